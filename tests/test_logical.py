"""Logical replication capture, end to end: a real throwaway PostgreSQL with wal_level=logical,
the daemon as a real process, staging on SQLite and on PostgreSQL (same test bodies)."""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from replicator.cdc import pgoutput
from replicator.staging import StagingStore
from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    base_config,
    staging_rows,
    wait_until,
)

SCHEMA = """
CREATE TYPE mood AS ENUM ('ok', 'sad');
CREATE TABLE items (
    id bigint PRIMARY KEY, sku varchar(40) NOT NULL, small smallint, qty integer,
    price numeric(14,4), active boolean, born date, seen timestamp, at timestamptz,
    uid uuid, attrs jsonb, doc json, raw bytea, tags text[], nums int[], feeling mood,
    note text
);
CREATE TABLE stock (sku text, warehouse int, qty int NOT NULL, PRIMARY KEY (sku, warehouse));
"""

ROW = """INSERT INTO items VALUES (%s, %s, 3, %s, 12.3456, true, '2024-02-29', '2024-01-01 10:00:00',
    '2024-06-01 12:00:00+02', gen_random_uuid(), '{"a": [1, 2], "b": null}', '{"x": 1}', '\\x00ff10',
    ARRAY['a', 'b,c', 'd"e'], ARRAY[1, NULL, 3], 'ok', %s)"""

TABLES = ["public.items", "public.stock"]


