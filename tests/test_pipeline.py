"""The apply pipeline's contract (replicator.cdc.pipeline), with a fake capture source against
real SQLite and PostgreSQL staging: a batch is confirmed only after its staging commit; a crash
between commit and confirm re-delivers a batch that applies again to the same state; an error
before the commit leaves nothing of the batch visible; memory stays bounded by the batch size."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.cdc.pipeline import ApplyPipeline, Reached
from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.staging import ApplyTxn, StagingStore

ROOT = Path(__file__).resolve().parent.parent
TABLE = "public.items"
SCHEMA = TableSchema(
    "public",
    "items",
    (Column("id", "integer", 23, False, 1), Column("name", "text", 25, True, 2)),
    ("id",),
)


class FakeSource:
    """A capture source that hands the pipeline numbered batches of upserts and deletes, and
    records what it was told to confirm."""

    def __init__(self, store: StagingStore, *, batch_size: int = 7, spill: bool = False) -> None:
        self.store = store
        self.pipeline = ApplyPipeline(store, "fake", batch_size=batch_size, spill=spill)
        self.confirmed: list[str] = []
        self.fail_at: int | None = None  # raise while producing this change (before commit)
        self.fail_confirm: BaseException | None = None
        self.max_pending = 0

    def changes(self, first: int, n: int) -> Iterator[Change]:
        for i in range(first, first + n):
            if i == self.fail_at:
                raise RuntimeError("source lost mid-batch")
            txn = self.pipeline.txn
            assert txn is not None
            self.max_pending = max(self.max_pending, txn.pending_count)
            yield Change(TABLE, "I", {"id": i % 20, "name": f"v{i}"}, position=str(i))
            if i % 5 == 0:
                yield Change(TABLE, "D", key={"id": (i + 3) % 20}, position=str(i))

    def deliver(self, first: int, n: int) -> int:
        position = str(first + n - 1)

        def changes(txn: ApplyTxn) -> Iterator[Change]:
            return self.changes(first, n)

        def confirm() -> None:
            if self.fail_confirm is not None:
                raise self.fail_confirm
            self.confirmed.append(position)

        def reached() -> Reached:
            return Reached(Checkpoint("fake", position), {"slot": "fake"}, confirm)

        return self.pipeline.deliver(changes, reached)


def expected(first: int, n: int, before: dict[int, str] | None = None) -> list[tuple[Any, ...]]:
    """The mirror after applying changes ``first .. first+n-1`` one by one onto ``before``."""
    rows = dict(before or {})
    for i in range(first, first + n):
        rows[i % 20] = f"v{i}"
        if i % 5 == 0:
            rows.pop((i + 3) % 20, None)
    return sorted(rows.items())


@pytest.fixture
def store(staging_url: str) -> Iterator[StagingStore]:
    s = StagingStore(staging_url)
    s.setup()
    s.ensure_mirror(SCHEMA)
    yield s
    s.dispose()


def fresh(store: StagingStore) -> StagingStore:
    """Another connection pool on the same staging database: what a reader (or a restarted
    daemon) sees."""
    other = StagingStore(str(store.engine.url.render_as_string(hide_password=False)))
    other.setup()
    return other


@pytest.mark.parametrize("spill", [False, True])
def test_confirm_runs_only_after_commit(store: StagingStore, spill: bool) -> None:
    src = FakeSource(store, spill=spill)
    seen: list[tuple[list[tuple[Any, ...]], str | None]] = []

    def look_from_outside() -> None:
        # The confirm action looks at staging through other connections: batch and checkpoint
        # must be committed by now.
        reader = fresh(store)
        try:
            cp = reader.load_checkpoint("fake")
            seen.append((reader.rows(TABLE), cp.position if cp else None))
        finally:
            reader.dispose()

    def changes(txn: ApplyTxn) -> Iterator[Change]:
        return src.changes(0, 50)

    n = src.pipeline.deliver(
        changes, lambda: Reached(Checkpoint("fake", "49"), {"slot": "fake"}, look_from_outside)
    )
    assert n == 60  # 50 upserts and 10 deletes
    assert seen == [(expected(0, 50), "49")]
    assert src.pipeline.txn is None
    assert src.deliver(50, 30) == 36
    assert src.confirmed == ["79"]
    assert store.rows(TABLE) == expected(50, 30, dict(expected(0, 50)))
    cp = store.load_checkpoint("fake")
    assert cp is not None and cp.position == "79"


@pytest.mark.parametrize("spill", [False, True])
def test_error_before_commit_leaves_nothing_visible(store: StagingStore, spill: bool) -> None:
    src = FakeSource(store, batch_size=4, spill=spill)
    assert src.deliver(0, 10) == 12
    before = store.rows(TABLE)
    src.fail_at = 35  # after several flushes of the second batch
    with pytest.raises(RuntimeError, match="mid-batch"):
        src.deliver(10, 40)
    assert src.pipeline.txn is None
    assert src.confirmed == ["9"]
    assert store.rows(TABLE) == before
    cp = store.load_checkpoint("fake")
    assert cp is not None and cp.position == "9"
    # The source delivers the batch again, whole this time.
    src.fail_at = None
    src.deliver(10, 40)
    assert store.rows(TABLE) == expected(0, 50)
    assert src.confirmed == ["9", "49"]


def test_error_while_committing_rolls_back(store: StagingStore) -> None:
    pipe = ApplyPipeline(store, "fake", batch_size=3)
    for i in range(10):
        pipe.apply(Change(TABLE, "I", {"id": i, "name": "x"}, position=str(i)))
    confirmed: list[bool] = []

    def broken(txn: ApplyTxn) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        pipe.commit(Checkpoint("fake", "9"), prepare=broken, confirm=lambda: confirmed.append(True))
    assert confirmed == []
    assert pipe.txn is None
    assert store.rows(TABLE) == []
    assert store.load_checkpoint("fake") is None
    assert pipe.commit(Checkpoint("fake", "9")) is False  # nothing open: nothing committed


def test_failed_confirm_redelivers_idempotently(store: StagingStore) -> None:
    src = FakeSource(store)
    src.deliver(0, 20)
    src.fail_confirm = ConnectionError("ERP gone before the cleanup")
    with pytest.raises(ConnectionError):
        src.deliver(20, 25)
    # Committed: staging holds the batch and its checkpoint; the source was not told.
    assert src.confirmed == ["19"]
    after = store.rows(TABLE)
    assert after == expected(0, 45)
    cp = store.load_checkpoint("fake")
    assert cp is not None and cp.position == "44"
    # The source does not know the batch is in: it delivers it again, and staging stays equal.
    src.fail_confirm = None
    src.deliver(20, 25)
    assert store.rows(TABLE) == after
    assert src.confirmed == ["19", "44"]


def test_memory_bounded_by_batch_size(store: StagingStore) -> None:
    src = FakeSource(store, batch_size=6)
    src.deliver(0, 200)
    assert 0 < src.max_pending <= 6
    assert store.rows(TABLE) == expected(0, 200)


def test_collector_paused_only_while_a_transaction_is_open(store: StagingStore) -> None:
    """The cyclic collector is paused from open to commit or rollback (changes pushed one at
    a time live until the next flush), and left alone when someone else had it disabled."""
    assert gc.isenabled()
    pipe = ApplyPipeline(store, "fake", batch_size=3)
    for i in range(7):  # two flushes inside the transaction
        pipe.apply(Change(TABLE, "I", {"id": i, "name": "x"}, position=str(i)))
        assert not gc.isenabled()
    pipe.commit(Checkpoint("fake", "7"))
    assert gc.isenabled()
    pipe.apply(Change(TABLE, "D", None, {"id": 1}, position="8"))
    assert not gc.isenabled()
    pipe.rollback()
    assert gc.isenabled()
    assert store.rows(TABLE) == [(i, "x") for i in range(7)]
    gc.disable()
    try:
        pipe.apply(Change(TABLE, "D", None, {"id": 1}, position="8"))
        pipe.commit(Checkpoint("fake", "8"))
        assert not gc.isenabled()  # not ours to enable
    finally:
        gc.enable()


def test_deliver_refuses_an_open_transaction(store: StagingStore) -> None:
    pipe = ApplyPipeline(store, "fake", batch_size=10)
    pipe.apply(Change(TABLE, "I", {"id": 1, "name": "x"}, position="1"))
    with pytest.raises(RuntimeError):
        pipe.deliver(lambda txn: iter(()), lambda: Reached(None))
    pipe.rollback()
    assert pipe.txn is None
    assert store.rows(TABLE) == []


# A daemon killed (SIGKILL) inside the pipeline: after the commit but before the confirm, or
# while the batch is still being applied. argv: staging URL, repo root, first, n, mode.
KILLED = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    from test_pipeline import FakeSource
    from replicator.staging import StagingStore

    store = StagingStore(sys.argv[1])
    src = FakeSource(store, spill=True)
    first, n, mode = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

    def kill(*_args):
        os.kill(os.getpid(), signal.SIGKILL)

    class Killer(list):
        def append(self, item):
            kill()

    if mode == "kill-before-confirm":
        src.confirmed = Killer()
    elif mode == "kill-before-commit":
        real = src.changes

        def dying(a, b):
            yield from real(a, b - 5)  # several flushes (and spills) already written
            kill()

        src.changes = dying
    src.deliver(first, n)
    print("confirmed", src.confirmed)
    """
)


