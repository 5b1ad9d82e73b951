"""End to end: ERP commit → logical replication (a real ``LogicalSource`` on a throwaway
PostgreSQL) → staging mirror + journal → stock push → the WooCommerce emulator's stock.
Staging on SQLite and on PostgreSQL (same body)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg

from replicator.cdc.logical import LogicalSource
from replicator.config import parse_config
from replicator.connectors.woocommerce import WooCommerceConnector
from replicator.push.stock import StockPushService
from replicator.staging import StagingStore
from tests.emulators import WooCommerceEmulator

SCHEMA = """
CREATE TABLE stock (sku text, warehouse int, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
                    PRIMARY KEY (sku, warehouse));
INSERT INTO stock SELECT 'SKU-' || g, w, 10 * w, 1 FROM generate_series(1, 30) g,
                         generate_series(1, 2) w;
"""


def erp_stock(url: str) -> dict[str, int]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT sku, GREATEST(0, SUM(on_hand - reserved))::int FROM stock GROUP BY sku"
        ).fetchall()
    return {s: int(q) for s, q in rows}


def test_erp_commit_reaches_shop_through_logical_replication(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute(SCHEMA)
    cfg = parse_config(
        {
            "erp": {"dsn": erp_db},
            "capture": {
                "tables": ["public.stock"],
                "batch_ms": 20,
                "slot": "push_e2e",
                "publication": "push_e2e",
            },
            "staging": {"url": staging_url},
            "daemon": {"state_dir": str(tmp_path)},
            "stock_push": {
                "table": "stock",
                "on_hand_column": "on_hand",
                "reserved_column": "reserved",
                "coalesce_seconds": 0,
            },
        }
    )
    store = StagingStore(cfg.staging_url)
    source = LogicalSource(cfg, store)
    products = [(f"SKU-{i}", f"Product {i}", 0) for i in range(1, 31)]
    with WooCommerceEmulator(products=products) as shop:
        conn = WooCommerceConnector("web", shop.url, shop.consumer_key, shop.consumer_secret)
        pusher = StockPushService(cfg, store, [conn])
        stop = threading.Event()
        try:
            source.start()  # the initial snapshot goes through the journal too

            def settle(timeout: float = 30) -> None:
                deadline = time.monotonic() + timeout
                want = erp_stock(erp_db)
                while time.monotonic() < deadline:
                    source.run_cycle(0.2, stop)
                    pusher.run_cycle()
                    if {k: v for k, v in shop.stock().items() if k in want} == want:
                        return
                raise AssertionError(f"shop {shop.stock()} != ERP {want}")

            settle()
            before = shop.count("POST", "/wp-json/wc/v3/products/batch")
            with psycopg.connect(erp_db, autocommit=True) as c:
                for i in range(20):  # a burst of small transactions on three SKUs
                    c.execute(
                        "UPDATE stock SET on_hand = on_hand + 1 WHERE sku = %s",
                        (f"SKU-{i % 3 + 1}",),
                    )
                c.execute("DELETE FROM stock WHERE sku = 'SKU-9' AND warehouse = 2")
                c.execute("UPDATE stock SET reserved = 0 WHERE sku = 'SKU-10'")
            settle()
            assert shop.count("POST", "/wp-json/wc/v3/products/batch") > before
            assert pusher.reader.caught_up()
        finally:
            stop.set()
            pusher.close()
            conn.close()
            source.close()
            store.dispose()
