"""`trace diff`: compare two policy versions statically, then replay both over a dataset.

Both versions triage the same pairs through one content-addressed result cache. The cache key of
an expensive predicate is its backend's fingerprint, its canonical definition and the text, never
its name or position, so after a one-rule edit only the predicates whose definition changed
reach a backend. The old version's results usually sit in the cache already from an earlier
`trace triage` or `trace diff`, which makes a diff after a triage cost little more than the
cheap rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.policy import CompiledPolicy, ModelPredicate, load_policy
from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import PolicyCheckError, TraceError
from trace_dsl.triage.engine import BackendFactory, triage
from trace_dsl.triage.verdict import Verdict
from trace_dsl.versions.replay import Transition, flip_matrix, sample_flips
from trace_dsl.versions.report import DiffReport, TriageWork
from trace_dsl.versions.revisions import PolicyRef, checkout_policy_tree, rewrite_paths
from trace_dsl.versions.static import static_diff


def load_policy_at(ref: PolicyRef | str) -> CompiledPolicy:
    """Check and compile a policy from the working tree or from git (`path@REV`).

    A policy read at a revision is compiled from a temporary checkout of its folder at that
    revision. Its content hash equals the working-tree hash of the same text, because the hash
    covers the canonical text and import paths relative to the policy's folder.

    Raises:
        GitRevisionError: the revision or the file at that revision cannot be read.
        PolicyCheckError: the policy at that revision does not check; positions in the message
            name `path@REV`.
    """
    if isinstance(ref, str):
        ref = PolicyRef.parse(ref)
    with checkout_policy_tree(ref) as path:
        if ref.revision is None:
            return load_policy(path)
        try:
            return load_policy(path)
        except PolicyCheckError as exc:
            raise PolicyCheckError(
                rewrite_paths(exc.message, path, ref),
                diagnostics=exc.diagnostics,
                hint=f"the policy at {ref.revision} does not check; see `git show {ref.revision}:{ref.path}`",
            ) from None
        except TraceError as exc:
            exc.message = rewrite_paths(exc.message, path, ref)
            raise


class CountingBackend(PredicateBackend):
    """A backend wrapper that counts the requests reaching the real backend.

    The fingerprint is the wrapped backend's, so cache keys are unchanged.
    """

    def __init__(self, inner: PredicateBackend, *, owns: bool = True) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.requests = 0
        self.owns = owns

    def fingerprint(self) -> str:
        """Return the wrapped backend's fingerprint."""
        return self.inner.fingerprint()

    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        """Count the requests, then pass them to the wrapped backend."""
        self.requests += len(requests)
        return self.inner.evaluate(requests)

    def close(self) -> None:
        """Close the wrapped backend, unless the caller that lent it closes it."""
        if self.owns:
            self.inner.close()


def default_backend_factory(model: ModelPredicate) -> PredicateBackend:
    """Build an expensive predicate's backend from the registry, as the triage engine does."""
    from trace_dsl.compiler.backends.registry import create_backend

    return create_backend(model.kind, model.options)


@dataclass
class _Counter:
    factory: BackendFactory
    backends: dict[str, CountingBackend] = field(default_factory=dict)

    def __call__(self, model: ModelPredicate) -> PredicateBackend:
        backend = CountingBackend(self.factory(model))
        self.backends[model.name] = backend
        return backend


def triage_with_work(
    policy: CompiledPolicy,
    pairs: Sequence[PreferencePair],
    *,
    cache: Any = None,
    progress: bool = True,
    backend_factory: BackendFactory | None = None,
    backends: Mapping[str, PredicateBackend] | None = None,
) -> tuple[list[Verdict], TriageWork]:
    """Triage `pairs` and count the expensive-predicate requests evaluated and read from cache.

    Args:
        policy: the compiled policy.
        pairs: the preference pairs.
        cache: a `ResultCache`, or `None` to evaluate every request.
        progress: draw progress bars on stderr.
        backend_factory: builds each expensive predicate's backend (default: the registry).
        backends: ready backends by predicate name, used instead of the factory; the caller
            closes them.
    """
    counter = _Counter(backend_factory or default_backend_factory)
    lent = {name: CountingBackend(backend, owns=False) for name, backend in (backends or {}).items()}
    hits_before = cache.stats().hits if cache is not None else 0
    started = time.perf_counter()
    verdicts = triage(policy, pairs, cache=cache, progress=progress, backend_factory=counter, backends=lent)
    seconds = time.perf_counter() - started
    cached = (cache.stats().hits - hits_before) if cache is not None else 0
    counted = {**counter.backends, **lent}
    evaluated = {name: backend.requests for name, backend in counted.items() if name in policy.models}
    return verdicts, TriageWork(evaluated=evaluated, cached=cached, seconds=seconds)


def diff_policies(
    old_ref: str,
    new_ref: str,
    pairs: Sequence[PreferencePair],
    *,
    dataset: Mapping[str, Any],
    cache: Any = None,
    samples: int = 3,
    transition: Transition | None = None,
    progress: bool = True,
    backend_factory: BackendFactory | None = None,
) -> DiffReport:
    """Compare two policy versions over `pairs`: static changes, flip matrix and samples.

    Args:
        old_ref: the old policy, `path` or `path@REV`.
        new_ref: the new policy, `path` or `path@REV`.
        pairs: the preference pairs to replay.
        dataset: `{"path", "hash", "pairs"}` describing the data, for the report.
        cache: the shared `ResultCache`, or `None` to evaluate everything twice.
        samples: sample pairs per transition.
        transition: sample only this (old, new) transition.
        progress: draw progress bars on stderr.
        backend_factory: builds expensive-predicate backends (default: the registry).

    Raises:
        GitRevisionError: a `path@REV` cannot be read.
        PolicyCheckError: a version does not check.
    """
    old = load_policy_at(old_ref)
    new = load_policy_at(new_ref)
    static = static_diff(old, new)

    started = time.perf_counter()
    old_verdicts, old_work = triage_with_work(
        old, pairs, cache=cache, progress=progress, backend_factory=backend_factory
    )
    if new.hash == old.hash:
        # The same canonical text gives the same verdicts, so the replay is done.
        new_verdicts, new_work = old_verdicts, TriageWork({}, 0, 0.0)
    else:
        new_verdicts, new_work = triage_with_work(
            new, pairs, cache=cache, progress=progress, backend_factory=backend_factory
        )
    seconds = time.perf_counter() - started

    return DiffReport(
        old_ref=str(old_ref),
        new_ref=str(new_ref),
        static=static,
        dataset=dict(dataset),
        matrix=flip_matrix(old_verdicts, new_verdicts),
        samples=sample_flips(pairs, old_verdicts, new_verdicts, samples=samples, transition=transition),
        transition=transition,
        work={"old": old_work, "new": new_work},
        seconds=seconds,
    )
