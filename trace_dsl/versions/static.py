"""The static half of a policy diff: which rules, predicates and `let` values were added,
removed or changed.

Two compiled policies are compared by id. A rule or predicate counts as changed when its
canonical definition differs, so re-formatting, re-ordering or editing comments changes nothing
here. A rule whose own text is unchanged but which uses a changed predicate is listed as
affected, because its verdicts can move too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from trace_dsl.compiler.policy import CompiledPolicy, PolicyElement


class ChangeKind(str, enum.Enum):
    """Kind of difference of one rule, predicate or `let` value between two versions."""

    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"
    AFFECTED = "affected"


@dataclass(frozen=True, slots=True)
class Change:
    """One added, removed, changed or affected rule or predicate.

    Attributes:
        element: 'rule', 'predicate' or 'let'.
        id: the rule id, predicate name or `let` name.
        kind: added, removed, changed or affected.
        title: the rule title in the new version (the old one when removed).
        old: the old canonical definition, `None` when added.
        new: the new canonical definition, `None` when removed.
        because: for an affected rule or predicate, the changed names it uses.
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
        """Return the fields as a JSON-ready dict."""
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
    """Every difference between two policy versions: rules, then predicates, then `let` values.

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
        """Return the changes of one element ('rule', 'predicate' or 'let'), optionally of one kind."""
        return [c for c in self.changes if c.element == element and (kind is None or c.kind is kind)]

    def to_dict(self) -> dict[str, Any]:
        """Return hashes, header changes and the changes by element as a JSON-ready dict."""
        return {
            "old_hash": self.old_hash,
            "new_hash": self.new_hash,
            "identical": self.identical,
            "header": {k: list(v) for k, v in self.header.items()},
            "rules": [c.to_dict() for c in self.of("rule")],
            "predicates": [c.to_dict() for c in self.of("predicate")],
            "lets": [c.to_dict() for c in self.of("let")],
        }


def _compare(old: Mapping[tuple[str, str], PolicyElement], new: Mapping[tuple[str, str], PolicyElement]) -> list[Change]:
    changes: list[Change] = []
    for element, ident in sorted(old.keys() | new.keys()):
        before, after = old.get((element, ident)), new.get((element, ident))
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


def _reached(definition: PolicyElement, named: Mapping[str, PolicyElement], changed: set[str]) -> tuple[str, ...]:
    """Return the changed names a definition reaches through predicate and `let` references."""
    seen: set[str] = set()
    stack = list(definition.uses)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in named:
            stack.extend(named[name].uses)
    return tuple(sorted(seen & changed))


ELEMENT_ORDER = {"rule": 0, "predicate": 1, "let": 2}


def diff_elements(
    old: Iterable[PolicyElement],
    new: Iterable[PolicyElement],
    *,
    old_hash: str,
    new_hash: str,
    header: Mapping[str, tuple[str, str]] | None = None,
) -> StaticDiff:
    """Compare two versions' rules, predicates and `let` values by element and id.

    A predicate or `let` value that is added, removed or changed makes every rule and predicate
    that uses it, directly or through other predicates, `affected` unless that one is itself
    listed.
    """
    old_by_key = {(d.element, d.id): d for d in old}
    new_by_key = {(d.element, d.id): d for d in new}
    changes = _compare(old_by_key, new_by_key)

    # Rules are referenced by no one, so only predicate and `let` names propagate a change.
    named = {d.id: d for d in new_by_key.values() if d.element != "rule"}
    changed_names = {c.id for c in changes if c.element != "rule" and (c.old != c.new)}
    listed = {(c.element, c.id) for c in changes}
    for key, definition in sorted(new_by_key.items()):
        if key in listed or definition.element == "let":
            continue
        because = _reached(definition, named, changed_names)
        if because:
            changes.append(Change(definition.element, definition.id, ChangeKind.AFFECTED, definition.title, because=because))

    changes.sort(key=lambda c: (ELEMENT_ORDER.get(c.element, 3), c.id))
    return StaticDiff(old_hash=old_hash, new_hash=new_hash, changes=tuple(changes), header=dict(header or {}))


def static_diff(old: CompiledPolicy, new: CompiledPolicy) -> StaticDiff:
    """Compare two compiled policies: header, rules, predicates and `let` values."""
    header = {}
    for name in ("name", "version", "description"):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            header[name] = (before, after)
    return diff_elements(
        old.elements().values(), new.elements().values(), old_hash=old.hash, new_hash=new.hash, header=header
    )
