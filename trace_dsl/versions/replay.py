"""The replay half of a policy diff: how verdicts move between two policy versions.

Verdicts of the old and the new policy are joined on the pair id (a content hash, so the join
needs no row numbers) into a flip matrix of categories, old by new, over invert, suppress, retain
and error. Sample pairs are drawn for each non-empty transition, with the rules that fired on
the chosen and rejected response under each version, so a reviewer can see why a pair moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import TraceError
from trace_dsl.triage.verdict import Category, Verdict

# Row and column order of every flip matrix: the three training categories, then error.
CATEGORIES: tuple[Category, ...] = (Category.INVERT, Category.SUPPRESS, Category.RETAIN, Category.ERROR)

Transition = tuple[Category, Category]


def parse_transition(text: str) -> Transition:
    """Parse `old:new`, for example `retain:invert`, into a pair of categories.

    Raises:
        TraceError: either side is not a category name.
    """
    names = ", ".join(c.value for c in CATEGORIES)
    parts = text.strip().lower().split(":")
    if len(parts) != 2:
        raise TraceError(f"invalid transition {text!r}: expected OLD:NEW", hint=f"for example retain:invert; categories: {names}")
    try:
        return Category(parts[0]), Category(parts[1])
    except ValueError:
        raise TraceError(f"invalid transition {text!r}: unknown category", hint=f"categories: {names}") from None


def format_transition(transition: Transition) -> str:
    """Write a transition as `old:new`, the form `parse_transition` reads."""
    return f"{transition[0].value}:{transition[1].value}"


@dataclass(frozen=True, slots=True)
class FlipMatrix:
    """Counts of pairs by (old category, new category).

    Attributes:
        counts: the number of pairs per transition; transitions with no pair are absent.
        total: the number of pairs replayed.
    """

    counts: Mapping[Transition, int]
    total: int

    def count(self, old: Category, new: Category) -> int:
        """Return the number of pairs that were `old` and are `new`."""
        return self.counts.get((old, new), 0)

    def share(self, old: Category, new: Category) -> float:
        """Return the fraction of all replayed pairs that were `old` and are `new` (0 when empty)."""
        return self.count(old, new) / self.total if self.total else 0.0

    def old_total(self, category: Category) -> int:
        """Return the number of pairs in `category` under the old policy (a row sum)."""
        return sum(self.count(category, new) for new in CATEGORIES)

    def new_total(self, category: Category) -> int:
        """Return the number of pairs in `category` under the new policy (a column sum)."""
        return sum(self.count(old, category) for old in CATEGORIES)

    @property
    def changed(self) -> int:
        """The number of pairs whose category differs between the versions."""
        return sum(n for (old, new), n in self.counts.items() if old != new)

    def transitions(self, *, changed_only: bool = False) -> list[Transition]:
        """Return the non-empty transitions in matrix order, optionally only those that change."""
        return [
            (old, new)
            for old in CATEGORIES
            for new in CATEGORIES
            if self.count(old, new) and (old != new or not changed_only)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Return totals and one entry per non-empty transition (count, share) as a JSON-ready dict."""
        return {
            "total": self.total,
            "changed": self.changed,
            "categories": [c.value for c in CATEGORIES],
            "old_counts": {c.value: self.old_total(c) for c in CATEGORIES},
            "new_counts": {c.value: self.new_total(c) for c in CATEGORIES},
            "transitions": [
                {"old": old.value, "new": new.value, "count": self.count(old, new), "share": round(self.share(old, new), 6)}
                for old, new in self.transitions()
            ],
        }


