"""The ERP-side webhook through the real health server: ``Success`` and the shop receives the
update (read straight from a real PostgreSQL ERP); 400/401/404/409 otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from replicator.config import Config, parse_config
from replicator.connectors.woocommerce import WooCommerceConnector
from replicator.push.erp_webhook import erp_webhook_secret, make_erp_webhook_handler
from replicator.push.invoices import InvoicePushService
from replicator.push.stock import StockPushService
from replicator.staging import StagingStore
from replicator.web.server import HttpServer
from tests.emulators import WooCommerceEmulator, generate_orders

SECRET = "s3cret-erp-hook"


@pytest.fixture
def setup(erp_db: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    orders = generate_orders(2, seed=5)
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute(
            "CREATE TABLE stock (sku text, warehouse int, qty int, PRIMARY KEY (sku, warehouse));"
            "INSERT INTO stock VALUES ('A-1', 1, 5), ('A-1', 2, 7), ('B-2', 1, 3), ('GIFT', 1, 9);"
            "CREATE TABLE invoices (id int PRIMARY KEY, invoice_no text, status text, "
            "e_number text, pdf bytea)"
        )
        c.execute(
            "INSERT INTO invoices VALUES (1, 'INV-1', 'booked', %s, %s), "
            "(2, 'INV-2', 'draft', %s, %s)",
            (str(orders[0].number), b"%PDF one", str(orders[1].number), b"%PDF two"),
        )
    cfg: Config = parse_config(
        {
            "erp": {"dsn": erp_db},
            "capture": {"tables": ["public.stock", "public.invoices"]},
            "health": {"listen": "127.0.0.1:0", "token": "health-token"},
            "stock_push": {"table": "stock", "webhook_secret": SECRET, "exclude_skus": ["GIFT"]},
            "invoice_push": {
                "table": "invoices",
                "number_column": "invoice_no",
                "e_number_column": "e_number",
                "pdf_source": "column",
                "pdf_column": "pdf",
            },
        }
    )
    store = StagingStore(f"sqlite:///{tmp_path / 'staging.db'}")
    with WooCommerceEmulator(products=[("A-1", "A", 0), ("B-2", "B", 0), ("GIFT", "G", 1)]) as woo:
        woo.add_orders(orders)
        conn = WooCommerceConnector("web", woo.url, woo.consumer_key, woo.consumer_secret)
        stock = StockPushService(cfg, store, [conn])
        invoices = InvoicePushService(cfg, store, [conn])
        secret = erp_webhook_secret(cfg)
        assert secret == SECRET
        handler = make_erp_webhook_handler(secret, stock=stock, invoices=invoices)
        health = HttpServer(cfg.health)
        health.add_route("GET", "/webhooks/erp", handler, public=True)
        health.add_route("POST", "/webhooks/erp", handler, public=True)
        health.start()
        try:
            yield {
                "url": f"{health.url}/webhooks/erp",
                "woo": woo,
                "erp": erp_db,
                "orders": orders,
                "stock": stock,
            }
        finally:
            health.stop()
            stock.close()
            invoices.close()
            conn.close()
            store.dispose()


def test_stock_update_success_and_shop_updated(setup: dict[str, Any]) -> None:
    url, woo = setup["url"], setup["woo"]
    r = httpx.get(url, params={"type": "stockUpdate", "number": "A-1", "secret": SECRET})
    assert (r.status_code, r.text) == (200, "Success")
    assert r.headers["content-type"].startswith("text/plain")
    assert woo.stock()["A-1"] == 12
    # The ERP changes again and calls by POST with the secret in a header.
    with psycopg.connect(setup["erp"], autocommit=True) as c:
        c.execute("UPDATE stock SET qty = 1 WHERE sku = 'A-1' AND warehouse = 2")
    r = httpx.post(
        url, data={"type": "stockUpdate", "number": "A-1"}, headers={"X-Webhook-Secret": SECRET}
    )
    assert (r.status_code, r.text) == (200, "Success")
    assert woo.stock()["A-1"] == 6
    # Excluded SKU: accepted, but never pushed.
    r = httpx.get(url, params={"type": "stockUpdate", "number": "GIFT", "secret": SECRET})
    assert r.status_code == 200 and woo.stock()["GIFT"] == 1


def test_invoice_booked_success_once(setup: dict[str, Any]) -> None:
    url, woo, orders = setup["url"], setup["woo"], setup["orders"]
    for _ in range(2):
        r = httpx.get(url, params={"type": "invoiceBooked", "number": "INV-1", "secret": SECRET})
        assert (r.status_code, r.text) == (200, "Success")
    notes = woo.notes.get(orders[0].number, [])
    assert len(notes) == 1 and "invoice-INV-1.pdf" in notes[0]["note"]
    r = httpx.get(url, params={"type": "invoiceBooked", "number": "INV-2", "secret": SECRET})
    assert r.status_code == 409 and "not booked" in r.text
    assert orders[1].number not in woo.notes


def test_errors(setup: dict[str, Any]) -> None:
    url, woo = setup["url"], setup["woo"]
    before = len(woo.requests)
    r = httpx.get(url, params={"type": "stockUpdate", "number": "A-1", "secret": "wrong"})
    assert r.status_code == 401
    r = httpx.get(url, params={"type": "stockUpdate", "number": "A-1"})
    assert r.status_code == 401
    r = httpx.get(url, params={"type": "priceUpdate", "number": "A-1", "secret": SECRET})
    assert r.status_code == 400 and "Unknown type" in r.text
    r = httpx.get(url, params={"type": "stockUpdate", "secret": SECRET})
    assert r.status_code == 400
    r = httpx.get(url, params={"type": "stockUpdate", "number": "NOPE", "secret": SECRET})
    assert r.status_code == 404 and "Unknown SKU" in r.text
    r = httpx.get(url, params={"type": "invoiceBooked", "number": "INV-404", "secret": SECRET})
    assert r.status_code == 404 and "Unknown invoice" in r.text
    assert len(woo.requests) == before  # nothing reached the shop


def test_shop_down_answers_503_and_cycle_retries(setup: dict[str, Any]) -> None:
    url, woo, stock = setup["url"], setup["woo"], setup["stock"]
    woo.fail_next(5, status=500)
    r = httpx.get(url, params={"type": "stockUpdate", "number": "B-2", "secret": SECRET})
    assert r.status_code == 503 and "queued" in r.text
    woo.clear_faults()
    stock.gates["web"].blocked_until = 0  # skip the back-off
    stock.run_cycle()
    assert woo.stock()["B-2"] == 3


def test_values_the_erp_cannot_hold_are_refused_with_400_naming_the_field(
    setup: dict[str, Any],
) -> None:
    url, woo = setup["url"], setup["woo"]
    before = len(woo.requests)
    # NUL (PostgreSQL refuses it in text) by query string and by form body.
    r = httpx.get(f"{url}?type=stockUpdate&number=%00&secret={SECRET}")
    assert r.status_code == 400 and "number: contains a NUL character" in r.text
    r = httpx.post(url, content=f"type=stockUpdate&number=A%00&secret={SECRET}")
    assert r.status_code == 400 and "number: contains a NUL character" in r.text
    r = httpx.get(url, params={"type": "stockUpdate", "number": "A\x01", "secret": SECRET})
    assert r.status_code == 400 and "number: contains a control character" in r.text
    r = httpx.get(url, params={"type": "invoiceBooked", "number": "9" * 500, "secret": SECRET})
    assert r.status_code == 400 and "number: longer than 200 characters" in r.text
    # Bodies beyond the JSON limits, or not UTF-8: 400 with the limit, never a RecursionError.
    deep = b"[" * 100_000
    r = httpx.post(url, content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested 100000 levels deep (limit 64)" in r.text
    big = b'{"type": "stockUpdate", "number": ' + b"1" * 5000 + b"}"
    r = httpx.post(url, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "field number: a number of 5000 digits" in r.text
    r = httpx.post(url, content=b"number=\xff", headers={"X-Webhook-Secret": SECRET})
    assert r.status_code == 400 and "body: not UTF-8" in r.text
    assert len(woo.requests) == before  # nothing reached the shop
