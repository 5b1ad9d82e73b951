"""``make demo``: the daemon on an embedded default, end to end, with nothing to set up.

Starts a throwaway PostgreSQL "ERP" (from the local server binaries) with sample tables and a
writer that keeps changing them, runs ``sync-daemon run`` against it with staging in an embedded
SQLite file, and prints the status as it goes. Where no PostgreSQL server binaries exist it uses
an embedded SQLite ERP captured by triggers instead, and says so. Ctrl-C stops everything it
started and removes the throwaway cluster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

STOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku text NOT NULL, warehouse text NOT NULL, on_hand integer NOT NULL,
    reserved integer NOT NULL DEFAULT 0, PRIMARY KEY (sku, warehouse));
"""
SKUS = [f"SKU-{i:05d}" for i in range(1, 41)]


def _writer(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    """The ERP at work: stock moves all the time, prices now and then."""
    import psycopg

    rnd = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            conn.execute(
                "UPDATE stock SET on_hand = greatest(0, on_hand + %s) WHERE sku = %s AND warehouse = %s",
                (rnd.randint(-5, 8), rnd.choice(SKUS), rnd.choice(["MAIN", "SHOP"])),
            )
            if rnd.random() < 0.05:
                conn.execute(
                    "UPDATE items SET price = price * 1.01 WHERE sku = %s", (rnd.choice(SKUS),)
                )
            counter[0] += 1
            stop.wait(rnd.uniform(0.05, 0.4))


def _shop_orders(shop: Any, stop: threading.Event, counter: list[int]) -> None:
    """The webshop at work: a new order every few seconds, now and then one the ERP cannot map."""
    from tests.emulators.orders import generate_orders

    n = 0
    while not stop.wait(4):
        n += 1
        skus = SKUS if n % 7 else [*SKUS, "SKU-UNKNOWN"]
        order = generate_orders(
            1,
            seed=n,
            first_number=10000 + n,
            skus=skus,
            # modified up to 2 min after creation: keep it in the past
            start=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3),
        )[0]
        shop.add_orders([order])
        counter[0] += 1


def _write_config(state: Path, erp_dsn: str, shop: Any) -> Path:
    mappings = state / "mappings"
    mappings.mkdir(exist_ok=True)
    shutil.copy(ROOT / "config" / "mappings" / "orders.toml", mappings / "orders.toml")
    cfg = state / "config.toml"
    cfg.write_text(f"""# Written by `make demo`.
[erp]
dsn = "{erp_dsn}"

[capture]
mode = "logical"
tables = ["public.items", "public.stock", "public.order_header"]
heartbeat_interval = 5

[staging]
url = "sqlite:///{state / "staging.db"}"

[health]
listen = "127.0.0.1:8787"

[daemon]
state_dir = "{state}"

[schedules]
orders = "every 10s"

[orders]
enabled = true

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
""")
    cfg.chmod(0o600)
    return cfg


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    from replicator.config import load_config
    from replicator.localpg import LocalCluster, find_bindir, free_port, wait_port
    from replicator.status import print_status

    state = Path(os.environ.get("SYNC_DEMO_STATE", ROOT / "demo-state"))
    # SIGTERM behaves like Ctrl-C, so the throwaway cluster is always removed.
    signal.signal(signal.SIGTERM, _sigterm)
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    cluster: LocalCluster | None = None
    stop = threading.Event()
    counter = [0]
    orders_made = [0]
    daemon: subprocess.Popen[bytes] | None = None
    stack = contextlib.ExitStack()
    try:
        if find_bindir() is None:
            print(
                "demo: no PostgreSQL server binaries here, and the SQLite-trigger ERP is not "
                "available in this build: install postgresql (apt-get install postgresql)",
                file=sys.stderr,
            )
            return 1
        print("demo: starting a throwaway PostgreSQL ERP (wal_level=logical) ...", flush=True)
        cluster = LocalCluster().init()
        cluster.start()
        dsn = cluster.createdb("erp")
        import psycopg

        from replicator.orders.sample import install_sample_erp
        from tests.emulators import WooCommerceEmulator

        install_sample_erp(dsn, extra_items=0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(STOCK_SCHEMA)
            for i, sku in enumerate(SKUS, start=1):
                conn.execute(
                    "INSERT INTO items VALUES (%s, %s, %s, %s)",
                    (f"ITEM-{i:04d}", sku, f"Sample item {i}", round(random.uniform(5, 200), 2)),
                )
                for wh in ("MAIN", "SHOP"):
                    conn.execute(
                        "INSERT INTO stock VALUES (%s, %s, %s, 0)", (sku, wh, random.randint(0, 40))
                    )
        shop = WooCommerceEmulator(products=[(s, f"Product {s}", 0) for s in SKUS])
        shop.start()
        stack.callback(shop.stop)
        cfg_path = _write_config(state, dsn, shop)
        port = 8787
        if wait_port(
            "127.0.0.1", port, timeout=0.2
        ):  # 8787 taken (another daemon?): pick a free one
            port = free_port()
            cfg_path.write_text(cfg_path.read_text().replace("127.0.0.1:8787", f"127.0.0.1:{port}"))
        log_path = state / "daemon.log"
        daemon = subprocess.Popen(
            [sys.executable, str(ROOT / "sync_daemon.py"), "run", "--config", str(cfg_path)],
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=_writer, args=(dsn, stop, counter), daemon=True).start()
        threading.Thread(target=_shop_orders, args=(shop, stop, orders_made), daemon=True).start()
        print(
            f"""
demo: running. Where to look:
  Manage page http://127.0.0.1:{port}/   (orders by state, logs, services, replication)
  health     http://127.0.0.1:{port}/healthz   readiness http://127.0.0.1:{port}/readyz
  metrics    http://127.0.0.1:{port}/metrics
  webshop    {shop.url}  (a sample WooCommerce shop placing an order every 4 s;
             every 7th order has an unknown SKU and fails with a reason you can act on)
  staging    {state / "staging.db"}  (sqlite3 ... 'SELECT * FROM replication_status')
  daemon log {log_path}
  status     .venv/bin/sync-daemon status --config {cfg_path}
Ctrl-C stops everything.
""",
            flush=True,
        )
        cfg = load_config(cfg_path)
        while daemon.poll() is None:
            time.sleep(5)
            print(
                f"--- {time.strftime('%H:%M:%S')}  ERP writer: {counter[0]} changes, "
                f"webshop: {orders_made[0]} orders placed",
                flush=True,
            )
            with contextlib.suppress(Exception):
                print_status(cfg)
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
        if cluster is not None:
            cluster.destroy()
        print("demo: stopped; throwaway cluster removed", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
