"""The HTTP server over real HTTP on loopback: liveness, readiness, metrics, routes, auth."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from replicator import __version__, metrics
from replicator.config.core import HealthSection
from replicator.db import make_engine
from replicator.errors import ConfigError
from replicator.localpg import free_port
from replicator.ops.checks import engine_check, threshold_check
from replicator.web.server import HttpServer, Request, Response, is_loopback


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _server(clock: FakeClock | None = None, **kwargs: object) -> HttpServer:
    token = kwargs.pop("token", None)
    secret = SecretStr(str(token)) if token else None
    cfg = HealthSection(listen="127.0.0.1:0", loop_overdue=60, token=secret)
    if clock is not None:
        kwargs["clock"] = clock
    return HttpServer(cfg, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def server(clock: FakeClock) -> Iterator[HttpServer]:
    srv = _server(clock)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_liveness_flips_to_503_when_tick_overdue(server: HttpServer, clock: FakeClock) -> None:
    server.tick()
    r = httpx.get(f"{server.url}/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "alive"

    clock.now += 61
    r = httpx.get(f"{server.url}/healthz")
    assert r.status_code == 503
    assert r.json()["status"] == "overdue"
    assert r.json()["last_tick_age_seconds"] == pytest.approx(61)

    server.tick()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_liveness_from_callable_and_before_first_tick(clock: FakeClock) -> None:
    last: list[float | None] = [None]
    srv = _server(clock, last_tick=lambda: last[0])
    srv.start()
    try:
        # No tick yet: the start time counts, so a loop that never starts turns red later.
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        clock.now += 120
        assert httpx.get(f"{srv.url}/healthz").status_code == 503
        last[0] = clock.now - 5
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    finally:
        srv.stop()


def test_readiness_critical_and_non_critical(server: HttpServer) -> None:
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == []

    server.add_check("staging", lambda: (True, "ok"))
    server.add_check("shop:demo", lambda: (False, "HTTP 502 from shop"), critical=False)
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200
    checks = {c["name"]: c for c in r.json()["checks"]}
    assert checks["staging"] == {**checks["staging"], "ok": True, "critical": True}
    assert checks["shop:demo"]["ok"] is False
    assert checks["shop:demo"]["critical"] is False
    assert checks["shop:demo"]["detail"] == "HTTP 502 from shop"
    assert isinstance(checks["staging"]["ms"], float)

    server.add_check("erp", lambda: (False, "connection refused"), critical=True)
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "not ready"


def test_stuck_check_times_out_and_does_not_pile_up(server: HttpServer) -> None:
    release = threading.Event()
    calls: list[int] = []

    def stuck() -> tuple[bool, str]:
        calls.append(1)
        release.wait(30)  # "sleeps 30 s" unless the test releases it at the end
        return True, "late"

    server.add_check("erp", stuck)
    server.add_check("staging", lambda: (True, "ok"))
    try:
        t0 = time.monotonic()
        r = httpx.get(f"{server.url}/readyz", timeout=10)
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0
        assert r.status_code == 503
        checks = {c["name"]: c for c in r.json()["checks"]}
        assert checks["erp"]["ok"] is False
        assert checks["erp"]["detail"] == "timed out after 2s"
        assert checks["staging"]["ok"] is True
        # A second probe while the first run is still stuck joins it instead of starting another.
        r = httpx.get(f"{server.url}/readyz", timeout=10)
        assert r.status_code == 503
        assert len(calls) == 1
    finally:
        release.set()


def test_engine_and_threshold_checks(server: HttpServer, tmp_path: Path) -> None:
    ok_engine = make_engine(f"sqlite:///{tmp_path / 'ok.db'}", "test")
    # Nothing listens on this loopback port: the connection is refused at once.
    down = make_engine(f"postgresql://sync:hunter2@127.0.0.1:{free_port()}/erp", "test")
    lag: list[float | None] = [None]
    server.add_check("staging", engine_check(ok_engine))
    server.add_check("erp", engine_check(down))
    server.add_check("lag", threshold_check(lambda: lag[0], 300, "lag seconds"), critical=False)
    try:
        r = httpx.get(f"{server.url}/readyz", timeout=10)
        checks = {c["name"]: c for c in r.json()["checks"]}
        assert checks["staging"]["ok"] is True
        assert checks["staging"]["detail"].startswith("SELECT 1 in")
        assert checks["erp"]["ok"] is False
        assert checks["erp"]["detail"].startswith("OperationalError")
        assert "hunter2" not in r.text
        assert checks["lag"] == {
            **checks["lag"],
            "ok": False,
            "detail": "no lag seconds measured yet",
        }
        assert r.status_code == 503
        lag[0] = 12.5
        server.remove_check("erp")
        r = httpx.get(f"{server.url}/readyz", timeout=10)
        assert r.status_code == 200
        checks = {c["name"]: c for c in r.json()["checks"]}
        assert (
            checks["lag"]["ok"] is True
            and checks["lag"]["detail"] == "lag seconds 12.5 (limit 300)"
        )
    finally:
        ok_engine.dispose()
        down.dispose()


def test_check_exception_is_failed_check_with_redacted_message(server: HttpServer) -> None:
    def boom() -> tuple[bool, str]:
        raise RuntimeError("cannot connect to postgresql://sync:hunter2@db:5432/erp")

    server.add_check("erp", boom)
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 503
    detail = r.json()["checks"][0]["detail"]
    assert detail.startswith("RuntimeError: cannot connect")
    assert "hunter2" not in r.text
    assert "***" in detail


def test_metrics_exposition_parses_and_has_the_metric_names(server: HttpServer) -> None:
    metrics.CHANGES_APPLIED.labels(source="erp", table="public.stock", op="update").inc(3)
    metrics.REPLICATION_LAG_SECONDS.labels(source="erp", slot="sync_daemon").set(1.5)
    metrics.LOOP_DURATION.observe(0.2)
    beat = time.time() - 42

    def refresh() -> None:
        metrics.HEARTBEAT_AGE.labels(source="erp").set(time.time() - beat)

    def broken() -> None:
        raise RuntimeError("refresher bug")

    metrics.on_scrape(refresh)
    metrics.on_scrape(broken)
    try:
        r = httpx.get(f"{server.url}/metrics")
    finally:
        metrics.remove_on_scrape(refresh)
        metrics.remove_on_scrape(broken)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "sync_replication_lag_seconds",
        "sync_replication_lag_bytes",
        "sync_slot_retained_wal_bytes",
        "sync_changes_applied",
        "sync_orders",
        "sync_push_lag_seconds",
        "sync_breaker_open",
        "sync_last_replication_timestamp_seconds",
        "sync_heartbeat_age_seconds",
        "sync_loop_duration_seconds",
        "sync_info",
    ):
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    key = (
        "sync_changes_applied_total",
        (("op", "update"), ("source", "erp"), ("table", "public.stock")),
    )
    assert samples[key] >= 3
    age = samples[("sync_heartbeat_age_seconds", (("source", "erp"),))]
    assert 41 <= age < 50  # computed at scrape time by the refresher
    assert samples[("sync_info", (("version", __version__),))] == 1


def test_mounted_route_body_query_and_413(clock: FakeClock) -> None:
    srv = _server(clock, max_body=1024)
    seen: list[Request] = []

    def echo(req: Request) -> Response:
        seen.append(req)
        return Response.json({"len": len(req.body), "q": req.query})

    srv.add_route("POST", "/webhooks/{shop}", echo)
    srv.start()
    try:
        r = httpx.post(
            f"{srv.url}/webhooks/shop1?topic=order.created",
            content=b"x" * 100,
            headers={"X-Signature": "abc"},
        )
        assert r.status_code == 200
        assert r.json() == {"len": 100, "q": {"topic": "order.created"}}
        assert seen[0].headers["x-signature"] == "abc"
        assert seen[0].path == "/webhooks/shop1"

        r = httpx.post(f"{srv.url}/webhooks/shop1", content=b"x" * 200_000)
        assert r.status_code == 413
        assert len(seen) == 1

        # Headers announcing 10 MB, a little of it sent: refused before the body is read.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"POST /webhooks/x HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
            s.sendall(b"y" * 1000)
            assert s.recv(100).startswith(b"HTTP/1.0 413")

        srv.add_route("POST", "/small", echo, max_body=10)
        assert httpx.post(f"{srv.url}/small", content=b"z" * 11).status_code == 413
        assert httpx.post(f"{srv.url}/small", content=b"z" * 10).json()["len"] == 10

        assert httpx.get(f"{srv.url}/webhooks/shop1").status_code == 405
        assert httpx.get(f"{srv.url}/nothing-here").status_code == 404
    finally:
        srv.stop()


def test_route_handler_exception_is_500_without_secret(server: HttpServer) -> None:
    def bad(req: Request) -> Response:
        raise ValueError("password=hunter2 rejected")

    server.add_route("GET", "/manage", bad)
    r = httpx.get(f"{server.url}/manage")
    assert r.status_code == 500
    assert "hunter2" not in r.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_slow_client_does_not_block_others_and_is_cut_off(clock: FakeClock) -> None:
    srv = _server(clock, request_timeout=1.0)
    srv.start()
    try:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: loc")  # half a request, then silence
        t0 = time.monotonic()
        assert httpx.get(f"{srv.url}/healthz", timeout=3).status_code == 200
        assert time.monotonic() - t0 < 1.0
        # The server gives up on the silent client after its socket timeout.
        assert slow.recv(100) == b""
        assert time.monotonic() - t0 < 3.0
        slow.close()
    finally:
        srv.stop()


def test_dripping_client_is_cut_off_at_the_deadline(clock: FakeClock) -> None:
    srv = _server(clock, request_timeout=1.0)
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            t0 = time.monotonic()
            closed = False
            for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40:
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)  # each byte well inside any per-read timeout
                if time.monotonic() - t0 > 3:
                    break
            if not closed:
                s.settimeout(3)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""
            assert time.monotonic() - t0 < 3.0
    finally:
        srv.stop()


def test_connection_count_is_bounded(clock: FakeClock) -> None:
    srv = _server(clock, request_timeout=1.0, max_connections=2)
    srv.start()
    socks = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            socks.append(s)
        time.sleep(0.2)
        r = httpx.get(f"{srv.url}/healthz", timeout=3)
        assert r.status_code == 503  # refused at once rather than a thread per slow client
        time.sleep(1.5)  # the slow ones time out and free their slots
        assert httpx.get(f"{srv.url}/healthz", timeout=3).status_code == 200
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_non_loopback_without_token_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"health\.token"):
        HttpServer(HealthSection(listen="0.0.0.0:8787"))
    with pytest.raises(ConfigError, match=r"health\.token"):
        HttpServer(HealthSection(listen="[::]:8787"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("db.example.com")
    # With a token the server may be built for a public address (not started: loopback only here).
    HttpServer(HealthSection(listen="0.0.0.0:8787", token=SecretStr("s3cret-token")))


def test_token_protects_everything_but_probes(clock: FakeClock) -> None:
    srv = _server(clock, token="s3cret-token")
    srv.add_route("GET", "/manage", lambda req: Response.text("manage page"))
    srv.add_route("POST", "/webhooks/{shop}", lambda req: Response.text("got it"), public=True)
    srv.start()
    try:
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        r = httpx.get(f"{srv.url}/metrics")
        assert r.status_code == 401
        assert "s3cret" not in r.text
        assert "basic" in r.headers["www-authenticate"].lower()
        assert httpx.get(f"{srv.url}/manage").status_code == 401
        assert (
            httpx.get(f"{srv.url}/manage", headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        ok = httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        basic = base64.b64encode(b"admin:s3cret-token").decode()
        r = httpx.get(f"{srv.url}/manage", headers={"Authorization": f"Basic {basic}"})
        assert r.status_code == 200 and r.text == "manage page"
        assert httpx.post(f"{srv.url}/webhooks/a", content=b"{}").status_code == 200
    finally:
        srv.stop()


def test_stop_is_idempotent_and_frees_port(clock: FakeClock) -> None:
    srv = _server(clock)
    srv.stop()  # before start: no-op
    srv.start()
    port = srv.port
    srv.stop()
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_routing_is_exact_and_allow_lists_what_the_route_serves(clock: FakeClock) -> None:
    srv = _server(clock, token="s3cret-token")
    hits: list[str] = []

    def hit(req: Request) -> Response:
        hits.append(req.path)
        return Response.text("ok")

    srv.add_route("GET", "/", hit)
    srv.add_route("GET", "/fragments/{panel}", hit)
    srv.add_route("POST", "/webhooks/shop/hooks", hit, public=True)
    srv.add_route("GET", "/webhooks/erp", hit, public=True)
    srv.add_route("POST", "/webhooks/erp", hit, public=True)
    srv.start()
    auth = {"Authorization": "Bearer s3cret-token"}
    try:
        with httpx.Client(base_url=srv.url, headers=auth) as c:
            # "/" is the page, not a catch-all; no prefix reaches a shop's receiver.
            for path in ("/nothing", "/order/", "/fragments", "/fragments/a/b", "/webhooks/shop/0"):
                assert c.get(path).status_code == 404, path
            for path in ("/webhooks/shop/0", "/webhooks/shop/hooksX", "/webhooks/shop/hooks/x"):
                assert c.post(path, content=b"{}").status_code == 404, path
            assert c.get("/fragments/orders").status_code == 200
            # NUL in a query parameter (PostgreSQL refuses it in text): 400 naming it, no handler.
            r = c.get("/fragments/orders?q=a%00b")
            assert r.status_code == 400 and "q: contains a NUL character" in r.text
            assert c.post("/webhooks/shop/hooks", content=b"{}").status_code == 200
            assert hits == ["/fragments/orders", "/webhooks/shop/hooks"]
            # Allow lists the methods of the matched route, for 405 and OPTIONS alike.
            r = c.get("/webhooks/shop/hooks")
            assert (r.status_code, r.headers["allow"]) == (405, "POST, OPTIONS")
            r = c.request("OPTIONS", "/webhooks/erp")
            assert (r.status_code, r.headers["allow"]) == (204, "GET, HEAD, POST, OPTIONS")
            for path in ("/healthz", "/readyz", "/metrics"):
                r = c.post(path, content=b"x")
                assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD, OPTIONS"), path
                assert c.request("OPTIONS", path).headers["allow"] == "GET, HEAD, OPTIONS"
            assert c.request("OPTIONS", "/nothing").status_code == 404
            # TRACE (which would echo the token back) and unknown verbs: 405, never 501.
            for verb in ("TRACE", "PUT", "DELETE", "FOO"):
                r = c.request(verb, "/")
                assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD, OPTIONS"), verb
                assert c.request(verb, "/elsewhere").status_code == 404
            assert c.head("/").status_code == 200
        assert hits[-1] == "/"
    finally:
        srv.stop()


def test_chunked_bodies_are_read_within_the_limit(clock: FakeClock) -> None:
    srv = _server(clock, max_body=1024)
    seen: list[Request] = []

    def echo(req: Request) -> Response:
        seen.append(req)
        return Response.json({"len": len(req.body)})

    srv.add_route("POST", "/in", echo)
    srv.start()

    def raw(body: bytes) -> bytes:
        head = b"POST /in HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(head + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    try:
        with httpx.Client() as c:  # a generator body is sent chunked
            r = c.post(f"{srv.url}/in", content=iter([b"ab", b"", b"cde"]))
            assert (r.status_code, r.json()) == (200, {"len": 5})
            # Handlers see a body of known length, as if sent with Content-Length.
            assert seen[-1].headers["content-length"] == "5"
            assert "transfer-encoding" not in seen[-1].headers
        assert raw(b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n").startswith(b"HTTP/1.0 200")
        assert seen[-1].body == b"abc"
        assert raw(b"400\r\n" + b"x" * 1024 + b"\r\n1\r\ny\r\n0\r\n\r\n").startswith(
            b"HTTP/1.0 413"
        )
        for bad in (b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\n\r\n", b"3\r\nabcd\r\n0\r\n\r\n"):
            assert raw(bad).startswith(b"HTTP/1.0 400"), bad
        assert len(seen) == 2
    finally:
        srv.stop()
