"""Benchmark: sync-daemon's logical capture against PostgreSQL's own consumers, in one run.

Workloads (all in one throwaway cluster with wal_level=logical):
  A. 1M inserts + 1M updates in large transactions (4 x 250k each);
  B. 100k small transactions of 1-10 rows;
  C. a steady 5,000 changes/s for 60 s (end-to-end lag p50/p99).

Consumers, each with its own slot created *before* the workload so they all decode the same WAL,
run one after the other on the 2 cores (no competition):
  1. sync-daemon into staging (SQLite, PostgreSQL);
  2. native logical replication (publication + subscription into a second database);
  3. pg_recvlogical to /dev/null (the server's decoding limit).

Throughput = row changes / time to catch up from the slot's start to the WAL end of the workload.
CPU per change, side by side: the daemon process's own user+system time (its threads included)
and the native subscription's apply worker backend's (pg_stat_subscription.pid, /proc/PID/stat),
each counted from the moment the consumer is connected to its slot until it has caught up,
divided by the row changes; on PostgreSQL staging the staging server's backends are shown
apart ("+x in the staging server"). The walsender decodes the same WAL for both, not counted.
The run says which pgoutput decoder and which value path (text: non-key values straight from
the source's text to the stored form; objects: psycopg loaders, SYNC_DAEMON_OBJECT_VALUES=1) the
daemons ran; ``--value-paths text,objects`` runs a daemon per path and staging side by side.
Lag at the steady rate: probe rows committed every 100 ms, timed until they appear downstream.
Peak RSS of the daemon is sampled during workload A. Nothing is asserted: figures are printed.

Usage: python bench/logical_replication.py [--scale 0.1] [--steady-seconds 60] [--json FILE]
                                          [--value-paths text,objects]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicator.cdc import pgoutput  # noqa: E402
from replicator.localpg import LocalCluster, find_bindir  # noqa: E402

SCHEMA = """
CREATE TABLE bench (id bigint PRIMARY KEY, sku text, qty int, price numeric(12,2), at timestamptz);
CREATE TABLE probe (id bigint PRIMARY KEY, sent timestamptz);
"""


def lsn(conn: psycopg.Connection[Any]) -> str:
    return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]


def slot_flushed(conn: psycopg.Connection[Any], slot: str, target: str) -> bool:
    row = conn.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (target, slot),
    ).fetchone()
    return bool(row and row[0])


def wait_flushed(
    conn: psycopg.Connection[Any], slot: str, target: str, timeout: float = 3600
) -> float:
    t0 = time.monotonic()
    while not slot_flushed(conn, slot, target):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(slot)
        time.sleep(0.05)
    return time.monotonic() - t0


def wait_active(conn: psycopg.Connection[Any], slot: str, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while not conn.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()[0]:  # type: ignore[index]
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{slot} never became active")
        time.sleep(0.01)
    return time.monotonic()


def workload_large(conn: psycopg.Connection[Any], n: int) -> int:
    chunk = max(1, n // 4)
    for start in range(0, n, chunk):
        conn.execute(
            "INSERT INTO bench SELECT g, 'SKU-' || g, g %% 100, g * 0.01, now() "
            "FROM generate_series(%s::bigint, %s::bigint) g",
            (start + 1, min(n, start + chunk)),
        )
        conn.commit()
    for start in range(0, n, chunk):
        conn.execute(
            "UPDATE bench SET qty = qty + 1 WHERE id BETWEEN %s AND %s",
            (start + 1, min(n, start + chunk)),
        )
        conn.commit()
    return 2 * n


def workload_small(conn: psycopg.Connection[Any], n: int) -> int:
    conn.execute("""
        CREATE OR REPLACE PROCEDURE small_txns(n int, base bigint) LANGUAGE plpgsql AS $$
        DECLARE k int; nxt bigint := base;
        BEGIN
          FOR i IN 1..n LOOP
            k := 1 + (i * 7919) % 10;
            INSERT INTO bench SELECT nxt + g, 'S', 1, 1, now() FROM generate_series(1, k) g;
            nxt := nxt + k;
            COMMIT;
          END LOOP;
        END $$""")
    conn.commit()
    conn.autocommit = True
    conn.execute("SET synchronous_commit = off")
    conn.execute("CALL small_txns(%s, 100000000)", (n,))
    conn.autocommit = False
    return sum(1 + (i * 7919) % 10 for i in range(1, n + 1))


class Consumer:
    name = ""
    slot = ""

    def prepare(self) -> None: ...
    def run_until(self, target: str) -> float: ...
    def stop(self) -> None: ...

    def cpu_seconds(self) -> float | None:
        """User+system CPU seconds the consumer has used so far (None: not measured)."""
        return None

    def server_cpu(self) -> dict[int, float]:
        """CPU seconds so far of the database backends that write for the consumer elsewhere
        (PostgreSQL staging), by pid; empty when there are none."""
        return {}


def process_cpu(pid: int) -> float | None:
    """User+system CPU seconds of process ``pid`` (/proc/PID/stat through psutil)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def daemon_config(tmp: Path, erp: str, staging: str, slot: str) -> Path:
    p = tmp / f"{slot}.toml"
    p.write_text(f"""
[erp]
dsn = "{erp}"
[capture]
mode = "logical"
tables = ["public.bench", "public.probe"]
slot = "{slot}"
publication = "bench_pub"
batch_ms = 100
heartbeat_interval = 1
[staging]
url = "{staging}"
[health]
listen = "127.0.0.1:0"
[daemon]
state_dir = "{tmp}"
[logging]
format = "json"
level = "warning"
""")
    return p


