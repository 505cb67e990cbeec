"""Triage: decide every pair's category under a compiled policy, calling models only where needed.

The run has two phases.

1. Cheap phase: every response goes through the cheap rules (one generated function) and the
   rules with expensive predicates in three-valued logic, where an expensive predicate is
   unknown. Most responses are decided here.
2. Rounds: while some needed response is undecided, the engine takes the cheapest expensive
   predicate (by kind, then declaration order) that an undecided response waits for. It
   evaluates that predicate in one batch through the result cache, for exactly the responses
   waiting for it, and decides them again.

A rejected response is needed only once its chosen response is known to violate: a chosen
response that complies makes the pair `retain` whatever the rejected one does, so the rejected
response's expensive predicates are then never run (its `rejected_complies` stays `None` unless
the cheap rules decided it). A backend failure leaves its responses undecided, and a pair whose
category depends on an undecided response gets an `error` verdict naming the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.evaluator import ResponseContext, history_text
from trace_dsl.compiler.policy import CompiledPolicy, ModelPredicate, ResponseOutcome
from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import TraceError
from trace_dsl.triage.verdict import Category, Verdict, categorize

logger = logging.getLogger(__name__)

BackendFactory = Callable[[ModelPredicate], PredicateBackend]


def _default_factory(model: ModelPredicate) -> PredicateBackend:
    from trace_dsl.compiler.backends.registry import create_backend

    return create_backend(model.kind, model.options)


def response_contexts(pair: PreferencePair) -> tuple[ResponseContext, ResponseContext]:
    """Build the contexts the tests read for a pair's chosen and rejected responses."""
    history = history_text(pair.history)
    return (
        ResponseContext("chosen", pair.prompt, pair.chosen, history, pair.chosen_metadata, pair.metadata),
        ResponseContext("rejected", pair.prompt, pair.rejected, history, pair.rejected_metadata, pair.metadata),
    )


@dataclass
class _State:
    ctx: ResponseContext
    outcome: ResponseOutcome
    errors: list[str] = field(default_factory=list)


class _Backends:
    """Backends created on first use, one per expensive predicate, closed at the end."""

    def __init__(self, factory: BackendFactory, given: Mapping[str, PredicateBackend]) -> None:
        self.factory = factory
        self.given = dict(given)
        self.created: dict[str, PredicateBackend] = {}

    def get(self, model: ModelPredicate) -> PredicateBackend:
        if model.name in self.given:
            return self.given[model.name]
        if model.name not in self.created:
            self.created[model.name] = self.factory(model)
        return self.created[model.name]

    def close(self) -> None:
        for backend in self.created.values():
            try:
                backend.close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide the triage result
                logger.warning("closing backend %s failed: %s", type(backend).__name__, exc)


def evaluate_model(
    model: ModelPredicate,
    contexts: Sequence[ResponseContext],
    backend: PredicateBackend,
    cache,
    *,
    progress: bool,
    batch_size: int,
) -> list[BackendResult]:
    """Run one expensive predicate on several responses through the cache, in batches."""
    from trace_dsl.triage.cached_eval import evaluate_cached

    requests = [
        BackendRequest(ctx.prompt, ctx.prompt if model.subject == "prompt" else ctx.response)
        for ctx in contexts
    ]
    try:
        return evaluate_cached(
            backend, cache, model.definition, requests,
            batch_size=batch_size, progress=progress, description=f"{model.kind} {model.name}",
        )
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - a backend bug becomes error verdicts, not a crash
        logger.warning("predicate %s failed on a batch of %d: %s", model.name, len(contexts), exc)
        reason = f"{type(exc).__name__}: {exc}"
        return [BackendResult(None, error=reason) for _ in contexts]


def triage(
    policy: CompiledPolicy,
    pairs: Iterable[PreferencePair],
    *,
    cache=None,
    progress: bool = True,
    backends: Mapping[str, PredicateBackend] | None = None,
    backend_factory: BackendFactory | None = None,
    batch_size: int = 16,
) -> list[Verdict]:
    """Triage preference pairs under a policy: one verdict per pair, in order.

    Args:
        policy: from `trace_dsl.compiler.load_policy`.
        pairs: the old-policy preference pairs.
        cache: a `trace_dsl.triage.cache.ResultCache` for expensive predicates, or `None`.
        progress: draw progress bars on stderr.
        backends: ready backends by predicate name, used instead of creating them (tests,
            callers that hold loaded models).
        backend_factory: builds the backend of an expensive predicate (default: the registry's
            `create_backend`, which loads the model on first use).
        batch_size: requests per backend call and per cache write.

    Returns:
        A `Verdict` per pair. `chosen_rules` and `rejected_rules` list the rules known to fire;
        a rule whose expensive predicates were skipped because the outcome was already decided
        is not listed.

    Raises:
        JudgeError: a backend cannot be created (its model is missing, options invalid).
    """
    pairs = list(pairs)
    if not policy.models:
        return _triage_rules_only(policy, pairs, progress)
    states: list[tuple[_State, _State]] = []
    classifier = policy.classifier
    with _bar(progress and len(pairs) >= 2000) as bar:
        task = bar.add_task("triage (rules)", total=len(pairs))
        for index, pair in enumerate(pairs):
            chosen_ctx, rejected_ctx = response_contexts(pair)
            chosen = _State(chosen_ctx, classifier.classify(chosen_ctx))
            rejected = _State(rejected_ctx, classifier.classify(rejected_ctx))
            states.append((chosen, rejected))
            if index % 1000 == 999:
                bar.advance(task, 1000)
        bar.update(task, completed=len(pairs))

    if policy.models:
        _run_rounds(policy, states, cache, progress, backends or {}, backend_factory or _default_factory, batch_size)
    return [_verdict(pair, chosen, rejected, policy.hash) for pair, (chosen, rejected) in zip(pairs, states)]


