"""The daemon's HTTP server: liveness, readiness, Prometheus metrics, and routes mounted by their
owners (webhook receivers, the Manage page).

Responsibilities (the Patroni split, see ``patroni/api.py``):

* ``GET /healthz`` — **liveness**: 200 while the main loop is not overdue, i.e. the last loop
  tick is younger than ``health.loop_overdue`` seconds; 503 otherwise. A supervisor restarts the
  daemon on 503; it says nothing about the ERP or the shops.
* ``GET /readyz`` — **readiness**: runs every check registered with :meth:`HttpServer.add_check`
  (each in its own worker thread with a timeout, so a stuck database cannot hang the probe; see
  :class:`replicator.ops.checks.Check`) and answers 503 when a *critical* check fails.
  Non-critical failures are listed but keep 200. The checks themselves live in
  :mod:`replicator.ops.checks`; this module only serves them.
* ``GET /metrics`` — Prometheus text exposition of :data:`replicator.metrics.REGISTRY`.
* Routes mounted by other features with :meth:`HttpServer.add_route` (webhook receivers, the
  Manage page).

Routing is exact: a path matches one resource (a literal path, or a pattern such as
``/fragments/{panel}`` whose parameter is one segment) or gets 404 — nothing matches by prefix.
A method the resource does not serve gets 405 with ``Allow`` listing what it does serve (HEAD
with GET, and OPTIONS, which answers 204 with the same ``Allow``); TRACE and unknown verbs are
answered the same way, never 501. A query parameter the stores cannot hold (NUL, which PostgreSQL
refuses in text) gets 400 naming it before any handler runs.

Protection: when ``health.listen`` is not a loopback address, every route except ``/healthz`` and
``/readyz`` requires ``health.token`` (``Authorization: Bearer <token>``, or basic auth whose
password — or ``user:password`` — equals the token); the server refuses to start on such an
address without a token. A configured token is enforced on loopback too. Routes mounted with
``public=True`` (webhook receivers that verify the shop's own signature) skip the token.
Bodies (sent with ``Content-Length`` or chunked) larger than ``max_body`` get 413, connections
have a socket timeout (slow clients cannot hold a thread for long) and the number of concurrent connections is bounded. Handlers never raise:
an exception becomes a 500 whose body names the exception type only, redacted.

Wiring (see ``replicator/runtime.py``)::

    from replicator.ops.checks import engine_check, threshold_check
    from replicator.web.server import HttpServer, Response

    health = HttpServer(cfg.health)            # or HttpServer(cfg.health, last_tick=fn)
    health.add_check("staging", engine_check(staging_engine))    # fn() -> (ok, detail)
    health.add_check("erp", engine_check(erp_engine), critical=True, timeout=2.0)
    health.add_check("lag", threshold_check(lambda: capture.lag_seconds,
                                            cfg.health.max_lag_seconds, "lag seconds"))
    health.add_check("shop:demo", shop_ping, critical=False)
    # A WooCommerce receiver (replicator.connectors.webhook) checks its own signature:
    def woo(req: Request) -> Response:
        status, body = receiver.handle(req.headers, req.body)
        return Response.json(body, status)
    health.add_route("POST", "/webhooks/shop/demo", woo, public=True,
                     max_body=receiver.max_body)
    health.start()                # binds; raises ConfigError (health.token) / OSError
    ...
    while running:
        run_one_cycle()
        health.tick()             # liveness: the loop made progress
    ...
    health.stop()                 # in the daemon's ``finally``

``last_tick`` (alternative to :meth:`HttpServer.tick`) is a callable returning the time of the
last loop tick on the ``clock`` given to the server (default :func:`time.monotonic`), or ``None``
before the first tick. Before the first tick the server's start time counts as a tick, so a loop
that never gets going turns liveness red after ``loop_overdue`` seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

from replicator import metrics, safejson
from replicator.config.core import HealthSection
from replicator.errors import ConfigError
from replicator.log import redact
from replicator.ops.checks import Check, CheckFn

log = structlog.get_logger(__name__)

__all__ = ["HttpServer", "Request", "Response", "RouteHandler", "is_loopback"]

RouteHandler = Callable[["Request"], "Response"]

# The server's own resources (GET only). /healthz and /readyz need no token: a load balancer or
# systemd-side monitor has none, and the bodies hold no secrets.
_BUILTIN = ("/healthz", "/readyz", "/metrics")
# A chunk-size line: hex size, optional extensions (ignored), CRLF.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:;[^\r\n]*)?\r?\n")


@dataclass(frozen=True)
class Request:
    """What a mounted route handler receives. ``headers`` keys are lower-case."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    client: str = ""

    def json(self) -> Any:
        """The body parsed as JSON within :mod:`replicator.safejson`'s limits (raises
        :class:`~replicator.safejson.JsonRefused`, a ``ValueError``, naming what is wrong)."""
        return safejson.loads(self.body)


