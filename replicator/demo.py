"""``make demo``: the daemon on an embedded default, end to end, with nothing to set up.

Starts a throwaway PostgreSQL "ERP" (from the local server binaries) with sample tables and a
writer that keeps changing them, runs ``sync-daemon run`` against it with staging in an embedded
SQLite file, and prints the status as it goes. Where no PostgreSQL server binaries exist it uses
an embedded SQLite ERP captured by triggers instead, and says so. Ctrl-C stops everything it
started and removes the throwaway cluster.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_no text PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL,
    active boolean NOT NULL DEFAULT true, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS stock (
    item_no text NOT NULL, warehouse text NOT NULL, on_hand integer NOT NULL,
    reserved integer NOT NULL DEFAULT 0, PRIMARY KEY (item_no, warehouse));
"""


def _writer(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    import psycopg

    rnd = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 100
        while not stop.is_set():
            item = f"ITEM-{rnd.randint(1, n):04d}"
            wh = rnd.choice(["MAIN", "SHOP"])
            conn.execute(
                "INSERT INTO stock VALUES (%s, %s, %s) ON CONFLICT (item_no, warehouse) "
                "DO UPDATE SET on_hand = greatest(0, stock.on_hand + %s)",
                (item, wh, rnd.randint(0, 50), rnd.randint(-5, 5)),
            )
            if rnd.random() < 0.1:
                n += 1
                conn.execute(
                    "INSERT INTO items (item_no, name, price) VALUES (%s, %s, %s)",
                    (f"ITEM-{n:04d}", f"Sample item {n}", round(rnd.uniform(1, 200), 2)),
                )
            if rnd.random() < 0.05:
                conn.execute(
                    "UPDATE items SET price = price * 1.01, updated_at = now() WHERE item_no = %s",
                    (item,),
                )
            counter[0] += 1
            stop.wait(rnd.uniform(0.05, 0.4))


def _write_config(state: Path, erp_dsn: str, mode: str, tables: list[str]) -> Path:
    cfg = state / "config.toml"
    cfg.write_text(
        f"""# Written by `make demo`.
[erp]
dsn = "{erp_dsn}"

[capture]
mode = "{mode}"
tables = {tables!r}
heartbeat_interval = 5

[staging]
url = "sqlite:///{state / "staging.db"}"

[health]
listen = "127.0.0.1:8787"

[daemon]
state_dir = "{state}"
""".replace("'", '"')
    )
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
    daemon: subprocess.Popen[bytes] | None = None
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

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SAMPLE_SCHEMA)
            conn.execute(
                "INSERT INTO items (item_no, name, price) SELECT 'ITEM-' || lpad(g::text, 4, '0'), "
                "'Sample item ' || g, round((random() * 200)::numeric, 2) "
                "FROM generate_series(1, 100) g"
            )
            conn.execute(
                "INSERT INTO stock SELECT item_no, w, (random() * 50)::int, 0 FROM items, "
                "(VALUES ('MAIN'), ('SHOP')) v(w)"
            )
        cfg_path = _write_config(state, dsn, "logical", ["public.items", "public.stock"])
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
        writer = threading.Thread(target=_writer, args=(dsn, stop, counter), daemon=True)
        writer.start()
        print(
            f"""
demo: running. Where to look:
  health     http://127.0.0.1:{port}/healthz   readiness http://127.0.0.1:{port}/readyz
  metrics    http://127.0.0.1:{port}/metrics   Manage page http://127.0.0.1:{port}/
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
                f"--- {time.strftime('%H:%M:%S')}  writer made {counter[0]} changes so far",
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
        if cluster is not None:
            cluster.destroy()
        print("demo: stopped; throwaway cluster removed", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
