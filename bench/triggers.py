"""Benchmark of trigger capture on a PostgreSQL ERP: write overhead and changelog drain rate.

Prints figures, asserts nothing (targets: overhead <= 10 % with synchronous_commit=on; drain
>= 50,000 changes/s). Runs on a throwaway cluster (``replicator.localpg.local_cluster``, with
``fsync=on`` so that a synchronous commit really waits for the WAL flush, as in production).

1. Write overhead: pgbench's simple-update script (``pgbench -N``) TPS on pgbench_accounts
   without and with the capture triggers, runs interleaved (off, on, off, on, ...), median of
   the per-pair ratios; with synchronous_commit on and off; also with the NOTIFY doorbell and
   with a "key + changed columns" row image instead of the full ``to_jsonb(NEW)``.
2. Drain rate: changes/s from the changelog into staging (SQLite and PostgreSQL staging), for
   many small transactions (pgbench) and for one bulk UPDATE.

    .venv/bin/python bench/triggers.py [--seconds 10] [--runs 3] [--scale 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from replicator.cdc.triggers import TriggerSource
from replicator.cdc.triggers.dialects import PostgresDialect
from replicator.config import parse_config
from replicator.localpg import LocalCluster, local_cluster
from replicator.staging import StagingStore

PGBENCH = os.environ.get("PGBENCH", "/usr/lib/postgresql/15/bin/pgbench")
TABLE = "public.pgbench_accounts"

# The alternative row image: key + changed columns, computed in PL/pgSQL.
DIFF_FN = """\
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $sync$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO {cl} (tbl, op, row_data)
        VALUES ('public.pgbench_accounts', 'U',
                (SELECT jsonb_object_agg(n.key, n.value) FROM jsonb_each(to_jsonb(NEW)) n
                 JOIN jsonb_each(to_jsonb(OLD)) o USING (key)
                 WHERE n.value IS DISTINCT FROM o.value OR n.key = 'aid'));
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO {cl} (tbl, op, row_data) VALUES ('public.pgbench_accounts', 'I', to_jsonb(NEW));
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {cl} (tbl, op, old_key)
        VALUES ('public.pgbench_accounts', 'D', jsonb_build_object('aid', OLD.aid));
    ELSE
        INSERT INTO {cl} (tbl, op) VALUES ('public.pgbench_accounts', 'T');
    END IF;
    RETURN NULL;
END
$sync$"""


def pgbench(cluster: LocalCluster, db: str, *args: str, options: str = "") -> str:
    env = {**os.environ, "PGOPTIONS": options}
    cmd = [PGBENCH, "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", *args, db]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return res.stdout


def tps(out: str) -> float:
    m = re.search(r"tps = ([\d.]+) \((?:without initial connection time|excluding)", out)
    if m is None:
        m = re.search(r"tps = ([\d.]+)", out)
    assert m is not None, out
    return float(m.group(1))


def config(url: str, staging: str, **capture: object):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "erp": {"dsn": url},
            "capture": {"mode": "triggers", "tables": [TABLE], "poll_interval": 0.05, **capture},
            "staging": {"url": staging},
        }
    )


def install(url: str, *, notify: bool) -> PostgresDialect:
    cfg = config(url, "sqlite:///unused.db", notify=notify)
    d = PostgresDialect(cfg.erp.url, cfg.capture)
    with d.connect("bench") as conn:
        d.install(conn, [TABLE])
    return d


def uninstall(url: str) -> None:
    cfg = config(url, "sqlite:///unused.db")
    d = PostgresDialect(cfg.erp.url, cfg.capture)
    with d.connect("bench") as conn:
        d.uninstall(conn, [TABLE])


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('public.sync_changelog')").fetchone()[0]:  # type: ignore[index]
            conn.execute("TRUNCATE sync_changelog")
        conn.execute("TRUNCATE pgbench_history")
        conn.execute("VACUUM ANALYZE pgbench_accounts")
        conn.execute("CHECKPOINT")


def overhead(
    cluster: LocalCluster, db: str, url: str, a: argparse.Namespace, *, sync: str, variant: str
) -> tuple[float, float, float]:
    """Median TPS without, with, and the median of per-pair ratios (with / without)."""
    opts = f"-c synchronous_commit={sync}"
    base: list[float] = []
    trig: list[float] = []
    args = [
        "-N",
        "-n",
        "-c",
        str(a.clients),
        "-j",
        str(min(a.clients, os.cpu_count() or 2)),
        "-T",
        str(a.seconds),
    ]
    for _ in range(a.runs):
        uninstall(url)
        reset(url)
        base.append(tps(pgbench(cluster, db, *args, options=opts)))
        d = install(url, notify=variant == "notify")
        if variant == "diff":
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(DIFF_FN.format(fn=d.capture_fn(TABLE), cl=d.cl))
        reset(url)
        trig.append(tps(pgbench(cluster, db, *args, options=opts)))
    ratios = [t / b for t, b in zip(trig, base, strict=True)]
    return statistics.median(base), statistics.median(trig), statistics.median(ratios)


def row_image_cost(url: str, rows: int = 200_000) -> None:
    """Per-row trigger cost and changelog size: one bulk UPDATE, no trigger / full / diff."""
    results = []
    for variant in ("none", "full", "diff"):
        uninstall(url)
        if variant != "none":
            d = install(url, notify=False)
            if variant == "diff":
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(DIFF_FN.format(fn=d.capture_fn(TABLE), cl=d.cl))
        reset(url)
        with psycopg.connect(url, autocommit=True) as conn:
            t0 = time.monotonic()
            conn.execute(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= {rows}")
            secs = time.monotonic() - t0
            size = 0.0
            if variant != "none":
                size = conn.execute(
                    "SELECT avg(pg_column_size(sync_changelog.*)) FROM sync_changelog"
                ).fetchone()[0]  # type: ignore[index]
        results.append((variant, secs, float(size)))
    base = results[0][1]
    for variant, secs, size in results:
        extra = f"+{1e6 * (secs - base) / rows:5.2f} us/row" if variant != "none" else ""
        print(
            f"  bulk UPDATE of {rows} rows, trigger {variant:<5} {secs:6.2f} s {extra:>16}"
            + (f"   changelog row {size:5.0f} bytes" if size else "")
        )


def read_rate(url: str) -> None:
    """Changelog read + JSON decode alone (no staging): the capture side's own ceiling."""
    from replicator.cdc.triggers.decode import RowDecoder, loads

    cfg = config(url, "sqlite:///unused.db", notify=False)
    d = PostgresDialect(cfg.erp.url, cfg.capture)
    with d.connect("bench", autocommit=False) as conn:
        dec = RowDecoder(d.table_schema(conn, TABLE))
        t0 = time.monotonic()
        n = 0
        with conn.cursor(name="bench") as cur:
            cur.itersize = 20000
            cur.execute(
                "SELECT id, tbl, op::text, row_data::text, old_key::text, at "
                "FROM sync_changelog ORDER BY id"
            )
            for row in cur:
                dec.decode(loads(row[3]))
                n += 1
        secs = time.monotonic() - t0
    print(f"  {'read + decode only (no staging)':<44} {n:>8} changes {n / secs:>9,.0f} changes/s")


