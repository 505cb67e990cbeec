"""The verdict record and the triage table.

The table is TRACE's (arXiv 2511.02623, stage 1), with c_w and c_l the compliance of the old
chosen and old rejected response under the new policy:

    c_w  c_l   category
    0    1     invert    the old winner now violates and the old loser complies
    0    0     suppress  both violate
    1    any   retain    the old winner still complies

A pair whose compliance could not be decided (a judge failed, a backend errored) is `error`,
never a silent "complies".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping


class Category(str, enum.Enum):
    """What training does with a pair."""

    INVERT = "invert"
    SUPPRESS = "suppress"
    RETAIN = "retain"
    ERROR = "error"


def categorize(chosen_complies: bool | None, rejected_complies: bool | None) -> Category:
    """Apply the triage table; `None` means compliance could not be decided.

    An undecided chosen response gives `error`. An undecided rejected response only matters
    when the chosen one violates, since a complying chosen response retains the pair whatever
    the rejected one does.
    """
    if chosen_complies is None:
        return Category.ERROR
    if chosen_complies:
        return Category.RETAIN
    if rejected_complies is None:
        return Category.ERROR
    return Category.INVERT if rejected_complies else Category.SUPPRESS


@dataclass(frozen=True, slots=True)
class Verdict:
    """The triage result for one pair.

    Attributes:
        pair_id: the `PreferencePair.id` it belongs to.
        category: invert, suppress, retain or error.
        chosen_complies: whether the old chosen response complies with the new policy
            (`None` when undecided).
        rejected_complies: the same for the old rejected response.
        chosen_rules: ids of the violation rules that fired on the chosen response.
        rejected_rules: ids of the violation rules that fired on the rejected response.
        policy_hash: content hash of the compiled policy that made the verdict.
        error: why the verdict is `error`, else `None`.
    """

    pair_id: str
    category: Category
    chosen_complies: bool | None
    rejected_complies: bool | None
    chosen_rules: tuple[str, ...] = ()
    rejected_rules: tuple[str, ...] = ()
    policy_hash: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the field names used in triage files."""
        return {
            "pair_id": self.pair_id,
            "category": self.category.value,
            "chosen_complies": self.chosen_complies,
            "rejected_complies": self.rejected_complies,
            "chosen_rules": list(self.chosen_rules),
            "rejected_rules": list(self.rejected_rules),
            "policy_hash": self.policy_hash,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "Verdict":
        """Rebuild a verdict written by `to_dict`."""
        return cls(
            pair_id=row["pair_id"],
            category=Category(row["category"]),
            chosen_complies=row.get("chosen_complies"),
            rejected_complies=row.get("rejected_complies"),
            chosen_rules=tuple(row.get("chosen_rules") or ()),
            rejected_rules=tuple(row.get("rejected_rules") or ()),
            policy_hash=row.get("policy_hash", ""),
            error=row.get("error"),
        )
