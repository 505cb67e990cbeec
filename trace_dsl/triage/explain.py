"""Explain one pair's verdict (`trace explain`): every predicate's value on the chosen and the
rejected response, each model's score or yes/no result with its rationale, each rule's `when` and
`unless`, and the rules that decide the category.

Unlike `triage`, which skips expensive predicates that cannot change a verdict, `explain`
evaluates every predicate on both responses, so the report is complete. The category is the
same as triage's, because skipped predicates never change the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from trace_dsl.compiler.backends.base import BackendResult, PredicateBackend
from trace_dsl.compiler.evaluator import EvaluationError, ResponseContext
from trace_dsl.compiler.policy import CompiledPolicy
from trace_dsl.data.records import PreferencePair
from trace_dsl.triage.engine import BackendFactory, _Backends, _default_factory, evaluate_model, response_contexts
from trace_dsl.triage.verdict import Category, Verdict, categorize

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class PredicateValue:
    """A predicate on one response.

    Attributes:
        value: true, false, or `None` when it could not be decided.
        score: the model's raw result (a score or yes/no) for an expensive predicate, else `None`.
        rationale: the judge's words or the backend's explanation, when there are any.
        error: why it could not be decided, else `None`.
    """

    value: bool | None
    score: float | bool | None = None
    rationale: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"value": self.value, "score": self.score, "rationale": self.rationale, "error": self.error}


@dataclass(frozen=True, slots=True)
class PredicateExplanation:
    """One predicate on both responses.

    Attributes:
        name: the predicate name.
        kind: "cheap" for a test on text or metadata, else the backend kind (embedding, classifier, judge, plugin).
        definition: its canonical definition.
        chosen: its value on the chosen response.
        rejected: its value on the rejected response.
    """

    name: str
    kind: str
    definition: str
    chosen: PredicateValue
    rejected: PredicateValue

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "name": self.name,
            "kind": self.kind,
            "definition": self.definition,
            "chosen": self.chosen.to_dict(),
            "rejected": self.rejected.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class RuleExplanation:
    """One rule on both responses: its `when` and `unless` values and whether it fires.

    Each value is true, false or `None` (undecided); `unless` is `None` when the rule has none.
    """

    id: str
    title: str
    chosen_when: bool | None
    chosen_unless: bool | None
    chosen_fires: bool | None
    rejected_when: bool | None
    rejected_unless: bool | None
    rejected_fires: bool | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "id": self.id,
            "title": self.title,
            "chosen": {"when": self.chosen_when, "unless": self.chosen_unless, "fires": self.chosen_fires},
            "rejected": {"when": self.rejected_when, "unless": self.rejected_unless, "fires": self.rejected_fires},
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    """The evidence behind one pair's category.

    Attributes:
        pair: the pair explained.
        verdict: its verdict (with every rule that fires, expensive ones included).
        predicates: every predicate on both responses, in declaration order.
        rules: every rule on both responses, in rule order.
        deciding_rules: the rules that decide the category: the rules firing on the chosen
            response for invert and suppress, none for retain and error.
    """

    pair: PreferencePair
    verdict: Verdict
    predicates: tuple[PredicateExplanation, ...]
    rules: tuple[RuleExplanation, ...]
    deciding_rules: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with `schema_version`."""
        return {
            "schema_version": SCHEMA_VERSION,
            "pair_id": self.pair.id,
            "source": self.pair.source,
            "verdict": self.verdict.to_dict(),
            "deciding_rules": list(self.deciding_rules),
            "predicates": [p.to_dict() for p in self.predicates],
            "rules": [r.to_dict() for r in self.rules],
        }


def _predicate_value(policy: CompiledPolicy, name: str, ctx: ResponseContext) -> PredicateValue:
    model = policy.models.get(name)
    result: BackendResult | None = ctx.models.get(name) if model else None
    try:
        value = policy.classifier.evaluator.predicate(name, ctx)
    except EvaluationError as exc:
        return PredicateValue(None, error=str(exc))
    if result is None:
        return PredicateValue(value)
    return PredicateValue(value, result.value, result.rationale, model.test.failure(result))


def _rule_values(policy: CompiledPolicy, node, ctx: ResponseContext) -> tuple[bool | None, bool | None, bool | None]:
    evaluator = policy.classifier.evaluator
    try:
        when = evaluator.test(node.when, ctx)
        unless = evaluator.test(node.unless, ctx) if node.unless is not None else None
        fires = policy.classifier.rule_fires(node, ctx)
    except EvaluationError:
        return None, None, None
    return when, unless, fires


def explain(
    policy: CompiledPolicy,
    pair: PreferencePair,
    *,
    cache=None,
    backends: Mapping[str, PredicateBackend] | None = None,
    backend_factory: BackendFactory | None = None,
    progress: bool = False,
) -> Explanation:
    """Evaluate every predicate and rule of a policy on one pair.

    Args:
        policy: the compiled policy.
        pair: the pair to explain.
        cache: result cache for expensive predicates, or `None`.
        backends: ready backends by predicate name (tests, callers holding loaded models).
        backend_factory: builds a predicate's backend (default: the registry's `create_backend`).
        progress: draw progress bars on stderr while models run.

    Raises:
        JudgeError: a backend cannot be created.
    """
    chosen, rejected = response_contexts(pair)
    pool = _Backends(backend_factory or _default_factory, backends or {})
    try:
        for model in policy.models.values():
            results = evaluate_model(model, [chosen, rejected], pool.get(model), cache, progress=progress, batch_size=2)
            chosen.models[model.name], rejected.models[model.name] = results
    finally:
        pool.close()

    predicates = []
    for name, definition in policy.predicates.items():
        kind = policy.models[name].kind if name in policy.models else "cheap"
        predicates.append(
            PredicateExplanation(name, kind, definition, _predicate_value(policy, name, chosen),
                                 _predicate_value(policy, name, rejected))
        )
    rules = []
    for node, info in zip(policy.classifier.rule_nodes, policy.rules):
        rules.append(RuleExplanation(info.id, info.title, *_rule_values(policy, node, chosen),
                                     *_rule_values(policy, node, rejected)))

    chosen_outcome = policy.classifier.classify(chosen)
    rejected_outcome = policy.classifier.classify(rejected)
    category = categorize(chosen_outcome.complies, rejected_outcome.complies)
    error = None
    if category is Category.ERROR:
        culprit = chosen_outcome if chosen_outcome.complies is None else rejected_outcome
        failures = [p for p in predicates if (p.chosen if culprit is chosen_outcome else p.rejected).error]
        reasons = ([culprit.error] if culprit.error else []) + [
            f"predicate `{p.name}`: {(p.chosen if culprit is chosen_outcome else p.rejected).error}" for p in failures
        ]
        error = "; ".join(dict.fromkeys(reasons)) or "compliance could not be decided"
    verdict = Verdict(
        pair_id=pair.id,
        category=category,
        chosen_complies=chosen_outcome.complies,
        rejected_complies=rejected_outcome.complies,
        chosen_rules=chosen_outcome.fired,
        rejected_rules=rejected_outcome.fired,
        policy_hash=policy.hash,
        error=error,
    )
    deciding = chosen_outcome.fired if category in (Category.INVERT, Category.SUPPRESS) else ()
    return Explanation(pair, verdict, tuple(predicates), tuple(rules), deciding)
