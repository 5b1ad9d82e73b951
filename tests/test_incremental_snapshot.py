"""Tables joining capture while it streams: copied in key-ordered chunks between watermarks, with
writers changing the same rows meanwhile, a kill -9 in the middle, and a table re-added after
rows were deleted in the ERP while it was out of capture. Staging ends equal to the source."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg

from replicator.cdc.logical import LogicalSource
from replicator.config import parse_config
from replicator.staging import StagingStore
from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    base_config,
    wait_until,
)

ROWS = 6000
RESYNC = [sys.executable, str(ROOT / "sync_daemon.py"), "resync", "--table"]


def _setup(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 10) g")
        c.execute("CREATE TABLE items (id int PRIMARY KEY, sku text, qty int, note text)")
        c.execute(
            f"INSERT INTO items SELECT g, 'SKU-' || g, g % 50, "
            f"CASE WHEN g % 200 = 0 THEN (SELECT string_agg(md5(random()::text || h), '') "
            f"FROM generate_series(1, 200) h) ELSE 'n' END FROM generate_series(1, {ROWS}) g"
        )


def _writer(url: str, stop: threading.Event, seed: int, count: list[int]) -> None:
    """Updates (some leaving the TOASTed note out), deletes and inserts all over the key range."""
    rnd = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as c:
        while not stop.is_set():
            k = rnd.randint(1, ROWS + 2000)
            r = rnd.random()
            if r < 0.5:
                c.execute("UPDATE items SET qty = qty + 1, sku = sku || '+' WHERE id = %s", (k,))
            elif r < 0.7:
                c.execute("DELETE FROM items WHERE id = %s", (k,))
            else:
                c.execute(
                    "INSERT INTO items VALUES (%s, %s, 1, 'new') ON CONFLICT (id) "
                    "DO UPDATE SET note = 'upserted'",
                    (k, f"NEW-{k}"),
                )
            count[0] += 1
            # A steady load, not a flood: capture must keep up for the test to mean anything.
            stop.wait(0.002)


def _extra(staging_url: str) -> dict[str, Any]:
    store = StagingStore(staging_url)
    try:
        cp = store.load_checkpoint("erp")
        return cp.extra if cp else {}
    finally:
        store.dispose()


def _copying(staging_url: str) -> int:
    """Rows of ``items`` copied so far by a copy in progress (0 when none is)."""
    try:
        extra = _extra(staging_url)
    except Exception:
        return 0
    return sum(c["done"] for c in extra.get("copying", []) if c["table"] == "public.items")


def test_table_added_while_streaming_is_copied_under_writers_and_survives_kill9(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    _setup(erp_db)
    cfg = base_config(tmp_path, erp_db, staging_url, ["public.a"], batch_size=200)
    stop = threading.Event()
    count = [0]
    writers = [threading.Thread(target=_writer, args=(erp_db, stop, s, count)) for s in range(2)]
    d = DaemonProcess(cfg).start()
    try:
        wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")
        for w in writers:
            w.start()
        # The operator adds a table with rows to capture; the daemon picks the file up.
        base_config(tmp_path, erp_db, staging_url, ["public.a", "public.items"], batch_size=200)
        wait_until(lambda: _copying(staging_url) > 0, 120, 0.05, "a copy in progress")
        d.kill9()
        assert 0 < _copying(staging_url) < ROWS, "the kill must land inside the copy"
        shown = subprocess.run(
            [sys.executable, str(ROOT / "sync_daemon.py"), "status", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert re.search(r"snapshot +public\.items: [\d,]+ of [\d,]+ rows", shown), shown
        d = DaemonProcess(cfg).start()
        wait_until(lambda: count[0] > 300, 60, what="writes during the copy")
        wait_until(
            lambda: "public.items" in _extra(staging_url).get("copied", []), 180, 0.5, "copy done"
        )
        stop.set()
        for w in writers:
            w.join()
        assert_staging_equals_source(erp_db, staging_url, ["public.a", "public.items"], 120)
        assert "snapshot_table_done" in d.output()
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()


def test_table_readded_after_deletes_is_recopied_through_a_shadow(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    """Rows deleted in the ERP while the table was out of capture disappear from staging once
    the re-copy (into a shadow mirror, swapped in at the end) is complete."""
    _setup(erp_db)
    tables = ["public.a", "public.items"]
    cfg = base_config(tmp_path, erp_db, staging_url, tables, batch_size=500)
    d = DaemonProcess(cfg).start()
    try:
        assert_staging_equals_source(erp_db, staging_url, tables, 120)
        assert d.terminate() == 0
        base_config(tmp_path, erp_db, staging_url, ["public.a"], batch_size=500)
        d = DaemonProcess(cfg, log=tmp_path / "second.log").start()
        wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")
        # The next commit (a heartbeat at the latest) records the table as out of capture.
        wait_until(lambda: _extra(staging_url)["copied"] == ["public.a"], 30, what="items out")
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("DELETE FROM items WHERE id % 3 = 0")
            c.execute("UPDATE items SET qty = -1 WHERE id % 5 = 0")
        base_config(tmp_path, erp_db, staging_url, tables, batch_size=500)
        stop = threading.Event()
        count = [0]
        writer = threading.Thread(target=_writer, args=(erp_db, stop, 7, count))
        writer.start()
        try:
            wait_until(
                lambda: "public.items" in _extra(staging_url).get("copied", []), 180, 0.5, "re-copy"
            )
        finally:
            stop.set()
            writer.join()
        assert_staging_equals_source(erp_db, staging_url, tables, 120)
        store = StagingStore(staging_url)
        try:
            with store.engine.connect() as conn:
                (events,) = conn.exec_driver_sql(
                    "SELECT count(*) FROM sync_journal WHERE table_name = 'public.items' "
                    "AND op = 'S'"
                ).fetchone() or (0,)
        finally:
            store.dispose()
        assert events >= 1, "the re-copy is a journal event for consumers"
        assert json.dumps(_extra(staging_url).get("copying")) == "[]"
        assert d.terminate() == 0
    finally:
        d.kill9()


def test_a_write_inside_the_watermark_window_is_never_overwritten_by_the_chunk(
    erp_db: str, tmp_path: Path
) -> None:
    """Deterministic: rows of the chunk are updated (one leaving its TOASTed note out), deleted
    and re-keyed after the chunk's SELECT and before its high watermark; the older rows the chunk
    holds for those keys must not win."""
    _setup(erp_db)
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = parse_config(
        {
            "erp": {"dsn": erp_db},
            "capture": {"mode": "logical", "tables": ["public.a"], "batch_size": 1000},
            "staging": {"url": staging_url},
        }
    )
    store = StagingStore(staging_url)
    src = LogicalSource(cfg, store)
    src.start()
    src.close()
    cfg = parse_config(
        {
            "erp": {"dsn": erp_db},
            "capture": {
                "mode": "logical",
                "tables": ["public.a", "public.items"],
                "batch_size": 1000,
            },
            "staging": {"url": staging_url},
        }
    )
    src = LogicalSource(cfg, store)
    fired = []

    def write_in_window() -> None:
        if fired:
            return
        fired.append(True)
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("UPDATE items SET qty = 1000 + id WHERE id BETWEEN 10 AND 20")
            c.execute("UPDATE items SET sku = 'toast-kept' WHERE id = 200")  # note left out
            c.execute("DELETE FROM items WHERE id BETWEEN 30 AND 40")
            c.execute("UPDATE items SET id = id + 100000 WHERE id = 50")

    src._snaps.after_select = write_in_window
    src.start()
    stop = threading.Event()
    try:
        wait_until(
            lambda: src.run_cycle(0.2, stop) >= 0 and not src._snaps.active, 120, 0, "copy done"
        )
        for _ in range(3):
            src.run_cycle(0.2, stop)
    finally:
        src.close()
        store.dispose()
    assert fired
    assert_staging_equals_source(erp_db, staging_url, ["public.items"], 30)


def test_resync_table_recopies_one_table_online(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    """Staging drifted (rows changed behind the daemon's back); `resync --table` copies the one
    table again while capture streams and writers go on, and staging equals the source again."""
    _setup(erp_db)
    tables = ["public.a", "public.items"]
    cfg = base_config(tmp_path, erp_db, staging_url, tables, batch_size=500)
    d = DaemonProcess(cfg).start()
    stop = threading.Event()
    count = [0]
    writer = threading.Thread(target=_writer, args=(erp_db, stop, 11, count))
    try:
        assert_staging_equals_source(erp_db, staging_url, tables, 120)
        store = StagingStore(staging_url)
        try:
            with store.engine.begin() as conn:  # drift: rows lost and changed in staging only
                conn.exec_driver_sql("DELETE FROM items WHERE mod(id, 10) = 1")
                conn.exec_driver_sql("UPDATE items SET sku = 'drifted' WHERE mod(id, 10) = 2")
        finally:
            store.dispose()
        writer.start()
        shown = subprocess.run(
            [*RESYNC, "public.items", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert "copied again online" in shown.stdout
        wait_until(lambda: "recopy_requested" in d.output(), 60, what="the request taken up")
        wait_until(
            lambda: (
                "public.items" in _extra(staging_url).get("copied", [])
                and not _extra(staging_url).get("copying")
            ),
            180,
            0.5,
            "the re-copy",
        )
        stop.set()
        writer.join()
        assert_staging_equals_source(erp_db, staging_url, tables, 120)
        refused = subprocess.run(
            [*RESYNC, "public.nope", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and "not in capture.tables" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()


def _b_writer(url: str, stop: threading.Event, count: list[int]) -> None:
    """Keeps changing ``b``, the table that leaves capture."""
    rnd = random.Random(11)
    with psycopg.connect(url, autocommit=True) as c:
        while not stop.is_set():
            k = rnd.randint(1, 600)
            if rnd.random() < 0.7:
                c.execute("UPDATE b SET v = v + 1 WHERE id = %s", (k,))
            else:
                c.execute("INSERT INTO b VALUES (%s, 0) ON CONFLICT DO NOTHING", (k,))
            count[0] += 1
            stop.wait(0.003)


def test_table_added_and_another_removed_in_one_reload(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    """One config edit swaps ``b`` for ``items`` while writers change both: ``items`` is copied
    online and ends equal to the source; ``b`` is no longer applied, its mirror kept."""
    _setup(erp_db)
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
        c.execute("INSERT INTO b SELECT g, 0 FROM generate_series(1, 500) g")
    cfg = base_config(tmp_path, erp_db, staging_url, ["public.a", "public.b"], batch_size=200)
    stop = threading.Event()
    count, b_count = [0], [0]
    writers = [threading.Thread(target=_writer, args=(erp_db, stop, s, count)) for s in range(2)]
    writers.append(threading.Thread(target=_b_writer, args=(erp_db, stop, b_count)))
    d = DaemonProcess(cfg).start()
    try:
        wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")
        for w in writers:
            w.start()
        wait_until(lambda: b_count[0] > 100, 60, what="writes to b while it is captured")
        base_config(tmp_path, erp_db, staging_url, ["public.a", "public.items"], batch_size=200)
        wait_until(lambda: "config_reloaded" in d.output(), 60, what="the reload")
        wait_until(
            lambda: "public.items" in _extra(staging_url).get("copied", []), 180, 0.5, "copy done"
        )
        wait_until(lambda: count[0] > 300 and b_count[0] > 300, 60, what="writes after it")
        stop.set()
        for w in writers:
            w.join()
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("UPDATE b SET v = -1")  # after this, any -1 in staging is a leak
            c.execute("UPDATE a SET v = 'after b' WHERE id = 1")  # streamed after it
        assert_staging_equals_source(erp_db, staging_url, ["public.a", "public.items"], 120)
        store = StagingStore(staging_url)
        try:
            store.setup()
            kept = store.rows("public.b")
        finally:
            store.dispose()
        assert len(kept) >= 500, "the mirror of a removed table is kept"
        assert all(v != -1 for _, v in kept), "a removed table is no longer applied"
        assert "snapshot_table_done" in d.output()
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()
