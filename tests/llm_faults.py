"""A fault-injecting OpenAI-compatible server on loopback for the tests (no tests here).

`FaultyLLM` answers ``POST /v1/chat/completions`` and ``GET /v1/models`` like an OpenAI-compatible
endpoint, but fails its first ``fail_first`` chat requests (every one when None) in one of these
modes, then answers ``reply``:

- ``"down"``: nothing listens on the port (connection refused); `base_url` still names it;
- ``"slow"``: the reply comes after ``delay_s`` (past the client's timeout);
- ``"429"``: HTTP 429 with ``Retry-After: <retry_after>`` (omitted when None);
- ``"400"``: HTTP 400 (a request the endpoint will never accept);
- ``"500"``: HTTP 500 with a JSON error body;
- ``"garbage"``: HTTP 200, ``Content-Type: application/json``, a body that is not JSON;
- ``"empty"``: HTTP 200 with an empty body;
- ``"ok"``: no fault.

Every request is recorded (`requests`: monotonic time, path, Authorization header) so a test can
count attempts, measure the backoff between them, and see which API key was sent. Standard
library only; used as a context manager.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from raylens.llm.server import free_loopback_port

MODES = ("down", "slow", "400", "429", "500", "garbage", "empty", "ok")


@dataclass
class Request:
    """One request the server received."""

    t: float
    path: str
    authorization: str | None
    body: dict | None


@dataclass
class FaultyLLM:
    """An OpenAI-compatible endpoint on 127.0.0.1 that fails as told (see the module docstring).

    Attributes:
        mode: one of `MODES`.
        fail_first: chat requests that fail before the good replies start; None: all fail.
        reply: the assistant message of a good reply.
        retry_after: the ``Retry-After`` header of mode ``"429"`` (seconds, as text).
        delay_s: how long mode ``"slow"`` waits before answering.
    """

    mode: str = "ok"
    fail_first: int | None = None
    reply: str = "movie sentiment"
    retry_after: str | None = "1"
    delay_s: float = 5.0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.port = free_loopback_port()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def gaps(self) -> list[float]:
        """Seconds between consecutive chat requests (the backoff the client waited, plus latency)."""
        t = [r.t for r in self.chat_requests()]
        return [b - a for a, b in zip(t, t[1:])]

    def __enter__(self) -> "FaultyLLM":
        if self.mode != "down":
            self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
            self._httpd.daemon_threads = True
            self._httpd.block_on_close = False
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def record(self, handler: BaseHTTPRequestHandler, body: dict | None) -> int:
        """Record a request; returns how many chat requests came before it."""
        with self._lock:
            n = len(self.chat_requests())
            self.requests.append(Request(time.monotonic(), handler.path, handler.headers.get("Authorization"), body))
            return n

    def good_body(self, model: str) -> bytes:
        return json.dumps({
            "id": "chatcmpl-faulty", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.reply}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()


def _handler(server: FaultyLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout)
                pass

        def do_GET(self) -> None:
            server.record(self, None)
            self._send(200, b'{"object": "list", "data": []}')

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = None
            n = server.record(self, body)
            failing = server.fail_first is None or n < server.fail_first
            mode = server.mode if failing else "ok"
            if mode == "slow":
                server._stop.wait(server.delay_s)
                mode = "ok"
            if mode == "429":
                self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                           {} if server.retry_after is None else {"Retry-After": server.retry_after})
            elif mode == "400":
                self._send(400, b'{"error": {"message": "bad request", "type": "invalid_request_error"}}')
            elif mode == "500":
                self._send(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
            elif mode == "garbage":
                self._send(200, b"\x00\xffthis is <not> json {{{")
            elif mode == "empty":
                self._send(200, b"")
            else:
                self._send(200, server.good_body((body or {}).get("model", "m")))

    return Handler