def _erp(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture
def erp(erp_db: str) -> str:
    with _erp(erp_db) as c:
        c.execute(SCHEMA)
        for i in range(1, 201):
            c.execute(ROW, (i, f"SKU-{i}", i, "x" * (20000 if i % 50 == 0 else 10)))
        c.execute(
            "INSERT INTO stock SELECT 'SKU-' || g, w, g * w FROM generate_series(1, 100) g, "
            "generate_series(1, 3) w"
        )
    return erp_db


def test_snapshot_then_stream_all_types(erp: str, staging_url: str, tmp_path: Path) -> None:
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        with _erp(erp) as c:
            for i in range(201, 261):
                c.execute(ROW, (i, f"SKU-{i}", i, "n"))
            # TOASTed column unchanged by this update: must keep its stored value.
            c.execute("UPDATE items SET qty = qty + 1 WHERE id % 50 = 0")
            c.execute("UPDATE items SET note = NULL, attrs = '[]', tags = '{}' WHERE id = 7")
            c.execute("UPDATE items SET id = 10007 WHERE id = 8")  # key change
            c.execute("DELETE FROM items WHERE id BETWEEN 100 AND 110")
            c.execute("UPDATE stock SET qty = qty - 1 WHERE warehouse = 2")
            c.execute("ALTER TABLE items ADD COLUMN color text DEFAULT 'blue'")
            c.execute("UPDATE items SET color = 'red' WHERE id = 1")
            c.execute("INSERT INTO items (id, sku, color) VALUES (999, 'NEW', 'green')")
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        rows, cols, _ = staging_rows(staging_url, "public.items")
        assert "color" in cols
        big = next(json.loads(r) for r in rows if json.loads(r)[0] == 50)
        assert len(big[cols.index("note")]) == 20000  # TOAST value kept, never a placeholder
        with _erp(erp) as c:
            c.execute("TRUNCATE stock")
        wait_until(lambda: staging_rows(staging_url, "public.stock")[0] == [], 30, what="truncate")
        assert d.terminate() == 0


def test_replication_status_view_and_status_cli(erp: str, staging_url: str, tmp_path: Path) -> None:
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)

        def heartbeat_seen() -> bool:
            store = StagingStore(staging_url)
            try:
                rows = store.replication_status()
            finally:
                store.dispose()
            return (
                bool(rows)
                and rows[0]["heartbeat_at"] is not None
                and rows[0]["lag_seconds"] is not None
            )

        wait_until(heartbeat_seen, 30, what="heartbeat through the slot")
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "sync_daemon.py", "status", "--config", str(cfg), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        st = json.loads(out.stdout)
        src = st["sources"][0]
        assert src["slot"] == "sync_daemon" and src["state"] == "streaming"
        assert src["heartbeat_age_seconds"] is not None and src["heartbeat_age_seconds"] < 30
        assert src["lag_seconds"] < 5
        text = subprocess.run(
            [sys.executable, "sync_daemon.py", "status", "--config", str(cfg)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "last replication" in text and "heartbeat" in text
        # The slot keeps advancing while the ERP is idle (heartbeats go through the WAL).
        with _erp(erp) as c:

            def flushed() -> int:
                row = c.execute(
                    "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
                ).fetchone()
                return int(row[0])

            before = flushed()
            wait_until(lambda: flushed() > before, 30, what="the idle slot advancing")
        assert d.terminate() == 0


def _writer(url: str, stop: threading.Event, seed: int, counter: list[int]) -> None:
    rnd = random.Random(seed)
    with psycopg.connect(url, autocommit=False) as c:
        while not stop.is_set():
            try:
                for _ in range(rnd.randint(1, 10)):
                    op = rnd.random()
                    sku = f"SKU-{rnd.randint(1, 150)}"
                    w = rnd.randint(1, 4)
                    if op < 0.6:
                        c.execute(
                            "INSERT INTO stock VALUES (%s, %s, %s) ON CONFLICT (sku, warehouse) "
                            "DO UPDATE SET qty = stock.qty + excluded.qty",
                            (sku, w, rnd.randint(1, 9)),
                        )
                    elif op < 0.8:
                        c.execute("DELETE FROM stock WHERE sku = %s AND warehouse = %s", (sku, w))
                    else:
                        c.execute(
                            "UPDATE items SET qty = %s, at = now() WHERE id = %s",
                            (rnd.randint(0, 1000), rnd.randint(1, 200)),
                        )
                c.commit()
                counter[0] += 1
            except psycopg.errors.DeadlockDetected:
                c.rollback()
            except psycopg.OperationalError:
                return


def test_concurrent_writers_final_state_equal(erp: str, staging_url: str, tmp_path: Path) -> None:
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    stop = threading.Event()
    counter = [0]
    with DaemonProcess(cfg):
        threads = [threading.Thread(target=_writer, args=(erp, stop, s, counter)) for s in range(4)]
        for t in threads:
            t.start()
        # Writers go on while the daemon streams; enough transactions to interleave, whatever
        # the machine's speed.
        wait_until(lambda: counter[0] >= 300, 60, what="300 writer transactions")
        stop.set()
        for t in threads:
            t.join()
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)


def test_kill9_at_several_points_then_restart(erp: str, staging_url: str, tmp_path: Path) -> None:
    """kill -9 during the snapshot and repeatedly while streaming; staging ends equal to the source."""
    with _erp(erp) as c:  # a bigger table so that the first kill lands inside the snapshot copy
        c.execute("INSERT INTO stock SELECT 'BULK-' || g, 1, g FROM generate_series(1, 150000) g")
    cfg = base_config(tmp_path, erp, staging_url, TABLES, batch_size=2000)
    stop = threading.Event()
    counter = [0]
    threads = [
        threading.Thread(target=_writer, args=(erp, stop, 100 + s, counter)) for s in range(3)
    ]
    rnd = random.Random(42)
    d = DaemonProcess(cfg).start()
    try:
        # Inside the snapshot: the slot exists and the 150,000-row copy has begun.
        wait_until(lambda: "slot_created" in d.output(), 60, 0.05, "the slot created")
        d.kill9()
        for t in threads:
            t.start()
        for _ in range(5):
            d = DaemonProcess(cfg).start()
            time.sleep(rnd.uniform(1.5, 4.0))
            d.kill9()
        stop.set()
        for t in threads:
            t.join()
        d = DaemonProcess(cfg).start()
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=120)
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()
    assert counter[0] > 20


