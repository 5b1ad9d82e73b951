"""The apply pipeline every capture source goes through: changes into one open staging
transaction, the position they reach committed with them, and only then the source's confirm.

Responsible for the order of the steps that make capture exactly-once, written once for the
logical source and the three trigger readers:

1. ``open``: one staging transaction (:class:`~replicator.staging.ApplyTxn`), lazily.
2. ``apply``: changes in source order; every ``capture.batch_size`` pending changes are flushed
   into the open transaction (or, for a source that asked for ``spill``, parked in SQLite spill
   tables), so memory stays bounded by the batch size however large a source transaction is.
3. ``commit``: the checkpoint (the position the batch reaches) is written in the same staging
   transaction as the changes, which then commits — all or nothing.
4. ``confirm``: only after the commit returned is the source told (slot feedback for logical
   replication, changelog cleanup for triggers). A crash between 3 and 4 re-delivers a batch that
   staging already holds; applying it again leaves the same state (upserts and deletes by key),
   and each source also skips what its checkpoint says it holds. A crash or error before 3 rolls
   the staging transaction back: nothing of the batch is visible, the checkpoint is unchanged,
   and the source delivers the batch again.

What a batch *is* stays with each source (its ordering rules and boundaries): the logical source
pushes changes as pgoutput frames arrive and commits at a source transaction boundary; a trigger
reader hands over a whole batch (:meth:`ApplyPipeline.deliver`): an iterator of changes, the
checkpoint it reaches once exhausted, and its confirm action.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from replicator.changes import Change, Checkpoint
from replicator.staging import ApplyTxn, StagingStore

log = structlog.get_logger(__name__, service="capture")


@dataclass
class Reached:
    """Where a delivered batch ends: the checkpoint committed with it, the extra arguments of
    :meth:`ApplyTxn.commit` (``slot``, ``source_commit_at``), and what the source does once the
    commit is durable (``None``: nothing to confirm)."""

    checkpoint: Checkpoint | None
    commit_kw: dict[str, Any] = field(default_factory=dict)
    confirm: Callable[[], None] | None = None


class ApplyPipeline:
    """One capture source's way into staging: open → apply (bounded flushes) → commit with the
    checkpoint → confirm.

    ``batch_size`` bounds the changes held in memory between flushes; ``spill`` is passed to
    :meth:`StagingStore.begin` (a source whose transactions may stay open across cycles of the
    daemon's loop, so that SQLite's write lock is not held meanwhile).
    """

    def __init__(
        self, store: StagingStore, source: str, *, batch_size: int, spill: bool = False
    ) -> None:
        self.store = store
        self.source = source
        self.batch_size = max(1, batch_size)
        self.spill = spill
        self.txn: ApplyTxn | None = None  # the open staging transaction, if any
        self._gc_paused = False  # this pipeline paused the cyclic collector (see open)

    def open(self) -> ApplyTxn:
        """The open staging transaction (begun now if none is).

        While it is open the cyclic garbage collector is paused (as :meth:`apply_all` does for
        a delivered batch, and for the same reason, see :func:`_gc_paused`): a source that
        pushes changes one at a time (the logical source) keeps every change of the batch
        alive until the next flush, and the collector's passes over them cost about a sixth
        of the per-change CPU (``bench/capture_path.py``). The young generations are collected
        at each flush inside the transaction; the collector runs again from the commit or the
        rollback on. Not paused when someone else had it disabled already.
        """
        if self.txn is None:
            self.txn = self.store.begin(self.source, spill=self.spill)
            if gc.isenabled():
                gc.disable()
                self._gc_paused = True
        return self.txn

    def _resume_gc(self) -> None:
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def apply(self, change: Change) -> None:
        """One change into the open transaction; a flush when the batch size is reached."""
        self.apply_row(change.table, change.op, change.values, change.key, change.position)

    def apply_row(
        self,
        table: str,
        op: str,
        values: dict[str, Any] | None,
        key: dict[str, Any] | None,
        position: str,
    ) -> None:
        """:meth:`apply` of ``Change(table, op, values, key, position)`` without the object:
        the logical source's per-row path."""
        txn = self.txn or self.open()
        txn.apply_row(table, op, values, key, position)
        if txn.pending_count >= self.batch_size:
            txn.flush()  # bounded memory; still invisible until the commit
            if self._gc_paused:
                gc.collect(1)  # the flushed changes are gone: a cheap moment for the young

    def apply_all(self, changes: Iterable[Change]) -> int:
        """Every change of ``changes`` in order (the fast path: one loop, no per-change calls
        but the transaction's own); returns how many were applied."""
        txn = self.txn or self.open()
        apply = txn.apply
        limit = self.batch_size
        n = 0
        with _gc_paused() as paused:
            for ch in changes:
                apply(ch)
                n += 1
                if txn.pending_count >= limit:
                    txn.flush()
                    if paused or self._gc_paused:
                        # The batch's objects are gone now: a cheap moment for the young
                        # generations (so cycles other threads made meanwhile do not pile up).
                        gc.collect(1)
        return n

    def flush(self) -> None:
        if self.txn is not None:
            self.txn.flush()

    def commit(
        self,
        checkpoint: Checkpoint | None,
        *,
        confirm: Callable[[], None] | None = None,
        prepare: Callable[[ApplyTxn], None] | None = None,
        **commit_kw: Any,
    ) -> bool:
        """Commit the open transaction with ``checkpoint``, then ``confirm``.

        ``prepare(txn)`` writes what else belongs in the same transaction (a heartbeat row).
        Any error before the commit returned rolls the transaction back and propagates, and
        ``confirm`` is not called. An error in ``confirm`` propagates too: the batch is in
        staging, the source re-delivers it and staging stays the same. Returns False when no
        transaction was open (nothing committed, nothing confirmed).
        """
        txn = self.txn
        if txn is None:
            return False
        self.txn = None
        try:
            if prepare is not None:
                prepare(txn)
            txn.commit(checkpoint, **commit_kw)
        except BaseException:
            txn.rollback()
            raise
        finally:
            self._resume_gc()
        # Staging durably holds everything up to the checkpoint: now, and only now, the source
        # may let go of it.
        if confirm is not None:
            confirm()
        return True

    def rollback(self) -> None:
        """Forget the open transaction (never raises)."""
        txn, self.txn = self.txn, None
        self._resume_gc()
        if txn is not None:
            txn.rollback()

    def deliver(
        self, changes: Callable[[ApplyTxn], Iterable[Change]], reached: Callable[[], Reached]
    ) -> int:
        """A whole batch: apply ``changes(txn)`` (it may write through ``txn`` itself, e.g. a
        schema change between two changes), ask ``reached()`` once they are exhausted, commit
        with its checkpoint, then confirm. Returns the changes applied; on any error the
        transaction is rolled back and nothing of the batch is visible."""
        if self.txn is not None:
            raise RuntimeError("deliver() needs no staging transaction open")
        txn = self.open()
        stream = changes(txn)
        try:
            n = self.apply_all(stream)
            end = reached()
        except BaseException:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a generator's cleanup (its source cursor) runs now, not at GC time
            self.rollback()
            raise
        self.commit(end.checkpoint, confirm=end.confirm, **end.commit_kw)
        return n


@contextlib.contextmanager
def _gc_paused() -> Iterator[bool]:
    """The cyclic garbage collector paused while a batch streams in.

    Almost every object of a batch (row dicts, changes, pending keys) survives until the next
    flush, so the collector's young generations keep finding nothing to free and promote them,
    and its full passes walk the whole pending batch again and again: about a quarter of the
    trigger drain's CPU (measured on a 200,000-change drain). Reference counting still frees
    everything of the batch once it is flushed (the apply path makes no reference cycles), and
    memory stays bounded by the batch size; the young generations are collected at each flush,
    and the collector runs normally again as soon as the batch is in. Yields whether it paused.
    """
    if not gc.isenabled():  # someone else decides: leave it as it is
        yield False
        return
    gc.disable()
    try:
        yield True
    finally:
        gc.enable()
