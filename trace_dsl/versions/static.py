"""The static half of a policy diff: which rules and predicates were added, removed or changed.

Two compiled policies are compared by id. A rule or predicate counts as changed when its
canonical definition differs, so re-formatting, re-ordering or editing comments changes nothing
here. A rule whose own text is unchanged but which uses a changed predicate is listed as
affected, because its verdicts can move too.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class ChangeKind(str, enum.Enum):
    """How one rule or predicate differs between the old and the new version."""

    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"
    AFFECTED = "affected"


@dataclass(frozen=True, slots=True)
class Definition:
    """One rule or predicate of a compiled policy, as the diff sees it.

    Attributes:
        element: 'rule' or 'predicate'.
        id: the rule id or predicate name.
        title: the rule's title (empty for predicates).
        text: the canonical definition.
        uses: the predicate names the definition refers to.
    """

    element: str
    id: str
    title: str
    text: str
    uses: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Change:
    """One added, removed, changed or affected rule or predicate.

    Attributes:
        element: 'rule' or 'predicate'.
        id: the rule id or predicate name.
        kind: added, removed, changed or affected.
        title: the rule title in the new version (the old one when removed).
        old: the old canonical definition, `None` when added.
        new: the new canonical definition, `None` when removed.
        because: for an affected rule, the changed predicates it uses.
        old_title: the old rule title when the title changed, else empty.
    """

    element: str
    id: str
    kind: ChangeKind
    title: str = ""
    old: str | None = None
    new: str | None = None
    because: tuple[str, ...] = ()
    old_title: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "element": self.element,
            "id": self.id,
            "kind": self.kind.value,
            "title": self.title,
            "old": self.old,
            "new": self.new,
            "because": list(self.because),
            "old_title": self.old_title,
        }


@dataclass(frozen=True, slots=True)
class StaticDiff:
    """Every difference between two policy versions, rules first, then predicates.

    Attributes:
        old_hash: content hash of the old compiled policy.
        new_hash: content hash of the new compiled policy.
        changes: one entry per rule or predicate that differs, sorted by element and id.
        header: header fields (name, version, description) that differ, as `{field: [old, new]}`.
    """

    old_hash: str
    new_hash: str
    changes: tuple[Change, ...]
    header: Mapping[str, tuple[str, str]]

    @property
    def identical(self) -> bool:
        """Whether the two versions compile to the same policy."""
        return self.old_hash == self.new_hash

    def of(self, element: str, kind: ChangeKind | None = None) -> list[Change]:
        """Return the changes of one element ('rule' or 'predicate'), optionally of one kind."""
        return [c for c in self.changes if c.element == element and (kind is None or c.kind is kind)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: hashes, header changes, and the changes by element."""
        return {
            "old_hash": self.old_hash,
            "new_hash": self.new_hash,
            "identical": self.identical,
            "header": {k: list(v) for k, v in self.header.items()},
            "rules": [c.to_dict() for c in self.of("rule")],
            "predicates": [c.to_dict() for c in self.of("predicate")],
        }


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTED = re.compile(r'"([^"\\]|\\.)*"|/([^/\\\n]|\\.)+/[imsx]*')


def referenced_names(text: str, names: Iterable[str]) -> frozenset[str]:
    """Return which of `names` appear as identifiers in a definition, outside strings and regexes."""
    bare = _QUOTED.sub(" ", text)
    wanted = set(names)
    return frozenset(token for token in _IDENTIFIER.findall(bare) if token in wanted)


def _compare(element: str, old: Mapping[str, Definition], new: Mapping[str, Definition]) -> list[Change]:
    changes: list[Change] = []
    for ident in sorted(old.keys() | new.keys()):
        before, after = old.get(ident), new.get(ident)
        if before is None and after is not None:
            changes.append(Change(element, ident, ChangeKind.ADDED, after.title, None, after.text))
        elif after is None and before is not None:
            changes.append(Change(element, ident, ChangeKind.REMOVED, before.title, before.text, None))
        elif before is not None and after is not None and (before.text != after.text or before.title != after.title):
            # A new title alone changes no verdict, but a reviewer should still see it.
            old_title = before.title if before.title != after.title else ""
            changes.append(
                Change(element, ident, ChangeKind.CHANGED, after.title, before.text, after.text, old_title=old_title)
            )
    return changes


def _dependents(
    definitions: Mapping[str, Definition], predicates: Mapping[str, Definition], changed: set[str]
) -> dict[str, tuple[str, ...]]:
    """Map each definition to the changed predicates it reaches through predicate references."""
    reached: dict[str, tuple[str, ...]] = {}
    for ident, definition in definitions.items():
        seen: set[str] = set()
        stack = list(definition.uses)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            stack.extend(predicates[name].uses if name in predicates else ())
        hits = tuple(sorted(seen & changed))
        if hits:
            reached[ident] = hits
    return reached


def diff_definitions(
    old_rules: Mapping[str, Definition],
    new_rules: Mapping[str, Definition],
    old_predicates: Mapping[str, Definition],
    new_predicates: Mapping[str, Definition],
    *,
    old_hash: str,
    new_hash: str,
    header: Mapping[str, tuple[str, str]] | None = None,
) -> StaticDiff:
    """Compare two versions' rules and predicates by id.

    Predicates that are added, removed or changed make every rule (and predicate) that uses
    them, directly or through other predicates, `affected` unless it is itself listed.
    """
    predicate_changes = _compare("predicate", old_predicates, new_predicates)
    rule_changes = _compare("rule", old_rules, new_rules)
    moved = {c.id for c in predicate_changes}

    listed_predicates = {c.id for c in predicate_changes}
    for ident, because in sorted(_dependents(new_predicates, new_predicates, moved).items()):
        if ident not in listed_predicates:
            predicate_changes.append(Change("predicate", ident, ChangeKind.AFFECTED, "", None, None, because))
    listed_rules = {c.id for c in rule_changes}
    for ident, because in sorted(_dependents(new_rules, new_predicates, moved).items()):
        if ident not in listed_rules:
            rule_changes.append(Change("rule", ident, ChangeKind.AFFECTED, new_rules[ident].title, None, None, because))

    def order(change: Change) -> tuple[int, str]:
        return (0 if change.element == "rule" else 1, change.id)

    return StaticDiff(
        old_hash=old_hash,
        new_hash=new_hash,
        changes=tuple(sorted(rule_changes + predicate_changes, key=order)),
        header=dict(header or {}),
    )
