"""``make demo``: the daemon on an embedded default, end to end, with nothing to set up.

Starts a throwaway "ERP" with sample tables and a writer that keeps changing them, a sample
webshop (a loopback WooCommerce emulator) that keeps producing orders, and ``sync-daemon run``
against both, with staging in an embedded SQLite file and the health server and Manage page on
localhost; it prints where to look and the status as it goes. Ctrl-C (or SIGTERM) stops
everything it started.

Which ERP it uses, and it says which it chose:
1. a PostgreSQL cluster from the local server binaries (logical replication; the full demo);
2. where there are none, PostgreSQL in Docker through testcontainers, if a Docker engine runs
   and the package is installed;
3. otherwise an embedded SQLite ERP captured by triggers (stock and items only: the sample order
   mapping targets PostgreSQL and MariaDB ERPs).
``SYNC_DEMO_ERP=sqlite`` forces the last one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from replicator.config import load_config
from replicator.localpg import LocalCluster, find_bindir, free_port, wait_port
from replicator.orders.sample import install_sample_erp
from replicator.status import collect_status

# The demo runs from a checkout (`make demo`) and borrows the test suite's shop emulators.
from tests.emulators import WooCommerceEmulator
from tests.emulators.orders import generate_orders

ROOT = Path(__file__).resolve().parent.parent

STOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku text NOT NULL, warehouse text NOT NULL, on_hand integer NOT NULL,
    reserved integer NOT NULL DEFAULT 0, PRIMARY KEY (sku, warehouse))"""
SQLITE_ITEMS = """
CREATE TABLE IF NOT EXISTS items (
    item_no text PRIMARY KEY, sku text UNIQUE NOT NULL, description text, price numeric)"""
SKUS = [f"SKU-{i:05d}" for i in range(1, 41)]


class DemoErp:
    """The sample ERP: a DB-API connection factory, its URL and how it is captured."""

    def __init__(self, label: str, url: str, mode: str, connect: Any, placeholder: str) -> None:
        self.label, self.url, self.mode, self.connect, self.ph = (
            label,
            url,
            mode,
            connect,
            placeholder,
        )

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        conn = self.connect()
        try:
            conn.execute(sql.replace("%s", self.ph), params)
            conn.commit()
        finally:
            conn.close()


def _postgres_erp(stack: contextlib.ExitStack) -> DemoErp | None:
    """Option 1 (local binaries) or 2 (testcontainers), with the full sample schema."""
    url: str | None = None
    label = ""
    if find_bindir() is not None and os.environ.get("SYNC_DEMO_ERP") != "sqlite":
        cluster = LocalCluster().init()
        stack.callback(cluster.destroy)
        cluster.start()
        url = cluster.createdb("erp")
        label = "a throwaway PostgreSQL cluster from the local server binaries"
    elif os.environ.get("SYNC_DEMO_ERP") != "sqlite" and shutil.which("docker"):
        try:
            # Optional, not a dependency: only this fallback uses it, and only if installed.
            from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found]  # noqa: PLC0415 - optional package

            pg = PostgresContainer("postgres:15").with_command("postgres -c wal_level=logical")
            pg.start()
            stack.callback(pg.stop)
            url = pg.get_connection_url().replace("+psycopg2", "")
            label = "PostgreSQL in Docker (testcontainers)"
        except Exception as exc:  # no engine, no package, no image: fall back to SQLite
            print(f"demo: Docker/testcontainers not usable ({type(exc).__name__}: {exc})")
    if url is None:
        return None
    install_sample_erp(url, extra_items=0)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(STOCK_SCHEMA)
    return DemoErp(label, url, "logical", lambda: psycopg.connect(url), "%s")


def _sqlite_erp(state: Path) -> DemoErp:
    """Option 3: an embedded SQLite ERP, captured by triggers."""
    path = state / "erp.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(SQLITE_ITEMS)
        conn.execute(STOCK_SCHEMA)
    return DemoErp(
        "an embedded SQLite ERP captured by triggers",
        f"sqlite:///{path}",
        "triggers",
        lambda: sqlite3.connect(path, timeout=10),
        "?",
    )


