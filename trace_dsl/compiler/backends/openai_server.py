"""A small OpenAI-compatible chat server for a local transformers model.

It serves `GET /v1/models` and `POST /v1/chat/completions` (non-streaming, one choice) with the
standard library's `ThreadingHTTPServer`, so a policy's `openai` judge can run against a local
model, and so the tests can exercise the HTTP judge against a real server on loopback:

    python -m trace_dsl.compiler.backends.openai_server --model smollm2 --port 8000
    # in the policy: backend = "openai", base_url = "http://127.0.0.1:8000/v1", model = "smollm2"

Decoding is always greedy, whatever `temperature` the client sends, because a judge must give
the same answer to the same question. Requests are answered one at a time (the model is
shared), so this server suits tests and small triage runs; use vLLM for throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from trace_dsl.compiler.backends.chat import ChatModel
from trace_dsl.errors import TraceError

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 2048
MAX_BODY_BYTES = 4 * 1024 * 1024
_ROLES = ("system", "user", "assistant")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class ChatCompletionServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` that serves chat completions from one `ChatModel`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], chat: ChatModel, model_name: str) -> None:
        super().__init__(address, _Handler)
        self.chat = chat
        self.model_name = model_name

    @property
    def base_url(self) -> str:
        """The API root to give a judge as `base_url`, for example http://127.0.0.1:8000/v1."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()


def serve(
    model: str | Path | ChatModel, host: str = "127.0.0.1", port: int = 0, *, model_name: str | None = None
) -> tuple[ChatCompletionServer, int]:
    """Start serving `model` in a background thread and return the server and its port.

    Args:
        model: a model name or folder (resolved like a judge's model), or a loaded `ChatModel`.
        host: the address to listen on; the default accepts connections from this machine only.
        port: the port, or 0 for a free one chosen by the system.
        model_name: the name clients send as `model` (default: the model's own name).

    Call `server.stop()` to shut it down.

    Raises:
        JudgeError: the model cannot be loaded.
    """
    chat = model if isinstance(model, ChatModel) else ChatModel.load(model)
    server = ChatCompletionServer((host, port), chat, model_name or chat.name)
    # A short poll interval makes stop() return quickly.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="openai-server", daemon=True
    )
    thread.start()
    bound_port = server.server_address[1]
    logger.info("serving %s at %s", server.model_name, server.base_url)
    return server, bound_port


class _Handler(BaseHTTPRequestHandler):
    server: ChatCompletionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.path.rstrip("/") != "/v1/models":
            self._send_error(_BadRequest(404, f"no route GET {self.path}", "not_found"))
            return
        model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "trace-dsl"}
        self._send_json(200, {"object": "list", "data": [model]})

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise _BadRequest(404, f"no route POST {self.path}", "not_found")
            body = self._read_json()
            self._send_json(200, self._complete(body))
        except _BadRequest as exc:
            self._send_error(exc)
        except Exception as exc:  # noqa: BLE001 - a server reports every failure to its client
            logger.exception("chat completion failed")
            self._send_error(_BadRequest(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))

    def _read_json(self) -> dict[str, Any]:
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.isdigit():
            raise _BadRequest(411, "a Content-Length header is required")
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise _BadRequest(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _BadRequest(400, "request body must be a JSON object")
        return body

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        name = self.server.model_name
        if body.get("model", name) != name:
            raise _BadRequest(404, f"model '{body.get('model')}' is not served here; this server has '{name}'", "model_not_found")
        if body.get("stream"):
            raise _BadRequest(400, "streaming is not supported; send stream = false")
        if body.get("n", 1) != 1:
            raise _BadRequest(400, "only n = 1 is supported")
        messages = _messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise _BadRequest(400, f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}")

        chat = self.server.chat
        text = chat.generate([messages], max_new_tokens=max_tokens)[0]
        prompt_tokens = chat.count_tokens(chat.render(messages))
        completion_tokens = chat.count_tokens(text)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if completion_tokens >= max_tokens else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: _BadRequest) -> None:
        logger.warning("%s %s from %s failed with %d: %s", self.command, self.path, self.address_string(), error.status, error.message)
        self._send_json(error.status, {"error": {"message": error.message, "type": error.code, "code": error.code}})


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _BadRequest(400, "messages must be a non-empty list")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(message.get("content"), str):
            raise _BadRequest(
                400, f"messages[{index}] must be an object with role ({', '.join(_ROLES)}) and text content"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def main(argv: list[str] | None = None) -> None:
    """Serve a local model until interrupted (the `python -m` entry)."""
    parser = argparse.ArgumentParser(description="Serve a local transformers model as an OpenAI-compatible judge.")
    parser.add_argument("--model", default="smollm2", help="model alias or folder (default: smollm2)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on, 0 for any free one (default: 8000)")
    parser.add_argument("--name", default=None, help="model name clients send (default: the --model value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    try:
        server, port = serve(args.model, args.host, args.port, model_name=args.name)
    except TraceError as exc:
        raise SystemExit(f"error[{exc.code}]: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    logger.info("ready: base_url = http://%s:%d/v1, model = %s", args.host, port, server.model_name)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
        server.stop()


if __name__ == "__main__":
    main()
