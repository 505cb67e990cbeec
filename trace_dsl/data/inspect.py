"""Summaries of the metadata fields that policies can test, for `trace data inspect`.

Policies address per-pair metadata as `pair.<name>` and per-response metadata as
`response.<name>`, where the response is the chosen or the rejected one being judged. The summary
uses the same names, so its output can be pasted into a policy.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from trace_dsl.data.formats.base import type_name
from trace_dsl.data.records import PreferencePair

# Longer string values are cut in the summary so one long text does not fill the table.
_MAX_VALUE_CHARS = 60


@dataclass(frozen=True, slots=True)
class FieldSummary:
    """Summary of one metadata field across a dataset.

    Attributes:
        name: the policy name of the field, `pair.<key>` or `response.<key>`.
        types: JSON type names seen (`string`, `number`, `boolean`, `array of string`, ...).
        present: how many pairs (for `pair.`) or responses (for `response.`) have the field.
        total: how many pairs or responses there are.
        distinct: distinct values (for arrays: distinct elements).
        top_values: the most frequent values (for arrays: elements) with their counts.
    """

    name: str
    types: tuple[str, ...]
    present: int
    total: int
    distinct: int
    top_values: tuple[tuple[Any, int], ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict."""
        return {
            "name": self.name,
            "types": list(self.types),
            "present": self.present,
            "total": self.total,
            "distinct": self.distinct,
            "top_values": [{"value": value, "count": count} for value, count in self.top_values],
        }


def _value_type(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = sorted({type_name(item) for item in value})
        return f"array of {'|'.join(inner)}" if inner else "array"
    return type_name(value)


def _hashable(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
        return value[: _MAX_VALUE_CHARS - 3] + "..."
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return value


class _FieldTally:
    def __init__(self) -> None:
        self.types: Counter[str] = Counter()
        self.values: Counter[Any] = Counter()
        self.present = 0

    def add(self, value: Any) -> None:
        self.present += 1
        self.types[_value_type(value)] += 1
        if isinstance(value, (list, tuple)):
            self.values.update(_hashable(item) for item in value)
        else:
            self.values[_hashable(value)] += 1


def _type_names(types: Counter[str]) -> tuple[str, ...]:
    names = [name for name, _ in types.most_common()]
    # An empty list has no element type; it adds nothing when other lists show the element type.
    if "array" in names and any(name.startswith("array of ") for name in names):
        names.remove("array")
    return tuple(names)


def _summarise(prefix: str, records: Iterable[Mapping[str, Any]], top: int) -> list[FieldSummary]:
    tallies: dict[str, _FieldTally] = {}
    total = 0
    for record in records:
        total += 1
        for key, value in record.items():
            tallies.setdefault(key, _FieldTally()).add(value)
    return [
        FieldSummary(
            name=f"{prefix}.{key}",
            types=_type_names(tally.types),
            present=tally.present,
            total=total,
            distinct=len(tally.values),
            top_values=tuple(tally.values.most_common(top)),
        )
        for key, tally in sorted(tallies.items())
    ]


def summarise_metadata(pairs: Iterable[PreferencePair], *, top: int = 5) -> list[FieldSummary]:
    """Summarise every metadata field of `pairs`: pair fields first, then response fields.

    Response fields pool the chosen and the rejected response of every pair, because a policy rule
    judges each response in turn.
    """
    pairs = list(pairs)
    pair_fields = _summarise("pair", (pair.metadata for pair in pairs), top)
    responses = [metadata for pair in pairs for metadata in (pair.chosen_metadata, pair.rejected_metadata)]
    return pair_fields + _summarise("response", responses, top)
