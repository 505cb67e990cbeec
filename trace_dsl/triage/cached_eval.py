"""Evaluating one expensive predicate over many requests, through the result cache.

The evaluation engine calls `evaluate_cached` once per expensive predicate with every request
whose verdict still depends on it. Cached results are read back, only the misses go to the
backend, in batches, and each batch's successes are stored before the next batch starts, so an
interrupted triage loses at most one batch.
"""

from __future__ import annotations

import json
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.triage.cache import ResultCache, cache_key


def request_keys(backend: PredicateBackend, definition: str, requests: Sequence[BackendRequest]) -> list[str]:
    """Return the cache key of each request.

    A request's params are folded into the definition, so two requests that differ only in
    their params (other example texts, another question) never share a cached result.
    """
    fingerprint = backend.fingerprint()
    keys = []
    for request in requests:
        full_definition = definition
        if request.params:
            params = json.dumps(dict(request.params), sort_keys=True, ensure_ascii=False, default=repr)
            full_definition = f"{definition}\x00{params}"
        keys.append(cache_key(fingerprint, full_definition, request.prompt, request.response))
    return keys


def evaluate_cached(
    backend: PredicateBackend,
    cache: ResultCache | None,
    definition: str,
    requests: Sequence[BackendRequest],
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "",
) -> list[BackendResult]:
    """Evaluate `requests` with `backend`, reusing and filling `cache`.

    Args:
        backend: the predicate's backend.
        cache: the result cache, or `None` to evaluate everything.
        definition: the predicate's canonical definition text; it is part of every cache key,
            so it must change whenever the predicate could give a different answer.
        requests: the items to evaluate; equal items are evaluated once.
        batch_size: requests per `backend.evaluate` call, and per cache write.
        progress: draw a progress bar on stderr while the backend works.
        description: the progress bar's label, for example the predicate's name.

    Returns:
        One result per request, in order. Results with `error` set are returned but not
        cached, so the next run evaluates them again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    keys = request_keys(backend, definition, requests)
    found = cache.get_many(keys) if cache is not None else {}

    # The first request of each uncached key stands for all requests with that key.
    misses: dict[str, BackendRequest] = {}
    for key, request in zip(keys, requests):
        if key not in found and key not in misses:
            misses[key] = request

    computed: dict[str, BackendResult] = {}
    pending = list(misses)
    label = description or backend.kind or "predicate"
    if found:
        label = f"{label} ({len(found)} cached)"
    with _progress_bar(progress and bool(pending)) as bar:
        task = bar.add_task(label, total=len(pending))
        for start in range(0, len(pending), batch_size):
            batch_keys = pending[start : start + batch_size]
            results = _checked(backend, backend.evaluate([misses[key] for key in batch_keys]), len(batch_keys))
            batch = dict(zip(batch_keys, results))
            if cache is not None:
                cache.put_many(batch)
            computed.update(batch)
            bar.advance(task, len(batch_keys))

    return [found[key] if key in found else computed[key] for key in keys]


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _checked(backend: PredicateBackend, results: object, expected: int) -> list[BackendResult]:
    """Return the backend's results, or error results when it broke its contract."""
    name = type(backend).__name__
    if not isinstance(results, list) or len(results) != expected:
        count = len(results) if isinstance(results, list) else type(results).__name__
        reason = f"backend {name} returned {count} results for {expected} requests"
        return [BackendResult(None, error=reason) for _ in range(expected)]
    return [
        result
        if isinstance(result, BackendResult)
        else BackendResult(None, error=f"backend {name} returned {type(result).__name__}, not a BackendResult")
        for result in results
    ]
