"""The common machinery of the loopback shop emulators: an HTTP server on 127.0.0.1 in a background
thread, a request log, and fault switches.

Each emulator subclass implements :meth:`ShopEmulator.route`; this module owns the socket, the
thread and the faults, so every emulator fails the same way when a test asks it to:

* ``fail_next(n, status=500)``: the next ``n`` requests get an error page with that status;
* ``throttle_next(n, retry_after=S)``: 429 with ``Retry-After: S``;
* ``delay_next(n, seconds)``: answer only after ``seconds`` (a client with a shorter timeout gives
  up);
* ``truncate_next(n)``: send the headers of the full answer, half the body, then close the
  connection (what a proxy that cuts a response looks like to a client);
* ``garbage_next(n)``: 200 with an HTML body instead of JSON (a captive portal / error page).

Faults are consumed in the order they were queued, one per request.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the emulator saw it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter ``name``."""
        value = default
        for key, v in self.query:
            if key == name:
                value = v
        return value

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


@dataclass(slots=True)
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str = "application/json; charset=UTF-8"

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body).encode("utf-8")


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str  # "status" | "throttle" | "delay" | "truncate" | "garbage"
    value: float = 0.0


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    status: int
    user_agent: str = ""


class ShopEmulator:
    """Base of the emulators: start on a free loopback port, log requests, inject faults."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.requests: list[LoggedRequest] = []
        self._faults: deque[_Fault] = deque()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Called with each request before it is answered (under no lock): lets a test change the
        # shop's state mid-conversation, e.g. modify an order while a client pages through orders.
        self.before_route: Callable[[Request], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Self:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 so clients keep connections alive, as they would against a real shop.
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                emulator._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "emulator not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- fault switches --------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 500) -> None:
        self._queue(n, _Fault("status", status))

    def throttle_next(self, n: int = 1, retry_after: float = 30) -> None:
        self._queue(n, _Fault("throttle", retry_after))

    def delay_next(self, n: int = 1, seconds: float = 2.0) -> None:
        self._queue(n, _Fault("delay", seconds))

    def truncate_next(self, n: int = 1) -> None:
        self._queue(n, _Fault("truncate"))

    def garbage_next(self, n: int = 1) -> None:
        self._queue(n, _Fault("garbage"))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _queue(self, n: int, fault: _Fault) -> None:
        with self.lock:
            self._faults.extend([fault] * n)

    # -- request log -----------------------------------------------------------------------------
    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen, optionally only those with this method and path prefix."""
        with self.lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method)
                and (path is None or r.path.startswith(path))
            )

    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- serving ---------------------------------------------------------------------------------
    def route(self, req: Request) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        req = Request(
            method=h.command,
            path=parts.path,
            query=parse_qsl(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in h.headers.items()},
            body=body,
        )
        with self.lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "delay":
            # Interruptible, so stop() does not wait for a sleeping handler.
            self._stopping.wait(fault.value)
            fault = None
        if fault is None:
            if self.before_route is not None:
                self.before_route(req)
            try:
                resp = self.route(req)
            except Exception as exc:  # an emulator bug must show up as a 500, not a hang
                resp = Response(500, {"message": f"emulator error: {exc!r}"})
        elif fault.kind == "status":
            resp = Response(
                int(fault.value),
                raw=b"<html><body><h1>Internal Server Error</h1></body></html>",
                content_type="text/html",
            )
        elif fault.kind == "throttle":
            resp = Response(
                429,
                {"message": "Too Many Requests"},
                headers={"Retry-After": f"{fault.value:g}"},
            )
        elif fault.kind == "garbage":
            resp = Response(
                200,
                raw=b"<html><head><title>Bad Gateway</title></head><body>upstream</body></html>",
                content_type="text/html",
            )
        else:  # truncate: the real answer, cut in half
            resp = self.route(req)
        with self.lock:
            self.requests.append(
                LoggedRequest(
                    req.method, req.path, req.query, resp.status, req.headers.get("user-agent", "")
                )
            )
        payload = resp.encode()
        h.send_response(resp.status)
        h.send_header("Content-Type", resp.content_type)
        h.send_header("Content-Length", str(len(payload)))
        for k, v in resp.headers.items():
            h.send_header(k, v)
        if fault is not None and fault.kind == "truncate":
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.end_headers()
        h.wfile.write(payload)
