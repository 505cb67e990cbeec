"""Flip matrices and transition samples over hand-written verdicts."""

from __future__ import annotations

import pytest

from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import TraceError
from trace_dsl.triage.verdict import Category, Verdict
from trace_dsl.versions.replay import flip_matrix, format_transition, parse_transition, sample_flips

I, S, R, E = Category.INVERT, Category.SUPPRESS, Category.RETAIN, Category.ERROR


def make_pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair.create(f"prompt {i}", f"chosen {i}", f"rejected {i}", source=f"data.jsonl:{i + 1}") for i in range(n)]


def verdict(pair: PreferencePair, category: Category, rules: tuple[str, ...] = ()) -> Verdict:
    complies = {I: (False, True), S: (False, False), R: (True, None), E: (None, None)}[category]
    return Verdict(pair.id, category, complies[0], complies[1], chosen_rules=rules)


# Six pairs; old and new categories chosen by hand:
#   pair 0: retain -> retain      pair 3: retain -> invert
#   pair 1: retain -> invert      pair 4: suppress -> retain
#   pair 2: invert -> invert      pair 5: retain -> error
OLD = [R, R, I, R, S, R]
NEW = [R, I, I, I, R, E]


@pytest.fixture
def pairs() -> list[PreferencePair]:
    return make_pairs(6)


def test_matrix_counts_by_hand(pairs):
    old = [verdict(p, c) for p, c in zip(pairs, OLD)]
    new = [verdict(p, c, ("r_new",) if c is I else ()) for p, c in zip(pairs, NEW)]
    matrix = flip_matrix(old, new)
    assert matrix.total == 6
    assert matrix.count(R, R) == 1
    assert matrix.count(R, I) == 2
    assert matrix.count(I, I) == 1
    assert matrix.count(S, R) == 1
    assert matrix.count(R, E) == 1
    assert matrix.count(I, R) == 0
    assert matrix.changed == 4
    assert matrix.share(R, I) == pytest.approx(2 / 6)
    assert matrix.old_total(R) == 4
    assert matrix.new_total(I) == 3
    assert matrix.transitions(changed_only=True) == [(S, R), (R, I), (R, E)]


def test_matrix_to_dict(pairs):
    old = [verdict(p, c) for p, c in zip(pairs, OLD)]
    new = [verdict(p, c) for p, c in zip(pairs, NEW)]
    data = flip_matrix(old, new).to_dict()
    assert data["changed"] == 4
    assert data["old_counts"] == {"invert": 1, "suppress": 1, "retain": 4, "error": 0}
    assert data["new_counts"] == {"invert": 3, "suppress": 0, "retain": 2, "error": 1}
    assert {"old": "retain", "new": "invert", "count": 2, "share": round(2 / 6, 6)} in data["transitions"]


def test_matrix_ignores_order(pairs):
    old = [verdict(p, c) for p, c in zip(pairs, OLD)]
    new = [verdict(p, c) for p, c in zip(pairs, NEW)]
    assert flip_matrix(old, list(reversed(new))).counts == flip_matrix(old, new).counts


def test_matrix_counts_duplicate_pairs_once(pairs):
    old = [verdict(p, c) for p, c in zip(pairs, OLD)]
    new = [verdict(p, c) for p, c in zip(pairs, NEW)]
    assert flip_matrix(old + old[:1], new).total == 6


def test_matrix_rejects_different_pairs(pairs):
    old = [verdict(p, R) for p in pairs]
    new = [verdict(p, R) for p in pairs[:5]]
    with pytest.raises(TraceError, match="1 only in the old, 0 only in the new"):
        flip_matrix(old, new)


def test_samples_per_transition_in_dataset_order(pairs):
    old = [verdict(p, c) for p, c in zip(pairs, OLD)]
    new = [verdict(p, c, ("r_new",) if c is I else ()) for p, c in zip(pairs, NEW)]
    samples = sample_flips(pairs, old, new, samples=1)
    assert list(samples) == [(S, R), (R, I), (R, E)]
    assert [s.index for s in samples[(R, I)]] == [1]
    assert samples[(R, I)][0].new.chosen_rules == ("r_new",)
    assert samples[(R, I)][0].old.chosen_rules == ()


def test_samples_limit_and_transition_filter(pairs):
    old = [verdict(p, c) for p, c in zip(pairs, OLD)]
    new = [verdict(p, c) for p, c in zip(pairs, NEW)]
    only = sample_flips(pairs, old, new, samples=5, transition=(R, I))
    assert list(only) == [(R, I)]
    assert [s.index for s in only[(R, I)]] == [1, 3]
    unchanged = sample_flips(pairs, old, new, samples=5, transition=(I, I))
    assert [s.index for s in unchanged[(I, I)]] == [2]
    assert sample_flips(pairs, old, new, samples=0) == {}


def test_sample_to_dict_cuts_text(pairs):
    long_pair = PreferencePair.create("p" * 1000, "c", "r")
    samples = sample_flips([long_pair], [verdict(long_pair, R)], [verdict(long_pair, I)], samples=1)
    data = samples[(R, I)][0].to_dict(max_chars=10)
    assert len(data["prompt"]) == 10
    assert data["old"]["category"] == "retain"
    assert data["new"]["category"] == "invert"


@pytest.mark.parametrize("text", ["retain:invert", " RETAIN:Invert "])
def test_parse_transition(text):
    assert parse_transition(text) == (R, I)
    assert format_transition(parse_transition(text)) == "retain:invert"


@pytest.mark.parametrize("text", ["retain", "retain:flip", "a:b:c"])
def test_parse_transition_rejects(text):
    with pytest.raises(TraceError, match="invalid transition"):
        parse_transition(text)