@dataclass(frozen=True, slots=True)
class FlipSample:
    """One pair whose verdict moved along a transition, with both verdicts.

    Attributes:
        index: the pair's position in the dataset (0-based), as `trace explain --pair` takes it.
        pair: the preference pair.
        old: its verdict under the old policy.
        new: its verdict under the new policy.
    """

    index: int
    pair: PreferencePair
    old: Verdict
    new: Verdict

    def to_dict(self, *, max_chars: int | None = 400) -> dict[str, Any]:
        """Return the sample as a JSON-ready dict, texts cut to `max_chars` characters (None keeps them whole)."""

        def cut(text: str) -> str:
            if max_chars is None or len(text) <= max_chars:
                return text
            return text[: max_chars - 1] + "…"

        return {
            "index": self.index,
            "pair_id": self.pair.id,
            "source": self.pair.source,
            "prompt": cut(self.pair.prompt),
            "chosen": cut(self.pair.chosen),
            "rejected": cut(self.pair.rejected),
            "old": _verdict_summary(self.old),
            "new": _verdict_summary(self.new),
        }


def _verdict_summary(verdict: Verdict) -> dict[str, Any]:
    return {
        "category": verdict.category.value,
        "chosen_complies": verdict.chosen_complies,
        "rejected_complies": verdict.rejected_complies,
        "chosen_rules": list(verdict.chosen_rules),
        "rejected_rules": list(verdict.rejected_rules),
        "error": verdict.error,
    }


def _index_verdicts(verdicts: Iterable[Verdict]) -> dict[str, Verdict]:
    by_id: dict[str, Verdict] = {}
    for verdict in verdicts:
        # Two identical pairs in one dataset share an id and get the same verdict, so the first
        # one stands for both.
        by_id.setdefault(verdict.pair_id, verdict)
    return by_id


def flip_matrix(old: Sequence[Verdict], new: Sequence[Verdict]) -> FlipMatrix:
    """Count pairs by (old category, new category), joining the two lists on pair id.

    Pairs with the same content share an id, and each distinct id is counted once.

    Raises:
        TraceError: the two lists do not cover the same pairs (they come from different data).
    """
    old_by_id = _index_verdicts(old)
    new_by_id = _index_verdicts(new)
    if old_by_id.keys() != new_by_id.keys():
        only_old = len(old_by_id.keys() - new_by_id.keys())
        only_new = len(new_by_id.keys() - old_by_id.keys())
        raise TraceError(
            f"the old and new verdicts cover different pairs ({only_old} only in the old, {only_new} only in the new)",
            hint="triage both policy versions over the same dataset",
        )
    counts: dict[Transition, int] = {}
    for pair_id, old_verdict in old_by_id.items():
        key = (old_verdict.category, new_by_id[pair_id].category)
        counts[key] = counts.get(key, 0) + 1
    return FlipMatrix(counts=counts, total=len(old_by_id))


def sample_flips(
    pairs: Sequence[PreferencePair],
    old: Sequence[Verdict],
    new: Sequence[Verdict],
    *,
    samples: int = 3,
    transition: Transition | None = None,
    include_unchanged: bool = False,
) -> dict[Transition, list[FlipSample]]:
    """Pick up to `samples` pairs per non-empty transition, in dataset order.

    Args:
        pairs: the dataset the verdicts were made on.
        old: verdicts of the old policy.
        new: verdicts of the new policy.
        samples: pairs per transition; 0 gives none.
        transition: keep only this (old, new) transition.
        include_unchanged: also sample transitions where the category stays the same; ignored
            when `transition` is given, which is always sampled.

    Returns:
        A dict from transition to its samples, in matrix order, without empty transitions.
    """
    old_by_id = _index_verdicts(old)
    new_by_id = _index_verdicts(new)
    chosen: dict[Transition, list[FlipSample]] = {}
    if samples <= 0:
        return chosen
    seen: set[str] = set()
    for index, pair in enumerate(pairs):
        if pair.id in seen or pair.id not in old_by_id or pair.id not in new_by_id:
            continue
        seen.add(pair.id)
        key = (old_by_id[pair.id].category, new_by_id[pair.id].category)
        if transition is not None and key != transition:
            continue
        if transition is None and key[0] == key[1] and not include_unchanged:
            continue
        bucket = chosen.setdefault(key, [])
        if len(bucket) < samples:
            bucket.append(FlipSample(index=index, pair=pair, old=old_by_id[pair.id], new=new_by_id[pair.id]))
    order = {(o, n): i for i, (o, n) in enumerate((o, n) for o in CATEGORIES for n in CATEGORIES)}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))
