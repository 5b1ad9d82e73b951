"""Capture by PostgreSQL logical replication: publication, slot, snapshot, pgoutput stream.

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
from typing import Any

import psycopg
import structlog
from psycopg import pq, sql

from replicator.cdc.base import CaptureSource, Progress
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
from replicator.cdc.snapshot import Chunk, IncrementalSnapshots
from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.config import Config
from replicator.config.core import filter_columns
from replicator.db import PG_KEEPALIVES, app_name, pg_connect
from replicator.errors import (
    DaemonAlreadyRunning,
    FatalError,
    RetryableError,
    SchemaError,
    SlotMissingError,
)
from replicator.errors_map import STORE_UNAVAILABLE, replication_start_error
from replicator.staging import ApplyTxn, StagingStore

log = structlog.get_logger(__name__, service="capture")

HEARTBEAT_PREFIX = "sync-daemon-heartbeat"


def describe_tables(conn: psycopg.Connection[Any], cfg: Config) -> list[TableSchema]:
    """Describe the watched tables, with the key staging uses, or raise SchemaError."""
    out: list[TableSchema] = []
    problems: list[str] = []
    for table in cfg.capture.tables:
        schema, name = table.split(".")
        row = conn.execute(
            "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, name),
        ).fetchone()
        if row is None:
            problems.append(f"capture.tables: {table!r} does not exist in the ERP database")
            continue
        oid, ident = row
        cols = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, NOT a.attnotnull, "
            "a.attnum FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 "
            "AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            (oid,),
        ).fetchall()
        columns = tuple(Column(n, t, int(o), bool(nl), int(num)) for n, t, o, nl, num in cols)
        pk = [
            r[0]
            for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
                (oid,),
            ).fetchall()
        ]
        configured = cfg.capture.key_columns(table)
        if ident == "i" and not pk:
            pk = [
                r[0]
                for r in conn.execute(
                    "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
                    "ON true JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                    "WHERE i.indrelid = %s AND i.indisreplident ORDER BY k.ord",
                    (oid,),
                ).fetchall()
            ]
        if configured:
            unknown = [c for c in configured if not any(col.name == c for col in columns)]
            if unknown:
                problems.append(f"capture.keys.{table}: no column {unknown[0]!r} in {table}")
                continue
            if not pk and ident != "f":
                problems.append(
                    f"{table} has no primary key: capture.keys names its key, but PostgreSQL only "
                    f"publishes its updates and deletes with REPLICA IDENTITY FULL. Run: "
                    f"ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
                continue
            key = tuple(configured)
        elif pk:
            key = tuple(pk)
        elif ident == "f":
            key = tuple(c.name for c in columns if c.type_name not in ("json", "jsonb", "bytea"))
            log.warning(
                "table_keyed_by_all_columns",
                table=table,
                hint="set capture.keys for this table; identical rows collapse into one",
            )
        else:
            problems.append(
                f"{table} has no primary key: add one, or run ALTER TABLE {table} REPLICA IDENTITY FULL "
                f"and name its key columns in capture.keys"
            )
            continue
        wanted = cfg.capture.column_list(table)
        if wanted is not None:
            unknown = [c for c in wanted if not any(col.name == c for col in columns)]
            if unknown:
                problems.append(f"capture.columns.{table}: no column {unknown[0]!r} in {table}")
                continue
            missing = [k for k in key if k not in wanted]
            if missing:
                problems.append(
                    f"capture.columns.{table} must include the key column(s) {', '.join(missing)}"
                )
                continue
            if ident == "f" and len(wanted) < len(columns):
                problems.append(
                    f"capture.columns.{table}: {table} has REPLICA IDENTITY FULL, and PostgreSQL "
                    "then refuses updates and deletes unless the column list names every column"
                )
                continue
            columns = tuple(c for c in columns if c.name in wanted)
        cond = cfg.capture.row_filter(table)
        if cond is not None:
            outside = [c for c in filter_columns(table, cond) if c not in key]
            if outside and ident != "f":
                # PostgreSQL would refuse every UPDATE and DELETE on the ERP table (a row
                # filter may only read replica identity columns): never let that happen.
                problems.append(
                    f"capture.filters.{table} reads {', '.join(outside)}, which is not part of the "
                    f"replica identity ({', '.join(key)}): PostgreSQL would then refuse updates "
                    f"and deletes on {table}. Filter on key columns, or run ALTER TABLE {table} "
                    "REPLICA IDENTITY FULL (and list no columns for it)"
                )
                continue
        out.append(TableSchema(schema, name, columns, key))
    if problems:
        raise SchemaError("; ".join(problems))
    return out


def _where(condition: str | None) -> sql.Composable:
    """`` WHERE (cond)`` for a table's row filter (validated when the config was read)."""
    return sql.SQL(" WHERE ({})").format(sql.SQL(condition)) if condition else sql.SQL("")


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
        self._snaps = IncrementalSnapshots(self.slot, cfg.capture.batch_size)
        self._had_mirror: set[str] = set()
        self._frozen: set[str] = set()  # mirrors whose key changed: unfed until re-copied
        self._requests_checked = 0.0

    # ------------------------------------------------------------------ start
    def _connect(self) -> psycopg.Connection[Any]:
        """Connect, check the server, take the per-slot advisory lock."""
        self.store.setup()
        self._conn = pg_connect(
            self.cfg.erp.url,
            "capture",
            autocommit=True,
            connect_timeout=self.cfg.erp.connect_timeout,
        )
        conn = self._conn
        (wal_level,) = conn.execute("SHOW wal_level").fetchone() or ("",)
        if wal_level != "logical":
            raise FatalError(
                f"the ERP server has wal_level={wal_level}; logical replication needs "
                "wal_level=logical (ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL), "
                'or use capture.mode = "triggers"'
            )
        locked = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s))", (f"sync-daemon:{self.slot}",)
        ).fetchone()
        if not locked or not locked[0]:
            holder = conn.execute(
                "SELECT a.pid, a.application_name, a.client_addr::text FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid AND l.granted "
                "AND l.pid <> pg_backend_pid() LIMIT 1",
                (f"sync-daemon:{self.slot}",),
            ).fetchone()
            who = (
                f" (pid {holder[0]}, {holder[1]}, from {holder[2] or 'local socket'})"
                if holder
                else ""
            )
            raise DaemonAlreadyRunning(
                f"another sync-daemon already captures slot {self.slot!r} on this ERP{who}; "
                "only one may capture a slot"
            )
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
        self._connect()
        if self._slot_row() is not None:
            self._drop_slot()
            log.warning("slot_dropped_for_resync", slot=self.slot)
        self._snapshot()

    def start(self) -> None:
        self._connect()
        cp = self.store.load_checkpoint(self.name)
        slot = self._slot_row()
        if cp is None and slot is None:
            self._snapshot()
        elif cp is not None and cp.state == "snapshot":
            log.warning(
                "snapshot_restarting",
                slot=self.slot,
                reason="the previous initial copy did not finish",
            )
            if slot is not None:
                self._drop_slot()
            self._snapshot()
        elif cp is None:
            raise FatalError(
                f"replication slot {self.slot!r} exists but the staging store has no checkpoint for "
                f"it (a new or emptied staging store?). Run `sync-daemon resync` to take a new "
                "snapshot, or point staging.url at the store that belongs to this slot."
            )
        elif slot is None:
            raise SlotMissingError(
                f"replication slot {self.slot!r} is gone (dropped by someone, or lost in a failover). "
                f"Changes made since {cp.position} may be lost, so it is not recreated silently. "
                "Run `sync-daemon resync` to take a new snapshot on purpose."
            )
        elif slot["active_pid"] is not None:
            raise DaemonAlreadyRunning(
                f"replication slot {self.slot!r} is in use by pid {slot['active_pid']}; "
                "only one consumer may stream a slot"
            )
        elif slot["wal_status"] == "lost":
            raise SlotMissingError(
                f"replication slot {self.slot!r} was invalidated (wal_status=lost, "
                "max_slot_wal_keep_size exceeded). Run `sync-daemon resync`."
            )
        cp = self.store.load_checkpoint(self.name)
        assert cp is not None
        self._snaps.load(cp.extra, self._schemas, self._had_mirror)
        for table in sorted(self._frozen):
            if all(c.table != table for c in self._snaps.queue):
                self._snaps.restart(table)
        for copy in self._snaps.queue:
            if copy.shadow:  # an online re-copy: a fresh shadow, or the one a crash interrupted
                self.store.ensure_shadow(self._schemas[copy.table], fresh=copy.after is None)
        self._show_snapshot_progress()
        self._checkpoint_lsn = lsn_to_int(cp.position)
        self.progress.confirmed_lsn = self._checkpoint_lsn
        self._start_stream(self._checkpoint_lsn)

    def _slot_row(self) -> dict[str, Any] | None:
        assert self._conn is not None
        with self._conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(
                "SELECT slot_name, plugin, active_pid, confirmed_flush_lsn::text AS confirmed, "
                "wal_status, database FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            )
            row = cur.fetchone()
        if row is not None and row["plugin"] != "pgoutput":
            raise FatalError(f"slot {self.slot!r} uses plugin {row['plugin']!r}, not pgoutput")
        return row

    def _drop_slot(self) -> None:
        assert self._conn is not None
        self._conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))

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

    # ------------------------------------------------------------------ snapshot
    def _snapshot(self) -> None:
        """Create the slot with an exported snapshot and copy the tables inside it."""
        assert self._conn is not None
        tables = list(self._schemas)
        self.store.reset_source(self.name, tables)
        with self.store.transaction(self.name) as txn:
            txn.commit(
                Checkpoint(self.name, "0/0", state="snapshot"), slot=self.slot, replicated=False
            )
        repl = psycopg.connect(
            self.cfg.erp.url,
            replication="database",
            autocommit=True,
            application_name=app_name("snapshot"),
            connect_timeout=int(self.cfg.erp.connect_timeout),
            **PG_KEEPALIVES,
        )
        try:
            row = repl.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(
                    sql.Identifier(self.slot)
                )
            ).fetchone()
            assert row is not None
            consistent_point, snapshot_name = row[1], row[2]
            log.info("slot_created", slot=self.slot, consistent_point=consistent_point)
            snap = pg_connect(
                self.cfg.erp.url, "snapshot", connect_timeout=self.cfg.erp.connect_timeout
            )
            try:
                snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                snap.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
                )
                # The snapshot is imported; the walsender may now be released.
                repl.close()
                for t in tables:
                    self._copy_table(snap, self._schemas[t])
                snap.execute("COMMIT")
            finally:
                snap.close()
        finally:
            repl.close()
        with self.store.transaction(self.name) as txn:
            self._snaps.copied = set(tables)
            self._snaps.queue = []
            txn.commit(
                Checkpoint(
                    self.name, consistent_point, state="streaming", extra=self._snaps.to_extra()
                ),
                slot=self.slot,
            )
        log.info(
            "snapshot_done", slot=self.slot, rows=self.snapshot_rows, position=consistent_point
        )

    def _copy_table(self, snap: psycopg.Connection[Any], schema: TableSchema) -> None:
        cols = [c.name for c in schema.columns]
        query = sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in cols),
            sql.Identifier(schema.schema, schema.name),
            _where(self.cfg.capture.row_filter(schema.qualified)),
        )
        batch = self.cfg.capture.batch_size
        n = 0
        txn = self.store.begin(self.name)
        try:
            with snap.cursor() as cur, cur.copy(query) as copy:
                copy.set_types([c.type_oid for c in schema.columns])
                for row in copy.rows():
                    txn.apply(
                        Change(
                            schema.qualified,
                            "I",
                            dict(zip(cols, row, strict=True)),
                            position="snapshot",
                        )
                    )
                    n += 1
                    if txn.pending_count >= batch:
                        txn.commit(None)
                        txn = self.store.begin(self.name)
            txn.commit(None)
        finally:
            txn.close()
        self.snapshot_rows += n
        log.info("table_copied", table=schema.qualified, rows=n)

    # ------------------------------------------------------------------ stream
    def _start_stream(self, lsn: int) -> None:
        repl = psycopg.connect(
            self.cfg.erp.url,
            replication="database",
            autocommit=True,
            application_name=app_name("capture"),
            connect_timeout=int(self.cfg.erp.connect_timeout),
            options="-c timezone=UTC -c datestyle=ISO",
            **PG_KEEPALIVES,
        )
        self._repl = repl
        pgconn = repl.pgconn
        command = (
            f"START_REPLICATION SLOT {sql.Identifier(self.slot).as_string(repl)} LOGICAL "
            f"{int_to_lsn(lsn)} (proto_version '1', publication_names "
            f"{sql.Literal(self.publication).as_string(repl)}, messages 'true')"
        )
        pgconn.send_query(command.encode())
        deadline = time.monotonic() + self.cfg.erp.connect_timeout
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            if time.monotonic() > deadline:
                raise RetryableError("START_REPLICATION did not answer in time")
            select.select([pgconn.socket], [], [], 0.2)
        res = pgconn.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            msg = res.error_message.decode(errors="replace") if res is not None else "no result"
            code = res.error_field(pq.DiagnosticField.SQLSTATE) if res is not None else None
            raise replication_start_error(self.slot, code.decode() if code else None, msg)
        pgconn.nonblocking = 1
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
                if self._snaps.active and self._snaps.chunk is None and not self._in_source_txn:
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
        if isinstance(frame, Keepalive):
            self.progress.server_wal_end = max(self.progress.server_wal_end, frame.wal_end)
            if frame.reply_requested:
                self._send_status(force=True)
            return
        self.progress.received_lsn = max(self.progress.received_lsn, frame.wal_start)
        self.progress.server_wal_end = max(self.progress.server_wal_end, frame.wal_end)
        self._handle_message(decode_message(frame.payload))

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
                    if self.store.mirror(self.store.shadow_of(table)) is not None:
                        pipe.apply(Change(self.store.shadow_of(table), "T", position=pos))
                    self._snaps.on_truncate(table)
                    self.progress.changes += 1
        elif isinstance(msg, LogicalMessage):
            self._on_logical_message(msg)
        elif isinstance(msg, TypeMsg):
            pass  # custom types decode as text; nothing to register

    def _on_relation(self, rel: Relation) -> None:
        self._relations[rel.oid] = rel
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
            self.store.ensure_shadow(schema, fresh=True, conn=conn)
            self._snaps.restart(table)
            self._show_snapshot_progress()
        elif not key_changed:
            for col in added:
                if not self._backfill_added_column(txn, table, rel.oid, col):
                    # The ERP rewrote the table (a volatile default, or a later DDL did):
                    # the rows that existed before have their value only in the ERP.
                    self.store.ensure_shadow(schema, fresh=True, conn=conn)
                    self._snaps.restart(table)
                    self._show_snapshot_progress()
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
        rel = self._relations[msg.relation_oid]
        table = self._rel_tables[msg.relation_oid]
        if table not in self._schemas:
            return
        if self._pipe.txn is None:
            self._open_txn()
        pos = self._txn_pos
        dec = self._decoder
        # Positional arguments: this runs once per streamed row.
        if msg.op == "I":
            assert msg.new is not None
            change = Change(table, "I", dec.row(rel, msg.new), None, pos)
        elif msg.op == "U":
            assert msg.new is not None
            values = dec.row(rel, msg.new)
            old = dec.row(rel, msg.old) if msg.old is not None else None
            change = Change(table, "U", values, old, pos)
        else:
            assert msg.old is not None
            change = Change(table, "D", None, dec.row(rel, msg.old), pos)
        if table not in self._frozen:
            # Flushed every batch_size changes (bounded memory inside a large source
            # transaction); the commit comes with the source's Commit.
            self._pipe.apply(change)
        if self._snaps.active:
            self._snapshot_sees(change)
        self.progress.changes += 1

    # ------------------------------------------------------------------ incremental snapshots
    def _start_chunk(self) -> None:
        copy = self._snaps.current
        assert copy is not None and self._conn is not None
        try:
            self._snaps.start_chunk(
                self._conn, self._schemas[copy.table], self.cfg.capture.row_filter(copy.table)
            )
        except psycopg.OperationalError as exc:
            raise RetryableError(f"snapshot of {copy.table} interrupted: {exc}") from exc
        self._show_snapshot_progress()

    def _take_recopy_requests(self) -> None:
        """``sync-daemon resync --table``: queue the copy; the request row goes with the commit
        that records the copy in the checkpoint (a crash before it leaves the request)."""
        self._requests_checked = time.monotonic()
        for table in self.store.recopy_requests(self.name):
            txn = self._open_txn()
            conn = txn.conn
            if table in self._schemas:
                self.store.ensure_shadow(self._schemas[table], fresh=True, conn=conn)
                self._snaps.restart(table)
                log.info("recopy_requested", table=table)
            else:
                log.warning("recopy_request_ignored", table=table, reason="not in capture.tables")
            self.store.take_recopy_request(conn, self.name, table)
            self._show_snapshot_progress()

    def _snapshot_sees(self, change: Change) -> None:
        """A streamed change of a table being copied: feed its shadow, keep the chunk honest."""
        table = change.table
        shadow = self.store.shadow_of(table)
        if self.store.mirror(shadow) is not None:
            self._pipe.apply(Change(shadow, change.op, change.values, change.key, change.position))
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
        target = self.store.shadow_of(copy.table) if copy.shadow else copy.table
        self._pipe.apply_all(
            Change(target, "I", values, position="snapshot") for values in chunk.rows.values()
        )
        self.snapshot_rows += len(chunk.rows)
        done = self._snaps.chunk_applied(chunk)
        if done is not None:
            position = int_to_lsn(self.progress.received_lsn)
            conn = txn.conn
            if done.shadow:
                txn.flush()  # the shadow's last rows, before it takes the mirror's place
                self.store.swap_shadow(conn, done.table)
                self._frozen.discard(done.table)
            self.store.journal_event(conn, self.name, done.table, "S", position)
        self._show_snapshot_progress()

    def _show_snapshot_progress(self) -> None:
        copy = self._snaps.current
        self.progress.snapshot_table = copy.table if copy else None
        self.progress.snapshot_done = copy.done if copy else 0
        self.progress.snapshot_total = copy.total if copy else 0

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
            # Released explicitly: a closed socket returns before the server's session ends, and
            # a capture started right after would still find the slot's lock held.
            with contextlib.suppress(Exception):
                self._conn.execute(
                    "SELECT pg_advisory_unlock(hashtext(%s))", (f"sync-daemon:{self.slot}",)
                )
        for c in (self._repl, self._conn):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._repl = None
        self._conn = None
