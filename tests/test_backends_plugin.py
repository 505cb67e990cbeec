"""Plugin predicates: registered in-process, installed by entry point, and misbehaving."""

from __future__ import annotations

import math
import textwrap

import pytest

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult
from trace_dsl.compiler.backends.plugin import available_plugins, register_plugin, unregister_plugin
from trace_dsl.compiler.backends.registry import create_backend, validate_backend_options
from trace_dsl.errors import JudgeError

REQUESTS = [BackendRequest("p", "take 500 mg twice a day"), BackendRequest("p", "drink water")]


@pytest.fixture
def plugin():
    names: list[str] = []

    def add(name, fn):
        register_plugin(name, fn)
        names.append(name)

    yield add
    for name in names:
        unregister_plugin(name)


def test_registered_plugin_gets_args(plugin):
    def mentions(requests, *, word):
        return [word in request.response for request in requests]

    plugin("mentions", mentions)
    backend = create_backend("plugin", {"name": "mentions", "args": {"word": "mg"}})
    assert [result.value for result in backend.evaluate(REQUESTS)] == [True, False]
    assert "mentions" in backend.fingerprint()


def test_numbers_and_results_pass_through(plugin):
    plugin("mixed", lambda requests: [0.25, BackendResult(True, rationale="because")])
    results = create_backend("plugin", {"name": "mixed"}).evaluate(REQUESTS)
    assert results == [BackendResult(0.25), BackendResult(True, rationale="because")]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda requests: [True], "returned 1 results for 2 requests"),
        (lambda requests: None, "returned NoneType, not a list"),
        (lambda requests: 1 / 0, "raised ZeroDivisionError"),
        (lambda requests: ["yes", True], "item 0: got str"),
        (lambda requests: [math.nan, True], "item 0: got float"),
        (lambda requests: [BackendResult(None), True], "item 0: value None"),
    ],
)
def test_bad_output_names_plugin(plugin, fn, message):
    plugin("broken", fn)
    results = create_backend("plugin", {"name": "broken"}).evaluate(REQUESTS)
    assert results[0].value is None
    assert "plugin 'broken'" in results[0].error
    assert message in results[0].error


def test_unknown_plugin_is_reported():
    problems = validate_backend_options("plugin", {"name": "no_such_plugin"})
    assert len(problems) == 1
    assert "not installed" in problems[0]
    with pytest.raises(JudgeError):
        create_backend("plugin", {"name": "no_such_plugin"})


def test_entry_point_plugin_loads(tmp_path, monkeypatch):
    (tmp_path / "demo_trace_plugin.py").write_text(
        textwrap.dedent(
            """
            def short(requests, limit=10):
                return [len(request.response) <= limit for request in requests]
            """
        )
    )
    dist = tmp_path / "demo_trace_plugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-trace-plugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[trace_dsl.predicates]\nshort_response = demo_trace_plugin:short\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert "short_response" in available_plugins()
    assert validate_backend_options("plugin", {"name": "short_response", "args": {"limit": 12}}) == []
    backend = create_backend("plugin", {"name": "short_response", "args": {"limit": 12}})
    assert [result.value for result in backend.evaluate(REQUESTS)] == [False, True]
    assert "version 1.2.3" in backend.fingerprint()
