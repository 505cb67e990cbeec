"""The OpenAI-compatible judge against misbehaving servers on loopback: server errors, garbage,
hangs, a closed port, client errors, and API keys."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from trace_dsl.compiler.backends.base import BackendRequest
from trace_dsl.compiler.backends.judge import BASE_URL_ENV
from trace_dsl.compiler.backends.registry import create_backend
from trace_dsl.errors import JudgeError

REQUESTS = [BackendRequest("prompt one", "response one"), BackendRequest("prompt two", "response two")]
FAST_RETRIES = {"max_retries": 2, "backoff": 0.01, "timeout": 2, "concurrency": 1}


class FakeServer:
    """A loopback HTTP server that handles every POST with `respond(handler, body)`."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler, dict], None]) -> None:
        self.calls: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append({"headers": dict(self.headers), "body": body})
                respond(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _answer(content: object) -> Callable[[BaseHTTPRequestHandler, dict], None]:
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
    return lambda handler, request_body: _send(handler, 200, body)


@pytest.fixture
def fake_server():
    servers: list[FakeServer] = []

    def start(respond: Callable[[BaseHTTPRequestHandler, dict], None]) -> FakeServer:
        server = FakeServer(respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _judge(base_url: str, **options):
    return create_backend(
        "judge", {"backend": "openai", "model": "judge-model", "base_url": base_url, "question": "Is it harmful?", **options}
    )


def test_yes_answer_parses(fake_server):
    server = fake_server(_answer("Yes. It gives bomb instructions."))
    results = _judge(server.base_url, concurrency=1).evaluate(REQUESTS)
    assert [result.value for result in results] == [True, True]
    assert results[0].rationale == "It gives bomb instructions."
    sent = server.calls[0]["body"]
    assert sent["temperature"] == 0
    assert sent["model"] == "judge-model"
    assert [message["role"] for message in sent["messages"]] == ["system", "user"]
    assert "prompt one" in sent["messages"][1]["content"]


def test_out_of_format_answer_is_error(fake_server):
    server = fake_server(_answer("Maybe, it depends."))
    [result, _] = _judge(server.base_url, **FAST_RETRIES).evaluate(REQUESTS)
    assert result.value is None
    assert result.error == "out-of-format answer: 'Maybe, it depends.'"
    # An out-of-format answer is not retried: greedy decoding would repeat it.
    assert len(server.calls) == 2


def test_server_error_retries_then_fails(fake_server):
    server = fake_server(lambda handler, body: _send(handler, 500, b'{"error": {"message": "GPU on fire"}}'))
    results = _judge(server.base_url, **FAST_RETRIES).evaluate(REQUESTS)

    assert "HTTP 500" in results[0].error
    assert "after 3 attempts" in results[0].error
    assert "GPU on fire" in results[0].error
    assert results[0].value is None
    # Once the server is known to fail, the rest of the batch is not sent.
    assert results[1].value is None
    assert results[1].error.startswith("not sent because the judge server failed")
    assert len(server.calls) == 3


def test_recovers_after_transient_error(fake_server):
    replies = iter([500, 200])

    def respond(handler, body):
        if next(replies, 200) == 500:
            _send(handler, 503, b"busy")
        else:
            _answer("no - it refuses")(handler, body)

    server = fake_server(respond)
    [result] = _judge(server.base_url, **FAST_RETRIES).evaluate(REQUESTS[:1])
    assert result.value is False
    assert result.rationale == "it refuses"
    assert len(server.calls) == 2


def test_garbage_body_is_error(fake_server):
    server = fake_server(lambda handler, body: _send(handler, 200, b"<html>not json</html>"))
    [result] = _judge(server.base_url, **FAST_RETRIES).evaluate(REQUESTS[:1])
    assert result.value is None
    assert "invalid chat-completion response" in result.error
    assert "<html>not json" in result.error
    assert len(server.calls) == 3


def test_content_of_wrong_type_is_error(fake_server):
    server = fake_server(_answer(None))
    [result] = _judge(server.base_url, **FAST_RETRIES).evaluate(REQUESTS[:1])
    assert "content is NoneType" in result.error


def test_hanging_server_times_out(fake_server):
    server = fake_server(lambda handler, body: time.sleep(1.5))
    started = time.monotonic()
    results = _judge(server.base_url, max_retries=1, backoff=0.01, timeout=0.2, concurrency=1).evaluate(REQUESTS)
    elapsed = time.monotonic() - started

    assert "timed out after 0.2 s" in results[0].error
    assert "after 2 attempts" in results[0].error
    assert results[1].error.startswith("not sent because")
    assert elapsed < 1.5


def test_closed_port_is_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = _judge(f"http://127.0.0.1:{port}/v1", **FAST_RETRIES).evaluate(REQUESTS)
    assert "connection failed" in results[0].error
    assert "refused" in results[0].error.lower()
    assert "after 3 attempts" in results[0].error
    assert all(result.value is None for result in results)


def test_client_error_is_not_retried(fake_server):
    server = fake_server(lambda handler, body: _send(handler, 401, b'{"error": "bad key"}'))
    [result] = _judge(server.base_url, **FAST_RETRIES).evaluate(REQUESTS[:1])
    assert "HTTP 401" in result.error
    assert len(server.calls) == 1


def test_api_key_is_sent_from_environment(fake_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-value")
    server = fake_server(_answer("yes"))
    _judge(server.base_url, api_key_env="TEST_JUDGE_KEY").evaluate(REQUESTS[:1])
    assert server.calls[0]["headers"]["Authorization"] == "Bearer secret-value"


def test_unset_api_key_variable_is_judge_error(monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError) as raised:
        _judge("http://127.0.0.1:9/v1", api_key_env="TEST_JUDGE_KEY")
    assert "TEST_JUDGE_KEY" in raised.value.message


def test_base_url_comes_from_environment(fake_server, monkeypatch):
    server = fake_server(_answer("no"))
    monkeypatch.setenv(BASE_URL_ENV, server.base_url + "/")
    judge = create_backend("judge", {"backend": "openai", "model": "judge-model", "question": "Is it harmful?"})
    assert judge.evaluate(REQUESTS[:1])[0].value is False
    assert server.base_url in judge.fingerprint()


def test_missing_base_url_is_judge_error(monkeypatch):
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    with pytest.raises(JudgeError) as raised:
        create_backend("judge", {"backend": "openai", "model": "m", "question": "q?"})
    assert BASE_URL_ENV in raised.value.hint


def test_concurrent_requests_keep_order(fake_server):
    def respond(handler, body):
        time.sleep(0.01)
        _answer("yes" if "prompt one" in body["messages"][1]["content"] else "no")(handler, body)

    server = fake_server(respond)
    requests = [BackendRequest("prompt one" if i % 2 == 0 else "prompt two", f"r{i}") for i in range(8)]
    results = _judge(server.base_url, concurrency=4).evaluate(requests)
    assert [result.value for result in results] == [i % 2 == 0 for i in range(8)]
