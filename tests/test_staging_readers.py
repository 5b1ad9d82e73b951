"""Readers of a SQLite staging store take no write lock: operations never wait behind capture.

A SQLite transaction that starts with BEGIN IMMEDIATE takes the database's write lock. When
every connection began that way, ``status``, the Manage page, ``/metrics``, the readiness check
and the journal readers queued behind each capture transaction (and, while they read, held
capture up). In WAL mode a reader needs no lock: it sees the last commit.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Any

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.ops import readmodel
from replicator.ops.checks import engine_check
from replicator.staging import StagingStore

SCHEMA = TableSchema(
    "public",
    "items",
    (Column("id", "integer", 23), Column("qty", "integer", 23)),
    ("id",),
)


def test_readers_see_the_last_commit_while_a_writer_holds_its_transaction(
    tmp_path: Path,
) -> None:
    store = StagingStore(f"sqlite:///{tmp_path / 'staging.db'}")
    store.setup()
    store.ensure_mirror(SCHEMA)
    first = store.begin("erp")
    first.apply(Change("public.items", "I", {"id": 1, "qty": 5}))
    first.commit(Checkpoint("erp", "1"))

    writer = store.begin("erp")
    writer.apply(Change("public.items", "U", {"id": 1, "qty": 7}))
    writer.flush()  # the write lock is taken and held until the commit below

    seen: dict[str, Any] = {}

    def read() -> None:
        try:
            seen["rows"] = store.rows("public.items")
            seen["checkpoint"] = store.load_checkpoint("erp")
            seen["backlog"] = store.journal_backlog("stock")
            seen["journal"] = store.journal_reader("stock").read(10)
            seen["replication"] = readmodel.replication_rows(store.engine)
            seen["orders"] = readmodel.order_counts(store.engine)
            seen["ready"] = engine_check(store.engine)()
        except Exception:  # reported below, with what was read before it
            seen["error"] = traceback.format_exc()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(90)  # a reader that waits for the lock fails with "database is locked" after 30 s
    try:
        assert not t.is_alive()
        assert "error" not in seen, seen.get("error")
        # Read while the writer was still open: the last commit, not the open transaction.
        assert seen["rows"] == [(1, 5)]
        assert seen["checkpoint"] is not None and seen["checkpoint"].position == "1"
        assert seen["backlog"][0] == 1
        assert [e["key"] for e in seen["journal"]] == [[1]]
        assert seen["ready"][0] is True
    finally:
        writer.commit(Checkpoint("erp", "2"))
    assert store.rows("public.items") == [(1, 7)]
    store.dispose()
