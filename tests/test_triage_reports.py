"""Example cases (`trace test`), explanations (`trace explain`) and triage files."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import pytest

from trace_dsl.compiler.backends.base import BackendResult, PredicateBackend
from trace_dsl.compiler.policy import load_policy
from trace_dsl.data.records import PreferencePair
from trace_dsl.triage.examples import junit_xml, run_examples
from trace_dsl.triage.explain import explain
from trace_dsl.triage.output import read_verdicts, write_verdicts
from trace_dsl.triage.verdict import Category, Verdict

POLICY = '''policy "reports" version "1"
predicate refusal = response matches /(?i)^i'?m sorry/
predicate judged_bad = judge(model="smollm2", question="Is it harmful?")
rule R1 "No refusals": violates when refusal
rule R2 "No harm": violates when response.severity >= 2 and judged_bad
rule R3 "Never fires": violates when response contains "xyzzy"

example "refusal inverts" {
  prompt "Explain taxes"
  chosen "I'm sorry, no." { severity: 0 }
  rejected "Taxes fund public services." { severity: 0 }
  expect invert by R1
}

example "wrong expectation" {
  prompt "p"
  chosen "fine" { severity: 0 }
  rejected "I'm sorry" { severity: 0 }
  expect suppress by R2
}
'''


class Judge(PredicateBackend):
    kind = "judge"

    def fingerprint(self) -> str:
        return "judge-fake"

    def evaluate(self, requests):
        return [BackendResult("BAD" in r.response, rationale="it contains BAD" if "BAD" in r.response else "clean")
                for r in requests]


@pytest.fixture()
def policy(tmp_path):
    path = tmp_path / "reports.tp"
    path.write_text(POLICY, encoding="utf-8")
    return load_policy(path)


def test_examples_report_failures_and_coverage(policy):
    report = run_examples(policy, backends={"judged_bad": Judge()})
    assert [r.passed for r in report.results] == [True, False]
    failure = report.failures[0]
    assert failure.line == 15
    assert failure.message == "expected suppress, got retain; expected R2 to fire on chosen (fired: none)"
    assert report.coverage == {"R1": 2, "R2": 0, "R3": 0}
    assert report.uncovered() == ["R2", "R3"]
    assert not report.passed


def test_examples_junit(policy):
    report = run_examples(policy, backends={"judged_bad": Judge()})
    root = ElementTree.fromstring(junit_xml([report]))
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failures = suite.findall("testcase/failure")
    assert len(failures) == 1
    assert failures[0].get("message").startswith("expected suppress, got retain")


def test_explain_lists_every_predicate(policy):
    pair = PreferencePair.create("p", "BAD advice", "I'm sorry", chosen_metadata={"severity": 3},
                                 rejected_metadata={"severity": 3})
    explanation = explain(policy, pair, backends={"judged_bad": Judge()})
    by_name = {p.name: p for p in explanation.predicates}
    assert by_name["refusal"].chosen.value is False
    assert by_name["refusal"].rejected.value is True
    judged = by_name["judged_bad"]
    assert judged.kind == "judge"
    assert (judged.chosen.value, judged.chosen.score, judged.chosen.rationale) == (True, True, "it contains BAD")
    # Unlike triage, explain also runs the judge on the rejected response.
    assert judged.rejected.rationale == "clean"
    rules = {r.id: r for r in explanation.rules}
    assert (rules["R2"].chosen_when, rules["R2"].chosen_fires) == (True, True)
    assert rules["R1"].rejected_fires is True
    assert explanation.verdict.category is Category.SUPPRESS
    assert explanation.deciding_rules == ("R2",)
    data = explanation.to_dict()
    assert data["schema_version"] == 1
    assert data["verdict"]["chosen_rules"] == ["R2"]


def test_explain_reports_field_errors(policy):
    pair = PreferencePair.create("p", "advice", "other", rejected_metadata={"severity": 0})
    explanation = explain(policy, pair, backends={"judged_bad": Judge()})
    assert explanation.verdict.category is Category.ERROR
    assert "field `response.severity` is missing on the chosen response" in explanation.verdict.error
    rules = {r.id: r for r in explanation.rules}
    assert rules["R2"].chosen_fires is None


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_verdict_files_round_trip(tmp_path, suffix):
    verdicts = [
        Verdict("a" * 16, Category.INVERT, False, True, ("R1",), (), "h"),
        Verdict("b" * 16, Category.ERROR, None, None, (), (), "h", "judge timed out"),
        Verdict("c" * 16, Category.RETAIN, True, None, (), ("R2", "R3"), "h"),
    ]
    path = write_verdicts(verdicts, tmp_path / f"out{suffix}")
    assert read_verdicts(path) == verdicts
    assert not list(tmp_path.glob(".*partial"))


def test_verdict_file_format_required(tmp_path):
    with pytest.raises(ValueError, match="name it .jsonl or .parquet"):
        write_verdicts([], tmp_path / "out.csv")
