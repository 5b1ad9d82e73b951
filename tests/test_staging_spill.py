"""Large source transactions on SQLite staging: chunks spilled in short transactions of their own
end, at the commit, exactly as if they had been written into one open transaction.

The direct path (every flush into the open staging transaction) is the reference: the same
changes, flushed after the same number of changes, must leave the same mirror rows and the same
journal, and nothing of the transaction may be visible before its commit.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.staging import StagingStore
from tests.helpers import wait_until

SCHEMA = TableSchema(
    "public",
    "items",
    (
        Column("id", "integer", 23),
        Column("sku", "text", 25),
        Column("price", "numeric(12,2)", 1700),
        Column("note", "text", 25),
    ),
    ("id",),
)
TWO_KEYS = TableSchema(
    "public",
    "lines",
    (Column("a", "integer", 23), Column("b", "text", 25), Column("qty", "integer", 23)),
    ("a", "b"),
)


def _store(path: Path) -> StagingStore:
    store = StagingStore(f"sqlite:///{path}")
    store.setup()
    store.ensure_mirror(SCHEMA)
    store.ensure_mirror(TWO_KEYS)
    return store


def _journal(store: StagingStore) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.exec_driver_sql(
                "SELECT source, table_name, op, row_key, position FROM sync_journal ORDER BY id"
            )
        ]


def _apply(store: StagingStore, changes: list[Change], flush_every: int, direct: bool) -> None:
    txn = store.begin("erp", spill=True)
    if direct:
        _ = txn.conn  # open the transaction now: every flush writes into it
    for i, ch in enumerate(changes, 1):
        txn.apply(ch)
        if i % flush_every == 0:
            txn.flush()
    txn.commit(Checkpoint("erp", "0/10"))


# One change: (op, key, sku, price, partial?) on ``items``, or an op on ``lines``.
change_st = st.one_of(
    st.tuples(
        st.sampled_from("IUDP"),
        st.integers(1, 12),
        st.text(max_size=5),
        st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False),
    ),
    st.tuples(st.sampled_from("ID"), st.integers(1, 3), st.sampled_from(["x", "y", "ü"])),
)


def _changes(raw: list[tuple[Any, ...]]) -> list[Change]:
    out = []
    for n, item in enumerate(raw):
        pos = f"0/{n + 1:X}"
        if len(item) == 3:
            op, a, b = item
            if op == "I":
                out.append(Change("public.lines", "I", {"a": a, "b": b, "qty": n}, position=pos))
            else:
                out.append(Change("public.lines", "D", key={"a": a, "b": b}, position=pos))
            continue
        op, k, sku, price = item
        if op == "D":
            out.append(Change("public.items", "D", key={"id": k}, position=pos))
        elif op == "P":  # an update that leaves an unchanged TOAST column out
            out.append(Change("public.items", "U", {"id": k, "sku": sku}, position=pos))
        else:
            row = {"id": k, "sku": sku, "price": price, "note": f"n{n}"}
            out.append(Change("public.items", op, row, position=pos))  # type: ignore[arg-type]
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.lists(change_st, max_size=60), flush_every=st.integers(1, 7))
def test_spilled_chunks_equal_the_direct_path(
    tmp_path: Path, raw: list[tuple[Any, ...]], flush_every: int
) -> None:
    changes = _changes(raw)
    base = [
        Change(
            "public.items", "I", {"id": k, "sku": "old", "price": 1, "note": "keep"}, position="0/0"
        )
        for k in range(1, 7)
    ]
    results = []
    for direct in (True, False):
        path = tmp_path / f"{'direct' if direct else 'spill'}-{time.monotonic_ns()}.db"
        store = _store(path)
        try:
            _apply(store, base, 100, direct=True)
            _apply(store, changes, flush_every, direct)
            with store.engine.connect() as conn:
                spills = conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE name LIKE '_sync_spill%'"
                ).fetchall()
            assert spills == [], "spill tables are dropped with the commit"
            results.append(
                (store.rows("public.items"), store.rows("public.lines"), _journal(store))
            )
        finally:
            store.dispose()
    assert results[0] == results[1]


def test_large_transaction_is_invisible_until_commit_and_never_blocks_other_writers(
    tmp_path: Path,
) -> None:
    """Chunks of an open source transaction: readers see nothing of them, and another writer of
    the staging store gets its turn between chunks instead of waiting for the whole transaction."""
    path = tmp_path / "s.db"
    store = _store(path)
    txn = store.begin("erp", spill=True)
    waits: list[float] = []
    stop = threading.Event()

    def other_writer() -> None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            while not stop.is_set():
                t = time.monotonic()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE sync_tables SET updated_at = updated_at")
                conn.execute("COMMIT")
                waits.append(time.monotonic() - t)
                time.sleep(0.01)
        finally:
            conn.close()

    writer = threading.Thread(target=other_writer)
    writer.start()
    try:
        for k in range(1, 20_001):
            txn.apply(
                Change("public.items", "I", {"id": k, "sku": f"S{k}", "price": 1, "note": ""})
            )
            if txn.pending_count >= 1000:
                txn.flush()
                with sqlite3.connect(path) as reader:
                    assert reader.execute("SELECT count(*) FROM items").fetchone() == (0,)
            if k == 10_000:
                # Half-way through the source transaction another writer can still commit
                # (with the whole transaction open in SQLite it would wait for our commit).
                seen = len(waits)
                wait_until(lambda seen=seen: len(waits) > seen, 20, what="another writer's commit")
        txn.commit(Checkpoint("erp", "0/1"))
    finally:
        stop.set()
        writer.join(30)
        store.dispose()
    with sqlite3.connect(path) as reader:
        assert reader.execute("SELECT count(*) FROM items").fetchone() == (20_000,)
        assert reader.execute("SELECT position FROM sync_checkpoints").fetchone() == ("0/1",)
