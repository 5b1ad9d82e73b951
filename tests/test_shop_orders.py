"""Shopify and Shopware orders into the sample ERP: the shipped mapping files
(``config/mappings/shopify.toml``, ``shopware.toml``) with their ``map --dry-run`` examples, the
import criteria per platform, bad input parked with a reason, and Shopify orders the search index
missed caught by the reconciliation sweep — through the real connectors and emulators into a real
PostgreSQL ERP."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from replicator.commands.orders import run_map
from replicator.connectors.shopify import ShopifyConnector, ShopifyWebhookReceiver
from replicator.connectors.shopware import ShopwareConnector, ShopwareWebhookReceiver
from replicator.orders.coordinator import OrderImportService
from tests import test_orders_support as support
from tests.emulators.orders import generate_orders
from tests.emulators.shopify import ShopifyEmulator
from tests.emulators.shopware import ShopwareEmulator
from tests.helpers import wait_until
from tests.test_orders_support import erp_count, erp_rows, make_config

pg_erp_url = support.pg_erp_url
_pg_erp_template = support._pg_erp_template

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
ERP_SKUS = ["SKU-1", "SKU-2", "SKU-3", "SKU-X1"]  # items the sample ERP knows

CRITERIA = {
    "shopify": {
        "status_fields": ["displayFinancialStatus", "financial_status"],
        "statuses": ["paid", "authorized", "partially_refunded"],
        "paid_only": False,
        "fulfillment_fields": ["displayFulfillmentStatus", "fulfillment_status"],
        "fulfillment_statuses": ["unfulfilled", "partially_fulfilled", ""],
    },
    "shopware": {
        "status_fields": ["transactions.0.stateMachineState.technicalName"],
        "statuses": ["paid", "authorized", "paid_partially", "refunded_partially"],
        "paid_only": False,
        "fulfillment_fields": ["deliveries.0.stateMachineState.technicalName"],
        "fulfillment_statuses": ["open", "shipped_partially"],
    },
}


def _config(tmp_path: Path, erp_url: str, **orders: Any) -> Any:
    (tmp_path / "mappings").mkdir(parents=True, exist_ok=True)
    for kind in ("shopify", "shopware"):
        shutil.copy(ROOT / "config" / "mappings" / f"{kind}.toml", tmp_path / "mappings")
    return make_config(
        tmp_path,
        erp_url,
        shop_mappings={"shopify": "mappings/shopify.toml", "shopware": "mappings/shopware.toml"},
        criteria=CRITERIA,
        **orders,
    )


def _dry_run(cfg: Any, order: Path, shop: str, e_number: str | None = None) -> str:
    out = io.StringIO()
    args = argparse.Namespace(
        order=str(order), dry_run=True, shop=shop, mapping=None, e_number=e_number
    )
    assert run_map(cfg, args, out) == 0
    return out.getvalue()


@pytest.mark.parametrize(
    ("example", "shop", "e_number"),
    [
        ("shopify-order.json", "shopify", "#1001"),
        ("shopify-webhook-order.json", "shopify", "#1001"),
        ("shopware-order.json", "shopware", "1001"),
    ],
)
def test_map_dry_run_examples(
    tmp_path: Path, pg_erp_url: str, example: str, shop: str, e_number: str
) -> None:
    cfg = _config(tmp_path, pg_erp_url)
    text = _dry_run(cfg, EXAMPLES / example, shop, e_number)
    assert "-- order_header (1 row)" in text and f'"e_number": "{e_number}"' in text
    assert '"currency": "DKK"' in text and '"payment_method": "CARD"' in text
    assert '"ship_country": "DK"' in text and '"shipping_method": "DHL"' in text
    assert "-- order_line (4 rows)" in text and '"tax_code": "V25"' in text
    for item in ("I-0001", "I-0002", "I-0003", "X-00001"):
        assert item in text
    assert erp_count(pg_erp_url, "order_header") == 0  # a dry run writes nothing


def test_shopify_poll_and_webhook_shapes_map_to_the_same_rows(
    tmp_path: Path, pg_erp_url: str
) -> None:
    cfg = _config(tmp_path, pg_erp_url)
    polled = _dry_run(cfg, EXAMPLES / "shopify-order.json", "shopify", "#1001")
    hooked = _dry_run(cfg, EXAMPLES / "shopify-webhook-order.json", "shopify", "#1001")
    # Same header, same lines, same customer: only the times' rendering may differ.
    assert polled.replace("\n", "") == hooked.replace("\n", "")


def _paid(n: int, **kw: Any) -> list[Any]:
    return [
        o
        for o in generate_orders(n * 3, skus=ERP_SKUS, **kw)
        if o.paid  # bank transfers are not paid yet
    ][:n]


def test_shopify_orders_import_with_criteria_and_bad_input_parked(
    tmp_path: Path, pg_erp_url: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    good = _paid(3, start=now - timedelta(hours=2), first_number=2001)
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(good)
        pending = generate_orders(
            10, skus=ERP_SKUS, start=now - timedelta(hours=1), first_number=3001
        )
        pending = [o for o in pending if not o.paid][:1]
        emu.add_orders(pending)
        bad = generate_orders(1, skus=["NO-SUCH"] * 4, start=now - timedelta(hours=1))[0]
        bad = bad.__class__(**{**{f: getattr(bad, f) for f in bad.__slots__}, "number": 4001})
        emu.add_orders([bad])
        emu.modify_order(4001, now - timedelta(minutes=30), status="paid")
        cfg = _config(tmp_path, pg_erp_url, first_lookback_hours=3.0)
        conn = ShopifyConnector("shopify", emu.url, emu.access_token)
        svc = OrderImportService(cfg, {"shopify": conn})
        try:
            r = svc.run_cycle()
            assert (r.new, r.skipped, r.errored) == (3, 1, 1), r.summary()
            rows = erp_rows(pg_erp_url, "SELECT e_number FROM order_header ORDER BY e_number")
            assert [x[0] for x in rows] == [f"#{o.number}" for o in good]
            skipped = svc.ledger.get("shopify", f"#{pending[0].number}")
            assert skipped is not None and skipped.state == "skipped"
            assert "'pending' is not imported" in (skipped.last_error or "")
            failed = svc.ledger.get("shopify", "#4001")
            assert failed is not None and failed.state == "failed"
            assert "NO-SUCH" in (failed.last_error or "")
            # A webhook for an imported order (REST shape, keyed by its name like the poll) is
            # no second ERP order: the receiver hands the ledger the e-number it read.
            headers, body = emu.webhook_request(good[0].number, topic="orders/updated")
            rcv = ShopifyWebhookReceiver(
                emu.client_secret, 1_000_000, svc.store_webhook_delivery, shop="shopify"
            )
            status, answer = rcv.handle({**headers, "Content-Length": str(len(body))}, body)
            assert status == 200 and answer["e_number"] == f"#{good[0].number}"
            assert erp_count(pg_erp_url, "order_header") == 3
        finally:
            svc.close()


def test_shopify_order_missed_by_the_search_index_is_caught_by_the_sweep(
    tmp_path: Path, pg_erp_url: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    orders = _paid(3, start=now - timedelta(hours=2), first_number=5001)
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(orders)
        emu.hide_from_search(orders[1].number)  # updated in the window, not in the results
        cfg = _config(
            tmp_path, pg_erp_url, overlap=0, first_lookback_hours=3.0, reconcile_interval_hours=1e-4
        )
        svc = OrderImportService(
            cfg, {"shopify": ShopifyConnector("shopify", emu.url, emu.access_token)}
        )
        try:
            first = svc.run_cycle()
            assert first.new == 2
            emu.reindex()  # the index catches up later
            started = time.monotonic()
            wait_until(lambda: time.monotonic() - started > 0.4, timeout=5)  # sweep is due
            second = svc.run_cycle()
            assert second.new == 1
            rows = erp_rows(pg_erp_url, "SELECT e_number FROM order_header ORDER BY e_number")
            assert [x[0] for x in rows] == [f"#{o.number}" for o in orders]
            events = [e.event for e in svc.ledger.events("shopify", f"#{orders[1].number}")]
            assert events[0] == "downloaded"
        finally:
            svc.close()


def test_shopware_orders_import_with_criteria(tmp_path: Path, pg_erp_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    good = _paid(2, start=now - timedelta(hours=2), first_number=6001)
    with ShopwareEmulator(products=[]) as emu:
        emu.add_orders(good[:1])
        emu.add_orders(good[1:], touched=False)  # placed, never updated: updatedAt null
        open_payment = [
            o
            for o in generate_orders(
                10, skus=ERP_SKUS, start=now - timedelta(hours=1), first_number=7001
            )
            if not o.paid
        ][:1]
        emu.add_orders(open_payment)
        cfg = _config(tmp_path, pg_erp_url, first_lookback_hours=3.0)
        conn = ShopwareConnector("shopware", emu.url, emu.client_id, emu.client_secret)
        svc = OrderImportService(cfg, {"shopware": conn})
        try:
            r = svc.run_cycle()
            assert (r.new, r.skipped, r.errored) == (2, 1, 0), r.summary()
            rows = erp_rows(
                pg_erp_url, "SELECT e_number, currency FROM order_header ORDER BY e_number"
            )
            assert rows == [(str(o.number), "DKK") for o in good]
            skipped = svc.ledger.get("shopware", str(open_payment[0].number))
            assert skipped is not None and "'open' is not imported" in (skipped.last_error or "")
            # The app webhook of an imported order carries the same order: no second ERP order.
            headers, body = emu.webhook_request(str(good[0].number))
            rcv = ShopwareWebhookReceiver(
                emu.shop_secret, 1_000_000, svc.store_webhook_delivery, shop="shopware"
            )
            status, answer = rcv.handle({**headers, "Content-Length": str(len(body))}, body)
            assert status == 200 and answer["e_number"] == str(good[0].number)
            assert erp_count(pg_erp_url, "order_header") == 2
            entry = svc.ledger.get("shopware", str(good[0].number))
            assert entry is not None and entry.state == "delivered"
            payload = json.loads(entry.payload)
            assert payload["orderNumber"] == str(good[0].number)
            # A signed event whose order lacks its lines is parked with the reason, not lost.
            broken = json.dumps(
                {
                    "data": {
                        "payload": {
                            "order": {
                                "orderNumber": "9999",
                                "transactions": [{"stateMachineState": {"technicalName": "paid"}}],
                                "deliveries": [{"stateMachineState": {"technicalName": "open"}}],
                            }
                        },
                        "event": "checkout.order.placed",
                    }
                }
            ).encode()
            sig = hmac.new(emu.shop_secret.encode(), broken, hashlib.sha256).hexdigest()
            status, _ = rcv.handle(
                {"shopware-shop-signature": sig, "Content-Length": str(len(broken))}, broken
            )
            assert status == 200
            # Answered once stored; the woken import parks it right after.
            wait_until(lambda: svc.ledger.get("shopware", "9999").state == "failed", 30, 0.05)
            parked = svc.ledger.get("shopware", "9999")
            assert parked is not None and parked.state == "failed"
            assert "lineItems" in (parked.last_error or "")
            assert erp_count(pg_erp_url, "order_header") == 2
        finally:
            svc.close()


def test_unimported_order_quantities_are_read_from_every_shape() -> None:
    # The stock push subtracts what waits in the ledger; it must find the lines in each shape.
    from replicator.push.levels import order_lines

    shapes = [
        order_lines((EXAMPLES / name).read_bytes())
        for name in ("shopify-order.json", "shopify-webhook-order.json", "shopware-order.json")
    ]
    assert shapes[0] and shapes[0] == shapes[1] == shapes[2]
    assert {sku for sku, _ in shapes[0]} == set(ERP_SKUS)
