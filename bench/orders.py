"""Benchmark: orders with 5 lines each, from the inbox into a PostgreSQL ERP.

A throwaway PostgreSQL cluster holds the sample ERP (``config/erp-sample/postgresql.sql``); the
staging store is SQLite (the default) or a PostgreSQL database on the same cluster. A feeder
thread puts orders into the inbox as fast as it can (the arrival time of each is when the inbox
committed it); the importer works them off as the daemon does (``ledger.due`` → ``process``),
each order written once in its own ERP transaction. Printed: orders/s end to end, p50/p99
arrival → ERP commit (and ledger update), and a check that every e-number is in the ERP exactly
once. No asserts: figures are for docs/orders.md.

    .venv/bin/python bench/orders.py [--orders 5000] [--staging sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicator.config import parse_config
from replicator.connectors.base import ShopOrder
from replicator.db import make_engine
from replicator.localpg import local_cluster
from replicator.orders.coordinator import OrderImportService
from replicator.orders.results import utcnow
from replicator.orders.sample import ROOT, SAMPLE_MAPPING, install_sample_erp, sample_order


def run(n: int, staging: str, workdir: Path, workers: int, rate: float, erp: str) -> None:
    import json

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    tryton_name = None
    with local_cluster() as cluster:
        if erp == "tryton":
            from tests.erp import tryton_db

            tryton_name = tryton_db.clone("bench_tryton")
            erp_url = tryton_db.url(tryton_name)
            mapping = ROOT / "config" / "mappings" / "tryton.toml"
        else:
            cluster.createdb("bench_erp")
            erp_url = f"postgresql://postgres@127.0.0.1:{cluster.port}/bench_erp"
            install_sample_erp(erp_url, extra_items=200)
            mapping = SAMPLE_MAPPING
        if staging == "postgresql":
            cluster.createdb("bench_staging")
            staging_url = f"postgresql://postgres@127.0.0.1:{cluster.port}/bench_staging"
        else:
            staging_url = f"sqlite:///{workdir / 'staging.db'}"
        (workdir / "mappings").mkdir()
        shutil.copy(mapping, workdir / "mappings" / "orders.toml")
        cfg = parse_config(
            {
                "erp": {"dsn": erp_url},
                "capture": {"tables": ["public.order_header"]},
                "staging": {"url": staging_url},
                "daemon": {"state_dir": str(workdir)},
                "orders": {"enabled": True, "workers": workers},
            },
            str(workdir / "config.toml"),
        )
        svc = OrderImportService(cfg, {})
        payloads = []
        for i in range(n):
            if erp == "tryton":
                from tests.erp.orders import taxed_order

                # Every fifth order is a new customer; the others are customers who ordered
                # before (not right before: repeat customers come back later).
                who = i if i % 5 == 0 else (i // 10) * 5
                o = taxed_order(1_000_000 + i, lines=5, email=f"c{who}@example.com")
            else:
                o = sample_order(
                    1_000_000 + i,
                    lines=5,
                    skus=[f"SKU-X{(i * 5 + k) % 200 + 1}" for k in range(5)],
                    email=f"c{i % 1000}@example.com",
                )
            payloads.append((str(o["number"]), json.dumps(o).encode()))
        feeding_done = threading.Event()

        def feed() -> None:
            # Orders arrive in pages of 50, as a poll page (or a burst of webhooks) would; with
            # --rate, pages are paced to that many orders per second.
            start = time.perf_counter()
            for i in range(0, len(payloads), 50):
                if rate:
                    time.sleep(max(0.0, start + i / rate - time.perf_counter()))
                now = utcnow()
                page = [
                    ShopOrder("shop", e, "processing", now, {}, raw)
                    for e, raw in payloads[i : i + 50]
                ]
                svc.inbox.offer_many(page, "bench", now)
            feeding_done.set()

        t0 = time.perf_counter()
        cpu0 = time.process_time()
        feeder = threading.Thread(target=feed)
        feeder.start()
        # The daemon's work-off (the code run_cycle uses): due orders in batches, ERP writes on
        # orders.workers threads, the ledger noted per batch.
        delivered = 0
        while delivered < n:
            r = svc.work_off("shop")
            delivered += r.new
            if r.errored:
                print(f"  errored: {r.errored_orders[:3]}")
                break
            if not r.new:
                if feeding_done.is_set() and not svc.ledger.due("shop", utcnow(), limit=1):
                    break
                time.sleep(0.002)
        feeder.join()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        # Arrival = when the inbox committed the order (first_seen); commit = right after the
        # ERP transaction committed (delivered_at).
        lat = sorted(
            (x.delivered_at - x.first_seen).total_seconds() * 1000
            for x in svc.ledger.list_orders(state="delivered")
            if x.delivered_at is not None
        )
        engine = make_engine(erp_url, "bench")
        header, e_col, line_table = (
            ("sale_sale", "reference", "sale_line")
            if erp == "tryton"
            else ("order_header", "e_number", "order_line")
        )
        with engine.connect() as conn:
            dup = conn.exec_driver_sql(
                f"SELECT count(*) FROM (SELECT {e_col} FROM {header} GROUP BY {e_col} "
                "HAVING count(*) > 1) d"
            ).scalar()
            total = conn.exec_driver_sql(f"SELECT count(DISTINCT {e_col}) FROM {header}").scalar()
            lines = conn.exec_driver_sql(f"SELECT count(*) FROM {line_table}").scalar()
        engine.dispose()
        svc.close()
        if tryton_name is not None:
            tryton_db.drop(tryton_name)
        print(
            f"ERP {erp}, staging {staging}, {cfg.orders.workers} workers, arrivals "
            f"{f'{rate:.0f}/s' if rate else 'all at once'}: {delivered} orders x 5 lines "
            f"in {elapsed:.2f} s = {delivered / elapsed:.0f} orders/s end to end"
        )
        print(
            f"  daemon CPU {cpu * 1000 / max(delivered, 1):.2f} ms/order "
            f"(= {delivered / cpu:.0f} orders per CPU-second); load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        if lat:
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(
                f"  arrival -> ERP commit: p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, "
                f"max {lat[-1]:.1f} ms"
            )
        print(
            f"  ERP: {total} distinct e-numbers, {lines} lines, duplicates {dup}; "
            f"every e-number exactly once: {total == n and dup == 0}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--staging", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--workers", type=int, default=4, help="orders.workers")
    ap.add_argument("--rate", type=float, default=0, help="arrivals per second (0: all at once)")
    ap.add_argument("--erp", choices=["sample", "tryton", "both"], default="sample")
    args = ap.parse_args()
    for erp in ["sample", "tryton"] if args.erp == "both" else [args.erp]:
        for staging in ["sqlite", "postgresql"] if args.staging == "both" else [args.staging]:
            with tempfile.TemporaryDirectory(prefix="bench-orders-") as d:
                run(args.orders, staging, Path(d), args.workers, args.rate, erp)


if __name__ == "__main__":
    main()