def run_worker(url: str, first: int, n: int, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", KILLED, url, str(ROOT), str(first), str(n), mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_kill_between_commit_and_confirm(store: StagingStore) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    FakeSource(store).deliver(0, 20)
    res = run_worker(url, 20, 30, "kill-before-confirm")
    assert res.returncode == -signal.SIGKILL, res.stderr
    cp = store.load_checkpoint("fake")
    assert cp is not None and cp.position == "49"  # committed, never confirmed
    after = store.rows(TABLE)
    assert after == expected(0, 50)
    # After the restart the source re-delivers from its own (unconfirmed) position.
    res = run_worker(url, 20, 30, "plain")
    assert res.returncode == 0, res.stderr
    assert "confirmed ['49']" in res.stdout
    assert store.rows(TABLE) == after


def test_kill_before_commit_leaves_nothing(store: StagingStore) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    FakeSource(store).deliver(0, 20)
    before = store.rows(TABLE)
    res = run_worker(url, 20, 30, "kill-before-commit")
    assert res.returncode == -signal.SIGKILL, res.stderr
    cp = store.load_checkpoint("fake")
    assert cp is not None and cp.position == "19"
    assert store.rows(TABLE) == before
    res = run_worker(url, 20, 30, "plain")
    assert res.returncode == 0, res.stderr
    assert store.rows(TABLE) == expected(0, 50)


def test_prefetched_rounds_errors_and_early_stop() -> None:
    """The PostgreSQL trigger reader's read-ahead thread: rows in order, a fetch error raised
    in the caller's thread, and an early stop that ends the thread before the caller goes on."""
    from replicator.cdc.triggers.source import _prefetched

    rounds = [[1, 2], [3], [4, 5, 6], []]
    assert list(_prefetched(lambda: rounds.pop(0))) == [1, 2, 3, 4, 5, 6]

    def failing() -> list[Any]:
        raise ConnectionError("server gone")

    with pytest.raises(ConnectionError):
        list(_prefetched(failing))

    fetched: list[int] = []

    def endless() -> list[Any]:
        fetched.append(1)
        return [len(fetched)]

    gen = _prefetched(endless)
    assert next(gen) == 1
    gen.close()
    assert not any(t.name == "changelog-prefetch" for t in threading.enumerate())
    assert len(fetched) <= 3  # one round ahead, never a runaway reader