def _triage_rules_only(policy: CompiledPolicy, pairs: list[PreferencePair], progress: bool) -> list[Verdict]:
    """Triage with a policy without expensive predicates: one generated-function call per response.

    A response the function cannot evaluate (a missing field) goes through the full classifier,
    which names the problem in the verdict.
    """
    rules = policy.classifier.cheap_function
    verdicts = []
    with _bar(progress and len(pairs) >= 2000) as bar:
        task = bar.add_task("triage (rules)", total=len(pairs))
        for index, pair in enumerate(pairs):
            history = history_text(pair.history) if pair.history else ""
            try:
                chosen = tuple(rules(pair.prompt, pair.chosen, history, pair.chosen_metadata, pair.metadata))
                rejected = tuple(rules(pair.prompt, pair.rejected, history, pair.rejected_metadata, pair.metadata))
            except Exception:  # noqa: BLE001 - the classifier below reports what went wrong
                chosen_ctx, rejected_ctx = response_contexts(pair)
                verdicts.append(_verdict(pair, _State(chosen_ctx, policy.classifier.classify(chosen_ctx)),
                                         _State(rejected_ctx, policy.classifier.classify(rejected_ctx)), policy.hash))
            else:
                category = categorize(not chosen, not rejected)
                verdicts.append(Verdict(pair.id, category, not chosen, not rejected, chosen, rejected, policy.hash))
            if index % 1000 == 999:
                bar.advance(task, 1000)
        bar.update(task, completed=len(pairs))
    return verdicts


def _needed(states: list[tuple[_State, _State]]) -> list[_State]:
    needed = []
    for chosen, rejected in states:
        if chosen.outcome.complies is None and chosen.outcome.needed:
            needed.append(chosen)
        elif chosen.outcome.complies is False and rejected.outcome.complies is None and rejected.outcome.needed:
            needed.append(rejected)
    return needed


def _run_rounds(policy, states, cache, progress, given, factory, batch_size) -> None:
    backends = _Backends(factory, given)
    classifier = policy.classifier
    try:
        while True:
            waiting = _needed(states)
            if not waiting:
                return
            model = next(m for m in policy.models.values() if any(m.name in s.outcome.needed for s in waiting))
            batch = [s for s in waiting if model.name in s.outcome.needed]
            results = evaluate_model(model, [s.ctx for s in batch], backends.get(model), cache,
                                     progress=progress, batch_size=batch_size)
            for state, result in zip(batch, results):
                state.ctx.models[model.name] = result
                state.ctx.memo.clear()
                failure = model.test.failure(result)
                if failure is not None:
                    state.errors.append(f"predicate `{model.name}` ({model.kind}) failed on the {state.ctx.role} response: {failure}")
                state.outcome = classifier.classify(state.ctx)
    finally:
        backends.close()


def _verdict(pair: PreferencePair, chosen: _State, rejected: _State, policy_hash: str) -> Verdict:
    category = categorize(chosen.outcome.complies, rejected.outcome.complies)
    error = None
    if category is Category.ERROR:
        culprit = chosen if chosen.outcome.complies is None else rejected
        reasons = ([culprit.outcome.error] if culprit.outcome.error else []) + culprit.errors
        error = "; ".join(reasons) or f"the {culprit.ctx.role} response could not be decided"
    return Verdict(
        pair_id=pair.id,
        category=category,
        chosen_complies=chosen.outcome.complies,
        rejected_complies=rejected.outcome.complies,
        chosen_rules=chosen.outcome.fired,
        rejected_rules=rejected.outcome.fired,
        policy_hash=policy_hash,
        error=error,
    )


def _bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def summarize(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Count verdicts per category, every category present (zero when absent)."""
    counts = {category.value: 0 for category in Category}
    for verdict in verdicts:
        counts[verdict.category.value] += 1
    return counts
