"""Trigger mode's online copy of one table (real PostgreSQL, MariaDB and SQLite ERPs): a table
added to capture, ``resync --table``, a kill -9 in the middle of a copy, a retyped column and a
rename that has no column number to follow. Each copies one chunk per changelog batch, read in
the batch's own read transaction, while writers go on; staging ends equal to the source row by
row and the other tables are never copied again.

The kill -9 test runs ``tests/capture_worker.py`` as its capture process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from replicator.cdc.triggers import TriggerSource
from replicator.cli import main as cli_main
from replicator.ops.readmodel import collect_status
from replicator.staging import StagingStore
from tests.capture_worker import (
    Erp,
    erp_of,
    install_triggers,
    make_config,
)
from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    base_config,
    wait_until,
    write_config,
)

ROWS = 300
WORKER = Path(__file__).with_name("capture_worker.py")


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def erp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Erp]:
    yield from erp_of(request.param, request, tmp_path)


def _tables(erp: Erp, *names: str) -> None:
    erp.execute(
        *(f"CREATE TABLE {t} (id INTEGER PRIMARY KEY, v INTEGER)" for t in names),
        *(f"INSERT INTO {t} VALUES ({i}, {i})" for t in names for i in range(1, ROWS + 1)),
    )


class Writer:
    """A thread of single-row ERP transactions: upserts and deletes over the tables' keys
    (inside and beyond the copied range, so chunks race with them)."""

    def __init__(self, erp: Erp, tables: list[str], seed: int) -> None:
        self.erp, self.tables, self.rnd = erp, tables, random.Random(seed)
        self.stop = threading.Event()
        self.count = 0
        self.failed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        erp = self.erp
        try:
            with erp.session() as conn:
                while not self.stop.is_set():
                    t, k = self.rnd.choice(self.tables), self.rnd.randint(1, ROWS + 60)
                    erp.begin(conn)
                    if self.rnd.random() < 0.25:
                        erp.run(conn, f"DELETE FROM {t} WHERE id = {k}")
                    else:
                        erp.run(conn, erp.upsert(t, "id, v", f"{k}, -1", f"v = {t}.v + 1000"))
                    erp.commit(conn)
                    self.count += 1
                    time.sleep(0.002)
        except BaseException as exc:
            self.failed.append(exc)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        assert not self.failed, self.failed


def _cycle(src: TriggerSource) -> None:
    src.run_cycle(0.02, threading.Event())


def _drain(src: TriggerSource) -> None:
    while src.copies:
        _cycle(src)
    for _ in range(3):
        _cycle(src)


def _equal(store: StagingStore, erp: Erp, table: str) -> None:
    assert store.rows(f"public.{table}") == erp.query(f"SELECT id, v FROM {table} ORDER BY id"), (
        table
    )


def _table_events(store: StagingStore) -> list[tuple[str, str]]:
    """The journal's table-level entries (a re-copy's swap, a schema change): (table, op)."""
    with store.engine.connect() as conn:
        return [
            (r[0], r[1])
            for r in conn.exec_driver_sql(
                "SELECT table_name, op FROM sync_journal WHERE row_key IS NULL ORDER BY id"
            )
        ]


# ------------------------------------------------------------------------------- added table
def test_table_added_is_copied_online_while_the_others_stream(erp: Erp, tmp_path: Path) -> None:
    """A table joins capture.tables while writers change it and another table: only it is
    copied (in chunks, progress shown), the other one keeps streaming; both end equal."""
    _tables(erp, "a", "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(erp.url, staging, ["a"], batch_size=40)
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    src.start()
    seen_progress: list[tuple[int, int]] = []
    with Writer(erp, ["a", "items"], 1) as w:
        wait_until(lambda: (_cycle(src), w.count > 50)[1], 30, 0, "writes")
        src.close()
        cfg2 = install_triggers(erp.url, staging, ["a", "items"], batch_size=40)
        src = TriggerSource(cfg2, store)
        with structlog.testing.capture_logs() as logs:
            src.start()
            assert [c.table for c in src.copies] == ["public.items"]
            assert src.progress.snapshot_table == "public.items"
            while src.copies:
                _cycle(src)
                if src.copies:
                    seen_progress.append((src.progress.snapshot_done, src.progress.snapshot_total))
            target = w.count + 50
            wait_until(lambda: (_cycle(src), w.count > target)[1], 30, 0, "writes after the copy")
    _drain(src)
    src.close()
    _equal(store, erp, "a")
    _equal(store, erp, "items")
    events = [e["event"] for e in logs]
    assert "initial_copy_done" not in events  # no new copy of every table
    done = [e["table"] for e in logs if e["event"] == "table_copy_done"]
    assert done == ["public.items"]
    assert ("public.a", "S") not in _table_events(store)
    assert ("public.items", "S") in _table_events(store)
    # several chunks, the progress moving up to the total
    assert len(seen_progress) >= 5 and seen_progress[0][0] < seen_progress[-1][0]
    assert all(0 < d <= t for d, t in seen_progress)
    assert src.progress.snapshot_table is None


def test_table_readded_loses_the_rows_deleted_while_it_was_out(erp: Erp, tmp_path: Path) -> None:
    """A table captured before, then out of capture.tables for a while, then back: its old
    mirror is replaced by a shadow copy, so rows deleted meanwhile do not linger."""
    _tables(erp, "a", "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    store = StagingStore(staging)
    for tables, writes in (
        (["a", "items"], ["UPDATE items SET v = 1 WHERE id = 1"]),
        (["a"], ["DELETE FROM items WHERE id <= 100", "UPDATE items SET v = 2 WHERE id = 200"]),
        (["a", "items"], ["INSERT INTO items VALUES (5000, 5)"]),
    ):
        src = TriggerSource(install_triggers(erp.url, staging, tables, batch_size=64), store)
        src.start()
        erp.execute(*writes)
        _drain(src)
        src.close()
    _equal(store, erp, "items")
    _equal(store, erp, "a")
    assert len(store.rows("public.items")) == ROWS - 100 + 1


# ------------------------------------------------------------------------------ resync --table
def test_resync_table_races_updates_and_deletes(erp: Erp, tmp_path: Path) -> None:
    """`resync --table` in trigger mode: copied again through a shadow, chunk by chunk, while
    writers update and delete the keys being copied; rows staging has and the source has not
    disappear with the swap."""
    _tables(erp, "items", "other")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(erp.url, staging, ["items", "other"], batch_size=25)
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    src.start()
    info = store.mirror("public.items")
    assert info is not None
    with store.engine.begin() as conn:  # staging drifted (say, an operator's mistake)
        conn.exec_driver_sql(f"INSERT INTO {store.q(info.name)} VALUES (100000, 1)")
        conn.exec_driver_sql(f"UPDATE {store.q(info.name)} SET v = 7 WHERE id = 3")
    config = write_config(
        tmp_path / "config.toml",
        {
            "erp": {"dsn": erp.url},
            "capture": {"mode": "triggers", "tables": ["items", "other"]},
            "staging": {"url": staging},
            "daemon": {"state_dir": str(tmp_path)},
        },
    )
    assert cli_main(["resync", "--table", "public.items", "--config", str(config)]) == 0
    assert store.recopy_requests("erp") == ["public.items"]
    copied = False
    with Writer(erp, ["items", "other"], 2) as w:
        while not (copied and not src.copies):
            before = w.count
            _cycle(src)
            copied = copied or bool(src.copies)
            # writes between every two chunks
            wait_until(lambda: w.count >= before + 3, 10, 0.001, "writes")  # noqa: B023
    _drain(src)
    src.close()
    assert store.recopy_requests("erp") == []
    _equal(store, erp, "items")
    _equal(store, erp, "other")
    assert [e for e in _table_events(store) if e[1] == "S"] == [("public.items", "S")]


def test_daemon_takes_a_resync_table_request_in_trigger_mode(erp_db: str, tmp_path: Path) -> None:
    """The daemon process (PostgreSQL ERP, trigger mode) takes `resync --table` while it runs."""
    erp = Erp("postgresql", erp_db)
    _tables(erp, "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(
        tmp_path,
        erp_db,
        staging,
        ["public.items"],
        mode="triggers",
        poll_interval=0.05,
        batch_size=40,
    )
    assert cli_main(["triggers", "install", "--config", str(cfg)]) == 0
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp_db, staging, ["public.items"], timeout=60)
        store = StagingStore(staging)
        store.setup()
        info = store.mirror("public.items")
        assert info is not None
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM {store.q(info.name)} WHERE id <= 10")
        assert cli_main(["resync", "--table", "public.items", "--config", str(cfg)]) == 0
        erp.execute("UPDATE items SET v = 0 WHERE id % 10 = 0")
        wait_until(lambda: store.recopy_requests("erp") == [], 30, what="the request taken")
        assert_staging_equals_source(erp_db, staging, ["public.items"], timeout=60)
        wait_until(lambda: "table_copy_done" in d.output(), 30, what="the copy's end")
        store.dispose()
        assert d.terminate() == 0


# --------------------------------------------------------------------------------- kill -9
def _worker(erp: Erp, staging: str, chunk: int, tables: list[str], **env: str) -> Any:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "--batch-size",
            str(chunk),
            "triggers",
            erp.url,
            staging,
            *tables,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    proc.lines = lines  # type: ignore[attr-defined]
    return proc


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_kill_9_in_the_middle_of_a_copy_resumes_after_the_last_chunk(
    erp: Erp, tmp_path: Path
) -> None:
    _tables(erp, "a", "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    install_triggers(erp.url, staging, ["a"])
    first = _worker(erp, staging, 30, ["a"])
    try:
        wait_until(lambda: any("started" in x for x in first.lines), 60, what="first start")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    install_triggers(erp.url, staging, ["a", "items"])
    erp.execute("UPDATE items SET v = v + 1 WHERE id % 7 = 0")
    # Stopped (SIGSTOP) right after the third chunk's staging commit, then killed.
    second = _worker(
        erp, staging, 30, ["a", "items"], SYNC_DAEMON_FAILPOINT="triggers.copy_chunk@3"
    )
    try:
        wait_until(lambda: _stopped(second.pid), 60, 0.05, "the failpoint")
        store = StagingStore(staging)
        cp = store.load_checkpoint("erp")
        assert cp is not None
        (copy,) = cp.extra["copying"]
        assert copy["table"] == "public.items" and copy["done"] == 90 and copy["after"]
        # `sync-daemon status` (and the Manage page) read it from there
        status = collect_status(make_config(erp.url, staging, ["a", "items"]))
        assert status["sources"][0]["snapshots"] == [
            {"table": "public.items", "done": 90, "total": ROWS}
        ]
    finally:
        second.kill()
        second.wait(30)
    # Changes while capture is down, on both sides of the copied range.
    erp.execute(
        "DELETE FROM items WHERE id IN (5, 200)",
        "UPDATE items SET v = 0 WHERE id IN (10, 250)",
        "INSERT INTO items VALUES (1000, 1)",
    )
    third = _worker(erp, staging, 30, ["a", "items"])
    try:
        wait_until(lambda: any("table_copy_resumed" in x for x in third.lines), 60, what="resume")
        resumed = next(x for x in third.lines if "table_copy_resumed" in x)
        assert "done=90" in resumed and str(copy["after"][0]) in resumed
        assert not any("table_copy_started" in x for x in third.lines)  # not from the start

        def finished() -> bool:
            c = store.load_checkpoint("erp")
            return c is not None and c.extra.get("copying") == []

        wait_until(finished, 60, what="the copy's end")
        wait_until(
            lambda: store.rows("public.items") == erp.query("SELECT id, v FROM items ORDER BY id"),
            30,
            what="staging == source",
        )
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait(30)
    _equal(store, erp, "items")
    _equal(store, erp, "a")
    store.dispose()


# ----------------------------------------------------------------------------- schema changes
@pytest.mark.parametrize("erp", ["postgresql", "mysql"], indirect=True)
def test_retyped_column_ends_in_the_new_form(erp: Erp, tmp_path: Path) -> None:
    """The ERP converts a column's rows without firing a trigger; the catalog check finds the
    new type and the table is copied again: every row in the new form."""
    _tables(erp, "items", "other")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(
        erp.url, staging, ["items", "other"], batch_size=50, heartbeat_interval=0.2
    )
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    src.start()
    if erp.dialect == "postgresql":
        erp.execute("ALTER TABLE items ALTER COLUMN v TYPE text USING 'x' || v::text")
    else:
        erp.execute("ALTER TABLE items MODIFY v VARCHAR(20)")
        erp.execute("UPDATE items SET v = CONCAT('x', v)")  # triggers fire: the stream's share
    erp.execute("UPDATE items SET v = 'new' WHERE id = 1", "UPDATE other SET v = 5 WHERE id = 1")
    with structlog.testing.capture_logs() as logs:
        wait_until(lambda: (_cycle(src), bool(src.copies))[1], 30, 0, "the re-copy")
        _drain(src)
        # Later catalog checks find the mirror in step: no copy again.
        checks = src._schema_checked
        wait_until(lambda: (_cycle(src), src._schema_checked > checks + 0.5)[1], 30, 0, "checks")
        assert not src.copies
    src.close()
    assert sum(e["event"] == "table_recopy_after_schema_change" for e in logs) == 1
    info = store.mirror("public.items")
    assert info is not None and info.schema.column("v").type_name.startswith(("text", "char"))  # type: ignore[union-attr]
    _equal(store, erp, "items")
    _equal(store, erp, "other")
    assert store.rows("public.items")[1] == (2, "x2")


def test_pg_chunk_of_a_table_rewritten_after_the_snapshot_is_put_off(
    erp_db: str, tmp_path: Path
) -> None:
    """`ALTER TABLE ... TYPE` rewrites the table and is not MVCC-safe: a snapshot older than it
    sees the table empty. A chunk read so is not applied (it would end the copy early and swap
    in a shadow without the rest of the rows); the next batch reads it again."""
    erp = Erp("postgresql", erp_db)
    _tables(erp, "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(erp.url, staging, ["items"], batch_size=50, heartbeat_interval=3600)
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    src.start()
    chunk_sql = src.dialect.chunk_sql
    calls = [0]

    def rewrite_before_the_third_chunk(*args: Any) -> str:
        calls[0] += 1
        if calls[0] == 3:  # after this batch's snapshot was taken, before its chunk's SELECT
            erp.execute("ALTER TABLE items ALTER COLUMN v TYPE bigint")
        return chunk_sql(*args)

    src.dialect.chunk_sql = rewrite_before_the_third_chunk  # type: ignore[method-assign]
    store.request_recopy("erp", "public.items")
    with structlog.testing.capture_logs() as logs:
        wait_until(lambda: (_cycle(src), bool(src.copies))[1], 30, 0, "the copy")
        _drain(src)
    src.close()
    _equal(store, erp, "items")  # without the check: only the first two chunks' rows
    assert [e["event"] for e in logs].count("table_copy_chunk_deferred") == 1


@pytest.mark.parametrize("erp", ["mysql", "sqlite"], indirect=True)
def test_rename_without_column_numbers_is_recopied(erp: Erp, tmp_path: Path) -> None:
    """MariaDB and SQLite have no stable column numbers: a rename reads as a drop and an add;
    the table is copied again, so rows not written since have their value under the new name."""
    _tables(erp, "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    install_triggers(erp.url, staging, ["items"], batch_size=70)
    store = StagingStore(staging)
    cfg = make_config(erp.url, staging, ["items"], batch_size=70)
    src = TriggerSource(cfg, store)
    src.start()
    erp.execute("ALTER TABLE items RENAME COLUMN v TO w")
    install_triggers(erp.url, staging, ["items"])  # the triggers name the new column
    erp.execute("UPDATE items SET w = 0 WHERE id = 1")
    _cycle(src)
    assert [c.table for c in src.copies] == ["public.items"]
    _drain(src)
    src.close()
    assert store.rows("public.items") == erp.query("SELECT id, w FROM items ORDER BY id")
    info = store.mirror("public.items")
    assert info is not None and [c.name for c in info.schema.columns] == ["id", "w"]


def test_added_column_the_erp_filled_is_recopied(erp: Erp, tmp_path: Path) -> None:
    """A column added with a default: the ERP gives every existing row the value without a
    trigger firing, so the table is copied again; a column added without one is just followed."""
    _tables(erp, "items")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(erp.url, staging, ["items"], batch_size=70)
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    src.start()
    with structlog.testing.capture_logs() as logs:
        erp.execute("ALTER TABLE items ADD COLUMN note VARCHAR(10)")
        install_triggers(erp.url, staging, ["items"])  # MariaDB/SQLite triggers list their columns
        erp.execute("UPDATE items SET note = 'n' WHERE id = 1")
        _drain(src)
        assert not any(e["event"] == "table_recopy_after_schema_change" for e in logs)
        erp.execute("ALTER TABLE items ADD COLUMN w INTEGER DEFAULT 7")
        install_triggers(erp.url, staging, ["items"])
        erp.execute("UPDATE items SET w = 0 WHERE id = 2")
        _cycle(src)
        assert [c.table for c in src.copies] == ["public.items"]
        _drain(src)
    src.close()
    recopies = [e for e in logs if e["event"] == "table_recopy_after_schema_change"]
    assert [e["filled"] for e in recopies] == [["w"]]
    assert store.rows("public.items") == erp.query("SELECT id, v, note, w FROM items ORDER BY id")
    assert store.rows("public.items")[2] == (3, 3, None, 7)