class DaemonConsumer(Consumer):
    def __init__(
        self, tmp: Path, erp: str, staging: str, slot: str, label: str, value_path: str = "text"
    ) -> None:
        self.cfg = daemon_config(tmp, erp, staging, slot)
        self.slot, self.name, self.staging = slot, label, staging
        self.value_path = value_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self._sampling = threading.Event()

    def _start(self) -> None:
        env = dict(os.environ)
        env[pgoutput.OBJECT_VALUES_ENV] = "1" if self.value_path == "objects" else "0"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "sync_daemon.py"), "run", "--config", str(self.cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self._sampling.clear()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        while not self._sampling.is_set():
            try:
                self.peak_rss = max(self.peak_rss, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def prepare(self, admin: psycopg.Connection[Any] | None = None) -> None:
        # First start creates the slot and snapshots the (empty) tables; then stop.
        self._start()
        assert admin is not None
        t0 = time.monotonic()
        while not admin.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (self.slot,)
        ).fetchone():
            if time.monotonic() - t0 > 60:
                raise TimeoutError("daemon did not start")
            time.sleep(0.1)
        self.stop()

    def start(self) -> None:
        self._start()

    def cpu_seconds(self) -> float | None:
        return process_cpu(self.proc.pid) if self.proc is not None else None

    def server_cpu(self) -> dict[int, float]:
        # On PostgreSQL staging part of the apply runs in the staging server's backends (COPY,
        # INSERT … ON CONFLICT), as the native apply worker's does in its own backend.
        if not self.staging.startswith("postgresql"):
            return {}
        with psycopg.connect(self.staging, autocommit=True) as s:
            pids = [
                r[0]
                for r in s.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
            ]
        out = {}
        for pid in pids:
            cpu = process_cpu(pid)
            if cpu is not None:
                out[pid] = cpu
        return out

    def stop(self) -> None:
        self._sampling.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class NativeConsumer(Consumer):
    def __init__(self, cluster: LocalCluster, erp_db: str) -> None:
        self.name, self.slot = "native logical replication", "native_slot"
        self.cluster, self.erp_db = cluster, erp_db
        self.sub_dsn = cluster.createdb("subscriber")

    def prepare(self, admin: psycopg.Connection[Any] | None = None) -> None:
        assert admin is not None
        admin.execute("SELECT pg_create_logical_replication_slot('native_slot', 'pgoutput')")
        with psycopg.connect(self.sub_dsn, autocommit=True) as s:
            s.execute(SCHEMA)
            s.execute(
                f"CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port={self.cluster.port} "
                f"user=postgres dbname={self.erp_db}' PUBLICATION bench_pub WITH (create_slot = false, "
                "slot_name = 'native_slot', enabled = false, copy_data = false)"
            )

    def start(self) -> None:
        with psycopg.connect(self.sub_dsn, autocommit=True) as s:
            s.execute("ALTER SUBSCRIPTION native_sub ENABLE")

    def cpu_seconds(self) -> float | None:
        # The apply worker: the subscription's backend without a table (relid) of its own.
        with psycopg.connect(self.sub_dsn, autocommit=True) as s:
            row = s.execute(
                "SELECT pid FROM pg_stat_subscription WHERE subname = 'native_sub' "
                "AND relid IS NULL AND pid IS NOT NULL"
            ).fetchone()
        return process_cpu(row[0]) if row else None

    def stop(self) -> None:
        with psycopg.connect(self.sub_dsn, autocommit=True) as s:
            s.execute("ALTER SUBSCRIPTION native_sub DISABLE")
        time.sleep(0.5)


class RecvlogicalConsumer(Consumer):
    def __init__(self, cluster: LocalCluster, erp_db: str) -> None:
        self.name, self.slot = "pg_recvlogical (decoding limit)", "recv_slot"
        self.cluster, self.erp_db = cluster, erp_db
        self.target = ""

    def prepare(self, admin: psycopg.Connection[Any] | None = None) -> None:
        assert admin is not None
        admin.execute("SELECT pg_create_logical_replication_slot('recv_slot', 'pgoutput')")

    def run_to(self, target: str) -> float:
        bindir = find_bindir()
        assert bindir is not None
        t0 = time.monotonic()
        subprocess.run(
            [
                str(bindir / "pg_recvlogical"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.cluster.port),
                "-U",
                "postgres",
                "-d",
                self.erp_db,
                "-S",
                "recv_slot",
                "--start",
                "-f",
                "/dev/null",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=bench_pub",
                "-E",
                target,
                "--no-loop",
                "-s",
                "1",
            ],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.monotonic() - t0


def steady(erp: str, rate: int, seconds: int, probe_seen: Any) -> list[float]:
    """Write `rate` changes/s for `seconds`; probe rows every 100 ms; return their lags."""
    lags: list[float] = []
    pending: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() or pending:
            for pid, t0 in list(pending.items()):
                if probe_seen(pid):
                    lags.append(time.monotonic() - t0)
                    pending.pop(pid, None)
            time.sleep(0.005)
            if stop.is_set() and time.monotonic() - stop_time[0] > 30:
                break

    stop_time = [0.0]
    watcher = threading.Thread(target=watch)
    watcher.start()
    with psycopg.connect(erp) as c:
        per_tick = rate // 10
        base = 500_000_000
        t_start = time.monotonic()
        for tick in range(seconds * 10):
            c.execute(
                "INSERT INTO bench SELECT %s::bigint + g, 'T', 1, 1, now() FROM generate_series(1, %s::int) g",
                (base + tick * per_tick, per_tick - 1),
            )
            c.execute("INSERT INTO probe VALUES (%s, now())", (tick,))
            c.commit()
            pending[tick] = time.monotonic()
            sleep = t_start + (tick + 1) / 10 - time.monotonic()
            if sleep > 0:
                time.sleep(sleep)
    stop_time[0] = time.monotonic()
    stop.set()
    watcher.join()
    return lags


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the workload sizes")
    ap.add_argument("--steady-seconds", type=int, default=60)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument(
        "--value-paths",
        default="text",
        help="comma-separated value paths of the daemons: text (default), objects, or both",
    )
    args = ap.parse_args()
    paths = [p.strip() for p in args.value_paths.split(",") if p.strip()]
    if not paths or any(p not in ("text", "objects") for p in paths):
        ap.error("--value-paths takes text, objects or text,objects")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up the cluster on SIGTERM too
    n_large = int(1_000_000 * args.scale)
    n_small = int(100_000 * args.scale)

    tmp = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    cluster = LocalCluster(settings={"max_wal_size": "8GB", "checkpoint_timeout": "30min"}).init()
    cluster.start()
    # The daemons started below inherit this environment, so they run the same decoder.
    print(f"pgoutput decoder: {pgoutput.DECODER}; value paths: {', '.join(paths)}", flush=True)
    results: dict[str, Any] = {
        "scale": args.scale,
        "decoder": pgoutput.DECODER,
        "value_paths": paths,
        "workloads": {},
    }
    try:
        erp = cluster.createdb("erp")
        staging_pg = cluster.createdb("staging")
        with psycopg.connect(erp, autocommit=True) as c:
            c.execute(SCHEMA)
            c.execute("CREATE PUBLICATION bench_pub FOR TABLE bench, probe")
        admin = psycopg.connect(erp, autocommit=True)
        consumers: list[Any] = []
        for path in paths:
            suffix = "" if path == "text" else "_objects"
            consumers.append(
                DaemonConsumer(
                    tmp,
                    erp,
                    f"sqlite:///{tmp / f'staging{suffix}.db'}",
                    f"sd_sqlite{suffix}",
                    f"sync-daemon -> SQLite ({path})",
                    path,
                )
            )
        for path in paths:
            suffix = "" if path == "text" else "_objects"
            consumers.append(
                DaemonConsumer(
                    tmp,
                    erp,
                    staging_pg if path == "text" else cluster.createdb("staging_objects"),
                    f"sd_pg{suffix}",
                    f"sync-daemon -> PostgreSQL ({path})",
                    path,
                )
            )
        consumers += [
            NativeConsumer(cluster, "erp"),
            RecvlogicalConsumer(cluster, "erp"),
        ]
        for cons in consumers:
            cons.prepare(admin)

        for wl_name, fn, n in (
            ("A: 1M inserts + 1M updates (large txns)", workload_large, n_large),
            ("B: 100k small txns of 1-10 rows", workload_small, n_small),
        ):
            with psycopg.connect(erp) as c:
                changes = fn(c, n)
                target = lsn(c)
            print(f"\n== {wl_name}: {changes:,} row changes, WAL end {target}", flush=True)
            figures = {}
            for cons in consumers:
                cpu0 = cpu1 = None
                srv0: dict[int, float] = {}
                srv1: dict[int, float] = {}
                if isinstance(cons, RecvlogicalConsumer):
                    secs = cons.run_to(target)
                else:
                    cons.start()
                    # The clock starts when the consumer is connected to its slot, so process
                    # start-up (Python imports, worker launch) is not counted for anyone.
                    t0 = wait_active(admin, cons.slot)
                    cpu0, srv0 = cons.cpu_seconds(), cons.server_cpu()
                    wait_flushed(admin, cons.slot, target)
                    secs = time.monotonic() - t0
                    cpu1, srv1 = cons.cpu_seconds(), cons.server_cpu()
                    cons.stop()
                rate = changes / secs
                figures[cons.name] = {"seconds": round(secs, 2), "changes_per_s": round(rate)}
                extra = ""
                if not isinstance(cons, RecvlogicalConsumer):
                    if cpu0 is not None and cpu1 is not None:
                        us = (cpu1 - cpu0) / changes * 1e6
                        figures[cons.name]["cpu_us_per_change"] = round(us, 2)
                        extra += f"  CPU {us:6.2f} us/change"
                    else:
                        extra += "  CPU      n/a"
                    if srv1:
                        # Backends opened after the first reading count from zero.
                        srv = sum(c - srv0.get(pid, 0.0) for pid, c in srv1.items())
                        sus = srv / changes * 1e6
                        figures[cons.name]["staging_backend_cpu_us_per_change"] = round(sus, 2)
                        extra += f" (+{sus:.2f} in the staging server)"
                if isinstance(cons, DaemonConsumer):
                    figures[cons.name]["peak_rss_mb"] = round(cons.peak_rss / 2**20, 1)
                    extra += f"  peak RSS {cons.peak_rss / 2**20:.0f} MiB"
                print(
                    f"  {cons.name:36s} {secs:8.2f} s  {rate:>10,.0f} changes/s{extra}", flush=True
                )
            native = figures["native logical replication"]["changes_per_s"]
            native_cpu = figures["native logical replication"].get("cpu_us_per_change")
            limit = figures["pg_recvlogical (decoding limit)"]["changes_per_s"]
            for k, v in figures.items():
                if k.startswith("sync-daemon"):
                    v["ratio_vs_native"] = round(v["changes_per_s"] / native, 2)
                    v["ratio_vs_recvlogical"] = round(v["changes_per_s"] / limit, 2)
                    cpu = ""
                    if native_cpu and v.get("cpu_us_per_change") is not None:
                        v["cpu_ratio_vs_native"] = round(v["cpu_us_per_change"] / native_cpu, 2)
                        cpu = (
                            f"; CPU {v['cpu_us_per_change']:.2f} vs {native_cpu:.2f} us/change "
                            f"(native apply worker): {v['cpu_ratio_vs_native']:.1f}x"
                        )
                    print(
                        f"  {k}: {v['ratio_vs_native']:.2f}x native, "
                        f"{v['ratio_vs_recvlogical']:.0%} of the pg_recvlogical limit{cpu}"
                    )
            results["workloads"][wl_name] = figures
            with psycopg.connect(erp, autocommit=True) as c:
                c.execute("TRUNCATE bench")
                target = lsn(c)
            for cons in consumers:  # consume the truncate so the next workload starts level
                if isinstance(cons, RecvlogicalConsumer):
                    cons.run_to(target)
                else:
                    cons.start()
                    wait_flushed(admin, cons.slot, target)
                    cons.stop()

        print(
            f"\n== C: steady {args.rate:,} changes/s for {args.steady_seconds} s "
            "(end-to-end lag of probe rows)",
            flush=True,
        )
        lag_fig: dict[str, Any] = {}
        for cons in consumers:
            if isinstance(cons, RecvlogicalConsumer):
                continue
            if isinstance(cons, DaemonConsumer):
                store_url = cons.staging
                if store_url.startswith("sqlite"):
                    import sqlite3

                    path = store_url.removeprefix("sqlite:///")
                    sconn = sqlite3.connect(path, check_same_thread=False)

                    def seen(pid: int, s: Any = sconn) -> bool:
                        return (
                            s.execute("SELECT 1 FROM probe WHERE id = ?", (pid,)).fetchone()
                            is not None
                        )
                else:
                    pconn = psycopg.connect(store_url, autocommit=True)

                    def seen(pid: int, s: Any = pconn) -> bool:
                        return (
                            s.execute("SELECT 1 FROM probe WHERE id = %s", (pid,)).fetchone()
                            is not None
                        )
            else:
                nconn = psycopg.connect(cons.sub_dsn, autocommit=True)

                def seen(pid: int, s: Any = nconn) -> bool:
                    return (
                        s.execute("SELECT 1 FROM probe WHERE id = %s", (pid,)).fetchone()
                        is not None
                    )

            cons.start()
            time.sleep(2)
            with psycopg.connect(erp, autocommit=True) as c:
                c.execute("TRUNCATE probe, bench")
            time.sleep(1)
            lags = steady(erp, args.rate, args.steady_seconds, seen)
            cons.stop()
            p50, p99 = pct(lags, 50), pct(lags, 99)
            lag_fig[cons.name] = {
                "p50_s": round(p50, 3),
                "p99_s": round(p99, 3),
                "probes": len(lags),
            }
            print(
                f"  {cons.name:36s} lag p50 {p50 * 1000:7.0f} ms  p99 {p99 * 1000:7.0f} ms  "
                f"({len(lags)} probes)",
                flush=True,
            )
        results["steady_lag"] = lag_fig
        admin.close()
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