def drain(url: str, staging: str, label: str, writer, journal: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Start capture (initial copy), produce changes with ``writer``, time the drain."""
    cfg = config(url, staging, batch_size=20000, cleanup_batch=50000, notify=False)
    store = StagingStore(staging, journal=journal)
    src = TriggerSource(cfg, store)
    t0 = time.monotonic()
    src.start()
    copy_s = time.monotonic() - t0
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()[0]  # type: ignore[index]
    writer()
    if label.startswith("SQLite staging, one"):
        read_rate(url)
    with psycopg.connect(url) as conn:
        pending = conn.execute("SELECT count(*) FROM sync_changelog").fetchone()[0]  # type: ignore[index]
    stop = threading.Event()
    t0 = time.monotonic()
    applied = 0
    while True:
        n = src.run_cycle(0.01, stop)
        applied += n
        if n == 0 and applied >= pending:
            break
    secs = time.monotonic() - t0
    src.close()
    store.dispose()
    print(
        f"  {label:<44} copy {rows:>8} rows {rows / copy_s:>9,.0f} rows/s | "
        f"drain {applied:>8} changes {applied / secs:>9,.0f} changes/s"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-drain", action="store_true")
    a = p.parse_args()
    settings = {
        "fsync": "on",
        "max_wal_size": "4GB",
        "checkpoint_timeout": "30min",
        "shared_buffers": "512MB",
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-triggers-"))
    try:
        return run(a, settings, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(a: argparse.Namespace, settings: dict[str, str], tmp: Path) -> int:
    with local_cluster(settings) as cluster:
        url = cluster.createdb("bench")
        pgbench(cluster, "bench", "-i", "-q", "-s", str(a.scale))
        print(
            f"pgbench -N, scale {a.scale}, {a.clients} clients, {a.seconds} s x {a.runs} "
            f"interleaved runs, {os.cpu_count()} CPUs, fsync=on"
        )
        if not a.skip_overhead:
            for sync, variant in (
                ("on", "full"),
                ("off", "full"),
                ("on", "notify"),
                ("on", "diff"),
            ):
                b, t, r = overhead(cluster, "bench", url, a, sync=sync, variant=variant)
                what = {
                    "full": "row image to_jsonb(NEW)",
                    "notify": "row image + NOTIFY doorbell",
                    "diff": "key + changed columns (PL/pgSQL diff)",
                }[variant]
                print(
                    f"  synchronous_commit={sync:<3} {what:<40} without {b:>8,.0f} tps  "
                    f"with {t:>8,.0f} tps  overhead {100 * (1 - r):5.1f} %"
                )
        print("row image: full to_jsonb(NEW) vs key + changed columns:")
        row_image_cost(url)
        if a.skip_drain:
            return 0
        uninstall(url)
        install(url, notify=False)
        reset(url)
        print("drain into staging (batch 20,000):")
        small = ["-N", "-n", "-c", str(a.clients), "-j", "2", "-T", str(a.seconds)]

        def pg_small() -> None:
            pgbench(cluster, "bench", *small)

        def bulk() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 200000"
                )

        staging_pg = cluster.createdb("staging")
        for label, staging, writer, journal in (
            (
                "SQLite staging, pgbench small transactions",
                f"sqlite:///{tmp / 's1.db'}",
                pg_small,
                True,
            ),
            ("SQLite staging, one 200k-row UPDATE", f"sqlite:///{tmp / 's2.db'}", bulk, True),
            (
                "SQLite staging, journal off, 200k-row UPDATE",
                f"sqlite:///{tmp / 's3.db'}",
                bulk,
                False,
            ),
            ("PostgreSQL staging, one 200k-row UPDATE", staging_pg, bulk, True),
        ):
            drain(url, staging, label, writer, journal)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE sync_changelog")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
