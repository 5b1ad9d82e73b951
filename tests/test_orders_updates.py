"""Orders changed in the shop after import: detection, automatic re-import while not posted, the
updates queue with a field diff, accept (refused on posted unless --force), ignore, cancel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from replicator.errors import FatalError
from replicator.orders.results import utcnow
from replicator.orders.sample import sample_order
from tests import test_orders_support as support
from tests.test_orders_support import erp_count, erp_rows

# Fixtures shared by the order tests (pytest finds them as module attributes).
erp_url = support.erp_url
_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory


def _later(n: int = 1) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=n)


def test_change_before_posting_is_applied_automatically(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    shop.put(sample_order(100, lines=3))
    svc.run_cycle()
    changed = sample_order(100, lines=2, customer_note="please ring twice")
    shop.put(changed, updated_at=_later())
    r = svc.run_cycle(utcnow() + timedelta(seconds=5))
    assert r.updated == 1 and r.new == 0
    assert erp_rows(erp_url, "SELECT order_no, note FROM order_header") == [
        ("SO100001", "please ring twice")
    ]
    assert erp_count(erp_url, "order_line") == 2
    entry = svc.ledger.get("shop", "100")
    assert entry.state == "delivered" and entry.pending_payload is None
    events = [e.event for e in svc.ledger.events("shop", "100")]
    assert events[-2:] == ["update detected", "accepted"]


def test_posted_order_goes_to_queue_and_accept_needs_force(erp_url, service_factory):
    svc, shop = service_factory(erp_url)
    shop.put(sample_order(200, lines=2))
    svc.run_cycle()
    erp_rows(erp_url, "SELECT 1")  # connection sanity
    from replicator.db import make_engine

    eng = make_engine(erp_url, "test")
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE order_header SET posted = true WHERE e_number = '200'")
    eng.dispose()
    shop.put(sample_order(200, lines=4, customer_note="changed"), updated_at=_later())
    r = svc.run_cycle(utcnow() + timedelta(seconds=5))
    assert r.updated == 0
    entry = svc.ledger.get("shop", "200")
    assert entry.state == "update-pending" and entry.update_queued
    assert "is posted" in entry.last_error
    fields = {d["field"] for d in __import__("json").loads(entry.diff)}
    assert "customer_note" in fields and "line_items[3].sku" in fields

    with pytest.raises(FatalError, match="is posted; use --force"):
        svc.actions.accept("200")
    assert erp_count(erp_url, "order_line") == 2
    res = svc.actions.accept("200", force=True)
    assert res.order_number == "SO100001"
    assert erp_count(erp_url, "order_header") == 1 and erp_count(erp_url, "order_line") == 4
    events = svc.ledger.events("shop", "200")
    assert [e.event for e in events][-2:] == ["accept refused", "accepted"]
    assert "forced over a posted ERP order" in events[-1].detail


def test_ignore_keeps_erp_order_and_same_version_is_not_redetected(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url, auto_apply_updates=False)
    shop.put(sample_order(300))
    svc.run_cycle()
    shop.put(sample_order(300, customer_note="x"), updated_at=_later())
    svc.run_cycle(utcnow() + timedelta(seconds=5))
    assert svc.ledger.get("shop", "300").state == "update-pending"
    svc.actions.ignore("300")
    assert svc.ledger.get("shop", "300").state == "delivered"
    svc.run_cycle(utcnow() + timedelta(seconds=10))  # the shop sends that version again
    assert svc.ledger.get("shop", "300").state == "delivered"
    assert erp_rows(pg_erp_url, "SELECT note FROM order_header") == [("",)]


def test_cancel_marks_erp_order_cancelled(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url)
    shop.put(sample_order(400))
    svc.run_cycle()
    assert svc.actions.cancel("400") == "SO100001"
    assert erp_rows(pg_erp_url, "SELECT status FROM order_header") == [("cancelled",)]
    assert svc.ledger.events("shop", "400")[-1].event == "cancelled"
    with pytest.raises(FatalError):
        svc.actions.cancel("nope")
