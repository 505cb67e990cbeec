"""Run a policy's example cases (`trace test`): triage each example pair and compare the category
and the deciding rules with what the example expects.

An example passes when its verdict has the expected category and every rule named after `by`
fired on the chosen response (for invert and suppress, the chosen response's violations are
what decide the pair). Rule coverage counts, per rule, the examples where it fired on either
response, so the report can list the rules no example exercises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from xml.etree import ElementTree

from trace_dsl.compiler.backends.base import PredicateBackend
from trace_dsl.compiler.policy import CompiledPolicy
from trace_dsl.data.records import PreferencePair
from trace_dsl.lang import nodes as n
from trace_dsl.lang.checker import literal_value
from trace_dsl.triage.engine import triage
from trace_dsl.triage.verdict import Verdict

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ExampleResult:
    """One example case after triage.

    Attributes:
        title: the example's title.
        line: the line of `example` in the policy file.
        expected_category: the category after `expect`.
        expected_rules: the rules after `by`.
        verdict: the verdict the policy gave.
        passed: whether the category matches and every expected rule fired on chosen.
        message: what differs, empty when it passed.
    """

    title: str
    line: int
    expected_category: str
    expected_rules: tuple[str, ...]
    verdict: Verdict
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "title": self.title,
            "line": self.line,
            "passed": self.passed,
            "expected": {"category": self.expected_category, "rules": list(self.expected_rules)},
            "actual": {
                "category": self.verdict.category.value,
                "chosen_rules": list(self.verdict.chosen_rules),
                "rejected_rules": list(self.verdict.rejected_rules),
                "error": self.verdict.error,
            },
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class ExampleReport:
    """Every example of one policy and the rule coverage.

    Attributes:
        path: the policy file.
        policy_hash: its content hash.
        results: one per example, in file order.
        coverage: for each rule id, the number of examples where it fired on either response.
    """

    path: str
    policy_hash: str
    results: tuple[ExampleResult, ...]
    coverage: Mapping[str, int]

    @property
    def passed(self) -> bool:
        """Whether every example passed."""
        return all(result.passed for result in self.results)

    @property
    def failures(self) -> list[ExampleResult]:
        """The examples that failed."""
        return [result for result in self.results if not result.passed]

    def uncovered(self) -> list[str]:
        """Rule ids that no example made fire."""
        return [rule for rule, count in self.coverage.items() if count == 0]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with `schema_version`."""
        return {
            "schema_version": SCHEMA_VERSION,
            "policy": self.path,
            "policy_hash": self.policy_hash,
            "passed": self.passed,
            "examples": [result.to_dict() for result in self.results],
            "coverage": dict(self.coverage),
            "uncovered_rules": self.uncovered(),
        }


def example_pair(example: n.Example, source: str = "") -> PreferencePair:
    """Build the preference pair an example describes.

    `history` strings alternate user and assistant turns, starting with the user.
    """
    prompt = example.first("prompt")
    chosen = example.first("chosen")
    rejected = example.first("rejected")
    pair_meta = example.first("pair")
    turns = example.first("history") or ()
    history = tuple(
        {"role": "user" if index % 2 == 0 else "assistant", "content": turn.value} for index, turn in enumerate(turns)
    )

    def metadata(node: n.MapLit | None) -> dict[str, Any]:
        return literal_value(node) if node is not None else {}

    return PreferencePair.create(
        prompt.value,
        chosen.text.value,
        rejected.text.value,
        history=history,
        metadata=metadata(pair_meta),
        chosen_metadata=metadata(chosen.metadata),
        rejected_metadata=metadata(rejected.metadata),
        source=source,
    )


def run_examples(
    policy: CompiledPolicy,
    *,
    cache=None,
    backends: Mapping[str, PredicateBackend] | None = None,
    progress: bool = False,
) -> ExampleReport:
    """Triage every example case of a policy and compare with its expectations.

    Args:
        policy: the compiled policy; its examples come from the policy file.
        cache: result cache for expensive predicates, or `None`.
        backends: ready backends by predicate name, passed to `triage`.
        progress: draw progress bars on stderr.
    """
    examples = list(policy.program.examples)
    pairs = [example_pair(example, f"{policy.path}:{example.line}") for example in examples]
    verdicts = triage(policy, pairs, cache=cache, progress=progress, backends=backends)
    coverage = {rule_id: 0 for rule_id in policy.rule_ids}
    results = []
    for example, verdict in zip(examples, verdicts):
        for rule_id in set(verdict.chosen_rules) | set(verdict.rejected_rules):
            coverage[rule_id] += 1
        expectation: n.Expectation = example.first("expect")
        problems = []
        if verdict.category.value != expectation.category:
            problems.append(f"expected {expectation.category}, got {verdict.category.value}")
        missing = [rule for rule in expectation.rules if rule not in verdict.chosen_rules]
        if missing:
            fired = ", ".join(verdict.chosen_rules) or "none"
            problems.append(f"expected {', '.join(missing)} to fire on chosen (fired: {fired})")
        if verdict.error:
            problems.append(f"error: {verdict.error}")
        results.append(
            ExampleResult(
                title=example.title.value,
                line=example.line,
                expected_category=expectation.category,
                expected_rules=expectation.rules,
                verdict=verdict,
                passed=not problems,
                message="; ".join(problems),
            )
        )
    return ExampleReport(policy.path, policy.hash, tuple(results), coverage)


def junit_xml(reports: list[ExampleReport], errors: Mapping[str, str] | None = None) -> str:
    """Render the reports as a JUnit XML document: one test suite per policy, one test case per example.

    `errors` maps each policy file that could not be loaded to the message why; each becomes a
    suite with one errored case, so a CI that reads only this file still sees it.
    """
    root = ElementTree.Element("testsuites")
    for path, message in (errors or {}).items():
        suite = ElementTree.SubElement(root, "testsuite", name=path, tests="1", failures="0", errors="1")
        case = ElementTree.SubElement(suite, "testcase", classname=path, name="load the policy")
        error = ElementTree.SubElement(case, "error", message=message.splitlines()[0])
        error.text = message
    for report in reports:
        suite = ElementTree.SubElement(
            root,
            "testsuite",
            name=report.path,
            tests=str(len(report.results)),
            failures=str(len(report.failures)),
        )
        for result in report.results:
            case = ElementTree.SubElement(suite, "testcase", classname=report.path, name=result.title)
            if not result.passed:
                failure = ElementTree.SubElement(case, "failure", message=result.message)
                failure.text = f"{report.path}:{result.line}: {result.message}"
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
