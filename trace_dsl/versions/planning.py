"""`trace plan`: triage a policy version, count its cost, and write the plan `trace apply` trains.

Before any backend runs, a probe walks the same rounds as the triage engine but looks up each
expensive-predicate request in the result cache only. That gives, per predicate, how many
requests the cache already holds and how many a backend must evaluate. A request that misses the
cache leaves its response undecided in the probe, so requests that become necessary only after it
is answered (the rejected response of a pair whose chosen response may violate) are counted apart,
as `conditional`: the triage evaluates at most that many more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.policy import CompiledPolicy, ModelPredicate
from trace_dsl.data.records import PreferencePair
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.triage.cached_eval import request_keys
from trace_dsl.triage.engine import BackendFactory, response_contexts
from trace_dsl.triage.verdict import Category
from trace_dsl.versions.diff import default_backend_factory, load_policy_at, triage_with_work
from trace_dsl.versions.plan import Plan, category_counts, estimate_steps
from trace_dsl.versions.replay import flip_matrix

# Placeholder result for a request the probe did not evaluate: the evaluator treats an error
# result as unknown and stops asking for that predicate on that response.
_NOT_EVALUATED = BackendResult(None, error="not evaluated while planning")


@dataclass(frozen=True, slots=True)
class PredicateDemand:
    """The expensive-predicate requests a triage will make, counted before it runs.

    Attributes:
        predicate: the predicate name.
        kind: embedding, classifier, judge or plugin.
        cached: requests found in the result cache.
        needed: uncached requests a backend must evaluate. The probe counts them with every
            uncached answer unknown, so the triage asks fewer when an answer settles a response
            before a later predicate runs.
        conditional: further uncached requests, of rejected responses, needed only if uncached
            answers make their chosen response violate (an upper bound).
    """

    predicate: str
    kind: str
    cached: int
    needed: int
    conditional: int

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return {
            "predicate": self.predicate,
            "kind": self.kind,
            "cached": self.cached,
            "needed": self.needed,
            "conditional": self.conditional,
        }


def count_requests(
    policy: CompiledPolicy,
    pairs: Sequence[PreferencePair],
    backends: Mapping[str, PredicateBackend],
    cache: Any,
) -> list[PredicateDemand]:
    """Count, per expensive predicate, the requests a triage finds in the cache and must evaluate.

    The probe follows the engine's order (cheapest kind first, then declaration order) and its
    rule that a rejected response is needed only once its chosen response violates. No backend
    is called: only `fingerprint()`, to build the same cache keys as the triage.

    Args:
        policy: the compiled policy.
        pairs: the pairs the triage will run on.
        backends: a backend per expensive predicate name (for fingerprints).
        cache: the `ResultCache` the triage will use, or `None` (then nothing is cached).
    """
    classifier = policy.classifier
    states = []
    for pair in pairs:
        chosen_ctx, rejected_ctx = response_contexts(pair)
        states.append([chosen_ctx, classifier.classify(chosen_ctx), rejected_ctx, classifier.classify(rejected_ctx)])

    cached = {name: 0 for name in policy.models}
    needed = {name: 0 for name in policy.models}
    seen_keys: dict[str, set[str]] = {name: set() for name in policy.models}
    while True:
        waiting = []
        for state in states:
            chosen, rejected = state[1], state[3]
            if chosen.complies is None and chosen.needed:
                waiting.append((state, 0))
            elif chosen.complies is False and rejected.complies is None and rejected.needed:
                waiting.append((state, 2))
        if not waiting:
            break
        model = next(m for m in policy.models.values() if any(m.name in s[i + 1].needed for s, i in waiting))
        batch = [(s, i) for s, i in waiting if model.name in s[i + 1].needed]
        contexts = [s[i] for s, i in batch]
        keys = request_keys(backends[model.name], model.definition, _requests(model, contexts))
        found = cache.get_many(keys) if cache is not None else {}
        for (state, index), key in zip(batch, keys):
            ctx = state[index]
            if key in found:
                ctx.models[model.name] = found[key]
                if key not in seen_keys[model.name]:
                    cached[model.name] += 1
            else:
                ctx.models[model.name] = _NOT_EVALUATED
                if key not in seen_keys[model.name]:
                    needed[model.name] += 1
            # The engine evaluates each distinct text once per predicate, so count keys once.
            seen_keys[model.name].add(key)
            ctx.memo.clear()
            state[index + 1] = classifier.classify(ctx)

    conditional = _conditional_requests(policy, states, backends, cache)
    return [
        PredicateDemand(name, model.kind, cached[name], needed[name], conditional[name])
        for name, model in policy.models.items()
    ]


def _conditional_requests(
    policy: CompiledPolicy, states: list[list[Any]], backends: Mapping[str, PredicateBackend], cache: Any
) -> dict[str, int]:
    """Count the uncached requests of rejected responses that wait on an undecided chosen response."""
    waiting: dict[str, list[Any]] = {name: [] for name in policy.models}
    for chosen_ctx, chosen, rejected_ctx, rejected in states:
        pending = any(result is _NOT_EVALUATED for result in chosen_ctx.models.values())
        if chosen.complies is None and pending and rejected.complies is None:
            for name in rejected.needed:
                waiting[name].append(rejected_ctx)
    counts = {}
    for name, contexts in waiting.items():
        keys = set(request_keys(backends[name], policy.models[name].definition, _requests(policy.models[name], contexts)))
        found = cache.get_many(keys) if cache is not None and keys else {}
        counts[name] = len(keys) - len(found)
    return counts


def _requests(model: ModelPredicate, contexts: Sequence[Any]) -> list[BackendRequest]:
    """Build the backend requests the engine sends for these responses."""
    return [BackendRequest(c.prompt, c.prompt if model.subject == "prompt" else c.response) for c in contexts]


def build_plan(
    policy_ref: str,
    pairs: Sequence[PreferencePair],
    *,
    dataset: Mapping[str, Any],
    config: TrainingConfig,
    model: Mapping[str, Any] | None = None,
    previous_ref: str | None = None,
    cache: Any = None,
    progress: bool = True,
    backend_factory: BackendFactory | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Triage `pairs` with a policy version and build its plan.

    Args:
        policy_ref: the policy, `path` or `path@REV`.
        pairs: the preference pairs.
        dataset: `{"path", "hash", "pairs_hash", "pairs"}` of the data.
        config: the training configuration the steps are estimated for.
        model: the model identity from `trace_dsl.versions.plan.model_identity`, or `None`.
        previous_ref: a previous policy version to count flips against.
        cache: the `ResultCache` shared with `trace triage` and `trace diff`, or `None`.
        progress: draw progress bars on stderr.
        backend_factory: builds expensive-predicate backends (default: the registry).

    Returns:
        The plan, and the work done: `{"evaluated": {predicate: requests}, "cached": n,
        "seconds": s}` of the triage.
    """
    factory = backend_factory or default_backend_factory
    policy = load_policy_at(policy_ref)

    # One backend per predicate serves the probe's fingerprints and then the triage.
    backends = {name: factory(model_predicate) for name, model_predicate in policy.models.items()}
    try:
        demand = count_requests(policy, pairs, backends, cache)
        verdicts, work = triage_with_work(policy, pairs, cache=cache, progress=progress, backends=backends)
    finally:
        for backend in backends.values():
            backend.close()

    flips = None
    if previous_ref is not None:
        previous = load_policy_at(previous_ref)
        previous_verdicts, _ = triage_with_work(
            previous, pairs, cache=cache, progress=progress, backend_factory=backend_factory
        )
        matrix = flip_matrix(previous_verdicts, verdicts)
        flips = {"previous": {"ref": previous_ref, "hash": previous.hash}, **matrix.to_dict()}

    plan = Plan(
        policy={"ref": policy_ref, "hash": policy.hash, "name": policy.name, "version": policy.version},
        dataset=dict(dataset),
        model=dict(model) if model is not None else None,
        config=config.model_dump(),
        counts=category_counts(verdicts),
        expensive=[d.to_dict() for d in demand],
        training=estimate_steps(verdicts, config).to_dict(),
        verdicts=tuple(verdicts),
        flips=flips,
    )
    return plan, work.to_dict()


def error_count(plan: Plan) -> int:
    """Return the number of planned verdicts in error, which `trace apply` stops on."""
    return sum(1 for v in plan.verdicts if v.category is Category.ERROR)
