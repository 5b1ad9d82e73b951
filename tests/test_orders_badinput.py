"""Bad input never stops the line: every bad order is parked with a clear reason, the good ones
flow, and nothing is half-written in the ERP (PostgreSQL and MariaDB)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from replicator.orders.results import utcnow
from replicator.orders.sample import sample_order
from tests import test_orders_support as support
from tests.helpers import wait_until
from tests.test_orders_support import erp_count, erp_rows

# Fixtures shared by the order tests (pytest finds them as module attributes).
erp_url = support.erp_url
_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory


def _bad_orders() -> dict[str, tuple[bytes, str]]:
    """e-number -> (raw payload, expected reason fragment)."""

    def raw(o: dict) -> bytes:
        return json.dumps(o).encode()

    no_lines = sample_order(12)
    no_lines["line_items"] = []
    missing = sample_order(13)
    del missing["currency"]
    neg = sample_order(14)
    neg["line_items"][0]["quantity"] = -3
    absurd = sample_order(15)
    absurd["line_items"][0]["quantity"] = 10**9
    not_num = sample_order(16)
    not_num["line_items"][0]["quantity"] = "two"
    big = sample_order(17)
    big["customer_note"] = "x" * (10 * 1024 * 1024)
    bad_email = sample_order(18, email="not-an-address")
    bad_date = sample_order(19, date_created="yesterday")
    nul = sample_order(20)
    nul["shipping"]["address_1"] = "Main\x00Street"
    return {
        "10": (b'{"number": "10", "status": "processing", "line_items": [', "malformed JSON"),
        "11": (b'{"number": "11", "name": "M\xfcller"}', "not UTF-8"),
        "12": (raw(no_lines), "missing required field(s): line_items"),
        "13": (raw(missing), "missing required field(s): currency"),
        "14": (raw(neg), "line 1: quantity -3 must be greater than 0"),
        "15": (raw(absurd), "exceeds the limit 10000"),
        "16": (raw(not_num), "line 1: lines.columns.quantity: 'two' is not a number"),
        "17": (raw(big), "above the limit of 5.0 MB"),
        "18": (raw(bad_email), "is not an e-mail address"),
        "19": (raw(bad_date), "'yesterday' is not an ISO date/time"),
        "20": (raw(nul), "NUL character"),
        "21": (
            raw(sample_order(21, skus=["SKU-X1", "AB-12"])),
            "line 2: SKU 'AB-12' has no ERP item",
        ),
        "22": (
            raw(
                sample_order(22, lines=1)
                | {"status": "processing", "number": "22", "total": "lots"}
            ),
            "'lots' is not a number",
        ),
    }


def test_bad_orders_are_parked_with_reasons_and_nothing_half_written(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    bad = _bad_orders()
    for e, (raw, _) in bad.items():
        # The shop sent garbage; the connector passes on the raw bytes it got.
        payload = {"number": e, "status": "processing"}
        shop.put(payload, raw=raw)
    shop.put(sample_order(99))  # a good order in the same cycle keeps flowing
    r = svc.run_cycle()
    assert r.new == 1 and r.errored == len(bad)
    reasons = {n.e_number: n.reason for n in r.errored_orders}
    for e, (_, fragment) in bad.items():
        assert fragment in reasons[e], (e, reasons[e])
        entry = svc.ledger.get("shop", e)
        assert entry.state == "failed" and fragment in entry.last_error
        assert entry.payload == bad[e][0]  # kept exactly as received
    assert erp_rows(erp_url, "SELECT e_number FROM order_header") == [("99",)]
    assert erp_count(erp_url, "order_line") == 2
    # Only the good order's customer exists; no half-created customers for the parked ones.
    assert erp_rows(erp_url, "SELECT count(*) FROM customers WHERE customer_no <> 'GUEST'") == [
        (1,)
    ]


def test_sql_and_shell_metacharacters_are_stored_literally(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    evil = 'Robert\'); DROP TABLE order_line;-- $(rm -rf /) `id` "x" \\ ; | &'
    o = sample_order(30, customer_note=evil)
    o["shipping"]["last_name"] = "O'Brien; DELETE FROM customers"
    o["billing"]["last_name"] = "Zoë 北京 🚀"
    shop.put(o)
    r = svc.run_cycle()
    assert r.new == 1
    assert erp_rows(erp_url, "SELECT note, ship_name FROM order_header") == [
        (evil, "Anna O'Brien; DELETE FROM customers")
    ]
    assert erp_rows(erp_url, "SELECT name FROM customers WHERE email = 'kunde30@example.com'") == [
        ("Anna Zoë 北京 🚀",)
    ]
    assert erp_count(erp_url, "order_line") == 2


def test_same_e_number_different_content(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url)
    shop.put(sample_order(40, skus=["NOPE"]))
    r = svc.run_cycle()
    assert r.errored == 1
    # The shop sends the same e-number with different content: the newer version replaces the
    # parked one and is imported.
    shop.put(sample_order(40, skus=["SKU-1"]), updated_at=datetime.now(UTC) + timedelta(seconds=1))
    r = svc.run_cycle(utcnow() + timedelta(seconds=5))
    assert r.new == 1
    assert erp_rows(pg_erp_url, "SELECT item_no FROM order_line") == [("I-0001",)]
    events = [e.event for e in svc.ledger.events("shop", "40")]
    assert events == ["downloaded", "failed", "changed", "written"]


def test_mapping_failure_is_retried_when_mapping_files_change(
    tmp_path, pg_erp_url, service_factory
):
    svc, shop = service_factory(pg_erp_url)
    shop.put(sample_order(50, payment_method="klarna"))
    r = svc.run_cycle()
    assert "payment 'klarna' has no ERP mapping" in r.errored_orders[0].reason
    entry = svc.ledger.get("shop", "50")
    assert (
        entry.error_kind == "mapping"
        and entry.mapping_hash == svc.mappings.get("shop").mapping.hash
    )
    svc.run_cycle(utcnow() + timedelta(minutes=5))
    assert svc.ledger.get("shop", "50").state == "failed"  # unchanged mapping: stays parked
    mapping = tmp_path / "mappings" / "orders.toml"
    mapping.write_text(mapping.read_text().replace('cod = "COD"', 'cod = "COD"\nklarna = "KLARNA"'))
    import os

    st = mapping.stat()
    os.utime(mapping, (st.st_atime, st.st_mtime + 5))
    r = svc.run_cycle(utcnow() + timedelta(minutes=10))
    assert r.new == 1
    assert erp_rows(pg_erp_url, "SELECT payment_method FROM order_header") == [("KLARNA",)]
    assert "requeued" in [e.event for e in svc.ledger.events("shop", "50")]


@pytest.mark.parametrize("raw", [b"\xff\xfe garbage", b"[1, 2, 3]", b'{"no": "number"}'])
def test_unreadable_webhook_bodies_are_parked_not_lost(pg_erp_url, service_factory, raw):
    svc, _ = service_factory(pg_erp_url)
    assert svc.ingest_webhook_payload("shop", raw, "dlv-9") is True
    wait_until(lambda: svc.ledger.list_orders(shop="shop")[0].state == "failed", 30, 0.05)
    entries = svc.ledger.list_orders(shop="shop")
    assert len(entries) == 1 and entries[0].payload == raw
    assert entries[0].e_number == "unreadable-dlv-9"
    assert entries[0].state == "failed"
    assert erp_count(pg_erp_url, "order_header") == 0
