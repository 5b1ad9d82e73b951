"""An order's state changes only when its fate changes, and each fate is logged and counted once.

The daemon runs a cycle every few seconds and every cycle sees the same orders again (the
overlap window, the sweep): the ledger's states (and the ``sync_orders{state}`` gauge read from
them) must not move while nothing changes, a skipped order's timeline gets one line, and
``order_skipped`` is logged once — until the order or the criteria change.
"""

from __future__ import annotations

from datetime import timedelta

from structlog.testing import capture_logs

from replicator.orders.results import utcnow
from replicator.orders.sample import ListShop, sample_order
from tests import test_orders_support as support

erp_url = support.erp_url
_pg_erp_template = support._pg_erp_template
maria_erp_url = support.maria_erp_url
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory


def _seed(shop: ListShop) -> None:
    shop.put(sample_order(1))
    shop.put(sample_order(2, skus=["AB-12"]))  # fails: no such ERP item
    for n in range(3, 13):
        shop.put(sample_order(n, paid=False))  # skipped: not paid yet


def test_no_state_flicker_while_cycles_run(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url)
    _seed(shop)
    svc.run_cycle()
    settled = svc.ledger.counts()
    assert settled == {"delivered": 1, "failed": 1, "skipped": 10}, settled
    seen: list[dict[str, int]] = []
    # Look at the ledger mid-cycle, where a flicker would show: after the download has offered
    # every order to the inbox, before the due orders are worked off (each ``due`` call).
    due = svc.ledger.due

    def due_observed(*args, **kwargs):
        seen.append(svc.ledger.counts())
        return due(*args, **kwargs)

    svc.ledger.due = due_observed
    for i in range(1, 4):
        svc.run_cycle(utcnow() + timedelta(seconds=10 * i))
        seen.append(svc.ledger.counts())
    assert len(seen) >= 6
    assert all(c == settled for c in seen), [c for c in seen if c != settled][:3]


def test_one_log_line_and_one_timeline_line_per_fate(pg_erp_url, service_factory, tmp_path):
    svc, shop = service_factory(pg_erp_url)
    _seed(shop)
    with capture_logs() as logs:
        first = svc.run_cycle()
        later = [svc.run_cycle(utcnow() + timedelta(seconds=10 * i)) for i in range(1, 4)]
    assert (first.new, first.errored, first.skipped) == (1, 1, 10)
    for r in later:
        # Already imported, parked as failed, skipped: none of it is news.
        assert (r.new, r.errored, r.skipped) == (0, 0, 0), r.summary()
        assert r.unchanged == 12
    skipped_logs = [x for x in logs if x["event"] == "order_skipped" and x["e_number"] == "3"]
    assert len(skipped_logs) == 1
    assert len([x for x in logs if x["event"] == "order_failed"]) == 1
    events = [e.event for e in svc.ledger.events("shop", "3")]
    assert events == ["downloaded", "skipped"], events

    # The order changes (paid now): it is decided again and imported.
    shop.put(sample_order(3, paid=True))
    r = svc.run_cycle(utcnow() + timedelta(seconds=60))
    assert r.new == 1 and svc.ledger.get("shop", "3").state == "delivered"

    # The criteria change (a reload builds a new service): skipped orders are decided again,
    # in place, without passing through awaiting.
    svc2, _ = service_factory(pg_erp_url, shop=shop, criteria={"default": {"paid_only": False}})
    r = svc2.run_cycle(utcnow() + timedelta(seconds=70))
    assert r.new == 9, r.summary()
    assert svc2.ledger.counts() == {"delivered": 11, "failed": 1}
