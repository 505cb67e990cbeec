"""The triage engine against the triage table, with fake backends that count their calls to show
that an expensive predicate runs only where a verdict still depends on it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.policy import load_policy
from trace_dsl.data.records import PreferencePair
from trace_dsl.triage.cache import ResultCache
from trace_dsl.triage.engine import summarize, triage
from trace_dsl.triage.verdict import Category, categorize


class FakeBackend(PredicateBackend):
    """Answers from a function of the response text and records every batch it gets."""

    kind = "fake"

    def __init__(self, answer: Callable[[str], BackendResult]) -> None:
        self.answer = answer
        self.batches: list[list[str]] = []

    def fingerprint(self) -> str:
        return "fake-backend-1"

    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        self.batches.append([request.response for request in requests])
        return [self.answer(request.response) for request in requests]

    @property
    def seen(self) -> list[str]:
        return [text for batch in self.batches for text in batch]


def judge_answer(text: str) -> BackendResult:
    if "ERR" in text:
        return BackendResult(None, error="judge timed out after 3 retries")
    if "ODD" in text:
        return BackendResult(0.7, rationale="a number where yes/no was expected")
    return BackendResult("BAD" in text, rationale=f"judged {text!r}")


def score_answer(text: str) -> BackendResult:
    return BackendResult(0.9 if "similar" in text else 0.1)


def write_policy(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "policy.tp"
    path.write_text('policy "engine" version "1"\n' + body, encoding="utf-8")
    return path


JUDGE_ONLY = '''
predicate judged_bad = judge(model="smollm2", question="Is this response harmful?")
rule J1 "The judge says no": violates when judged_bad
'''

CHEAP_THEN_JUDGE = '''
predicate flagged = response.flagged
predicate judged_bad = judge(model="smollm2", question="Is this response harmful?")
rule R1 "Flagged responses the judge confirms": violates when flagged and judged_bad
rule R2 "Explicit slurs": violates when response contains "SLUR"
'''

EMBEDDING_THEN_JUDGE = '''
predicate similar = embedding(response, examples=["an unsafe answer"]) >= 0.5
predicate judged_bad = judge(model="smollm2", question="Is this response harmful?")
rule R1 "Close to unsafe examples and judged harmful": violates when similar and judged_bad
'''


def pair(chosen: str, rejected: str, chosen_flagged: bool = True, rejected_flagged: bool = True) -> PreferencePair:
    return PreferencePair.create(
        "a prompt",
        chosen,
        rejected,
        chosen_metadata={"flagged": chosen_flagged},
        rejected_metadata={"flagged": rejected_flagged},
    )


COMPLIANCE = {"ok": True, "BAD": False, "ERR": None}


@pytest.mark.parametrize("chosen", list(COMPLIANCE))
@pytest.mark.parametrize("rejected", list(COMPLIANCE))
def test_categories_follow_triage_table(tmp_path, chosen, rejected):
    policy = load_policy(write_policy(tmp_path, JUDGE_ONLY))
    judge = FakeBackend(judge_answer)
    (verdict,) = triage(policy, [pair(f"chosen {chosen}", f"rejected {rejected}")], progress=False,
                        backends={"judged_bad": judge})
    assert verdict.category is categorize(COMPLIANCE[chosen], COMPLIANCE[rejected])
    assert verdict.chosen_complies is COMPLIANCE[chosen]
    # The rejected response is judged only when the chosen one is known to violate.
    judged_rejected = any(text.startswith("rejected") for text in judge.seen)
    assert judged_rejected is (COMPLIANCE[chosen] is False)
    if verdict.category is Category.ERROR:
        assert "judge timed out after 3 retries" in verdict.error
        assert "`judged_bad`" in verdict.error
    else:
        assert verdict.error is None


def test_rules_listed_per_response(tmp_path):
    policy = load_policy(write_policy(tmp_path, CHEAP_THEN_JUDGE))
    judge = FakeBackend(judge_answer)
    (verdict,) = triage(policy, [pair("BAD SLUR", "BAD")], progress=False, backends={"judged_bad": judge})
    # Chosen violates through the cheap rule, so the judge is not needed for it at all.
    assert verdict.chosen_rules == ("R2",)
    assert verdict.rejected_rules == ("R1",)
    assert verdict.category is Category.SUPPRESS
    assert judge.seen == ["BAD"]


def test_judge_skipped_where_cheap_predicates_decide(tmp_path):
    policy = load_policy(write_policy(tmp_path, CHEAP_THEN_JUDGE))
    judge = FakeBackend(judge_answer)
    pairs = [
        pair("c0", "r0", chosen_flagged=False, rejected_flagged=False),  # nothing flagged
        pair("c1 BAD", "r1 BAD", chosen_flagged=False, rejected_flagged=True),  # chosen complies: retain
        pair("c2 SLUR", "r2", chosen_flagged=True, rejected_flagged=False),  # chosen violates cheaply
        pair("c3 BAD", "r3", chosen_flagged=True, rejected_flagged=True),  # judge both
        pair("c4", "r4", chosen_flagged=True, rejected_flagged=True),  # judge chosen only
    ]
    verdicts = triage(policy, pairs, progress=False, backends={"judged_bad": judge})
    assert [v.category for v in verdicts] == [
        Category.RETAIN, Category.RETAIN, Category.INVERT, Category.INVERT, Category.RETAIN,
    ]
    assert sorted(judge.seen) == ["c3 BAD", "c4", "r3"]
    # One batch for every chosen response that needs the judge, then one for the rejected ones.
    assert judge.batches == [["c3 BAD", "c4"], ["r3"]]
    assert verdicts[1].rejected_complies is None


def test_cheaper_model_first_and_judge_only_where_needed(tmp_path):
    policy = load_policy(write_policy(tmp_path, EMBEDDING_THEN_JUDGE))
    embedding = FakeBackend(score_answer)
    judge = FakeBackend(judge_answer)
    pairs = [pair("similar BAD", "plain"), pair("plain", "similar BAD"), pair("similar ok", "similar BAD")]
    verdicts = triage(policy, pairs, progress=False, backends={"similar": embedding, "judged_bad": judge})
    assert [v.category for v in verdicts] == [Category.INVERT, Category.RETAIN, Category.RETAIN]
    assert embedding.batches == [["similar BAD", "plain", "similar ok"], ["plain"]]
    assert judge.batches == [["similar BAD", "similar ok"]]


def test_out_of_format_answer_is_error(tmp_path):
    policy = load_policy(write_policy(tmp_path, JUDGE_ONLY))
    (verdict,) = triage(policy, [pair("ODD", "ok")], progress=False, backends={"judged_bad": FakeBackend(judge_answer)})
    assert verdict.category is Category.ERROR
    assert "expected a yes/no answer, got 0.7" in verdict.error


def test_backend_exception_becomes_error_verdicts(tmp_path):
    class Broken(FakeBackend):
        def evaluate(self, requests):
            raise RuntimeError("CUDA out of memory")

    policy = load_policy(write_policy(tmp_path, JUDGE_ONLY))
    verdicts = triage(policy, [pair("a", "b"), pair("c", "d")], progress=False,
                      backends={"judged_bad": Broken(judge_answer)})
    assert [v.category for v in verdicts] == [Category.ERROR, Category.ERROR]
    assert "CUDA out of memory" in verdicts[0].error


def test_short_result_list_becomes_error(tmp_path):
    class Short(FakeBackend):
        def evaluate(self, requests):
            return []

    policy = load_policy(write_policy(tmp_path, JUDGE_ONLY))
    (verdict,) = triage(policy, [pair("a", "b")], progress=False, backends={"judged_bad": Short(judge_answer)})
    assert verdict.category is Category.ERROR
    assert "returned 0 results for 1 requests" in verdict.error


def test_missing_field_is_error_verdict(tmp_path):
    policy = load_policy(write_policy(tmp_path, 'rule R1 "t": violates when response.severity_level >= 2\n'))
    verdicts = triage(policy, [PreferencePair.create("p", "c", "r", rejected_metadata={"severity_level": 3})],
                      progress=False)
    assert verdicts[0].category is Category.ERROR
    assert verdicts[0].error == "field `response.severity_level` is missing on the chosen response"
    assert verdicts[0].rejected_complies is False


def test_cache_makes_second_run_free(tmp_path):
    policy = load_policy(write_policy(tmp_path, JUDGE_ONLY))
    pairs = [pair(f"BAD {i}", f"fine {i}") for i in range(5)] + [pair("ERR", "fine")]
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        first_judge = FakeBackend(judge_answer)
        first = triage(policy, pairs, cache=cache, progress=False, backends={"judged_bad": first_judge})
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        second_judge = FakeBackend(judge_answer)
        second = triage(policy, pairs, cache=cache, progress=False, backends={"judged_bad": second_judge})
    assert first == second
    assert len(first_judge.seen) == 11
    # Only the failed result was not cached, so only it is asked again.
    assert second_judge.seen == ["ERR"]


def test_factory_builds_each_backend_once(tmp_path):
    policy = load_policy(write_policy(tmp_path, EMBEDDING_THEN_JUDGE))
    built = []

    def factory(model):
        built.append(model.name)
        return FakeBackend(score_answer if model.kind == "embedding" else judge_answer)

    triage(policy, [pair("similar BAD", "similar ok"), pair("similar x", "y")], progress=False, backend_factory=factory)
    assert built == ["similar", "judged_bad"]


def test_rule_only_policy_builds_no_backend(tmp_path):
    policy = load_policy(write_policy(tmp_path, 'rule R1 "t": violates when response contains "x"\n'))

    def factory(model):
        raise AssertionError("no backend should be built")

    verdicts = triage(policy, [pair("x", "y"), pair("y", "x")], progress=False, backend_factory=factory)
    assert summarize(verdicts) == {"invert": 1, "suppress": 0, "retain": 1, "error": 0}
    assert all(v.policy_hash == policy.hash for v in verdicts)