def _fill(erp: DemoErp) -> None:
    for i, sku in enumerate(SKUS, start=1):
        erp.execute(
            "INSERT INTO items VALUES (%s, %s, %s, %s)",
            (f"ITEM-{i:04d}", sku, f"Sample item {i}", round(random.uniform(5, 200), 2)),
        )
        for wh in ("MAIN", "SHOP"):
            erp.execute(
                "INSERT INTO stock VALUES (%s, %s, %s, 0)", (sku, wh, random.randint(0, 40))
            )


def _writer(erp: DemoErp, stop: threading.Event, counter: list[int]) -> None:
    """The ERP at work: stock moves all the time, prices now and then."""
    rnd = random.Random(7)
    while not stop.is_set():
        with contextlib.suppress(Exception):  # a busy moment in the ERP is not the demo's concern
            delta = rnd.randint(-5, 8)
            erp.execute(
                "UPDATE stock SET on_hand = CASE WHEN on_hand + %s < 0 THEN 0 ELSE on_hand + %s END "
                "WHERE sku = %s AND warehouse = %s",
                (delta, delta, rnd.choice(SKUS), rnd.choice(["MAIN", "SHOP"])),
            )
            if rnd.random() < 0.05:
                erp.execute(
                    "UPDATE items SET price = price * 1.01 WHERE sku = %s", (rnd.choice(SKUS),)
                )
            counter[0] += 1
        stop.wait(rnd.uniform(0.05, 0.4))


# What the sample shop's orders turn into, in turn, so that every state shows within the first
# minute (an order every 4 s, an import every 10 s) and a failure is common enough to be seen.
DEMO_MIX = ("imported", "failed", "not paid", "imported", "on hold", "imported")


def demo_order(n: int) -> Any:
    """The n-th order of the sample shop (1-based), shaped by ``DEMO_MIX``."""
    kind = DEMO_MIX[(n - 1) % len(DEMO_MIX)]
    order = generate_orders(
        1,
        seed=n,
        first_number=10000 + n,
        skus=[*SKUS, "SKU-UNKNOWN"] if kind == "failed" else SKUS,
        # modified up to 2 min after creation: keep it in the past
        start=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3),
    )[0]
    lines = order.lines
    if kind == "failed" and all(ln.sku != "SKU-UNKNOWN" for ln in lines):
        lines = (*lines[:-1], replace(lines[-1], sku="SKU-UNKNOWN"))
    return replace(
        order,
        lines=lines,
        status="on-hold" if kind == "on hold" else "processing",
        paid=None if kind == "not paid" else order.created + dt.timedelta(seconds=30),
        payment_method="bacs" if kind == "not paid" else "stripe",
    )


def _shop_orders(shop: Any, stop: threading.Event, counter: list[int]) -> None:
    """The webshop at work: a new order at once and then every 4 s, in the ``DEMO_MIX``."""
    n = 0
    while True:
        n += 1
        shop.add_orders([demo_order(n)])
        counter[0] += 1
        if stop.wait(4):
            return


