"""The Manage page over plain HTTP on a real health server: fragments render from a real staging
store, CSRF is enforced on every POST, the token is required when bound elsewhere, no DSN
password reaches any page, and the lag history records, purges and charts."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from replicator.changes import Checkpoint
from replicator.config import Config, parse_config
from replicator.db import make_engine
from replicator.logstore import LogStore
from replicator.orders.ledger import Ledger
from replicator.staging import StagingStore
from replicator.staging.lag import lag_history, lag_history_t, purge_lag_history, record_lag_sample
from replicator.state import DaemonState
from replicator.web.app import WebContext, mount
from replicator.web.csrf import COOKIE, CsrfGuard
from replicator.web.server import HttpServer

SECRET = "s3cret-Pw0rd"


def _config(tmp_path: Path, listen: str = "127.0.0.1:0", token: str | None = None) -> Config:
    health: dict[str, Any] = {"listen": listen}
    if token:
        health["token"] = token
    return parse_config(
        {
            "erp": {"dsn": f"postgresql://erp_app:{SECRET}@erp.example:5432/erp"},
            "capture": {"tables": ["public.order_header"]},
            "staging": {"url": f"sqlite:///{tmp_path / 'staging.db'}"},
            "daemon": {"state_dir": str(tmp_path)},
            "health": health,
            "schedules": {"orders": "*/5 * * * *", "reconcile": "30 2 * * *"},
        },
        str(tmp_path / "config.toml"),
    )


def _order(
    led: Ledger,
    e: str,
    state: str,
    *,
    erp: str | None = None,
    error: str | None = None,
    seen: datetime | None = None,
    diff: list[dict[str, Any]] | None = None,
) -> None:
    now = (seen or datetime.now(UTC)).replace(tzinfo=None)
    with led.begin() as conn:
        led.insert(
            conn,
            shop="demo",
            e_number=e,
            state=state,
            erp_order_no=erp,
            last_error=error,
            payload_hash=f"h{e}",
            payload=json.dumps({"number": e, "total": "9.50"}).encode(),
            first_seen=now,
            last_seen=now,
            pending_payload=b'{"number": "%s", "total": "12.00"}' % e.encode() if diff else None,
            diff=json.dumps(diff) if diff else None,
            update_queued=bool(diff),
        )
        led.event(conn, "demo", e, now, "downloaded", "by poll")
        if state == "failed":
            led.event(conn, "demo", e, now, "failed", error)
        if erp:
            led.event(conn, "demo", e, now, "written", f"ERP order {erp}")


@dataclass
class Site:
    server: HttpServer
    store: StagingStore
    engine: sa.Engine
    cfg: Config

    @property
    def url(self) -> str:
        return self.server.url

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    cfg = _config(tmp_path)
    store = StagingStore(cfg.staging_url)
    store.setup()
    engine = store.engine
    led = Ledger(engine)
    base = datetime.now(UTC) - timedelta(hours=1)
    for i in range(25):
        _order(
            led, f"{1000 + i}", "delivered", erp=f"SO{100000 + i}", seen=base + timedelta(minutes=i)
        )
    _order(led, "2001", "awaiting")
    _order(led, "2002", "failed", error="line 2: SKU 'AB-12' has no ERP item")
    _order(
        led,
        "2003",
        "failed",
        error=f"ERP refused: could not connect to postgresql://erp_app:{SECRET}@erp.example/erp",
    )
    _order(
        led,
        "2004",
        "update-pending",
        erp="SO200004",
        diff=[{"field": "total", "old": "9.50", "new": "12.00"}],
    )
    logstore = LogStore(engine)
    logstore.start()
    for service, level, event in [
        ("orders", "info", "order_cycle"),
        ("orders", "error", "order_failed"),
        ("capture", "warning", "capture_reconnecting"),
        ("capture", "info", "capture_batch"),
    ]:
        logstore.sink(
            {
                "event": event,
                "level": level,
                "service": service,
                "dsn": f"postgresql://u:{SECRET}@h/db",
            }
        )
    assert logstore.flush(5)
    logstore.stop()
    with store.engine.begin() as conn:
        store.write_checkpoint(
            conn,
            Checkpoint(source="erp", position="0/16B3748", state="streaming"),
            slot="sync_slot",
        )
    store.record_heartbeat("erp", sent_at=datetime.now(UTC), lag_seconds=2.5, lag_bytes=4096)
    for minutes in range(30, 0, -5):
        record_lag_sample(
            engine,
            [{"source": "erp", "lag_seconds": minutes / 3, "lag_bytes": minutes * 1000}],
            at=datetime.now(UTC) - timedelta(minutes=minutes),
        )
    state = DaemonState(capture_connected=True)
    svc = state.service("orders")
    svc.last_run_at = datetime.now(UTC) - timedelta(minutes=2)
    svc.last_result, svc.last_ok = "total 3, new 3, skipped 0, errored 0", True
    push = state.service("stock_push")
    push.progress, push.breaker_open = "1200/4800 items", True
    state.service("reconcile")  # a daemon that pushes stock runs the reconcile too
    server = HttpServer(cfg.health)
    mount(
        server,
        WebContext(
            config=cfg,
            staging_engine=engine,
            store=store,
            daemon_state=lambda: state,
            logstore=logstore,
        ),
    )
    server.start()
    try:
        yield Site(server, store, engine, cfg)
    finally:
        server.stop()
        store.dispose()


def _column(html: str, state: str) -> str:
    m = re.search(rf'data-state="{state}">(.*?)</ol>', html, re.S)
    assert m, f"no {state} column"
    return m.group(1)


def test_orders_fragment_columns_paging_and_search(site: Site) -> None:
    r = site.get("/fragments/orders")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    delivered = _column(r.text, "delivered")
    assert delivered.count('class="order"') == 20  # 20 per state by default
    assert delivered.index("1024") < delivered.index("1010")  # newest first
    assert "SO100024" in delivered
    assert "2001" in _column(r.text, "awaiting")
    failed = _column(r.text, "failed")
    assert "2002" in failed and "SKU &#39;AB-12&#39; has no ERP item" in failed
    page2 = _column(site.get("/fragments/orders?page_delivered=2").text, "delivered")
    assert page2.count('class="order"') == 5 and "1000" in page2 and "1024" not in page2
    found = site.get("/fragments/orders?q=SO100003").text  # by ERP order number
    assert _column(found, "delivered").count('class="order"') == 1 and ">1003<" in found
    assert _column(site.get("/fragments/orders?q=2002").text, "failed").count('class="order"') == 1


def test_order_page_shows_numbers_payload_and_timeline(site: Site) -> None:
    r = site.get("/order?shop=demo&e=2002")
    assert r.status_code == 200
    assert "SKU &#39;AB-12&#39; has no ERP item" in r.text
    assert "&#34;total&#34;: &#34;9.50&#34;" in r.text  # raw payload, pretty-printed and escaped
    assert re.search(r"downloaded.*failed", r.text, re.S)
    r = site.get("/order?shop=demo&e=1003")
    assert 'id="erp-order-no">SO100003<' in r.text and 'id="e-number">1003<' in r.text
    assert site.get("/order?shop=demo&e=nope").status_code == 404
    tl = site.get("/fragments/timeline?shop=demo&e=1003").text
    assert "written" in tl and "ERP order SO100003" in tl


def test_updates_logs_services_and_replication_fragments(site: Site) -> None:
    up = site.get("/fragments/updates").text
    assert "2004" in up and "12.00" in up and "Read-only" in up  # no importer: no buttons
    assert "/actions/accept" not in up

    logs = site.get("/fragments/logs").text
    assert logs.index("capture_batch") < logs.index("order_cycle")  # newest first
    only = site.get("/fragments/logs?service=orders&level=error").text
    assert "order_failed" in only and "order_cycle" not in only and "capture" not in only
    warn = site.get("/fragments/logs?level=warning").text
    assert "capture_reconnecting" in warn and "order_failed" in warn and "capture_batch" not in warn

    svc = site.get("/fragments/services").text
    assert "every 5 minutes" in svc and "at 02:30 every day" in svc
    assert "total 3, new 3" in svc and "1200/4800 items" in svc and 'value="25.0"' in svc
    row = re.search(r'data-service="stock_push">(.*?)</tr>', svc, re.S)
    assert row and "breaker open" in row.group(1)

    rep = site.get("/fragments/replication").text
    assert "sync_slot" in rep and "2.5 s" in rep and "4.0 kB" in rep
    assert "<polyline" in rep and "0/16B3748" in rep


def test_no_dsn_password_on_any_page(site: Site) -> None:
    paths = [
        "/",
        "/order?shop=demo&e=2003",
        "/fragments/orders",
        "/fragments/logs",
        "/fragments/services",
        "/fragments/replication",
        "/fragments/updates",
        "/fragments/summary",
        "/fragments/timeline?shop=demo&e=2003",
    ]
    for path in paths:
        r = site.get(path)
        assert r.status_code == 200, path
        assert SECRET not in r.text, path
    page = site.get("/").text
    assert "postgresql://erp_app:***@erp.example:5432/erp" in page
    assert (
        "could not connect to postgresql://erp_app:***@" in site.get("/order?shop=demo&e=2003").text
    )


def _csrf_session(site: Site) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=site.url, timeout=10)
    page = client.get("/order?shop=demo&e=2004")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if token is None:  # read-only page: take the token from the cookie the page set
        return client, client.cookies[COOKIE]
    return client, token.group(1)


def test_post_without_csrf_token_or_cross_origin_is_refused(site: Site) -> None:
    client, token = _csrf_session(site)
    form = {"shop": "demo", "e_number": "2004"}
    try:
        r = client.post("/actions/accept", data=form)
        assert r.status_code == 403 and "missing CSRF token" in r.text
        r = client.post("/actions/accept", data={**form, "csrf_token": "x.y"})
        assert r.status_code == 403
        r = client.post(
            "/actions/accept",
            data={**form, "csrf_token": token},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 403 and "cross-origin" in r.text
        r = client.post(
            "/actions/accept",
            data={**form, "csrf_token": token},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert r.status_code == 403
        # A forged cookie + matching field (sub-domain cookie injection) fails the HMAC.
        forged = CsrfGuard().new_token()
        r = httpx.post(
            site.url + "/actions/accept",
            data={**form, "csrf_token": forged},
            cookies={COOKIE: forged},
        )
        assert r.status_code == 403 and "expired" in r.text
        # The genuine token passes the check and reaches the action (read-only here: 409).
        r = client.post(
            "/actions/accept", data={**form, "csrf_token": token}, headers={"Origin": site.url}
        )
        assert r.status_code == 409 and "read-only" in r.text
    finally:
        client.close()
    entry = Ledger(site.engine).get("demo", "2004")
    assert entry is not None and entry.state == "update-pending"


def test_static_files_and_security_headers(site: Site) -> None:
    css = site.get("/static/manage.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = site.get("/static/manage.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert site.get("/static/../app.py").status_code == 404
    assert site.get("/static/nope.js").status_code == 404
    page = site.get("/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_token_required_when_bound_elsewhere(tmp_path: Path) -> None:
    cfg = _config(tmp_path, listen="0.0.0.0:0", token="tok-123")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'staging.db'}")
    server = HttpServer(cfg.health)
    mount(server, WebContext(config=cfg, staging_engine=engine))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        for path in ("/", "/fragments/orders", "/order?shop=a&e=1", "/static/manage.css"):
            r = httpx.get(base + path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert httpx.post(base + "/actions/accept", data={"shop": "a"}).status_code == 401
        ok = httpx.get(base + "/", headers={"Authorization": "Bearer tok-123"})
        assert ok.status_code == 200 and "Orders" in ok.text and "tok-123" not in ok.text
        basic = base64.b64encode(b"admin:tok-123").decode()
        assert httpx.get(base + "/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert httpx.get(base + "/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        server.stop()
        engine.dispose()


def test_record_lag_sample_purges_past_retention(staging_url: str) -> None:
    engine = make_engine(staging_url, "test")
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = [
        {"source": "erp", "lag_seconds": 1.5, "lag_bytes": 10},
        {"source": "shop", "lag_seconds": None, "lag_bytes": None},
    ]
    assert record_lag_sample(engine, rows, at=now - timedelta(hours=50)) == 2
    assert record_lag_sample(engine, rows, at=now - timedelta(hours=1)) == 2
    hist = lag_history(engine, now - timedelta(days=3))
    assert [s.lag_seconds for s in hist["erp"]] == [1.5]  # the 50 h old sample went
    assert hist["shop"][0].lag_seconds is None
    record_lag_sample(engine, [{"source": "erp", "lag_seconds": 2, "lag_bytes": 20}], at=now)
    assert purge_lag_history(engine, timedelta(minutes=30), now=now) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(lag_history_t)).scalar() == 1
    engine.dispose()
