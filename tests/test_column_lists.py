"""Column lists and row filters per table (PostgreSQL 15 publications): personal data stays out of
staging, rows outside the filter never reach it, the snapshot honours both, writers going on; a
changed list or filter re-copies the table; a filter PostgreSQL would enforce by refusing the
ERP's own updates is refused before the publication is touched."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import psycopg

from replicator.staging import StagingStore
from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    wait_until,
    write_config,
)

T = "public.customers"


def _config(tmp: Path, erp: str, staging: str, columns: list[str], cond: str) -> Path:
    return write_config(
        tmp / "config.toml",
        {
            "erp": {"dsn": erp},
            "capture": {
                "mode": "logical",
                "tables": [T],
                "batch_ms": 50,
                "batch_size": 300,
                "heartbeat_interval": 1,
                "status_interval": 1,
                "columns": {T: columns},
                "filters": {T: cond},
            },
            "staging": {"url": staging},
            "health": {"listen": "127.0.0.1:0"},
            "daemon": {"state_dir": str(tmp / "state")},
            "logging": {"format": "json"},
        },
    )


def _writer(url: str, stop: threading.Event, count: list[int]) -> None:
    rnd = random.Random(3)
    with psycopg.connect(url, autocommit=True) as c:
        while not stop.is_set():
            k = rnd.randint(1, 2500)
            r = rnd.random()
            if r < 0.5:
                c.execute(
                    "UPDATE customers SET name = name || '+', secret = md5(random()::text) "
                    "WHERE id = %s",
                    (k,),
                )
            elif r < 0.7:
                c.execute("DELETE FROM customers WHERE id = %s", (k,))
            else:
                c.execute(
                    "INSERT INTO customers VALUES (%s, %s, %s, 'x', 'north') ON CONFLICT DO NOTHING",
                    (k, f"new-{k}", f"{k}@example.com"),
                )
            count[0] += 1
            # A steady load, not a flood: capture must keep up for the test to mean anything.
            stop.wait(0.002)


def _mirror_columns(staging_url: str) -> list[str]:
    store = StagingStore(staging_url)
    try:
        store.setup()
        info = store.mirror(T)
        assert info is not None
        with store.engine.connect() as conn:
            return list(conn.exec_driver_sql(f"SELECT * FROM {store.q(info.name)}").keys())
    finally:
        store.dispose()


def test_column_list_and_row_filter_then_changed(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, secret text, "
            "region text)"
        )
        c.execute(
            "INSERT INTO customers SELECT g, 'c' || g, g || '@example.com', md5(g::text), "
            "'south' FROM generate_series(1, 2000) g"
        )
    cfg = _config(tmp_path, erp_db, staging_url, ["id", "name", "region"], "id % 2 = 0")
    stop = threading.Event()
    count = [0]
    writer = threading.Thread(target=_writer, args=(erp_db, stop, count))
    d = DaemonProcess(cfg).start()
    try:
        wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")
        writer.start()
        wait_until(lambda: count[0] > 300, 60, what="writes")
        stop.set()
        writer.join()
        assert _mirror_columns(staging_url) == ["id", "name", "region"]
        assert_staging_equals_source(erp_db, staging_url, [T], 120, where={T: "id % 2 = 0"})
        assert d.terminate() == 0

        # Another column list and filter: the table is copied again in its new shape.
        cfg = _config(tmp_path, erp_db, staging_url, ["id", "name", "email"], "id % 3 = 0")
        d = DaemonProcess(cfg, log=tmp_path / "second.log").start()
        stop.clear()
        writer = threading.Thread(target=_writer, args=(erp_db, stop, count))
        writer.start()
        wait_until(lambda: "snapshot_table_done" in d.output(), 120, what="the re-copy")
        stop.set()
        writer.join()
        assert _mirror_columns(staging_url) == ["id", "name", "email"]
        assert_staging_equals_source(erp_db, staging_url, [T], 120, where={T: "id % 3 = 0"})
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()


def test_a_filter_outside_the_replica_identity_is_refused_before_it_can_break_the_erp(
    erp_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE customers (id int PRIMARY KEY, name text, region text)")
        c.execute("INSERT INTO customers VALUES (1, 'a', 'north')")
    cfg = _config(
        tmp_path, erp_db, f"sqlite:///{tmp_path / 's.db'}", ["id", "name"], "region = 'north'"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sync_daemon.py"), "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "capture.filters.public.customers reads region" in out
    assert "Traceback" not in out
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("UPDATE customers SET name = 'b' WHERE id = 1")  # the ERP still works
        assert c.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