def status_line(cfg: Any, counter: int, orders_made: int) -> str:
    """The demo's one line of status (``sync-daemon status`` has the whole picture)."""
    st = collect_status(cfg, per_state=1)
    parts = [time.strftime("%H:%M:%S")]
    for src in st["sources"][:1]:
        lag = "?" if src["lag_seconds"] is None else f"{src['lag_seconds']:.1f}s"
        parts.append(
            f"capture {src['state']} ({st['capture_mode']}), lag {lag}, "
            f"{src['changes_applied']} changes applied"
        )
    if not st["sources"]:
        parts.append("capture starting")
    counts = st["orders"]["counts"]
    if counts:
        parts.append("orders " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    parts.append(f"ERP writer {counter} changes, webshop {orders_made} orders placed")
    return " | ".join(parts)


def _write_config(state: Path, erp: DemoErp, shop: Any, port: int) -> Path:
    mappings = state / "mappings"
    mappings.mkdir(exist_ok=True)
    shutil.copy(ROOT / "config" / "mappings" / "orders.toml", mappings / "orders.toml")
    schema = "public" if erp.mode == "logical" else "main"
    tables = [f"{schema}.items", f"{schema}.stock"]
    orders = "enabled = true"
    if erp.mode == "logical":
        tables.append("public.order_header")
    else:
        orders = "enabled = false  # the sample order mapping targets PostgreSQL/MariaDB ERPs"
    cfg = state / "config.toml"
    cfg.write_text(
        f"""# Written by `make demo` ({erp.label}).
[erp]
dsn = "{erp.url}"

[capture]
mode = "{erp.mode}"
tables = {tables!r}
heartbeat_interval = 5
poll_interval = 0.2

[staging]
url = "sqlite:///{state / "staging.db"}"

[health]
listen = "127.0.0.1:{port}"

[daemon]
state_dir = "{state}"

[schedules]
orders = "every 10s"

[orders]
{orders}

[stock_push]
table = "stock"
sku_column = "sku"
on_hand_column = "on_hand"
reserved_column = "reserved"
warehouse_column = "warehouse"
coalesce_seconds = 5

[[shops]]
name = "demo-shop"
kind = "woocommerce"
url = "{shop.url}"
consumer_key = "{shop.consumer_key}"
consumer_secret = "{shop.consumer_secret}"
""".replace("'", '"')
    )
    cfg.chmod(0o600)
    return cfg


# Ctrl-C and SIGTERM only set this flag (an exception raised from a signal handler can land in a
# finaliser run by the garbage collector, where Python ignores it, and the demo ran on).
_STOP = threading.Event()


def _on_stop_signal(*_: object) -> None:
    _STOP.set()


def main() -> int:
    state = Path(os.environ.get("SYNC_DEMO_STATE", ROOT / "demo-state"))
    # SIGTERM behaves like Ctrl-C, so everything the demo started is always stopped.
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    stop = threading.Event()
    counter, orders_made = [0], [0]
    daemon: subprocess.Popen[bytes] | None = None
    stack = contextlib.ExitStack()
    try:
        print("demo: starting the sample ERP ...", flush=True)
        erp = _postgres_erp(stack) or _sqlite_erp(state)
        print(f"demo: the ERP is {erp.label} (capture mode: {erp.mode})", flush=True)
        _fill(erp)
        shop = WooCommerceEmulator(products=[(s, f"Product {s}", 0) for s in SKUS])
        shop.start()
        stack.callback(shop.stop)
        port = 8787 if not wait_port("127.0.0.1", 8787, timeout=0.2) else free_port()
        cfg_path = _write_config(state, erp, shop, port)
        if erp.mode == "triggers":
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "sync_daemon.py"),
                    "triggers",
                    "install",
                    "--config",
                    str(cfg_path),
                ],
                check=True,
            )
        log_path = state / "daemon.log"
        daemon = subprocess.Popen(
            [sys.executable, str(ROOT / "sync_daemon.py"), "run", "--config", str(cfg_path)],
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=_writer, args=(erp, stop, counter), daemon=True).start()
        threading.Thread(target=_shop_orders, args=(shop, stop, orders_made), daemon=True).start()
        print(
            f"""
demo: running. Where to look:
  Manage page http://127.0.0.1:{port}/   (orders by state, logs, services, replication)
  health      http://127.0.0.1:{port}/healthz   readiness http://127.0.0.1:{port}/readyz
  metrics     http://127.0.0.1:{port}/metrics
  webshop     {shop.url}  (a sample WooCommerce shop placing an order every 4 s,
              in turn: imported, failed (unknown SKU), not paid yet, imported, on hold, ...)
  staging     {state / "staging.db"}  (sqlite3 ... 'SELECT * FROM replication_status')
  daemon log  {log_path}
  status      .venv/bin/sync-daemon status --config {cfg_path}   (the whole picture)
Below: one status line every 5 s. Ctrl-C stops everything.
""",
            flush=True,
        )
        cfg = load_config(cfg_path)
        # One line every 5 s; on a terminal it redraws in place instead of scrolling away.
        tty = sys.stdout.isatty()
        while daemon.poll() is None:
            if _STOP.wait(5):
                raise KeyboardInterrupt
            try:
                line = status_line(cfg, counter[0], orders_made[0])
            except Exception as exc:  # staging busy or not there yet: say so, keep going
                line = f"{time.strftime('%H:%M:%S')} status not readable yet ({exc})"
            if tty:
                print(f"\r\x1b[K{line}", end="", flush=True)
            else:
                print(line, flush=True)
        print(
            f"demo: the daemon exited with code {daemon.returncode}; see {log_path}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\ndemo: stopping ...", flush=True)
        return 0
    finally:
        stop.set()
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(15)
            if daemon.poll() is None:
                daemon.kill()
        stack.close()
        print("demo: stopped; everything it started is gone", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
