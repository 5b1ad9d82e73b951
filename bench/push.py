"""Benchmark: the stock push, end to end, on a throwaway PostgreSQL cluster.

1. Latency: time from the ERP commit of a stock change to the WooCommerce emulator receiving the
   ``POST products/batch`` that carries it, with coalescing off (``coalesce_seconds = 0``).
   Path: ERP commit → pgoutput → ``LogicalSource`` (thread) → staging (SQLite) mirror + journal →
   ``StockPushService.run_forever`` (thread) → emulator. Probes: one SKU changed per commit,
   every ``--interval`` seconds; each probe sets a unique quantity, so the request that carried
   it is found in the emulator's request hook. Figures: p50/p90/p99/max.
2. A full reconcile of ``--skus`` SKUs (``--drift`` of them wrong in the shop): wall time and the
   requests it made (product pages read, batch writes).

Nothing is asserted: figures are printed (and written to ``--json``).

Usage: python bench/push.py [--skus 10000] [--probes 200] [--interval 0.1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicator.cdc.logical import LogicalSource  # noqa: E402
from replicator.config import parse_config  # noqa: E402
from replicator.connectors.woocommerce import WooCommerceConnector  # noqa: E402
from replicator.localpg import local_cluster  # noqa: E402
from replicator.push.stock import StockPushService  # noqa: E402
from replicator.staging import StagingStore  # noqa: E402
from tests.emulators import WooCommerceEmulator  # noqa: E402
from tests.emulators.base import Request  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skus", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--drift", type=int, default=500)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # Only warnings: per-cycle info lines would measure the terminal, not the pusher.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    out: dict[str, Any] = {"skus": args.skus}
    skus = [f"SKU-{i:05d}" for i in range(1, args.skus + 1)]
    with local_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        erp = cluster.createdb("erp")
        with psycopg.connect(erp, autocommit=True) as c:
            c.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
            c.execute(
                "INSERT INTO stock SELECT 'SKU-' || lpad(g::text, 5, '0'), 10 "
                "FROM generate_series(1, %s) g",
                (args.skus,),
            )
        erp_url = erp
        cfg = parse_config(
            {
                "erp": {"dsn": erp_url},
                "capture": {"tables": ["public.stock"], "batch_ms": 20, "status_interval": 1},
                "staging": {"url": f"sqlite:///{tmp}/staging.db"},
                "daemon": {"state_dir": tmp},
                "stock_push": {
                    "table": "stock",
                    "coalesce_seconds": 0,
                    "rate_limit": 1000,
                    "burst": 1000,
                },
            }
        )
        store = StagingStore(cfg.staging_url)
        source = LogicalSource(cfg, store)
        shop = WooCommerceEmulator(products=[(s, s, 0) for s in skus]).start()
        ids = {p["id"]: p["sku"] for p in shop.products.values()}
        seen: dict[tuple[str, int], float] = {}
        lock = threading.Lock()

        def hook(req: Request) -> None:
            if req.method == "POST" and req.path.endswith("/products/batch"):
                at = time.time()
                with lock:
                    for item in (req.json() or {}).get("update", []):
                        seen.setdefault((ids[int(item["id"])], int(item["stock_quantity"])), at)

        shop.before_route = hook
        conn = WooCommerceConnector("web", shop.url, shop.consumer_key, shop.consumer_secret)
        pusher = StockPushService(cfg, store, [conn])
        stop = threading.Event()

        def capture() -> None:
            while not stop.is_set():
                source.run_cycle(0.2, stop)

        t0 = time.monotonic()
        source.start()
        threads = [
            threading.Thread(target=capture, daemon=True),
            threading.Thread(target=pusher.run_forever, args=(stop, 0.02), daemon=True),
        ]
        for t in threads:
            t.start()
        while sum(1 for q in shop.stock().values() if q == 10) < args.skus:
            time.sleep(0.2)
        out["initial_sync_seconds"] = round(time.monotonic() - t0, 2)
        print(f"initial snapshot + push of {args.skus} SKUs: {out['initial_sync_seconds']} s")

        rnd = random.Random(7)
        sent: list[tuple[str, int, float]] = []
        with psycopg.connect(erp, autocommit=True) as c:
            for i in range(args.probes):
                sku = rnd.choice(skus)
                qty = 100_000 + i
                c.execute("UPDATE stock SET qty = %s WHERE sku = %s", (qty, sku))
                sent.append((sku, qty, time.time()))
                time.sleep(args.interval)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if all((s, q) in seen for s, q, _ in sent):
                    break
            time.sleep(0.1)
        with lock:
            lat = [seen[(s, q)] - at for s, q, at in sent if (s, q) in seen]
        missing = len(sent) - len(lat)
        out["latency"] = {
            "probes": len(sent),
            "missing": missing,
            "p50": round(statistics.median(lat), 3),
            "p90": round(pct(lat, 90), 3),
            "p99": round(pct(lat, 99), 3),
            "max": round(max(lat), 3),
        }
        print(
            f"commit → shop API call, coalescing off ({len(sent)} probes, every "
            f"{args.interval}s): p50 {out['latency']['p50']} s, p90 {out['latency']['p90']} s, "
            f"p99 {out['latency']['p99']} s, max {out['latency']['max']} s, missing {missing}"
        )
        stop.set()
        for t in threads:
            t.join(10)

        # Full reconcile: drift some SKUs in the shop behind the pusher's back.
        with shop.lock:
            for p in rnd.sample(list(shop.products.values()), args.drift):
                p["stock_quantity"] = 999_999
        shop.reset_log()
        shop.before_route = None
        t1 = time.monotonic()
        summary = pusher.reconcile()
        secs = time.monotonic() - t1
        web = summary["shops"]["web"]
        reads = shop.count("GET", "/wp-json/wc/v3/products")
        writes = shop.count("POST", "/wp-json/wc/v3/products/batch")
        out["reconcile"] = {
            "seconds": round(secs, 2),
            "checked": web["checked"],
            "differed": web["differed"],
            "corrected": web["corrected"],
            "requests": len(shop.requests),
            "product_pages": reads,
            "batch_writes": writes,
        }
        print(
            f"full reconcile of {web['checked']} SKUs: {secs:.2f} s, {len(shop.requests)} "
            f"requests ({reads} product pages, {writes} batch writes), {web['differed']} differed, "
            f"{web['corrected']} corrected"
        )
        pusher.close()
        conn.close()
        shop.stop()
        source.close()
        store.dispose()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
