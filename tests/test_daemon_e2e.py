"""The whole daemon process, end to end: logical capture of a sample ERP, webshop orders imported
from a loopback WooCommerce emulator (once per e-number, ERP order number recorded), stock pushed
back to the shop, a signed webhook delivery, status and the Manage page — one real process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from replicator.orders.sample import install_sample_erp
from tests.emulators import WooCommerceEmulator
from tests.emulators.orders import generate_orders, sample_skus
from tests.helpers import DaemonProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent


def erp_stock(url: str) -> dict[str, int]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT sku, GREATEST(0, SUM(on_hand))::int FROM stock GROUP BY sku"
        ).fetchall()
    return {s: int(q) for s, q in rows}


def test_capture_orders_stock_push_and_webhook_in_one_daemon(erp_db: str, tmp_path: Path) -> None:
    install_sample_erp(erp_db)
    skus = sample_skus(10)
    with psycopg.connect(erp_db, autocommit=True) as c:
        for i, sku in enumerate(skus, start=1):
            c.execute("INSERT INTO items VALUES (%s, %s, %s, 1)", (f"W-{i:04d}", sku, f"Woo {i}"))
        c.execute("CREATE TABLE stock (sku text PRIMARY KEY, on_hand int NOT NULL)")
        c.cursor().executemany("INSERT INTO stock VALUES (%s, %s)", [(s, 10) for s in skus])
    now = datetime.now(UTC)
    orders = generate_orders(
        8, start=now - timedelta(hours=2), spacing=timedelta(minutes=5), skus=skus
    )
    (tmp_path / "mappings").mkdir()
    shutil.copy(ROOT / "config" / "mappings" / "orders.toml", tmp_path / "mappings" / "orders.toml")
    secret = "hook-secret"
    with WooCommerceEmulator(products=[(s, f"P {s}", 0) for s in skus]) as woo:
        woo.add_orders(orders)
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
metrics_interval = 1
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
[stock_push]
table = "stock"
sku_column = "sku"
on_hand_column = "on_hand"
coalesce_seconds = 0
[[shops]]
name = "woo"
kind = "woocommerce"
url = "{woo.url}"
consumer_key = "{woo.consumer_key}"
consumer_secret = "{woo.consumer_secret}"
webhook_secret = "{secret}"
""")
        cfg.chmod(0o600)
        with DaemonProcess(cfg) as d:
            expected = {str(o.number) for o in orders if o.status == "processing" and o.paid}

            def imported() -> set[str]:
                with psycopg.connect(erp_db) as c:
                    return {r[0] for r in c.execute("SELECT e_number FROM order_header")}

            wait_until(lambda: imported() == expected, 60, what="orders in the ERP")
            # Stock: the shop ends with the ERP's quantities, also after a change in the ERP.
            wait_until(
                lambda: {k: v for k, v in woo.stock().items()} == erp_stock(erp_db),
                60,
                what="initial stock in the shop",
            )
            with psycopg.connect(erp_db, autocommit=True) as c:
                c.execute("UPDATE stock SET on_hand = on_hand - 3 WHERE sku = %s", (skus[0],))
            wait_until(lambda: woo.stock()[skus[0]] == 7, 30, what="stock change pushed")

            # A signed webhook delivery of a new order imports it once, even when repeated.
            url = re.search(r'"url": "(http://[^"]+)"', d.output()).group(1)  # type: ignore[union-attr]
            extra = generate_orders(1, first_number=5001, skus=skus, start=now)[0]
            woo.add_orders([extra])
            body = json.dumps(woo.orders[extra.number]).encode()
            sig = base64.b64encode(
                hmac.new(secret.encode(), body, hashlib.sha256).digest()
            ).decode()
            for _ in range(3):
                r = httpx.post(
                    url + "webhooks/shop/woo",
                    content=body,
                    headers={
                        "X-WC-Webhook-Signature": sig,
                        "X-WC-Webhook-Delivery-ID": "d-1",
                        "Content-Type": "application/json",
                    },
                )
                assert r.status_code in (200, 202), r.text
            bad = httpx.post(
                url + "webhooks/shop/woo", content=body, headers={"X-WC-Webhook-Signature": "bad"}
            )
            assert bad.status_code == 401
            if extra.status == "processing" and extra.paid:
                wait_until(lambda: "5001" in imported(), 30, what="webhook order imported")
            with psycopg.connect(erp_db) as c:
                dup = c.execute(
                    "SELECT e_number, count(*) FROM order_header GROUP BY 1 HAVING count(*) > 1"
                ).fetchall()
                numbers = c.execute("SELECT count(DISTINCT order_no) FROM order_header").fetchone()
            assert dup == []
            assert numbers is not None and numbers[0] == len(imported())

            # The Manage page and status show the delivered orders.
            wait_until(
                lambda: (
                    'sync_orders{shop="woo",state="delivered"}' in httpx.get(url + "metrics").text
                ),
                40,
                what="orders by state in /metrics",
            )
            page = httpx.get(url).text
            assert "delivered" in page.lower()
            st = subprocess.run(
                [
                    sys.executable,
                    "sync_daemon.py",
                    "orders",
                    "--config",
                    str(cfg),
                    "--status",
                    "delivered",
                ],
                capture_output=True,
                text=True,
            )
            assert st.returncode == 0
            for e in expected:
                assert e in st.stdout
            # `status`, the Manage page in a terminal: services with their runs, orders by state.
            wait_until(
                lambda: (
                    "stock_push"
                    in subprocess.run(
                        [sys.executable, "sync_daemon.py", "status", "--config", str(cfg)],
                        capture_output=True,
                        text=True,
                    ).stdout
                ),
                30,
                what="stock_push in status",
            )
            status = subprocess.run(
                [sys.executable, "sync_daemon.py", "status", "--config", str(cfg), "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            data = json.loads(status.stdout)
            by_name = {s["name"]: s for s in data["services"]}
            assert by_name["orders"]["last_ok"] is True and by_name["capture"]["last_ok"] is True
            assert data["orders"]["counts"]["delivered"] == len(imported())
            delivered = {r["e_number"] for r in data["orders"]["latest"]["delivered"]}
            assert expected <= delivered
            assert all(r["erp_order_no"] for r in data["orders"]["latest"]["delivered"])
            assert d.terminate() == 0
