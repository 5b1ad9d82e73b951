"""Online table copies, for every capture mode: the one owner of what a copy has to keep.

A table is copied online (while the other tables stream) when it joins capture, when its shape
or column list changes in a way the mirror cannot follow, and on ``sync-daemon resync --table``.
How a chunk of rows is read differs by mode — logical replication brackets it with watermarks
(:mod:`replicator.cdc.snapshot`), triggers read it in the batch's own read transaction
(:mod:`replicator.cdc.triggers.source`) — and each source decides when to read one. Everything
else is the same and is kept here, once:

* the queue of tables being copied (the first one is under way), persisted as the checkpoint's
  ``extra["copying"]`` list of :class:`TableCopy` (and, for logical capture, ``extra["copied"]``);
* ``resync --table`` request rows, taken in the staging transaction that records the copy (a
  crash before it commits leaves the request);
* shadow mirrors: a re-copy of a table whose mirror has rows copies into a fresh shadow that
  every streamed change of the table also feeds, swapped in by the last chunk, so rows the source
  no longer has disappear and readers keep the old mirror until then;
* the journal event (``S``: the table was read again) in the commit of the last chunk;
* progress (``progress.snapshot_table/done/total``) and the start and end log events.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from replicator.cdc.base import Progress
from replicator.changes import Change, TableSchema
from replicator.staging import ApplyTxn, StagingStore

log = structlog.get_logger(__name__, service="capture")


@dataclass
class TableCopy:
    """One table being copied: where the copy stands (persisted with the checkpoint)."""

    table: str
    after: list[str] | None = None  # key of the last copied row, as the ERP's text
    done: int = 0
    total: int = 0
    shadow: bool = False  # copy into a shadow mirror, swapped in at the end (a re-copy)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "after": self.after,
            "done": self.done,
            "total": self.total,
            "shadow": self.shadow,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TableCopy:
        return cls(
            table=str(d["table"]),
            after=None if d.get("after") is None else [str(v) for v in d["after"]],
            done=int(d.get("done", 0)),
            total=int(d.get("total", 0)),
            shadow=bool(d.get("shadow", False)),
        )


class OnlineCopies:
    """The tables one capture source copies online, their shadows, requests and progress.

    ``events`` names the start and end log events (``{events}_started``, ``{events}_done``):
    each mode has kept its own names, and dashboards and tests look for them.
    """

    def __init__(self, store: StagingStore, source: str, progress: Progress, events: str) -> None:
        self.store = store
        self.source = source
        self.progress = progress
        self.events = events
        self.queue: list[TableCopy] = []  # the first one is being copied
        self.copied: set[str] = set()  # tables whose copy completed (kept by logical capture)
        self.shadows: dict[str, str] = {}  # table -> its shadow mirror, fed by every change
        self.requests: list[str] = []  # `resync --table` requests, not yet taken

    # ---------------------------------------------------------------- the queue
    @property
    def active(self) -> bool:
        return bool(self.queue)

    @property
    def current(self) -> TableCopy | None:
        return self.queue[0] if self.queue else None

    def set(self, copies: list[TableCopy]) -> None:
        """Make ``copies`` the queue (the first one under way)."""
        self.queue = copies
        self._changed()

    def add(self, copy: TableCopy) -> None:
        """Queue ``copy`` at the end, in place of any copy of the same table (which starts over)."""
        self.queue = [c for c in self.queue if c.table != copy.table] + [copy]
        self.copied.discard(copy.table)
        self._changed()

    def _changed(self) -> None:
        self.shadows = {c.table: self.store.shadow_of(c.table) for c in self.queue if c.shadow}
        self.show_progress()

    def show_progress(self) -> None:
        copy = self.current
        self.progress.snapshot_table = copy.table if copy else None
        self.progress.snapshot_done = copy.done if copy else 0
        self.progress.snapshot_total = copy.total if copy else 0

    # ---------------------------------------------------------------- persistence
    @staticmethod
    def stored(extra: dict[str, Any], tables: Collection[str]) -> list[TableCopy]:
        """The copies a checkpoint's ``extra`` holds, of the ``tables`` still captured."""
        return [
            TableCopy.from_json(d) for d in extra.get("copying", []) if d.get("table") in tables
        ]

    def to_json(self) -> list[dict[str, Any]]:
        """The queue as the checkpoint's ``extra["copying"]``."""
        return [c.to_json() for c in self.queue]

    def open_shadows(self, schemas: Mapping[str, TableSchema]) -> None:
        """Make the shadows of the queue ready: a fresh one for a copy that has no chunk yet, the
        persisted one (fed and filled in step with the checkpoint) for one under way."""
        for c in self.queue:
            if c.shadow:
                self.store.ensure_shadow(schemas[c.table], fresh=c.after is None)
        self._changed()

    # ---------------------------------------------------------------- re-copies
    def recopy(self, table: str, schema: TableSchema, txn: ApplyTxn) -> None:
        """Copy ``table`` (now of ``schema``) again from the start, through a fresh shadow
        mirror, in ``txn`` (the staging transaction that records it in the checkpoint)."""
        txn.flush()  # pending changes of the old shadow go before it is dropped
        self.store.ensure_shadow(schema, fresh=True, conn=txn.conn)
        self.add(TableCopy(table, shadow=True))

    def poll_requests(self) -> bool:
        """Read the ``resync --table`` request rows; whether there are any to take."""
        self.requests = self.store.recopy_requests(self.source)
        return bool(self.requests)

    def take_requests(self, txn: ApplyTxn, schemas: Mapping[str, TableSchema]) -> list[str]:
        """Queue the copies asked for; the request rows are deleted in ``txn``, which records the
        copies in the checkpoint (a crash before it commits leaves the requests). The tables
        queued (the others are not captured)."""
        requests, self.requests = self.requests, []
        queued = []
        for table in requests:
            schema = schemas.get(table)
            if schema is not None:
                log.info("recopy_requested", source=self.source, table=table)
                self.recopy(table, schema, txn)
                queued.append(table)
            else:
                log.warning("recopy_request_ignored", table=table, reason="not in capture.tables")
            self.store.take_recopy_request(txn.conn, self.source, table)
        return queued

    # ---------------------------------------------------------------- chunks
    def shadow_change(self, change: Change) -> Change | None:
        """``change`` of a table copied through a shadow, for the shadow; None otherwise."""
        shadow = self.shadows.get(change.table)
        if shadow is None:
            return None
        return Change(shadow, change.op, change.values, change.key, change.position)

    def target(self, copy: TableCopy) -> str:
        """The mirror a chunk of ``copy`` goes into."""
        return self.store.shadow_of(copy.table) if copy.shadow else copy.table

    def started(self, copy: TableCopy, total: int) -> None:
        """The copy of ``copy.table`` starts: ``total`` rows to copy."""
        copy.total = total
        log.info(f"{self.events}_started", table=copy.table, rows=total, shadow=copy.shadow)
        self.show_progress()

    def chunk_applied(
        self,
        txn: ApplyTxn,
        copy: TableCopy,
        last_key: list[str] | None,
        selected: int,
        complete: bool,
        position: str,
    ) -> bool:
        """A chunk of ``selected`` rows up to ``last_key`` went into ``txn``; record it in the
        copy (its progress commits with ``txn``'s checkpoint). The last chunk (``complete``)
        also swaps the shadow in and journals the table as read again (``S``) in ``txn``.
        Whether the copy is complete."""
        copy.after = last_key
        copy.done += selected
        copy.total = max(copy.total, copy.done)
        if not complete:
            self.show_progress()
            return False
        conn = txn.conn
        if copy.shadow:
            txn.flush()  # the shadow's last rows, before it takes the mirror's place
            self.store.swap_shadow(conn, copy.table)
        self.store.journal_event(conn, self.source, copy.table, "S", position)
        log.info(f"{self.events}_done", source=self.source, table=copy.table, rows=copy.done)
        self.queue = [c for c in self.queue if c is not copy]
        self.copied.add(copy.table)
        self._changed()
        return True


def requeued(copies: Iterable[TableCopy], copy: TableCopy) -> list[TableCopy]:
    """``copies`` with ``copy`` in place of any copy of the same table (at the end of the queue;
    the one under way restarts from the start)."""
    return [c for c in copies if c.table != copy.table] + [copy]
