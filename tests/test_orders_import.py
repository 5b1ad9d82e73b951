"""Order import end to end against a real PostgreSQL and MariaDB ERP: the cycle, write-once,
the one inbox, watermark, criteria, customers, crash recovery, failure counting."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from replicator.orders.polling import CANCELLED
from replicator.orders.results import utcnow
from replicator.orders.sample import ListShop, sample_order
from tests import test_orders_support as support
from tests.helpers import wait_until
from tests.test_orders_support import erp_count, erp_rows

# Fixtures shared by the order tests (pytest finds them as module attributes).
erp_url = support.erp_url
_pg_erp_template = support._pg_erp_template
maria_erp_url = support.maria_erp_url
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory


def test_cycle_imports_orders_once_with_e_number_and_erp_number(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    for n in (1001, 1002, 1003):
        shop.put(sample_order(n, lines=3))
    r = svc.run_cycle()
    assert (r.total, r.new, r.skipped, r.errored) == (3, 3, 0, 0)
    rows = erp_rows(
        erp_url,
        "SELECT e_number, order_no, currency, customer_no FROM order_header ORDER BY e_number",
    )
    assert [r[0] for r in rows] == ["1001", "1002", "1003"]
    # Numbers come from the series, in whatever order the parallel writers took them.
    assert sorted(r[1] for r in rows) == ["SO100001", "SO100002", "SO100003"]
    assert all(r[2] == "EUR" for r in rows)
    assert erp_count(erp_url, "order_line") == 9
    lines = erp_rows(
        erp_url,
        "SELECT line_no, item_no, quantity, tax_code FROM order_line "
        "WHERE order_no = :o ORDER BY line_no",
        o=rows[0][1],
    )
    assert [ln[0] for ln in lines] == [1, 2, 3]
    assert all(ln[1].startswith("X-") and ln[3] == "V19" for ln in lines)
    entry = svc.ledger.get("shop", "1002")
    assert entry is not None and entry.state == "delivered" and entry.erp_order_no == rows[1][1]
    assert [e.event for e in svc.ledger.events("shop", "1002")] == ["downloaded", "written"]
    # Customers were created from the billing data and numbered from the customer series.
    assert erp_rows(erp_url, "SELECT count(*) FROM customers WHERE customer_no LIKE 'C5000%'") == [
        (3,)
    ]
    assert erp_rows(erp_url, "SELECT customer_no FROM order_header WHERE e_number = '1001'") == (
        erp_rows(erp_url, "SELECT customer_no FROM customers WHERE email = 'kunde1001@example.com'")
    )

    # Next cycle: the overlap re-reads the same orders; nothing is written twice.
    r2 = svc.run_cycle(utcnow() + timedelta(seconds=5))
    # Already imported: unchanged, not "skipped" again (their fate was counted once).
    assert r2.new == 0 and r2.skipped == 0 and r2.unchanged == 3
    assert erp_count(erp_url, "order_header") == 3


def test_webhook_poll_and_sweep_feed_one_inbox(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    order = sample_order(2001)
    shop.put(order)
    raw = shop.orders["2001"][1]
    assert svc.ingest_webhook_payload("shop", raw, "delivery-1") is True
    assert svc.ingest_webhook_payload("shop", raw, "delivery-1") is False  # shop redelivers
    # Answered once stored; the import runs from the inbox right after, on its own thread.
    wait_until(lambda: svc.ledger.get("shop", "2001").state == "delivered", 30, 0.05)
    r = svc.run_cycle()  # poll + first sweep both see it again
    assert r.new == 0 and r.total == 1
    assert erp_rows(erp_url, "SELECT count(*) FROM order_header WHERE e_number = '2001'") == [(1,)]
    events = [e.event for e in svc.ledger.events("shop", "2001")]
    assert events.count("downloaded") == 1 and events.count("written") == 1


def test_crash_between_erp_commit_and_ledger_finds_existing_order(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    shop.put(sample_order(3001))
    svc.inbox.offer(shop._order("3001"), "poll", utcnow())
    # The ERP commit happened, then the daemon died before the ledger noted it.
    written = svc.writer_for("shop").write("shop", "3001", sample_order(3001))
    assert written.created
    assert svc.ledger.get("shop", "3001").state == "awaiting"
    r = svc.run_cycle()
    assert r.new == 0
    entry = svc.ledger.get("shop", "3001")
    assert entry.state == "delivered" and entry.erp_order_no == written.order_number
    assert erp_count(erp_url, "order_header") == 1
    assert "found in ERP" in [e.event for e in svc.ledger.events("shop", "3001")]


def test_concurrent_writers_make_one_erp_order(erp_url, service_factory):
    svc, _ = service_factory(erp_url)
    writer = svc.writer_for("shop")
    results, errors = [], []

    def go() -> None:
        try:
            results.append(writer.write("shop", "4001", sample_order(4001, lines=5)))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.created for r in results) == 1
    assert len({r.order_number for r in results}) == 1
    assert erp_count(erp_url, "order_header") == 1
    assert erp_count(erp_url, "order_line") == 5


def test_criteria_skip_with_reason_then_import_when_met(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    shop.put(sample_order(5001, status="pending", paid=False))
    shop.put(sample_order(5002, status="processing", paid=False))
    r = svc.run_cycle()
    assert r.new == 0 and r.skipped == 2
    reasons = {n.e_number: n.reason for n in r.skipped_orders}
    assert "status 'pending' is not imported" in reasons["5001"]
    assert "not paid yet" in reasons["5002"]
    assert svc.ledger.get("shop", "5001").state == "skipped"
    assert erp_count(erp_url, "order_header") == 0
    # The customer pays; the shop's modification time moves; the next cycle imports it.
    shop.put(
        sample_order(5002, status="processing", paid=True),
        updated_at=datetime.now(UTC) + timedelta(seconds=1),
    )
    r2 = svc.run_cycle(utcnow() + timedelta(seconds=10))
    assert r2.new == 1
    assert svc.ledger.get("shop", "5002").state == "delivered"


def test_wait_for_invoice_and_auto_invoice_modes(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url, criteria={"default": {"mode": "wait_for_invoice"}})
    shop.put(sample_order(5101))
    r = svc.run_cycle()
    assert r.skipped == 1 and "waiting for the shop's invoice" in r.skipped_orders[0].reason
    svc.close()
    svc2, _ = service_factory(pg_erp_url, shop=shop, criteria={"default": {"mode": "auto_invoice"}})
    svc2.run_cycle(utcnow() + timedelta(seconds=1))
    assert erp_rows(pg_erp_url, "SELECT auto_invoice FROM order_header WHERE e_number='5101'") == [
        (True,)
    ]


def test_customer_matched_by_email_and_guest_default(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    shop.put(sample_order(6001, email="Same@Example.com"))
    shop.put(sample_order(6002, email="same@example.com"))
    shop.put(sample_order(6003, email=""))
    svc.run_cycle()
    rows = dict(erp_rows(erp_url, "SELECT e_number, customer_no FROM order_header"))
    assert rows["6001"] == rows["6002"] != "GUEST"
    assert rows["6003"] == "GUEST"
    assert erp_rows(
        erp_url, "SELECT count(*) FROM customers WHERE lower(email) = 'same@example.com'"
    ) == [(1,)]


def test_watermark_advances_only_after_success_and_failures_cancel(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url, max_consecutive_failures=3, probe_interval_minutes=10)
    shop.put(sample_order(7001))
    now = utcnow()
    svc.run_cycle(now)
    st = svc.ledger.shop_state("shop")
    assert st.watermark == now and st.consecutive_failures == 0

    shop.down = True
    for i in range(1, 4):
        r = svc.run_cycle(now + timedelta(minutes=5 * i))
        assert not r.ok
    st = svc.ledger.shop_state("shop")
    assert st.watermark == now  # never moved while the shop was down
    assert st.cancelled and st.consecutive_failures == 3
    assert st.cancelled_reason.startswith(CANCELLED)
    fetches = shop.fetches
    r = svc.run_cycle(now + timedelta(minutes=16))  # before the next probe: not even asked
    assert shop.fetches == fetches and CANCELLED in r.shops["shop"]

    shop.down = False
    shop.put(sample_order(7002), updated_at=datetime.now(UTC))
    r = svc.run_cycle(now + timedelta(minutes=16), force=True)  # `sync-daemon download`
    assert r.ok and r.new == 1
    st = svc.ledger.shop_state("shop")
    assert not st.cancelled and st.consecutive_failures == 0 and st.watermark > now


def test_first_download_looks_back_and_overlap_is_applied(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url, first_lookback_hours=1, overlap=60)
    now = utcnow()
    shop.put(sample_order(7101), updated_at=(now - timedelta(hours=2)).replace(tzinfo=UTC))
    shop.put(sample_order(7102), updated_at=(now - timedelta(minutes=30)).replace(tzinfo=UTC))
    r = svc.run_cycle(now, shops=["shop"])
    # 7101 is older than the lookback, but the first reconciliation sweep (2 days) finds it.
    assert r.new == 2
    # An order modified just before the watermark is still seen thanks to the overlap.
    shop.put(sample_order(7103), updated_at=(now - timedelta(seconds=30)).replace(tzinfo=UTC))
    r2 = svc.run_cycle(now + timedelta(minutes=5))
    assert r2.new == 1


def test_erp_unreachable_keeps_order_awaiting_and_counts_failure(
    tmp_path: Path, pg_erp_url, service_factory
):
    svc, shop = service_factory(pg_erp_url)
    shop.put(sample_order(8001))
    svc.inbox.offer(shop._order("8001"), "poll", utcnow())
    # Cut the ERP: point the writer's engine at a port where nothing listens.
    import copy

    from replicator.db import make_engine
    from replicator.localpg import free_port

    dead = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "test")
    loaded = svc.mappings.get("shop")
    good = loaded.writer
    loaded.writer = copy.copy(good)
    loaded.writer.engine = dead
    r = svc.run_cycle()
    assert not r.ok and "ERP unavailable" in r.shops["shop"]
    entry = svc.ledger.get("shop", "8001")
    assert entry.state == "awaiting" and entry.error_kind == "transient"
    assert entry.next_attempt_at is not None
    assert svc.ledger.shop_state("shop").consecutive_failures == 1
    loaded.writer = good
    dead.dispose()
    r2 = svc.run_cycle(utcnow() + timedelta(hours=1))
    assert r2.ok and r2.new == 1
    assert erp_count(pg_erp_url, "order_header") == 1


@pytest.mark.parametrize("staging", ["sqlite", "postgresql"])
def test_ledger_on_both_staging_stores(staging, tmp_path, pg_server, pg_erp_url, service_factory):
    url = None
    if staging == "postgresql":
        url = pg_server.url(pg_server.createdb("staging"))
    svc, shop = service_factory(pg_erp_url, staging_url=url)
    shop.put(sample_order(9001))
    shop.put(sample_order(9002, skus=["NOPE-1"]))
    r = svc.run_cycle()
    assert (r.new, r.errored) == (1, 1)
    assert svc.ledger.counts() == {"delivered": 1, "failed": 1}
    failed = svc.ledger.list_orders(state="failed")
    assert failed[0].last_error == "line 1: SKU 'NOPE-1' has no ERP item"
    assert failed[0].payload == shop.orders["9002"][1]  # raw payload kept as received


def test_concurrent_importers_take_distinct_numbers_from_the_series(erp_url, service_factory):
    svc, _ = service_factory(erp_url)
    writer = svc.writer_for("shop")
    numbers: list[str] = []
    errors: list[BaseException] = []

    def go(base: int) -> None:
        for i in range(5):
            try:
                numbers.append(
                    writer.write("shop", str(base + i), sample_order(base + i)).order_number
                )
            except Exception as exc:  # asserted below
                errors.append(exc)

    threads = [threading.Thread(target=go, args=(10000 + 100 * t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(numbers) == 40 and len(set(numbers)) == 40
    assert erp_rows(erp_url, "SELECT next_value FROM number_series WHERE series = 'ORDER'") == [
        (100041,)
    ]


def test_webhook_receiver_stores_through_the_import_service(pg_erp_url, service_factory):
    import base64
    import hashlib
    import hmac

    from replicator.config.shops import ShopSection
    from replicator.connectors import make_webhook_receiver

    svc, _ = service_factory(pg_erp_url)
    receiver = make_webhook_receiver(
        ShopSection(name="shop", kind="webhook", webhook_secret="s3cret"),
        svc.store_webhook_delivery,
    )
    body = __import__("json").dumps(sample_order(12001)).encode()
    sig = base64.b64encode(hmac.new(b"s3cret", body, hashlib.sha256).digest()).decode()
    headers = {
        "Content-Length": str(len(body)),
        "X-WC-Webhook-Signature": sig,
        "X-WC-Webhook-Delivery-ID": "d-1",
        "X-WC-Webhook-Topic": "order.created",
    }
    assert receiver.handle(headers, body)[1]["status"] == "stored"
    assert receiver.handle(headers, body)[1]["status"] == "duplicate"
    wait_until(lambda: svc.ledger.get("shop", "12001").state == "delivered", 30, 0.05)
    assert erp_rows(pg_erp_url, "SELECT e_number, order_no FROM order_header") == [
        ("12001", "SO100001")
    ]


def test_two_shops_with_the_same_e_number_get_two_erp_orders(tmp_path, pg_erp_url):
    from replicator.orders.coordinator import OrderImportService
    from tests.test_orders_support import make_config

    cfg = make_config(tmp_path, pg_erp_url, shop_mappings={"magento": "mappings/magento.toml"})
    woo_map = (tmp_path / "mappings" / "orders.toml").read_text()
    (tmp_path / "mappings" / "magento.toml").write_text(
        woo_map.replace(
            'e_number_column = "e_number"',
            'e_number_column = "e_number"\ne_number_prefix = "MAG-"',
            1,
        )
    )
    woo, mag = ListShop("woo"), ListShop("magento")
    woo.put(sample_order(500))
    mag.put(sample_order(500, lines=1))
    svc = OrderImportService(cfg, {"woo": woo, "magento": mag})
    try:
        r = svc.run_cycle()
        assert r.new == 2
        assert sorted(erp_rows(pg_erp_url, "SELECT e_number FROM order_header")) == [
            ("500",),
            ("MAG-500",),
        ]
        assert svc.writer_for("magento").erp_e_numbers() == {"500"}
        r2 = svc.run_cycle(utcnow() + timedelta(seconds=5))
        assert r2.new == 0 and erp_count(pg_erp_url, "order_header") == 2
    finally:
        svc.close()


def test_missing_e_number_index_is_created_at_start(erp_url, tmp_path):
    from replicator.db import make_engine
    from replicator.orders.coordinator import OrderImportService
    from tests.test_orders_support import make_config

    eng = make_engine(erp_url, "test")
    with eng.begin() as c:
        if eng.dialect.name == "postgresql":
            c.exec_driver_sql("DROP INDEX order_header_e_number")
        else:
            c.exec_driver_sql("ALTER TABLE order_header DROP INDEX order_header_e_number")
    insp = __import__("sqlalchemy").inspect(eng)
    assert not any(ix["unique"] for ix in insp.get_indexes("order_header"))
    svc = OrderImportService(make_config(tmp_path, erp_url), {"shop": ListShop("shop")})
    try:
        insp = __import__("sqlalchemy").inspect(eng)
        assert [ix["column_names"] for ix in insp.get_indexes("order_header") if ix["unique"]] == [
            ["e_number"]
        ]
        assert svc.writer_for("shop").unique_e_number
    finally:
        svc.close()
        eng.dispose()


def test_without_unique_index_the_series_lock_keeps_one_order(erp_url, service_factory):
    from replicator.db import make_engine

    eng = make_engine(erp_url, "test")
    with eng.begin() as c:
        if eng.dialect.name == "postgresql":
            c.exec_driver_sql("DROP INDEX order_header_e_number")
        else:
            c.exec_driver_sql("ALTER TABLE order_header DROP INDEX order_header_e_number")
    eng.dispose()
    svc, _ = service_factory(erp_url, create_e_number_index=False)
    writer = svc.writer_for("shop")
    assert not writer.unique_e_number
    results, errors = [], []

    def go() -> None:
        try:
            results.append(writer.write("shop", "4501", sample_order(4501)))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sum(r.created for r in results) == 1
    assert erp_rows(erp_url, "SELECT count(*) FROM order_header WHERE e_number = '4501'") == [(1,)]


def test_webhook_only_shop_inbox_is_worked_off_by_the_cycle(tmp_path, pg_erp_url):
    import json

    from replicator.config import parse_config
    from replicator.orders.coordinator import OrderImportService
    from tests.test_orders_support import make_config

    base = make_config(tmp_path, pg_erp_url)
    data = json.loads(base.model_dump_json(exclude={"source_path"}))
    data["erp"]["dsn"] = pg_erp_url
    data["staging"]["url"] = f"sqlite:///{tmp_path / 'staging.db'}"
    data["shops"] = [{"name": "hooks", "kind": "webhook", "webhook_secret": "x"}]
    cfg = parse_config(data, str(tmp_path / "config.toml"))
    svc = OrderImportService(cfg, {})  # the daemon passes no connector for webhook-only shops
    try:
        # The fast path met an ERP outage: the order waits in the inbox.
        svc.inbox.offer_webhook("hooks", json.dumps(sample_order(880)).encode(), "d-1", utcnow())
        r = svc.run_cycle()
        assert r.new == 1 and r.shops == {"hooks": "ok"}
        assert svc.ledger.get("hooks", "880").state == "delivered"
    finally:
        svc.close()


def test_webhook_is_answered_once_stored_not_after_the_erp_write(pg_erp_url, service_factory):
    """The shop's request waits for the inbox commit only: with the ERP's order table locked
    (the write would block) the delivery is still answered at once, and the order is imported
    from the inbox as soon as the ERP takes it — once."""
    import json

    import psycopg

    svc, _ = service_factory(pg_erp_url)
    raw = json.dumps(sample_order(13001)).encode()
    with psycopg.connect(pg_erp_url) as blocker:
        blocker.execute("LOCK TABLE order_header IN ACCESS EXCLUSIVE MODE")
        answered = threading.Event()
        stored: list[bool] = []

        def deliver() -> None:
            stored.append(svc.ingest_webhook_payload("shop", raw, "d-13001"))
            answered.set()

        threading.Thread(target=deliver, daemon=True).start()
        # Answered while the ERP is still locked: the ERP write is not part of the request.
        assert answered.wait(30), "the webhook waited for the ERP write"
        assert stored == [True]
        assert svc.ledger.get("shop", "13001").state == "awaiting"
        blocker.rollback()
    wait_until(lambda: svc.ledger.get("shop", "13001").state == "delivered", 60, 0.05)
    assert erp_rows(pg_erp_url, "SELECT count(*) FROM order_header WHERE e_number = '13001'") == [
        (1,)
    ]
