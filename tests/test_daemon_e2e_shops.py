"""Shopify and Shopware 6 end to end through one daemon process: a paid order from each shop's
emulator lands in the sample ERP once (polled, and again by a signed webhook through the daemon's
HTTP server without a second ERP order), and a stock change in the ERP reaches both shops."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from replicator.orders.sample import install_sample_erp
from tests.emulators.orders import generate_orders, sample_skus
from tests.emulators.shopify import ShopifyEmulator
from tests.emulators.shopware import ShopwareEmulator
from tests.helpers import DaemonProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _imported(erp_db: str) -> set[str]:
    with psycopg.connect(erp_db) as c:
        return {r[0] for r in c.execute("SELECT e_number FROM order_header")}


def test_shopify_and_shopware_orders_in_and_stock_out(erp_db: str, tmp_path: Path) -> None:
    install_sample_erp(erp_db)
    skus = sample_skus(6)
    with psycopg.connect(erp_db, autocommit=True) as c:
        for i, sku in enumerate(skus, start=1):
            c.execute("INSERT INTO items VALUES (%s, %s, %s, 1)", (f"S-{i:04d}", sku, f"Item {i}"))
        c.execute("CREATE TABLE stock (sku text PRIMARY KEY, on_hand int NOT NULL)")
        c.cursor().executemany("INSERT INTO stock VALUES (%s, %s)", [(s, 10) for s in skus])
    now = datetime.now(UTC).replace(microsecond=0)
    paid = [o for o in generate_orders(12, start=now - timedelta(hours=1), skus=skus) if o.paid]
    shopify_order, shopware_order, hooked = paid[0], paid[1], paid[2]
    (tmp_path / "mappings").mkdir()
    for name in ("orders", "shopify", "shopware"):
        shutil.copy(ROOT / "config" / "mappings" / f"{name}.toml", tmp_path / "mappings")
    products = [(s, f"P {s}", 0) for s in skus]
    with ShopifyEmulator(products=products) as sfy, ShopwareEmulator(products=products) as sw:
        sfy.add_orders([shopify_order])
        sw.add_orders([shopware_order], touched=False)  # as placed: updatedAt null
        cfg = tmp_path / "config.toml"
        cfg.write_text(f"""
[erp]
dsn = "{erp_db}"
[capture]
tables = ["public.stock", "public.order_header"]
batch_ms = 50
heartbeat_interval = 1
[staging]
url = "sqlite:///{tmp_path / "staging.db"}"
[health]
listen = "127.0.0.1:0"
[daemon]
state_dir = "{tmp_path}"
[logging]
format = "json"
[schedules]
orders = "every 2s"
[orders]
enabled = true
backoff_initial = 0.0
backoff_max = 0.0
[orders.shop_mappings]
shopify = "mappings/shopify.toml"
shopware = "mappings/shopware.toml"
[orders.criteria.shopify]
status_fields = ["displayFinancialStatus", "financial_status"]
statuses = ["paid", "authorized", "partially_refunded"]
paid_only = false
[orders.criteria.shopware]
status_fields = ["transactions.0.stateMachineState.technicalName"]
statuses = ["paid", "authorized", "paid_partially", "refunded_partially"]
paid_only = false
[stock_push]
table = "stock"
sku_column = "sku"
on_hand_column = "on_hand"
coalesce_seconds = 0
[[shops]]
name = "shopify"
kind = "shopify"
url = "{sfy.url}"
token = "{sfy.access_token}"
webhook_secret = "{sfy.client_secret}"
[[shops]]
name = "shopware"
kind = "shopware"
url = "{sw.url}"
client_id = "{sw.client_id}"
client_secret = "{sw.client_secret}"
webhook_secret = "{sw.shop_secret}"
""")
        cfg.chmod(0o600)
        with DaemonProcess(cfg) as d:
            expected = {f"#{shopify_order.number}", str(shopware_order.number)}
            wait_until(lambda: _imported(erp_db) == expected, 60, what="orders in the ERP")
            wait_until(
                lambda: (
                    sfy.stock() == {s: 10 for s in skus} and sw.stock() == {s: 10 for s in skus}
                ),
                60,
                what="initial stock in both shops",
            )
            with psycopg.connect(erp_db, autocommit=True) as c:
                c.execute("UPDATE stock SET on_hand = 4 WHERE sku = %s", (skus[0],))
            wait_until(
                lambda: sfy.stock()[skus[0]] == 4 and sw.stock()[skus[0]] == 4,
                30,
                what="stock change pushed to both shops",
            )

            # Webhooks through the daemon's HTTP server: a new Shopify order, and Shopware's
            # placed-event of the order already imported; each delivered twice.
            url = re.search(r'"url": "(http://[^"]+)"', d.output()).group(1)  # type: ignore[union-attr]
            sfy.add_orders([hooked])
            h1, b1 = sfy.webhook_request(hooked.number, webhook_id="wh-e2e")
            h2, b2 = sw.webhook_request(str(shopware_order.number), event_id="ev-e2e")
            for _ in range(2):
                assert (
                    httpx.post(url + "webhooks/shop/shopify", content=b1, headers=h1).status_code
                    == 200
                )
                assert (
                    httpx.post(url + "webhooks/shop/shopware", content=b2, headers=h2).status_code
                    == 200
                )
            forged = {**h1, "X-Shopify-Hmac-Sha256": "AAAA"}
            assert (
                httpx.post(url + "webhooks/shop/shopify", content=b1, headers=forged).status_code
                == 401
            )
            expected.add(f"#{hooked.number}")
            wait_until(lambda: _imported(erp_db) == expected, 30, what="webhook order imported")
            with psycopg.connect(erp_db) as c:
                dup = c.execute(
                    "SELECT e_number FROM order_header GROUP BY 1 HAVING count(*) > 1"
                ).fetchall()
                lines = c.execute(
                    "SELECT count(*) FROM order_line l JOIN order_header h USING (order_no) "
                    "WHERE h.e_number = %s",
                    (f"#{shopify_order.number}",),
                ).fetchone()
            assert dup == []
            assert lines is not None and lines[0] == len(shopify_order.lines)
            assert d.terminate() == 0