def test_sigterm_stops_within_10s_and_sighup_reload(erp: str, tmp_path: Path) -> None:
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        good = cfg.read_text()
        cfg.write_text(good.replace('mode = "logical"', 'mode = "logicl"'))
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "reload_rejected" in d.output(), 10, what="reload rejected")
        assert "capture.mode" in d.output()
        with _erp(erp) as c:
            c.execute("UPDATE stock SET qty = 0 WHERE warehouse = 1")
        assert_staging_equals_source(
            erp, staging_url, TABLES, timeout=30
        )  # old config still in force
        cfg.write_text(good)
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "config_reloaded" in d.output(), 10, what="reload accepted")
        with _erp(erp) as c:  # keep writing while we stop it
            c.execute("INSERT INTO stock SELECT 'T-' || g, 1, g FROM generate_series(1, 50000) g")
        t0 = time.monotonic()
        code = d.terminate(timeout=15)
        assert code == 0
        assert time.monotonic() - t0 < 10
    # Restart resumes from the kept position: nothing lost, nothing doubled.
    with DaemonProcess(cfg) as d2:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        d2.terminate()


def test_slot_dropped_is_reported_not_recreated_and_resync_recovers(
    erp: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        d.terminate()
    with _erp(erp) as c:
        c.execute("SELECT pg_drop_replication_slot('sync_daemon')")
        c.execute("DELETE FROM stock WHERE warehouse = 3")
    with DaemonProcess(cfg) as d:
        code = d.wait(30)
        assert code == 3
        assert "is gone" in d.output() and "resync" in d.output()
    with _erp(erp) as c:
        assert c.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
    res = subprocess.run(
        [sys.executable, "sync_daemon.py", "resync", "--config", str(cfg), "--yes"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert_staging_equals_source(erp, staging_url, TABLES, timeout=10)
    with DaemonProcess(cfg) as d:
        with _erp(erp) as c:
            c.execute("DELETE FROM stock WHERE warehouse = 2")
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        d.terminate()


def test_second_daemon_on_same_slot_refuses(erp: str, tmp_path: Path) -> None:
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    other = tmp_path / "other"
    other.mkdir()
    cfg2 = base_config(other, erp, f"sqlite:///{other / 's.db'}", TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        with DaemonProcess(cfg2) as d2:
            assert d2.wait(30) == 3
            assert "already captures slot" in d2.output()
        assert d.alive()


def test_table_without_key_is_a_clear_startup_error(erp_db: str, tmp_path: Path) -> None:
    with _erp(erp_db) as c:
        c.execute("CREATE TABLE log (at timestamptz, msg text)")
    cfg = base_config(tmp_path, erp_db, f"sqlite:///{tmp_path / 's.db'}", ["public.log"])
    with DaemonProcess(cfg) as d:
        assert d.wait(30) == 3
        out = d.output()
        assert "public.log has no primary key" in out and "REPLICA IDENTITY FULL" in out
    with _erp(erp_db) as c:
        c.execute("ALTER TABLE log REPLICA IDENTITY FULL")
        c.execute("INSERT INTO log VALUES (now(), 'a'), (now(), 'b')")
    cfg = base_config(
        tmp_path,
        erp_db,
        f"sqlite:///{tmp_path / 's.db'}",
        ["public.log"],
        keys={"public.log": ["at", "msg"]},
    )
    with DaemonProcess(cfg) as d:
        with _erp(erp_db) as c:
            c.execute("DELETE FROM log WHERE msg = 'a'")
            c.execute("INSERT INTO log VALUES (now(), 'c')")
        assert_staging_equals_source(
            erp_db, f"sqlite:///{tmp_path / 's.db'}", ["public.log"], timeout=60
        )
        d.terminate()


def test_daemon_health_metrics_and_systemd_notify(erp: str, tmp_path: Path) -> None:
    """The running daemon answers /healthz, /readyz and /metrics, and tells systemd it is ready."""
    import re
    import socket

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    cfg.write_text(cfg.read_text().replace("[health]\n", "[health]\nmetrics_interval = 1\n"))
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    with DaemonProcess(
        cfg, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": ""}
    ) as d:
        got: list[str] = []
        while not any("READY=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        wait_until(lambda: "health_server_listening" in d.output(), 20, what="health server")
        url = re.search(r'"url": "(http://[^"]+)"', d.output()).group(1)  # type: ignore[union-attr]
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        with _erp(erp) as c:
            c.execute("UPDATE stock SET qty = qty + 1 WHERE warehouse = 1")
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        assert httpx.get(url + "healthz").status_code == 200

        def ready() -> bool:
            r = httpx.get(url + "readyz")
            return r.status_code == 200

        wait_until(ready, 30, what="/readyz 200")
        body = httpx.get(url + "readyz").json()
        names = {c["name"] for c in body["checks"]}
        assert {"staging", "erp", "capture", "lag", "heartbeat"} <= names
        text = httpx.get(url + "metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        applied = fams["sync_changes_applied"]
        assert any(s.value > 0 for s in applied.samples)
        assert "sync_replication_lag_seconds" in fams and "sync_heartbeat_age_seconds" in fams
        wait_until(
            lambda: "sync_slot_retained_wal_bytes{" in httpx.get(url + "metrics").text,
            30,
            what="retained WAL of the slot in /metrics",
        )
        assert "postgres@" not in text and "password" not in text.lower()
        # watchdog pings keep coming while the loop runs
        sock.settimeout(5)
        later = [sock.recv(4096).decode() for _ in range(2)]
        assert any("WATCHDOG=1" in m for m in later)
        d.terminate()
    sock.close()


def test_config_file_change_is_picked_up_without_restart(erp: str, tmp_path: Path) -> None:
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        text = cfg.read_text()
        cfg.write_text(text + '\n[schedules]\norders = "*/10 * * * *"\n')
        wait_until(lambda: "config_reloaded" in d.output(), 15, what="reload on file change")
        assert '"services_rebuilt": true' in d.output()
        with _erp(erp) as c:
            c.execute("UPDATE stock SET qty = qty + 5 WHERE warehouse = 3")
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=30)
        assert d.terminate() == 0


def _status(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "sync_daemon.py"), "status", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
    )


def test_status_of_a_stopped_or_killed_daemon(erp: str, tmp_path: Path) -> None:
    """``status`` tells from the daemon's liveness mark whether it runs: after a stop it says
    "not running since …" and exits 5, with no stale "streaming", lag or next runs."""
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        wait_until(
            lambda: _heartbeat_after(staging_url, dt.datetime(2000, 1, 1, tzinfo=dt.UTC)), 30
        )
        running = _status(cfg)
        assert running.returncode == 0, running.stderr
        assert f"daemon running (pid {d.pid}" in running.stdout
        assert f"{pgoutput.DECODER} decoder): streaming" in running.stdout
        assert d.terminate() == 0
    stopped = _status(cfg)
    assert stopped.returncode == 5, stopped.stderr
    assert "daemon not running since" in stopped.stdout and "(stopped," in stopped.stdout
    assert "streaming" not in stopped.stdout
    assert "lag               unknown (daemon not running)" in stopped.stdout
    data = json.loads(_status(cfg, "--json").stdout)
    assert data["daemon"]["running"] is False and data["daemon"]["since"].endswith("+00:00")
    assert data["sources"][0]["state"] == "stopped" and data["sources"][0]["lag_seconds"] is None
    assert all(not s["next_runs"] for s in data["services"])
    # One timestamp format everywhere: ISO 8601 with T, in UTC.
    stamps = [data["now"], data["sources"][0]["last_replication_at"]]
    stamps += [s["last_run_at"] for s in data["services"] if s["last_run_at"]]
    assert stamps and all("T" in t and t.endswith("+00:00") for t in stamps), stamps
    # kill -9 leaves no "stopped" mark: the process being gone is enough.
    with DaemonProcess(cfg) as d:
        wait_until(lambda: _status(cfg).returncode == 0, 60, what="status says running")
        d.kill9()
    killed = _status(cfg)
    assert killed.returncode == 5 and "(killed," in killed.stdout, killed.stdout


def _heartbeat_after(staging_url: str, since: dt.datetime) -> bool:
    store = StagingStore(staging_url)
    try:
        rows = store.replication_status()
    finally:
        store.dispose()
    at = rows[0]["heartbeat_at"] if rows else None
    if isinstance(at, str):
        at = dt.datetime.fromisoformat(at)
    return at is not None and at.replace(tzinfo=at.tzinfo or dt.UTC) > since


def test_reading_the_config_file_causes_no_reload(erp: str, tmp_path: Path) -> None:
    """Reads (cat, ``status``), a touch and a rewrite with the same bytes are not changes: only
    the two real edits below reload, once each (the daemon's own re-read is no change either)."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, erp, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        wait_until(lambda: "capture_started" in d.output(), 60, what="capture started")
        for _ in range(10):
            cfg.read_bytes()
        subprocess.run(
            [sys.executable, str(ROOT / "sync_daemon.py"), "status", "--config", str(cfg)],
            capture_output=True,
            check=False,
        )
        os.utime(cfg)
        cfg.write_bytes(cfg.read_bytes())
        reloads = lambda: d.output().count('"config_reloaded"')  # noqa: E731
        cfg.write_text(cfg.read_text() + "\n# first edit\n")
        wait_until(lambda: reloads() >= 1, 15, what="reload after the first edit")
        for _ in range(10):
            cfg.read_bytes()
        cfg.write_text(cfg.read_text() + "# second edit\n")
        wait_until(lambda: reloads() >= 2, 15, what="reload after the second edit")
        # Let the daemon run on for three heartbeats: a reload loop would show up by then.
        since = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        wait_until(lambda: _heartbeat_after(staging_url, since), 30, what="3 more heartbeats")
        assert d.terminate() == 0
    assert reloads() == 2, d.output().count("config_reloaded")


def test_secrets_never_in_logs_status_metrics_or_errors(erp: str, tmp_path: Path) -> None:
    """A password in the DSN (trust auth ignores it) appears nowhere the daemon writes."""
    import re
    import subprocess
    import sys

    import httpx

    secret = "s3cr3t-Pw-42"
    dsn = erp.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(tmp_path, dsn, staging_url, TABLES)
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging_url, TABLES, timeout=60)
        url = re.search(r'"url": "(http://[^"]+)"', d.output()).group(1)  # type: ignore[union-attr]
        seen = [httpx.get(url + p).text for p in ("metrics", "readyz", "healthz", "")]
        for args in (
            ["status"],
            ["status", "--json"],
            ["lag"],
            ["check-config", "--connect"],
            ["logs", "--since", "1h"],
        ):
            res = subprocess.run(
                [sys.executable, "sync_daemon.py", *args, "--config", str(cfg)],
                capture_output=True,
                text=True,
            )
            seen += [res.stdout, res.stderr]
        d.terminate()
        seen.append(d.output())
    # The same secret in a DSN that cannot connect: the error path.
    bad = base_config(
        tmp_path,
        dsn.replace(str(erp.split(":")[2].split("/")[0]), "1"),
        f"sqlite:///{tmp_path / 'bad.db'}",
        TABLES,
    )
    with DaemonProcess(bad) as d2:
        wait_until(lambda: "capture_interrupted" in d2.output(), 30, what="connection error")
        d2.terminate()
        seen.append(d2.output())
    for text in seen:
        assert secret not in text
    assert any("capture_interrupted" in t for t in seen)
