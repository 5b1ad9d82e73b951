"""Capture by PostgreSQL logical replication: the pgoutput stream and the decisions about it.

Owned here: the life of the source (below), the stream loop, following relations and schema
changes, incremental-snapshot chunks, batch commits with their position, status feedback and
heartbeats. Owned elsewhere, each with its SQL: the watched tables and their keys as the
catalog describes them (:mod:`replicator.cdc.tables`), the slot, its lock and the stream's start
(:mod:`replicator.cdc.slot`), the initial copy from the slot's exported snapshot
(:mod:`replicator.cdc.initial_copy`), the publication (:mod:`replicator.cdc.publication`),
matching a Relation message to the mirror (:mod:`replicator.cdc.schema_follow`) and online
table copies (:mod:`replicator.cdc.copies`, chunks read by :mod:`replicator.cdc.snapshot`).

Life of a source
----------------
1. ``start``: connect, check ``wal_level``, describe the watched tables (key: primary key, replica
   identity index, or ``capture.keys`` with REPLICA IDENTITY FULL), make sure the publication
   exists, take an advisory lock so a second daemon on the same slot refuses to start, and decide:

   * no checkpoint in staging and no slot → create the slot with an exported snapshot and copy
     the tables inside that snapshot (COPY, streamed in chunks), then stream from the slot's
     consistent point: the copy and the stream neither overlap nor leave a gap;
   * checkpoint still in state ``snapshot`` (a crash during the copy) → the slot is ours and its
     snapshot is gone: drop it and start the copy again;
   * checkpoint ``streaming`` and the slot is missing → :class:`SlotMissingError`. Never
     silently recreated: changes between the loss and now are gone, only ``sync-daemon resync``
     may take a new snapshot, on purpose.

2. ``run_cycle``: read CopyBoth frames from the walsender, decode pgoutput, apply into an open
   staging transaction; at a source Commit, when the batch is big or old enough, commit staging
   with the Commit's end LSN as checkpoint, and only then report that LSN as flushed. A source
   transaction larger than the batch is flushed in chunks into the *same* staging transaction, so
   memory stays bounded and staging never shows half a source transaction.

Why positions are kept apart (as Debezium does): ``received`` is what the walsender sent,
``confirmed`` is what staging durably holds. Only ``confirmed`` is ever reported as flushed; after
a crash the server resends everything after it, and the client also skips any transaction whose
commit LSN lies before the checkpoint, in case the server sends one again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import select
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import psycopg
import structlog

from replicator.cdc.base import CaptureSource, Progress
from replicator.cdc.copies import OnlineCopies, TableCopy
from replicator.cdc.initial_copy import copy_initial
from replicator.cdc.pgoutput import (
    Begin,
    Commit,
    Keepalive,
    LogicalMessage,
    Relation,
    RowChange,
    Truncate,
    TypeMsg,
    ValueDecoder,
    decode_message,
    int_to_lsn,
    lsn_to_int,
    parse_copy_message,
    pg_time_to_datetime,
    standby_status,
)
from replicator.cdc.pipeline import ApplyPipeline
from replicator.cdc.publication import changed_specs, ensure_publication, table_spec
from replicator.cdc.schema_follow import catalog_columns, declared_types, match_relation, same_shape
from replicator.cdc.slot import ReplicationSlot
from replicator.cdc.snapshot import Chunk, IncrementalSnapshots
from replicator.cdc.tables import describe_tables
from replicator.changes import Change, Checkpoint, Column, Op, TableSchema
from replicator.config import Config
from replicator.errors import RetryableError
from replicator.errors_map import STORE_UNAVAILABLE
from replicator.staging import ApplyTxn, StagingStore

log = structlog.get_logger(__name__, service="capture")

HEARTBEAT_PREFIX = "sync-daemon-heartbeat"


def _with_attnums(mirror: TableSchema, source: TableSchema) -> TableSchema:
    """The mirror's shape with the catalog numbers of the columns the source still has under the
    same name and type (definitions written before numbers were recorded have none)."""
    cols = []
    for c in mirror.columns:
        now = source.column(c.name)
        if c.attnum == 0 and now is not None and now.type_oid == c.type_oid:
            c = Column(c.name, c.type_name, c.type_oid, c.nullable, now.attnum)
        cols.append(c)
    return TableSchema(mirror.schema, mirror.name, tuple(cols), mirror.key)


class LogicalSource(CaptureSource):
    """A PostgreSQL ERP captured through a logical replication slot (pgoutput)."""

    def __init__(self, cfg: Config, store: StagingStore, name: str = "erp") -> None:
        self.cfg = cfg
        self.store = store
        self.name = name
        self.slot = cfg.capture.slot
        self.publication = cfg.capture.publication
        self.progress = Progress()
        self._conn: psycopg.Connection[Any] | None = None  # regular: lock, heartbeat, queries
        self._repl: psycopg.Connection[Any] | None = None
        self._decoder = ValueDecoder(
            dialect=store.dialect, schema_of=lambda rel: self._schemas.get(rel.qualified)
        )
        self._relations: dict[int, Relation] = {}
        # Per relation oid, its current Relation's row builder (see ValueDecoder.row_builder).
        self._row_builders: dict[int, Callable[[list[Any]], dict[str, Any]]] = {}
        self._rel_tables: dict[int, str] = {}
        self._schemas: dict[str, TableSchema] = {}
        # begin → apply (bounded flushes, spilled on SQLite) → commit with the LSN → feedback
        self._pipe = ApplyPipeline(store, name, batch_size=cfg.capture.batch_size, spill=True)
        self._in_source_txn = False
        self._skip_txn = False
        self._txn_commit_time: dt.datetime | None = None
        self._txn_pos = "0/0"  # commit LSN of the source transaction being applied
        self._batch_txns = 0
        self._batch_started = 0.0
        self._batch_end_lsn = 0
        self._batch_latest_event: dt.datetime | None = None
        self._batch_heartbeat: tuple[dt.datetime, int] | None = None
        self._last_status = 0.0
        self._checkpoint_lsn = 0
        self.snapshot_rows = 0
        self._copies = OnlineCopies(store, name, self.progress, events="snapshot_table")
        self._snaps = IncrementalSnapshots(self.slot, cfg.capture.batch_size, self._copies)
        self._had_mirror: set[str] = set()
        self._frozen: set[str] = set()  # mirrors whose key changed: unfed until re-copied
        self._requests_checked = 0.0
        self._slot = ReplicationSlot(cfg.erp, self.slot)

    # ------------------------------------------------------------------ start
    def _connect(self) -> psycopg.Connection[Any]:
        """Connect and lock the slot, bring the publication up to date and decide, table by
        table, which mirror the stream feeds."""
        self.store.setup()
        self._conn = conn = self._slot.connect()
        schemas = describe_tables(conn, self.cfg)
        respec = self._ensure_publication(schemas)
        self._had_mirror = {s.qualified for s in schemas if self.store.mirror(s.qualified)}
        self._schemas = {}
        for s in schemas:
            info = self.store.mirror(s.qualified)
            if info is None:
                self._schemas[s.qualified] = self.store.ensure_mirror(s).schema
            elif info.schema.key != s.key or s.qualified in respec:
                # Keyed differently now, or another column list or row filter: the mirror stays
                # as it is, unfed, until a re-copy of the new shape replaces it.
                self._frozen.add(s.qualified)
                self._schemas[s.qualified] = s
            else:
                # The shape staging holds: the stream's Relation messages bring it up to date in
                # order (a column changed while the daemon was stopped is followed there).
                self._schemas[s.qualified] = _with_attnums(info.schema, s)
        return conn

    def resync(self) -> None:
        """On purpose: drop the slot (if any), forget staging's copy, take a new snapshot."""
        conn = self._connect()
        if self._slot.row(conn) is not None:
            self._slot.drop(conn)
            log.warning("slot_dropped_for_resync", slot=self.slot)
        self._initial_copy()

    def start(self) -> None:
        conn = self._connect()
        if self._slot.take_over(conn, self.store.load_checkpoint(self.name)):
            self._initial_copy()
        cp = self.store.load_checkpoint(self.name)
        assert cp is not None
        self._snaps.load(cp.extra, self._schemas, self._had_mirror)
        for table in sorted(self._frozen):
            if all(c.table != table for c in self._copies.queue):
                self._copies.add(TableCopy(table, shadow=True))
        # An online re-copy: a fresh shadow, or the one a crash interrupted.
        self._copies.open_shadows(self._schemas)
        self._checkpoint_lsn = lsn_to_int(cp.position)
        self.progress.confirmed_lsn = self._checkpoint_lsn
        self._start_stream(self._checkpoint_lsn)

    def _ensure_publication(self, schemas: list[TableSchema]) -> set[str]:
        """Create the publication or bring it up to date; the tables whose column list or row
        filter changed since the last run (their mirrors must be copied again)."""
        assert self._conn is not None
        wanted = {s.qualified: table_spec(self.cfg.capture, s.qualified) for s in schemas}
        cp = self.store.load_checkpoint(self.name)
        changed = changed_specs(wanted, (cp.extra if cp else {}).get("specs", {}))
        self._snaps.specs = wanted
        ensure_publication(self._conn, self.publication, wanted, changed)
        return changed

    def _initial_copy(self) -> None:
        """Copy every watched table inside the snapshot of a new slot; the checkpoint that
        ends the copy records them all as copied, none queued for an incremental copy."""
        tables = list(self._schemas)
        self._copies.copied = set(tables)
        self._copies.set([])
        self.snapshot_rows += copy_initial(
            self._slot,
            self.store,
            self.name,
            [self._schemas[t] for t in tables],
            self.cfg.capture,
            extra=self._snaps.to_extra(),
        )

    # ------------------------------------------------------------------ stream
    def _start_stream(self, lsn: int) -> None:
        self._repl = self._slot.start_stream(int_to_lsn(lsn), self.publication)
        self._last_status = 0.0
        log.info("streaming_started", slot=self.slot, position=int_to_lsn(lsn))

    def run_cycle(self, timeout: float, stop: threading.Event) -> int:
        """Read, decode and apply for up to ``timeout`` seconds."""
        if self._repl is None:
            raise RetryableError("not connected")
        pgconn = self._repl.pgconn
        deadline = time.monotonic() + timeout
        applied_before = self.progress.changes
        batch_ms = self.cfg.capture.batch_ms / 1000
        if not self._in_source_txn and time.monotonic() - self._requests_checked >= 1.0:
            self._take_recopy_requests()
        try:
            while not stop.is_set():
                # The copy queue itself, not the `active` properties: this runs once a frame.
                if self._copies.queue and self._snaps.chunk is None and not self._in_source_txn:
                    self._start_chunk()
                n, data = pgconn.get_copy_data(1)
                if n == 0:
                    # Nothing buffered: commit a batch that is old enough, then wait on the socket.
                    if (
                        self._pipe.txn is not None
                        and not self._in_source_txn
                        and (time.monotonic() - self._batch_started >= batch_ms)
                    ):
                        self._commit_batch()
                    self._maybe_send_status()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    wait = min(
                        remaining,
                        max(0.01, batch_ms) if self._pipe.txn is not None else remaining,
                        self.cfg.capture.status_interval,
                    )
                    select.select([pgconn.socket], [], [], wait)
                    pgconn.consume_input()
                    continue
                if n == -1:
                    res = pgconn.get_result()
                    msg = res.error_message.decode(errors="replace") if res is not None else ""
                    raise RetryableError(
                        f"replication stream ended: {msg.strip() or 'server closed it'}"
                    )
                self._handle_frame(data)
                if time.monotonic() > deadline and not self._in_source_txn:
                    break
            if self._pipe.txn is not None and not self._in_source_txn:
                self._commit_batch()
            self._maybe_send_status()
        except psycopg.OperationalError as exc:
            raise RetryableError(f"replication connection lost: {exc}") from exc
        except STORE_UNAVAILABLE as exc:
            # The staging store went away (server down, disk full). Nothing was confirmed
            # beyond its last commit: reconnect later and resume from the staging checkpoint.
            raise RetryableError(f"staging store unavailable: {exc}") from exc
        return self.progress.changes - applied_before

    def _handle_frame(self, data: memoryview) -> None:
        frame = parse_copy_message(data)
        progress = self.progress
        if isinstance(frame, Keepalive):
            progress.server_wal_end = max(progress.server_wal_end, frame.wal_end)
            if frame.reply_requested:
                self._send_status(force=True)
            return
        # Comparisons, not max(): this runs once per streamed row.
        if frame.wal_start > progress.received_lsn:
            progress.received_lsn = frame.wal_start
        if frame.wal_end > progress.server_wal_end:
            progress.server_wal_end = frame.wal_end
        msg = decode_message(frame.payload)
        if type(msg) is RowChange:  # the common case, straight to the row path
            if not self._skip_txn:
                self._apply_row(msg)
            return
        self._handle_message(msg)

    def _open_txn(self) -> ApplyTxn:
        if self._pipe.txn is None:
            self._batch_started = time.monotonic()
            self._batch_txns = 0
        return self._pipe.open()

    def _handle_message(self, msg: Any) -> None:
        if isinstance(msg, RowChange):
            if self._skip_txn:
                return
            self._apply_row(msg)
        elif isinstance(msg, Begin):
            txn = self._pipe.txn
            if txn is not None and txn.pending_count >= self.cfg.capture.batch_size // 2:
                # Commit whole transactions at their boundary before a new one can push the batch
                # over its size: then only a source transaction that is large by itself is
                # flushed (and, on SQLite, spilled) in chunks, never a backlog of small ones.
                self._commit_batch()
            self._in_source_txn = True
            # A transaction that committed before our checkpoint is already in staging.
            self._skip_txn = msg.final_lsn < self._checkpoint_lsn
            self._txn_commit_time = pg_time_to_datetime(msg.commit_time)
            self._txn_pos = int_to_lsn(msg.final_lsn)
            if not self._skip_txn:
                self._open_txn()
        elif isinstance(msg, Commit):
            self._in_source_txn = False
            if self._skip_txn:
                self._skip_txn = False
                return
            self.progress.transactions += 1
            self._batch_txns += 1
            self._batch_end_lsn = msg.end_lsn
            self._batch_latest_event = pg_time_to_datetime(msg.commit_time)
            self.progress.last_commit_at = self._batch_latest_event
            txn = self._pipe.txn
            if txn is not None and (
                txn.pending_count >= self.cfg.capture.batch_size
                or time.monotonic() - self._batch_started >= self.cfg.capture.batch_ms / 1000
            ):
                self._commit_batch()
        elif isinstance(msg, Relation):
            self._on_relation(msg)
        elif isinstance(msg, Truncate):
            if self._skip_txn:
                return
            self._open_txn()
            pipe = self._pipe
            for oid in msg.relation_oids:
                table = self._rel_tables.get(oid)
                if table is not None:
                    pos = int_to_lsn(self.progress.received_lsn)
                    if table not in self._frozen:
                        pipe.apply(Change(table, "T", position=pos))
                    shadow = self._copies.shadow_change(Change(table, "T", position=pos))
                    if shadow is not None:
                        pipe.apply(shadow)
                    self._snaps.on_truncate(table)
                    self.progress.changes += 1
        elif isinstance(msg, LogicalMessage):
            self._on_logical_message(msg)
        elif isinstance(msg, TypeMsg):
            pass  # custom types decode as text; nothing to register

    def _on_relation(self, rel: Relation) -> None:
        self._relations[rel.oid] = rel
        self._row_builders.pop(rel.oid, None)  # built for the Relation before
        table = rel.qualified
        self._rel_tables[rel.oid] = table
        known = self._schemas.get(table)
        if known is None:
            return
        assert self._conn is not None
        type_names = declared_types(self._conn, rel)
        if not same_shape(rel, known, type_names):
            self._follow_schema_change(rel, known, type_names)

    def _follow_schema_change(
        self, rel: Relation, known: TableSchema, type_names: list[str]
    ) -> None:
        """The table changed shape in the ERP: make the mirror follow, in the open staging
        transaction, so the changes before and after the DDL stay in order.

        How the columns map is decided by catalog number (:mod:`replicator.cdc.schema_follow`).
        What cannot be matched for certain, a type change and a changed key are followed by
        re-copying the table online through a shadow mirror (see :mod:`replicator.cdc.snapshot`),
        so staging ends equal to the source either way.
        """
        assert self._conn is not None
        table = known.qualified
        change = match_relation(rel, known, type_names, catalog_columns(self._conn, rel.oid))
        schema, renamed, dropped, retyped = (
            change.schema,
            change.renamed,
            change.dropped,
            change.retyped,
        )
        added, key_changed, recopy = change.added, change.key_changed, change.recopy
        txn = self._open_txn()
        conn = txn.conn
        txn.flush()
        position = int_to_lsn(self.progress.received_lsn)
        if key_changed:
            # The live mirror is keyed by the old key: it keeps its rows, unfed, until the
            # re-copy with the new key takes its place.
            self._frozen.add(table)
        else:
            self.store.alter_mirror(conn, schema, renamed=renamed, dropped=dropped, retyped=retyped)
        self._schemas[table] = schema
        self.store.journal_event(conn, self.name, table, "S", position)
        log.warning(
            "mirror_schema_changed",
            table=table,
            renamed=renamed or None,
            dropped=dropped or None,
            added=[c.name for c in added] or None,
            retyped=retyped or None,
            key=list(schema.key) if key_changed else None,
            recopy=recopy,
            hint="the table is copied again online; staging equals the source when it is done"
            if recopy
            else None,
        )
        if recopy:
            self._recopy(table, schema, txn)
        elif not key_changed:
            for col in added:
                if not self._backfill_added_column(txn, table, rel.oid, col):
                    # The ERP rewrote the table (a volatile default, or a later DDL did):
                    # the rows that existed before have their value only in the ERP.
                    self._recopy(table, schema, txn)
                    break

    def _backfill_added_column(self, txn: ApplyTxn, table: str, relid: int, col: Column) -> bool:
        """Give rows that existed before ``ADD COLUMN ... DEFAULT x`` their value in staging;
        False when only a re-copy of the table can.

        PostgreSQL stores such a default once (``attmissingval``) instead of rewriting the
        table, so no row change reaches the stream. A volatile default rewrites the table, also
        without row changes (and a later rewrite, a type change say, folds the stored default
        into the rows): then the values are only in the ERP's rows.
        """
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT a.atthasmissing, a.atthasdef, a.attmissingval::text, t.typarray "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = %s AND a.attname = %s AND NOT a.attisdropped",
            (relid, col.name),
        ).fetchone()
        if row is None:
            return False  # renamed or dropped since: the catalog is ahead of the stream
        has_missing, has_default, missing_text, typarray = row
        if has_missing and missing_text is not None:
            values = self._decoder.loader(typarray)(missing_text.encode())
            value = values[0] if values else None
            self.store.backfill_column(txn.conn, table, col.name, value)
            log.info("mirror_column_backfilled", table=table, column=col.name)
            return True
        if has_default:
            log.warning("column_added_with_rewrite", table=table, column=col.name)
            return False
        return True

    def _apply_row(self, msg: RowChange) -> None:
        oid = msg.relation_oid
        table = self._rel_tables[oid]
        if table not in self._schemas:
            return
        rel = self._relations[oid]
        pipe = self._pipe
        if pipe.txn is None:
            self._open_txn()
        row = self._row_builders.get(oid)
        if row is None:
            row = self._row_builders[oid] = self._decoder.row_builder(rel)
        # Positional arguments and no Change object on the common path: this runs once per
        # streamed row.
        op = msg.op
        if op == "I":
            assert msg.new is not None
            values, old = row(msg.new), None
        elif op == "U":
            assert msg.new is not None
            values = row(msg.new)
            old = row(msg.old) if msg.old is not None else None
        else:
            assert msg.old is not None
            values, old = None, row(msg.old)
        self.progress.changes += 1
        if self._copies.queue or table in self._frozen:
            # An online copy is under way (its shadow and chunk see every change), or the
            # table's mirror is frozen until its re-copy takes its place.
            change = Change(table, cast(Op, op), values, old, self._txn_pos)
            if table not in self._frozen:
                pipe.apply(change)
            if self._copies.queue:
                self._snapshot_sees(change)
            return
        # Flushed every batch_size changes (bounded memory inside a large source
        # transaction); the commit comes with the source's Commit.
        pipe.apply_row(table, op, values, old, self._txn_pos)

    # ------------------------------------------------------------------ incremental snapshots
    def _start_chunk(self) -> None:
        copy = self._copies.current
        assert copy is not None and self._conn is not None
        try:
            self._snaps.start_chunk(
                self._conn, self._schemas[copy.table], self.cfg.capture.row_filter(copy.table)
            )
        except psycopg.OperationalError as exc:
            raise RetryableError(f"snapshot of {copy.table} interrupted: {exc}") from exc

    def _recopy(self, table: str, schema: TableSchema, txn: ApplyTxn) -> None:
        """Copy ``table`` again from the start, through a fresh shadow mirror, in ``txn``."""
        self._copies.recopy(table, schema, txn)
        self._snaps.drop_stale_chunk()

    def _take_recopy_requests(self) -> None:
        """``sync-daemon resync --table``: queue the copy; the request row goes with the commit
        that records the copy in the checkpoint (a crash before it leaves the request)."""
        self._requests_checked = time.monotonic()
        if self._copies.poll_requests():
            self._copies.take_requests(self._open_txn(), self._schemas)
            self._snaps.drop_stale_chunk()

    def _snapshot_sees(self, change: Change) -> None:
        """A streamed change of a table being copied: feed its shadow, keep the chunk honest."""
        shadow = self._copies.shadow_change(change)
        if shadow is not None:
            self._pipe.apply(shadow)
        table = change.table
        schema = self._schemas[table]
        key = schema.key
        if change.key is not None:
            old = tuple(change.key[c] for c in key)
            if change.values is None or old != tuple(change.values[c] for c in key):
                self._snaps.on_change(table, old, None, partial=False)
        if change.values is not None:
            partial = len(change.values) < len(schema.columns)
            new = tuple(change.values[c] for c in key)
            self._snaps.on_change(table, new, change.values, partial=partial)

    def _apply_chunk(self, chunk: Chunk) -> None:
        txn = self._open_txn()
        copy = chunk.copy
        target = self._copies.target(copy)
        self._pipe.apply_all(
            Change(target, "I", values, position="snapshot") for values in chunk.rows.values()
        )
        self.snapshot_rows += len(chunk.rows)
        position = int_to_lsn(self.progress.received_lsn)
        done = self._copies.chunk_applied(
            txn, copy, chunk.last_key, chunk.selected, chunk.complete, position
        )
        if done and copy.shadow:
            self._frozen.discard(copy.table)  # the re-copy of the new shape took its place

    def _on_logical_message(self, msg: LogicalMessage) -> None:
        if msg.prefix == self._snaps.prefix and not self._in_source_txn:
            chunk = self._snaps.on_message(msg.content.decode(errors="replace"))
            if chunk is not None:
                self._apply_chunk(chunk)
                # Non-transactional, like a heartbeat: a safe position to confirm.
                self._batch_end_lsn = max(self._batch_end_lsn, msg.lsn)
            return
        if msg.prefix != f"{HEARTBEAT_PREFIX}:{self.slot}":
            return
        try:
            sent = dt.datetime.fromisoformat(json.loads(msg.content)["sent_at"])
        except (ValueError, KeyError, TypeError):
            return
        self._batch_heartbeat = (sent, msg.lsn)
        self._batch_latest_event = max(sent, self._batch_latest_event or sent)
        if not self._in_source_txn:
            # A non-transactional message: everything that committed before it has been sent,
            # so its LSN is a safe position — this is what keeps an idle slot advancing.
            self._open_txn()
            self._batch_end_lsn = max(self._batch_end_lsn, msg.lsn)

    def _commit_batch(self) -> None:
        """Commit the open batch with the end LSN of its last whole source transaction; only
        once staging holds it, report that LSN to the server as flushed."""
        if self._pipe.txn is None:
            return
        end = max(self._batch_end_lsn, self._checkpoint_lsn)
        now = dt.datetime.now(dt.UTC)
        lag = (now - self._batch_latest_event).total_seconds() if self._batch_latest_event else None
        heartbeat = self._batch_heartbeat

        def record_heartbeat(txn: ApplyTxn) -> None:
            if heartbeat is not None:
                self.store.record_heartbeat(
                    self.name,
                    sent_at=heartbeat[0],
                    lag_seconds=max(0.0, lag or 0.0),
                    lag_bytes=max(0, self.progress.server_wal_end - end),
                    server_position=int_to_lsn(self.progress.server_wal_end),
                    conn=txn.conn,
                )

        def confirm() -> None:
            if lag is not None:
                self.progress.lag_seconds = max(0.0, lag)
            self.progress.last_applied_at = now
            if heartbeat is not None:
                self.progress.last_heartbeat_at = now
            self._batch_heartbeat = None
            self._batch_latest_event = None
            self._checkpoint_lsn = end
            self.progress.confirmed_lsn = end
            self._send_status(force=True)  # slot feedback: the server may now recycle its WAL

        self._pipe.commit(
            Checkpoint(self.name, int_to_lsn(end), extra=self._snaps.to_extra()),
            prepare=record_heartbeat,
            confirm=confirm,
            slot=self.slot,
            source_commit_at=self.progress.last_commit_at,
        )

    def _maybe_send_status(self) -> None:
        if time.monotonic() - self._last_status >= self.cfg.capture.status_interval:
            self._send_status(force=True)

    def _send_status(self, force: bool = False) -> None:
        if self._repl is None:
            return
        pgconn = self._repl.pgconn
        confirmed = self.progress.confirmed_lsn
        received = max(self.progress.received_lsn, confirmed)
        msg = standby_status(received, confirmed, confirmed)
        if pgconn.put_copy_data(msg) == 1:
            pgconn.flush()
        self._last_status = time.monotonic()

    # ------------------------------------------------------------------ heartbeat / close
    def heartbeat(self) -> None:
        """Emit a non-transactional logical message; its arrival measures end-to-end lag."""
        if self._conn is None:
            return
        payload = json.dumps({"sent_at": dt.datetime.now(dt.UTC).isoformat()})
        try:
            self._conn.execute(
                "SELECT pg_logical_emit_message(false, %s, %s)",
                (f"{HEARTBEAT_PREFIX}:{self.slot}", payload),
            )
        except psycopg.errors.InsufficientPrivilege:
            log.warning(
                "heartbeat_not_permitted",
                hint="GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) "
                "TO the capture role",
            )
        except psycopg.OperationalError as exc:
            raise RetryableError(f"heartbeat failed: {exc}") from exc

    def close(self) -> None:
        if self._pipe.txn is not None:
            if self._in_source_txn:
                # Half a source transaction: roll it back; the server sends it again.
                self._pipe.rollback()
            else:
                try:
                    self._commit_batch()  # whole transactions received: keep them
                except Exception as exc:  # never raise from close; _commit_batch rolled back
                    log.warning("close_commit_failed", error=str(exc))
        if self._conn is not None:
            self._slot.unlock(self._conn)
        for c in (self._repl, self._conn):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._repl = None
        self._conn = None