@dataclass
class Response:
    """What a mounted route handler returns."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        body = json.dumps(data, indent=None, separators=(",", ":"), default=str).encode()
        return cls(status, {"Content-Type": "application/json"}, body + b"\n")

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain") -> Response:
        return cls(status, {"Content-Type": f"{content_type}; charset=utf-8"}, text.encode())


@dataclass
class _Route:
    method: str
    path: str  # the pattern as mounted, e.g. "/webhooks/shop/demo" or "/fragments/{panel}"
    regex: re.Pattern[str]
    handler: RouteHandler
    public: bool
    max_body: int | None

    @property
    def literal(self) -> bool:
        return "{" not in self.path


_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def _compile(path: str) -> re.Pattern[str]:
    """``/a/{name}/b`` → a regex matching exactly that path, ``{name}`` one non-empty segment."""
    parts = _PARAM.split(path)
    if any("{" in p or "}" in p for p in parts):
        raise ValueError(f"route {path!r}: braces only around a parameter name, e.g. {{shop}}")
    return re.compile("[^/]+".join(re.escape(p) for p in parts))


def _allow(methods: set[str]) -> str:
    """The ``Allow`` header for a resource serving ``methods`` (HEAD with GET; OPTIONS always)."""
    if "GET" in methods:
        methods = methods | {"HEAD"}
    order = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    return ", ".join([m for m in order if m in methods] + ["OPTIONS"])


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; a host name we cannot judge is not loopback."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], app: HttpServer, max_connections: int) -> None:
        host = addr[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded concurrency: with every slot taken (slow clients), answer 503 at once
        # instead of spawning threads without limit.
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail with TimeoutError once a per-connection deadline has passed."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "sync-daemon"
    sys_version = ""
    # HTTP/1.0: one request per connection, so idle keep-alive connections never hold threads.
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.body_read = False
        timeout = self.server.app.request_timeout
        # Writes to a client that stopped reading give up after ``timeout``.
        self.connection.settimeout(timeout)
        # Reads share one deadline for request line, headers and body: a slowloris client that
        # drips a byte every few seconds is cut off as surely as a silent one.
        self.rfile.close()
        self.reader = _DeadlineReader(self.connection, time.monotonic() + timeout)
        self.rfile = io.BufferedReader(self.reader, 65536)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request", client=self.client_address[0], line=redact(format % args))

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def __getattr__(self, name: str) -> Any:
        # http.server looks up ``do_<METHOD>`` and answers 501 when it is missing; every other
        # verb (TRACE, which would echo tokens back, and unknown ones) gets the router's answer:
        # 404 for an unknown path, 405 with the route's ``Allow`` otherwise.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self, head: bool = False) -> None:
        try:
            resp = self.server.app._handle(self)
        except Exception as exc:  # last resort: the server thread must never die on a request
            log.error("http_handler_failed", path=redact(self.path), error=f"{type(exc).__name__}")
            resp = Response.json({"error": "internal error"}, 500)
        if resp is None:  # connection already answered (e.g. body too large, client gone)
            return
        if not self.body_read:
            # Answered without reading the body (404, 405, 401...): swallow it first, so the
            # client reads our answer instead of a connection reset.
            raw = self.headers.get("Content-Length", "").strip()
            if raw.isdigit() and "chunked" not in self.headers.get("Transfer-Encoding", ""):
                HttpServer._discard(self, int(raw))
        self._send(resp, head=head)

    def _send(self, resp: Response, head: bool = False) -> None:
        try:
            # The read deadline may have left a tiny socket timeout; writes get the full one.
            self.connection.settimeout(self.server.app.request_timeout)
            self.send_response(resp.status)
            headers = {k.lower(): (k, v) for k, v in resp.headers.items()}
            for k, v in headers.values():
                if k.lower() not in ("content-length", "connection"):
                    self.send_header(k, v)
            if "content-type" not in headers:
                self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(resp.body)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True


class HttpServer:
    """Liveness, readiness and metrics over HTTP, served from a daemon thread."""

    def __init__(
        self,
        cfg: HealthSection,
        *,
        last_tick: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        check_timeout: float = 2.0,
        max_body: int = 1024 * 1024,
        request_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.check_timeout = check_timeout
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._last_tick_fn = last_tick
        self._last_tick: float | None = None
        self._started_at = clock()
        self._checks: dict[str, Check] = {}
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._token = cfg.token.get_secret_value() if cfg.token is not None else None
        if not is_loopback(cfg.host) and not self._token:
            raise ConfigError(
                f"health.token: required when health.listen = {cfg.listen!r} is not a loopback "
                "address (or listen on 127.0.0.1)"
            )

    # -- wiring API ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Record that the main loop completed a cycle (liveness)."""
        self._last_tick = self.clock()

    def add_check(
        self, name: str, fn: CheckFn, critical: bool = True, timeout: float | None = None
    ) -> None:
        """Register (or replace) a readiness check ``fn() -> (ok, detail)``."""
        with self._lock:
            self._checks[name] = Check(name, fn, critical, timeout or self.check_timeout)

    def remove_check(self, name: str) -> None:
        with self._lock:
            self._checks.pop(name, None)

    def add_route(
        self,
        method: str,
        path: str,
        handler: RouteHandler,
        *,
        public: bool = False,
        max_body: int | None = None,
    ) -> None:
        """Mount ``handler(Request) -> Response`` for ``method`` on exactly ``path``.

        ``path`` is matched whole: ``/webhooks/shop/demo`` serves that path and nothing below
        or beside it. A ``{name}`` segment (``/fragments/{panel}``) matches one non-empty path
        segment; a literal route wins over a pattern. A path no route matches gets 404; a
        matched path with another method gets 405 with ``Allow`` listing the methods mounted on
        it. ``public=True`` skips the token (the handler must authenticate the caller itself,
        e.g. by the shop's webhook signature). ``max_body`` overrides the server's body limit
        for this route (413 before the body is read).
        """
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with /")
        route = _Route(method.upper(), path, _compile(path), handler, public, max_body)
        with self._lock:
            # Mounting the same method and path again replaces the route (config reload).
            self._routes = [r for r in self._routes if (r.method, r.path) != (route.method, path)]
            self._routes.append(route)
            self._routes.sort(key=lambda r: not r.literal)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("health server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.cfg.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind ``health.listen`` and serve in a daemon thread."""
        if self._server is not None:
            return
        self._server = _Server((self.cfg.host, self.cfg.port), self, self.max_connections)
        self._started_at = self.clock()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # How often the loop looks for a stop: stop() waits up to this long (the daemon's
            # shutdown too); an idle select() this often costs nothing worth saving.
            kwargs={"poll_interval": 0.05},
            name="health-http",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "health_server_started",
            listen=f"{self.cfg.host}:{self.port}",
            token_required=bool(self._token),
        )

    def stop(self) -> None:
        """Stop serving and close the socket. Safe to call twice or before start."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("health_server_stopped")

    # -- probes -------------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """``(alive, body)``: alive while the last tick is younger than ``loop_overdue``."""
        last = self._last_tick_fn() if self._last_tick_fn is not None else self._last_tick
        if last is None:
            last = self._started_at
        age = max(0.0, self.clock() - last)
        alive = age <= self.cfg.loop_overdue
        return alive, {
            "status": "alive" if alive else "overdue",
            "last_tick_age_seconds": round(age, 3),
            "overdue_after_seconds": self.cfg.loop_overdue,
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``: run every check in parallel, each bounded by its timeout."""
        with self._lock:
            checks = list(self._checks.values())
        runs = [(c, c.start()) for c in checks]
        results = [c.result(run) for c, run in runs]
        ready = all(r["ok"] for r in results if r["critical"])
        return ready, {"status": "ready" if ready else "not ready", "checks": results}

    # -- request handling ---------------------------------------------------------------------

    def _authorized(self, headers: dict[str, str]) -> bool:
        if not self._token:
            return True
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        value = value.strip()
        token = self._token.encode()
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.encode(), token)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            password = decoded.partition(b":")[2]
            # Both compared, always: timing must not reveal which form matched.
            whole = hmac.compare_digest(decoded, token)
            pw = hmac.compare_digest(password, token)
            return whole or pw
        return False

    def _resource(self, path: str) -> tuple[list[_Route], set[str]]:
        """The routes mounted on the one resource ``path`` matches, and its methods."""
        if path in _BUILTIN:
            return [], {"GET"}
        with self._lock:
            matches = [r for r in self._routes if r.regex.fullmatch(path)]
        if not matches:
            return [], set()
        # A literal route wins over a pattern; the routes of that one resource remain.
        chosen = matches[0].path
        routes = [r for r in matches if r.path == chosen]
        return routes, {r.method for r in routes}

    def _handle(self, h: _Handler) -> Response | None:
        parts = urlsplit(h.path)
        path = parts.path or "/"
        method = h.command.upper()
        headers = {k.lower(): v for k, v in h.headers.items()}
        if method == "HEAD":
            method = "GET"

        routes, methods = self._resource(path)
        if not methods:
            return Response.json({"error": "not found"}, 404)
        if method == "OPTIONS":
            return Response(204, {"Allow": _allow(methods), "Content-Type": "text/plain"}, b"")
        if method not in methods:
            return Response(
                405,
                {"Allow": _allow(methods), "Content-Type": "text/plain"},
                b"method not allowed\n",
            )

        if path == "/healthz":
            alive, body = self.liveness()
            return Response.json(body, 200 if alive else 503)
        if path == "/readyz":
            ready, body = self.readiness()
            return Response.json(body, 200 if ready else 503)

        route = next((r for r in routes if r.method == method), None)
        if (route is None or not route.public) and not self._authorized(headers):
            return Response(
                401,
                {"WWW-Authenticate": 'Basic realm="sync-daemon"', "Content-Type": "text/plain"},
                b"authentication required\n",
            )

        if route is None:  # /metrics
            try:
                return Response(200, {"Content-Type": metrics.CONTENT_TYPE}, metrics.render())
            except Exception as exc:
                log.error("metrics_render_failed", error=redact(f"{type(exc).__name__}: {exc}"))
                return Response.json({"error": "metrics unavailable"}, 500)

        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        bad = safejson.unstorable(query)
        if bad is not None:  # e.g. %00, which PostgreSQL refuses in every text value
            return Response.text(f"Bad request: {bad}\n", 400)
        limit = self.max_body if route.max_body is None else route.max_body
        payload = self._read_body(h, headers, limit)
        if payload is None:
            return None
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=payload,
            client=str(h.client_address[0]),
        )
        try:
            resp = route.handler(request)
        except Exception as exc:
            log.error(
                "route_handler_failed",
                path=path,
                method=method,
                error=redact(f"{type(exc).__name__}: {exc}"),
            )
            return Response.json({"error": "internal error", "type": type(exc).__name__}, 500)
        if not isinstance(resp, Response):
            log.error("route_handler_bad_return", path=path, returned=type(resp).__name__)
            return Response.json({"error": "internal error"}, 500)
        return resp

    def _read_body(self, h: _Handler, headers: dict[str, str], limit: int) -> bytes | None:
        """Read the body within ``max_body`` and the request timeout; ``None`` when answered."""
        h.body_read = True
        encoding = headers.get("transfer-encoding", "").strip().lower()
        if encoding:
            if encoding != "chunked":
                h._send(Response.text(f"Transfer-Encoding {encoding[:40]!r} not supported\n", 400))
                return None
            body = self._read_chunked(h, limit)
            if body is not None:
                # Handlers see a body of known length, as if sent with Content-Length.
                headers.pop("transfer-encoding", None)
                headers["content-length"] = str(len(body))
            return body
        raw = headers.get("content-length", "0").strip() or "0"
        if not raw.isdigit():
            h._send(Response.text("invalid Content-Length\n", 400))
            return None
        length = int(raw)
        if length > limit:
            h._send(Response.text(f"body larger than {limit} bytes\n", 413))
            self._discard(h, length)
            return None
        chunks: list[bytes] = []
        remaining = length
        try:
            while remaining > 0:  # the connection's read deadline bounds the whole loop
                chunk = h.rfile.read1(min(remaining, 65536))
                if not chunk:
                    raise ConnectionError
                chunks.append(chunk)
                remaining -= len(chunk)
        except (OSError, ConnectionError):
            h.close_connection = True
            return None
        return b"".join(chunks)

    @staticmethod
    def _read_chunked(h: _Handler, limit: int) -> bytes | None:
        """A ``Transfer-Encoding: chunked`` body (RFC 9112 7.1) within ``limit``; ``None`` when
        answered (400 malformed, 413 too large) or the client went away."""
        body = bytearray()
        try:
            while True:
                line = h.rfile.readline(1024)
                m = _CHUNK_SIZE.fullmatch(line)
                if m is None:
                    h._send(Response.text("malformed chunked body\n", 400))
                    h.close_connection = True
                    return None
                size = int(m.group(1), 16)
                if size == 0:
                    break
                if len(body) + size > limit:
                    h._send(Response.text(f"body larger than {limit} bytes\n", 413))
                    h.close_connection = True
                    return None
                while size > 0:  # the connection's read deadline bounds the whole loop
                    chunk = h.rfile.read1(min(size, 65536))
                    if not chunk:
                        raise ConnectionError
                    body += chunk
                    size -= len(chunk)
                if h.rfile.readline(3) not in (b"\r\n", b"\n"):
                    h._send(Response.text("malformed chunked body\n", 400))
                    h.close_connection = True
                    return None
            for _ in range(64):  # trailer fields: read and ignored
                if h.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                    break
        except (OSError, ConnectionError):
            h.close_connection = True
            return None
        return bytes(body)

    @staticmethod
    def _discard(h: _Handler, length: int) -> None:
        # Swallow a bounded part of the refused body so the client reads our 413 instead of a
        # connection reset (closing a socket with unread data sends RST).
        budget = min(length, 8 * 1024 * 1024)
        h.reader.deadline = min(h.reader.deadline, time.monotonic() + 1.0)
        try:
            while budget > 0:
                chunk = h.rfile.read1(min(budget, 65536))
                if not chunk:
                    break
                budget -= len(chunk)
        except OSError:
            pass
        h.close_connection = True
