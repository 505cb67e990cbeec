"""The SQLite result cache and `evaluate_cached`: hits, misses, errors, and resuming after an
interrupted run. A counting backend shows exactly which requests reach the model."""

from __future__ import annotations

import sqlite3
from typing import Sequence

import pytest

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.errors import ResultCacheError
from trace_dsl.triage.cache import ResultCache, cache_key, default_cache_path
from trace_dsl.triage.cached_eval import evaluate_cached


class CountingBackend(PredicateBackend):
    """Scores a response by its length and fails responses containing 'FAIL'. On call number
    `interrupt_on_call` it raises KeyboardInterrupt, as a user pressing Ctrl-C would."""

    kind = "counting"

    def __init__(self, interrupt_on_call: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.interrupt_on_call = interrupt_on_call

    def fingerprint(self) -> str:
        return "counting/v1"

    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        self.calls.append([request.response for request in requests])
        if self.interrupt_on_call == len(self.calls):
            raise KeyboardInterrupt
        return [
            BackendResult(None, error="failed on purpose")
            if "FAIL" in request.response
            else BackendResult(float(len(request.response)), rationale=f"len {len(request.response)}")
            for request in requests
        ]

    @property
    def evaluated(self) -> int:
        return sum(len(call) for call in self.calls)


def _requests(count: int) -> list[BackendRequest]:
    return [BackendRequest(f"prompt {i}", "x" * (i + 1)) for i in range(count)]


@pytest.fixture
def cache(tmp_path):
    with ResultCache(tmp_path / "cache" / "results.sqlite") as cache:
        yield cache


def test_cache_key_separates_parts():
    base = cache_key("fp", "def", "prompt", "response")
    assert len(base) == 64
    assert base == cache_key("fp", "def", "prompt", "response")
    assert base != cache_key("fp2", "def", "prompt", "response")
    assert base != cache_key("fp", "def2", "prompt", "response")
    assert base != cache_key("fp", "def", "prompt2", "response")
    assert base != cache_key("fp", "def", "prompt", "response2")
    assert cache_key("fp", "def", "ab", "c") != cache_key("fp", "def", "a", "bc")


def test_round_trip_keeps_types(cache):
    stored = {"a": BackendResult(True, "yes because"), "b": BackendResult(0.75), "c": BackendResult(False)}
    assert cache.put_many(stored) == 3
    assert cache.get_many(["a", "b", "c", "missing"]) == stored
    assert isinstance(cache.get_many(["a"])["a"].value, bool)


def test_errors_are_not_stored(cache):
    written = cache.put_many({"ok": BackendResult(1.0), "bad": BackendResult(None, error="timeout")})
    assert written == 1
    assert set(cache.get_many(["ok", "bad"])) == {"ok"}


def test_file_persists_and_uses_wal(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultCache(path) as first:
        first.put_many({"k": BackendResult(0.5, "half")})
    with ResultCache(path) as second:
        assert second.get_many(["k"]) == {"k": BackendResult(0.5, "half")}
        assert second.stats().entries == 1
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_stats_count_hits_and_misses(cache):
    cache.put_many({"a": BackendResult(1.0)})
    cache.get_many(["a", "b", "c"])
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.writes) == (1, 1, 2, 1)
    assert stats.to_dict()["size_bytes"] > 0


def test_foreign_file_is_clear_error(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database " * 100)
    with pytest.raises(ResultCacheError) as raised:
        ResultCache(path)
    assert str(path) in raised.value.message
    # The file may be the user's own (a typo in --cache): the hint must not just say delete it.
    assert raised.value.hint.startswith("pass another cache path")


def test_folder_path_is_clear_error(tmp_path):
    with pytest.raises(ResultCacheError) as raised:
        ResultCache(tmp_path)
    assert "is a folder" in raised.value.message


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(ResultCacheError) as raised:
        ResultCache(path)
    assert "schema version 99" in raised.value.message


def test_closed_cache_is_error(tmp_path):
    cache = ResultCache(tmp_path / "results.sqlite")
    cache.close()
    cache.close()
    with pytest.raises(ResultCacheError):
        cache.get_many(["k"])


def test_default_path_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "results.sqlite"
    monkeypatch.delenv("TRACE_CACHE_DIR")
    assert str(default_cache_path()) == ".trace-cache/results.sqlite"


def test_second_evaluation_makes_no_backend_calls(cache):
    requests = _requests(40)
    backend = CountingBackend()

    first = evaluate_cached(backend, cache, "length()", requests, batch_size=16, progress=False)
    assert backend.evaluated == 40
    assert len(backend.calls) == 3

    second = evaluate_cached(backend, cache, "length()", requests, batch_size=16, progress=False)
    assert backend.evaluated == 40
    assert second == first
    assert [result.value for result in first] == [float(i + 1) for i in range(40)]


def test_changed_definition_misses(cache):
    backend = CountingBackend()
    evaluate_cached(backend, cache, "length()", _requests(5), progress=False)
    evaluate_cached(backend, cache, "length() > 3", _requests(5), progress=False)
    assert backend.evaluated == 10


def test_params_are_part_of_the_key(cache):
    backend = CountingBackend()
    plain = [BackendRequest("p", "r")]
    with_params = [BackendRequest("p", "r", params={"examples": ["a"]})]
    other_params = [BackendRequest("p", "r", params={"examples": ["b"]})]
    for requests in (plain, with_params, other_params, with_params):
        evaluate_cached(backend, cache, "d", requests, progress=False)
    assert backend.evaluated == 3


def test_duplicate_requests_evaluate_once(cache):
    backend = CountingBackend()
    requests = [BackendRequest("p", "same")] * 5 + [BackendRequest("p", "other")]
    results = evaluate_cached(backend, cache, "d", requests, progress=False)
    assert backend.evaluated == 2
    assert [result.value for result in results] == [4.0] * 5 + [5.0]


def test_errors_are_retried_next_run(cache):
    backend = CountingBackend()
    requests = [BackendRequest("p", "fine"), BackendRequest("p", "FAIL here")]
    first = evaluate_cached(backend, cache, "d", requests, progress=False)
    assert first[1].error == "failed on purpose"

    evaluate_cached(backend, cache, "d", requests, progress=False)
    assert backend.calls[-1] == ["FAIL here"]


def test_interrupted_run_resumes(tmp_path):
    path = tmp_path / "results.sqlite"
    requests = _requests(50)
    interrupted = CountingBackend(interrupt_on_call=3)
    with ResultCache(path) as cache:
        with pytest.raises(KeyboardInterrupt):
            evaluate_cached(interrupted, cache, "d", requests, batch_size=10, progress=False)

    resumed = CountingBackend()
    with ResultCache(path) as cache:
        results = evaluate_cached(resumed, cache, "d", requests, batch_size=10, progress=False)
    # Two batches of ten were stored before the interruption, so only 30 remain.
    assert resumed.evaluated == 30
    assert [result.value for result in results] == [float(i + 1) for i in range(50)]


def test_without_cache_evaluates_everything():
    backend = CountingBackend()
    results = evaluate_cached(backend, None, "d", _requests(7), batch_size=3, progress=False)
    assert backend.evaluated == 7
    assert len(backend.calls) == 3
    assert len(results) == 7


class ShortBackend(CountingBackend):
    def evaluate(self, requests):
        return super().evaluate(requests)[:-1]


def test_broken_backend_gives_error_results(cache):
    results = evaluate_cached(ShortBackend(), cache, "d", _requests(3), progress=False)
    assert all(result.value is None for result in results)
    assert "returned 2 results for 3 requests" in results[0].error
    assert cache.stats().entries == 0
