"""The Manage page end to end in a real headless Chromium (Debian's ``chromium`` driven by
Playwright): orders imported through the importer into a real PostgreSQL ERP appear in the right
colour, the failed order's reason shows, logs filter, accepting an update changes the ERP row, a
POST without the CSRF token is refused, and panels refresh by themselves.

Screenshots are kept under ``test-artifacts/`` (desktop and phone width).
Skipped when ``/usr/bin/chromium`` or Playwright is missing — except in CI (``CI=true``), where
they must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from replicator.changes import Checkpoint
from replicator.config.core import HealthSection
from replicator.logstore import LogStore
from replicator.orders.coordinator import OrderImportService
from replicator.orders.results import utcnow
from replicator.orders.sample import ListShop, sample_order
from replicator.staging import StagingStore
from replicator.staging.lag import record_lag_sample
from replicator.state import DaemonState
from replicator.web.app import WebContext, mount
from replicator.web.server import HttpServer
from tests import test_orders_support as support
from tests.test_orders_support import erp_rows

# Fixtures shared with the order tests (pytest finds them as module attributes); the template
# fixture exists in newer versions of the support module only.
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory
_pg_erp_template = getattr(support, "_pg_erp_template", None)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
GREEN, BLUE, RED = "rgb(21, 128, 61)", "rgb(29, 78, 216)", "rgb(185, 28, 28)"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        if _in_ci():
            raise
        pytest.skip(f"playwright is not installed: {exc}")
    if not CHROMIUM.exists() and not _in_ci():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Shop:
    url: str
    svc: OrderImportService
    shop: ListShop
    erp_url: str


@pytest.fixture
def manage(tmp_path: Path, pg_erp_url: str, service_factory: Any) -> Iterator[Shop]:
    svc, shop = service_factory(pg_erp_url, auto_apply_updates=False)
    # Three good orders, one the ERP cannot take (unknown SKU), one paid-for-later order.
    for n in (1001, 1002, 1003):
        shop.put(sample_order(n, lines=2))
    shop.put(sample_order(1004, skus=["SKU-X1", "AB-12"]))
    assert svc.run_cycle().new == 3
    # An order the shop changed after import: queued for a person (auto_apply_updates = false).
    shop.put(
        sample_order(1001, lines=3, customer_note="please ring twice"),
        updated_at=datetime.now(UTC) + timedelta(seconds=1),
    )
    svc.run_cycle(utcnow() + timedelta(seconds=5))
    assert svc.ledger.get("shop", "1001").state == "update-pending"
    # One order that arrived and waits for the next cycle.
    shop.put(sample_order(1005))
    svc.inbox.offer(shop._order("1005"), "webhook", utcnow())

    staging_url = svc.cfg.staging_url
    store = StagingStore(staging_url)
    store.setup()
    with store.engine.begin() as conn:
        store.write_checkpoint(
            conn,
            Checkpoint(source="erp", position="0/3000060", state="streaming"),
            slot="sync_daemon",
        )
    store.record_heartbeat("erp", sent_at=datetime.now(UTC), lag_seconds=1.2, lag_bytes=2048)
    now = datetime.now(UTC)
    for m in range(240, 0, -2):  # four hours of samples with a burst in the middle
        lag = 40.0 if 100 < m < 130 else 1.0 + (m % 7) / 3
        record_lag_sample(
            store.engine,
            [{"source": "erp", "lag_seconds": lag, "lag_bytes": int(lag * 5000)}],
            at=now - timedelta(minutes=m),
        )

    logstore = LogStore(store.engine)
    logstore.start()
    for service, level, event in [
        ("capture", "info", "capture_batch_applied"),
        ("orders", "info", "order_cycle"),
        ("orders", "error", "order_failed"),
        ("stock_push", "warning", "shop_slow"),
    ]:
        logstore.sink({"event": event, "level": level, "service": service, "shop": "shop"})
    assert logstore.flush(5)

    state = DaemonState(capture_connected=True)
    orders = state.service("orders")
    orders.last_run_at, orders.last_ok = datetime.now(UTC), True
    orders.last_result = "total 5, new 3, skipped 0, errored 1"
    push = state.service("stock_push")
    push.progress = "3200/8000 items"
    server = HttpServer(HealthSection(listen="127.0.0.1:0"))
    mount(
        server,
        WebContext(
            config=svc.cfg,
            staging_engine=store.engine,
            store=store,
            daemon_state=lambda: state,
            logstore=logstore,
            importer=svc.actions,
            refresh_seconds=1.0,
        ),
    )
    server.start()
    try:
        yield Shop(server.url, svc, shop, pg_erp_url)
    finally:
        server.stop()
        logstore.stop()
        store.dispose()


def _colour(page: Any, selector: str) -> str:
    return str(page.eval_on_selector(selector, "e => getComputedStyle(e).borderTopColor"))


def test_manage_page_in_a_browser(browser: Any, manage: Shop) -> None:
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(manage.url + "/")

    # Orders in the right column and colour.
    delivered = page.locator('.col.state-delivered li.order[data-e-number="1002"]')
    assert delivered.is_visible() and "SO10000" in delivered.inner_text()
    assert page.locator('.col.state-awaiting li.order[data-e-number="1005"]').is_visible()
    failed = page.locator('.col.state-failed li.order[data-e-number="1004"]')
    assert "SKU 'AB-12' has no ERP item" in failed.inner_text()
    assert _colour(page, ".col.state-delivered") == GREEN
    assert _colour(page, ".col.state-awaiting") == BLUE
    assert _colour(page, ".col.state-failed") == RED
    assert page.locator("#replication svg.spark polyline").count() >= 2
    assert "3200/8000 items" in page.locator("#services").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "manage-page.png"), full_page=True)

    # Logs: filter by level, then by service; the panel updates in place.
    logs = page.locator("#logs-panel")
    assert "capture_batch_applied" in logs.inner_text()
    page.select_option("#log-level", "warning")
    expect(logs).not_to_contain_text("capture_batch_applied")
    text = logs.inner_text()
    assert "order_failed" in text and "shop_slow" in text and "order_cycle" not in text
    page.select_option("#log-service", "orders")
    expect(logs).not_to_contain_text("shop_slow")
    assert {r.get_attribute("data-level") for r in logs.locator("tr[data-level]").all()} == {
        "error"
    }
    assert "service=orders" in page.url and "level=warning" in page.url

    # Search by ERP order number narrows the columns in place.
    (order_no,) = erp_rows(
        manage.erp_url, "SELECT order_no FROM order_header WHERE e_number = '1003'"
    )
    page.fill('form.search input[name="q"]', order_no[0])
    page.click('form.search button[type="submit"]')
    expect(page.locator("#orders-panel li.order")).to_have_count(1)
    assert page.locator('#orders-panel li.order[data-e-number="1003"]').is_visible()
    page.goto(manage.url + "/")

    # Live refresh: an order imported now appears without a reload.
    manage.shop.put(sample_order(1006), updated_at=datetime.now(UTC) + timedelta(seconds=2))
    manage.svc.run_cycle(utcnow() + timedelta(seconds=30))
    page.locator('.col.state-delivered li.order[data-e-number="1006"]').wait_for(timeout=8000)

    # The failed order's page: the reason and the timeline.
    page.click('.col.state-failed a.e:text("1004")')
    page.wait_for_url("**/order?*")
    assert "SKU 'AB-12' has no ERP item" in page.locator("#last-error").inner_text()
    timeline = page.locator("ol.timeline").inner_text()
    assert "downloaded" in timeline and "failed" in timeline
    assert '"AB-12"' in page.locator("pre.payload").first.inner_text()
    assert "has no ERP item" in page.locator("#mapped").inner_text()  # the dry-run mapping says why
    page.screenshot(path=str(ARTIFACTS / "manage-order-failed.png"), full_page=True)

    # A delivered order's page: both numbers and the rows the mapping makes.
    page.goto(manage.url + "/order?shop=shop&e=1003")
    assert page.locator("#erp-order-no").inner_text() == order_no[0]
    assert page.locator("#mapped table.rows").count() == 2
    assert order_no[0] in page.locator("#mapped").inner_text()

    # Accept the update of 1001 from the updates queue: the ERP order changes.
    assert erp_rows(manage.erp_url, "SELECT note FROM order_header WHERE e_number = '1001'") != [
        ("please ring twice",)
    ]
    page.goto(manage.url + "/#updates")
    update = page.locator('li.update[data-e-number="1001"]')
    assert "customer_note" in update.inner_text()
    update.locator('button[name="accept"]').click()
    page.wait_for_url("**/?done=accepted*")
    assert "Update accepted" in page.locator(".flash.ok").inner_text()
    assert erp_rows(manage.erp_url, "SELECT note FROM order_header WHERE e_number = '1001'") == [
        ("please ring twice",)
    ]
    assert erp_rows(
        manage.erp_url,
        "SELECT count(*) FROM order_line ol JOIN order_header oh "
        "ON ol.order_no = oh.order_no WHERE oh.e_number = '1001'",
    ) == [(3,)]
    accepted = manage.svc.ledger.get("shop", "1001")
    assert accepted is not None and accepted.state == "delivered"

    # Cancel from an order page (the button asks first): the ERP order is marked cancelled.
    page.on("dialog", lambda d: d.accept())
    page.goto(manage.url + "/order?shop=shop&e=1003")
    page.click('button[name="cancel"]')
    page.wait_for_url("**done=cancelled*")
    assert "marked cancelled" in page.locator(".flash.ok").inner_text()
    assert "cancelled" in page.locator("ol.timeline").inner_text()
    assert erp_rows(manage.erp_url, "SELECT status FROM order_header WHERE e_number = '1003'") == [
        ("cancelled",)
    ]

    # A POST without the CSRF token (same browser session, cookies and all) is refused.
    r = page.request.post(manage.url + "/actions/ignore", form={"shop": "shop", "e_number": "1002"})
    assert r.status == 403 and "CSRF" in r.text()
    r = page.request.post(
        manage.url + "/actions/cancel",
        form={"shop": "shop", "e_number": "1002", "csrf_token": "forged.0"},
    )
    assert r.status == 403
    assert erp_rows(manage.erp_url, "SELECT status FROM order_header WHERE e_number = '1002'") == [
        ("open",)
    ]
    assert not errors, errors

    # Phone width: one column, nothing wider than the screen.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    pp = phone.new_page()
    pp.goto(manage.url + "/")
    width = pp.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"page is {width}px wide on a 390px phone"
    pp.screenshot(path=str(ARTIFACTS / "manage-page-phone.png"), full_page=True)
    phone.close()
    ctx.close()


def test_manage_page_tells_the_truth(browser: Any, manage: Shop) -> None:
    """Ages are when an order was imported or failed (not "last seen", which every cycle moves),
    only configured services are listed, a failed order has a Retry button, the lag chart fits
    its data, wide mapped rows scroll, and a harmless skip reason is not red."""
    import sqlalchemy as sa

    from replicator.orders.ledger import ledger_t

    svc = manage.svc
    with svc.ledger.begin() as conn:
        conn.execute(
            sa.update(ledger_t)
            .where(ledger_t.c.e_number == "1002")
            .values(delivered_at=utcnow() - timedelta(hours=3))
        )
    manage.shop.put(sample_order(1007, paid=False))
    svc.run_cycle(utcnow() + timedelta(seconds=30))  # moves every order's last_seen to now
    assert svc.ledger.get("shop", "1007").state == "skipped"

    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    page.goto(manage.url + "/")
    imported = page.locator('.col.state-delivered li.order[data-e-number="1002"] time')
    assert imported.inner_text() == "imported 3.0 h ago"
    assert page.locator('.col.state-failed li.order[data-e-number="1004"] time').inner_text()

    # Services: no invoice push is configured, so no phantom "invoices" row.
    services = page.locator("#services").inner_text()
    assert "orders" in services and "invoices" not in services

    # The lag chart spans the four hours of samples, not a 6-hour box.
    caption = page.locator("#replication figcaption").first.inner_text()
    assert caption == "lag seconds, last 4.0 h", caption
    xs = [
        float(p.split(",")[0])
        for p in page.eval_on_selector(
            "#replication svg.spark polyline", "e => e.getAttribute('points')"
        ).split()
    ]
    assert min(xs) < 0.05 * 320, min(xs)

    # A skipped order's reason ("not paid yet") is no alarm: not red.
    page.goto(manage.url + "/order?shop=shop&e=1007")
    why = page.locator("#last-error")
    assert "not paid yet" in why.inner_text()
    assert page.eval_on_selector("#last-error", "e => getComputedStyle(e).color") != (
        "rgb(185, 28, 28)"
    )

    # Wide mapped rows scroll inside their box; the page itself does not get wider.
    page.goto(manage.url + "/order?shop=shop&e=1003")
    assert page.eval_on_selector("#mapped", "e => e.getBoundingClientRect().width") > 1300
    for box in page.locator("#mapped .scroll").all():
        assert box.evaluate("e => getComputedStyle(e).overflowX") in ("auto", "scroll")
    # The header (one row, many columns) reads downwards and fits entirely.
    header = page.locator("#mapped table.one-row").first
    assert "ship_name" in header.inner_text()
    assert header.evaluate("e => e.parentElement.scrollWidth <= e.parentElement.clientWidth")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1360, width
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "manage-order-delivered.png"), full_page=True)

    # The failed order has a Retry button: fix the cause in the ERP, retry, it is imported.
    from replicator.db import make_engine

    eng = make_engine(manage.erp_url, "test")
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO items VALUES ('I-AB12', 'AB-12', 'AB 12', 1)")
    eng.dispose()
    page.goto(manage.url + "/order?shop=shop&e=1004")
    page.click('button[name="retry"]')
    page.wait_for_url("**done=retried*")
    assert page.locator("#order").get_attribute("data-state") == "delivered"
    assert svc.ledger.get("shop", "1004").state == "delivered"
    ctx.close()
