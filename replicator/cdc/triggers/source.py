"""Trigger capture: reads the changelog the triggers fill and applies it to staging, exactly once.

Responsible for turning changelog rows into :class:`~replicator.changes.Change` events in an
order that leaves staging equal to the source, committing them with a position from which capture
resumes after any crash, and deleting changelog rows only once a staging commit covers them.

Why the order is correct
------------------------
All three dialects rest on one fact: a trigger writes its changelog row *while the transaction
holds the row lock* of the changed row, and keeps it until commit. So for any one row, the
changelog entries of two transactions are created — and their ids drawn — in the order in which
the transactions committed, and a reader that sees the later transaction committed also sees the
earlier one (it committed before the later one could take the lock). Changes of different rows
commute. Hence: **applying every committed entry of a set of whole transactions in changelog id
order gives the right final state**, provided no entry is skipped and the set grows only by whole
transactions that committed after it. What differs per dialect is how a reader knows which
committed entries it has not applied yet — id order is *not* commit order across rows, so
"``id > last id``" loses a row whose transaction drew a small id and committed late.

*PostgreSQL* (as PgQ does): every entry carries ``pg_current_xact_id()``. A batch is the set of
transactions visible in the current snapshot but not in the previous one (``pg_current_snapshot()``,
``pg_visible_in_snapshot``), read inside the REPEATABLE READ transaction whose snapshot *is* the
current one, applied in id order. The snapshot becomes the next "previous" snapshot and is stored
in the staging commit (``Checkpoint.extra["snapshot"]``), with the last id as the position. The
initial copy runs in a REPEATABLE READ transaction and records its snapshot as the first previous
snapshot: rows of transactions visible to the copy are in the copy, the others come from the
changelog — no overlap, no gap. Cleanup deletes entries whose transaction is visible in the
*committed* snapshot — exactly what staging already holds.

*MariaDB* (no snapshot functions): a single consumer reads, in one READ COMMITTED statement (one
InnoDB read view: the set of transactions committed at that instant, so whole transactions only),
*every* entry, applies them in id order, commits to staging with the exact set of ids it read
(``extra["applied"]``, as id ranges), then deletes exactly those ids. Entries of transactions that
were still open keep their (smaller) ids and are simply read by a later cycle — nothing is
skipped because nothing is skipped *by id*: what has not been deleted has not been applied. The
delete happens after the staging commit; after a crash in between, the checkpoint's id set is
deleted again before the next read (idempotent), so nothing is applied twice. The initial copy
reads the tables and the changelog ids in one ``START TRANSACTION WITH CONSISTENT SNAPSHOT``:
the ids it sees are covered by the copy and are deleted like an applied batch.
MariaDB does not fire triggers for rows changed by foreign-key actions (ON DELETE CASCADE, SET
NULL) nor for TRUNCATE; :meth:`TriggerSource.start` warns naming such tables.

*SQLite* (one writer at a time): a writer holds the database write lock from its first write to
its commit, so ``AUTOINCREMENT`` ids are drawn in commit order, and a read transaction sees a
prefix of them. An id cursor (``id > last_id``, the position) is therefore safe; AUTOINCREMENT
(not plain rowid) guarantees that ids freed by cleanup are never drawn again.

A batch is always *all* committed, unapplied entries (streamed, flushed to staging every
``capture.batch_size`` changes so memory stays bounded) and commits in one staging transaction, so
a source transaction is never split across two positions.

Copying one table online
------------------------
A table added to ``capture.tables``, one whose column list or row filter changed, one asked for
with ``sync-daemon resync --table``, and one the mirror cannot follow exactly (a retyped column;
a rename where the ERP has no stable column numbers; a column added with a default, which the
ERP fills without firing a trigger) is copied again while the others stream —
no watermarks needed, because every batch above is read in *one consistent snapshot* of the ERP
(PostgreSQL: the REPEATABLE READ transaction whose snapshot is ``cur``; SQLite: one read
transaction; MariaDB: while a copy is active, ``START TRANSACTION WITH CONSISTENT SNAPSHOT``
instead of one READ COMMITTED statement — the trigger writes its changelog row in the ERP's own
transaction, so data and changelog are seen together). A chunk ``SELECT image, key FROM t WHERE
key > after ORDER BY key LIMIT capture.batch_size`` run in that transaction *after* the batch's
entries shows exactly the state those entries lead to: the batch is applied, then the chunk's
rows are upserted, then the checkpoint (with the copy's progress, :class:`TableCopy` in
``extra["copying"]``) commits with both. A chunk row therefore never overwrites a newer change
and no change is missed; rows past the chunk are kept current by the stream until their chunk.
A table whose mirror has rows is copied into a shadow mirror that every batch feeds like the
live one; the last chunk swaps it in (same commit), so rows the source no longer has disappear
and readers keep the old mirror until then. A batch is read while a copy is active even when the
changelog has nothing new (the batch is just the chunk). After a kill -9 the copy goes on after
the last committed chunk, into the persisted shadow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pymysql.cursors
import structlog

from replicator.cdc.base import CaptureSource, Progress
from replicator.cdc.copies import OnlineCopies, TableCopy, requeued
from replicator.cdc.pipeline import ApplyPipeline, Reached
from replicator.cdc.triggers.decode import RowDecoder, loads
from replicator.cdc.triggers.dialects import (
    Dialect,
    MysqlDialect,
    PostgresDialect,
    SqliteDialect,
    dialect_for,
)
from replicator.cdc.triggers.follow import SchemaFollow, key_changed, with_types
from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.errors import DaemonAlreadyRunning, FatalError, RetryableError
from replicator.errors_map import DRIVER_UNAVAILABLE
from replicator.failpoints import failpoint
from replicator.staging import ApplyTxn, StagingStore

if TYPE_CHECKING:
    from replicator.config import Config

log = structlog.get_logger(__name__)

# (id, table, op, row image JSON, old key JSON, unix time of the change)
Entry = tuple[int, str, str, str | None, str | None, Any]


def ranges_of(ids: Iterable[int]) -> list[list[int]]:
    """Sorted ids as inclusive ``[lo, hi]`` ranges (the MariaDB checkpoint's applied set)."""
    builder = _RangeBuilder()
    for i in ids:
        builder.add(i)
    return builder.ranges


class _RangeBuilder:
    """Builds :func:`ranges_of` one sorted id at a time (while the ids stream past)."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def add(self, i: int) -> None:
        r = self.ranges
        if r and i == r[-1][1] + 1:
            r[-1][1] = i
        else:
            r.append([i, i])


class TriggerSource(CaptureSource):
    """Capture of one ERP database through triggers and a changelog table.

    ``TriggerSource(cfg, store, stop_event=None, *, name="erp")``: ``cfg`` is the loaded
    :class:`~replicator.config.Config` (``erp.dsn`` and ``[capture]`` with ``mode = "triggers"``),
    ``store`` the :class:`StagingStore` (set up or not), ``stop_event`` ends a long initial copy
    early, ``name`` is the checkpoint key in ``sync_checkpoints`` (the ``slot`` column shows the
    changelog table). Drive it like every capture source: ``start()`` once, ``run_cycle(timeout,
    stop)`` in the loop, ``heartbeat()`` every ``capture.heartbeat_interval``, ``close()`` at the
    end. A lost connection raises :class:`RetryableError` from ``run_cycle``; the next call
    reconnects and resumes from the staging checkpoint.
    """

    def __init__(
        self,
        cfg: Config,
        store: StagingStore,
        stop_event: threading.Event | None = None,
        *,
        name: str = "erp",
    ) -> None:
        self.cfg = cfg
        self.capture = cfg.capture
        self.store = store
        self.stop_event = stop_event or threading.Event()
        self.name = name
        self.progress = Progress()
        self.dialect: Dialect = dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
        self.tables = list(cfg.capture.tables)
        self.decoders: dict[str, RowDecoder] = {}
        self.pipeline = ApplyPipeline(store, name, batch_size=cfg.capture.batch_size)
        self.reader: _Reader
        if isinstance(self.dialect, PostgresDialect):
            self.reader = _PgReader(self, self.dialect)
        elif isinstance(self.dialect, MysqlDialect):
            self.reader = _MysqlReader(self, self.dialect)
        else:
            assert isinstance(self.dialect, SqliteDialect)
            self.reader = _SqliteReader(self, self.dialect)
        self._started = False
        self._lock: Any = None
        self._need_resume = False
        self.last_batch_at: float = 0.0
        # Online table copies (see "Copying one table online" above): the queue, the first one
        # being copied, persisted in the checkpoint's extra with every batch; their shadows and
        # `resync --table` requests (taken by the next batch).
        self._copies = OnlineCopies(store, name, self.progress, events="table_copy")
        self._schema = SchemaFollow(self.dialect, store, name)
        self.chunk_rows = cfg.capture.batch_size
        self._requests_checked = 0.0
        # A column retyped in the ERP leaves the row images' keys as they were, so it is found
        # by reading the catalog now and then (every heartbeat_interval), in a batch.
        self._schema_checked = time.monotonic()
        # Columns found retyped (table -> the catalog's columns), followed by the next batch.
        self._retyped: dict[str, dict[str, Column]] = {}
        self._chunked = False  # the batch being delivered holds a chunk (failpoint after it)
        # Mirrors keyed by an old key (a key column renamed, another primary key): unfed until
        # the online copy with the new key replaces them.
        self._frozen: set[str] = set()

    # ------------------------------------------------------------------ contract
    def start(self) -> None:
        self.store.setup()
        self._lock = self.dialect.consumer_lock()
        if self._lock is None:
            raise DaemonAlreadyRunning(
                f"another daemon already reads changelog {self.capture.changelog_table} "
                "of this ERP database"
            )
        schemas = self._installed_schemas()
        cp = self.store.load_checkpoint(self.name)
        had_mirror = {t for t in self.tables if self.store.mirror(t) is not None}
        recorded: dict[str, Any] = (cp.extra if cp else {}).get("specs", {})
        plain = {"columns": None, "filter": None}
        respecified = sorted(
            t for t in self.tables if recorded.get(t, plain) != self.dialect.spec(t)
        )
        keyed_anew = self._prepare_mirrors(schemas, respecified)
        if cp is None or cp.state != "streaming" or cp.extra.get("mode") != "triggers":
            if cp is not None:
                log.warning(
                    "checkpoint_not_from_triggers",
                    source=self.name,
                    hint="taking a new initial copy",
                )
            if keyed_anew:  # the initial copy fills mirrors of the new shape from empty
                with self.store.engine.begin() as sconn:
                    for table in keyed_anew:
                        self.store.ensure_shadow(
                            self.decoders[table].schema, fresh=True, conn=sconn
                        )
                        self.store.swap_shadow(sconn, table)
            self.reader.initial_copy()
            self._copies.set([])
        else:
            self.reader.resume(cp)
            self._plan_copies(cp, had_mirror, respecified, keyed_anew)
        self.reader.open_doorbell()
        self._started = True
        log.info(
            "trigger_capture_started",
            source=self.name,
            dialect=self.dialect.name,
            tables=len(self.tables),
        )

    def _installed_schemas(self) -> list[TableSchema]:
        """The watched tables as the ERP's catalog describes them, once the triggers are known
        to be installed and current (else a FatalError saying to install them)."""
        with self.dialect.connection("capture-setup") as conn:
            statuses = self.dialect.status(conn, self.tables)
            bad = [s for s in statuses if s.table in self.tables and s.state != "current"]
            if bad:
                detail = "; ".join(f"{s.table}: {s.state} ({s.detail})" for s in bad)
                raise FatalError(
                    f"capture triggers are not installed or not current: {detail}. "
                    "Run `sync-daemon triggers install --config FILE`."
                )
            schemas = [self.dialect.table_schema(conn, t) for t in self.tables]
            if isinstance(self.dialect, MysqlDialect):
                children = self.dialect.cascade_children(conn, self.tables)
                if children:
                    log.warning(
                        "cascade_changes_not_captured",
                        tables=children,
                        hint="MariaDB fires no triggers for rows changed by foreign-key actions; "
                        "these changes reach staging only with `sync-daemon resync --table T`",
                    )
        return schemas

    def _prepare_mirrors(self, schemas: list[TableSchema], respecified: list[str]) -> list[str]:
        """A mirror and a decoder for every watched table; the tables whose mirror is keyed
        differently now (left as they are: a copy with the new key replaces them)."""
        keyed_anew: list[str] = []
        with self.store.engine.begin() as sconn:
            for table, schema in zip(self.tables, schemas, strict=True):
                self.decoders[table] = RowDecoder(schema)
                existing = self.store.mirror(table)
                if existing is not None and key_changed(table, existing.schema, schema):
                    # The mirror cannot be altered into the new key (its rows are keyed by the
                    # old one).
                    keyed_anew.append(table)
                    continue
                info = self.store.ensure_mirror(schema, sconn)
                if table in respecified or self.capture.column_list(table) is not None:
                    # Columns left out of the list leave the mirror (personal data must not
                    # stay in staging); the copy fills what is listed now.
                    gone = [c.name for c in info.schema.columns if schema.column(c.name) is None]
                    if gone:
                        self.store.alter_mirror(sconn, schema, renamed={}, dropped=gone, retyped=[])
                        log.warning("mirror_columns_dropped", table=table, columns=gone)
        return keyed_anew

    def _plan_copies(
        self,
        cp: Checkpoint,
        had_mirror: set[str],
        respecified: list[str],
        keyed_anew: list[str],
    ) -> None:
        """Resuming from ``cp``: the online copies it left, plus a copy of each table added to
        capture.tables, given another column list or row filter, or keyed anew."""
        copies = self._copies.stored(cp.extra, self.decoders)
        before = set(cp.extra.get("tables", []))
        for table in self.tables:
            if table not in before:
                # A table joined capture.tables: copy just it, online; the others stream on.
                # A mirror left from an earlier time it was captured is replaced at the end.
                log.warning(
                    "capture_table_added",
                    source=self.name,
                    table=table,
                    hint="copying it online while the other tables stream",
                )
                copies = requeued(copies, TableCopy(table, shadow=table in had_mirror))
            elif table in respecified:
                # A column list or row filter changed: rows that now match (or columns now
                # listed) are in no mirror. The triggers already log the new way (`triggers
                # install`, else the status check stops us).
                log.warning(
                    "capture_spec_changed",
                    source=self.name,
                    table=table,
                    hint="copying it again online",
                )
                copies = requeued(copies, TableCopy(table, shadow=True))
        for table in keyed_anew:
            self._frozen.add(table)
            if all(c.table != table for c in copies):  # else: a copy under way goes on
                copies = requeued(copies, TableCopy(table, shadow=True))
        gone = sorted(before - set(self.tables))
        if gone:
            log.info("capture_tables_removed", source=self.name, tables=gone)
        self._resume_copies(copies)
        if before != set(self.tables) or respecified:
            # On record now, not with the next batch: a table removed, and added back before
            # any batch committed, would otherwise not be seen as added (nor copied).
            fresh = self.checkpoint(cp.position, {})
            with self.store.engine.begin() as sconn:
                self.store.write_checkpoint(
                    sconn,
                    Checkpoint(self.name, cp.position, cp.state, {**cp.extra, **fresh.extra}),
                    replicated=False,
                )

    def run_cycle(self, timeout: float, stop: threading.Event) -> int:
        deadline = time.monotonic() + timeout
        try:
            if self._need_resume:
                cp = self.store.load_checkpoint(self.name)
                if cp is None:
                    raise FatalError(f"checkpoint of {self.name} vanished from staging; resync")
                self.reader.close()
                self.reader.resume(cp)
                if self.copies or cp.extra.get("copying"):
                    # A batch that failed may have created or swapped a shadow in memory only.
                    self.store.refresh_mirrors()
                    self._resume_copies(self._copies.stored(cp.extra, self.decoders))
                self.reader.open_doorbell()
                self._need_resume = False
            if time.monotonic() - self._schema_checked >= self.capture.heartbeat_interval:
                # A retyped column fires no trigger: only the catalog tells (see follow.py).
                self._schema_checked = time.monotonic()
                self._retyped = self._schema.find_retyped(
                    t for t in self.tables if t in self.decoders
                )
            if time.monotonic() - self._requests_checked >= 1.0:
                self._requests_checked = time.monotonic()
                self._copies.poll_requests()
            while True:
                n = self.reader.read_batch_and_cleanup()
                if n:
                    self.last_batch_at = time.monotonic()
                    self.progress.changes += n
                    self.progress.last_applied_at = dt.datetime.now(dt.UTC)
                    return n
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return 0
                self.reader.wait(min(self.capture.poll_interval, left), stop)
                if time.monotonic() >= deadline or stop.is_set():
                    return self.reader.read_batch_and_cleanup()
        except DRIVER_UNAVAILABLE as exc:
            self._need_resume = True
            self.reader.close()
            raise RetryableError(f"ERP connection lost: {exc}") from exc
        except BaseException:
            self._need_resume = True
            raise

    def heartbeat(self) -> None:
        try:
            lag = self.reader.lag_seconds()
        except DRIVER_UNAVAILABLE as exc:
            self._need_resume = True
            self.reader.close()
            raise RetryableError(f"ERP connection lost: {exc}") from exc
        now = dt.datetime.now(dt.UTC)
        self.store.record_heartbeat(self.name, sent_at=now, lag_seconds=lag)
        self.progress.lag_seconds = lag if lag is not None else 0.0
        self.progress.last_heartbeat_at = now

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.reader.close()
        if self._lock is not None:
            with contextlib.suppress(Exception):
                self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ shared apply path
    def refresh_schema(self, table: str, txn: ApplyTxn) -> RowDecoder:
        """A row image with other columns than the mirror's: the table changed shape in the ERP.
        Make the mirror follow (:mod:`replicator.cdc.triggers.follow`), in the staging
        transaction of the changes around it; a new key, or rows the change leaves wrong, copy
        the table again."""
        schema = self._schema.catalog_schema(table)
        info = self.store.mirror(table)
        dec = self.decoders[table] = RowDecoder(schema)  # a re-copy's shadow takes this shape
        if info is None:
            self.store.ensure_mirror(schema, txn.conn)
        elif key_changed(table, info.schema, schema):
            # The key changed under a running reader: the mirror keeps its rows, unfed, until a
            # copy with the new key replaces it (see start()).
            self._frozen.add(table)
            self.recopy(table, txn)
        elif self._schema.follow(table, info.schema, schema, txn, self._copying(table)):
            self.recopy(table, txn)
        return dec

    def _copying(self, table: str) -> bool:
        return any(c.table == table for c in self._copies.queue)

    # ------------------------------------------------------------------ online table copies
    @property
    def copies(self) -> list[TableCopy]:
        """The tables being copied online, the first one under way."""
        return self._copies.queue

    def recopy(self, table: str, txn: ApplyTxn) -> None:
        """Copy ``table`` again from the start, through a fresh shadow mirror, in ``txn`` (the
        batch that records it in the checkpoint)."""
        self._copies.recopy(table, self.decoders[table].schema, txn)

    def _resume_copies(self, copies: list[TableCopy]) -> None:
        """Make ``copies`` the queue, as a checkpoint left them, with their shadows ready."""
        for c in copies:
            if c.after is not None:
                log.info(
                    "table_copy_resumed",
                    source=self.name,
                    table=c.table,
                    after=c.after,
                    done=c.done,
                    total=c.total,
                )
        self._copies.set(copies)
        self._copies.open_shadows({t: d.schema for t, d in self.decoders.items()})

    @property
    def copying(self) -> bool:
        """A batch is due even without changelog entries: a table copy is under way or asked
        for (every batch reads a chunk), or a retyped column is to be followed."""
        return bool(self._copies.queue or self._copies.requests or self._retyped)

    def _follow_retyped(self, txn: ApplyTxn) -> None:
        """The retyped columns the catalog check found, applied to the mirror as it is now (the
        batch before may have changed it)."""
        retyped, self._retyped = self._retyped, {}
        for table, changed in retyped.items():
            info = self.store.mirror(table)
            if info is None or table not in self.decoders:
                continue
            schema = with_types(info.schema, changed)
            if schema is not None:
                self.decoders[table] = RowDecoder(schema)
                if self._schema.follow(table, info.schema, schema, txn, self._copying(table)):
                    self.recopy(table, txn)

    def chunk_changes(
        self, txn: ApplyTxn, run: Callable[[str], list[Any]], position: Callable[[], str]
    ) -> Iterator[Change]:
        """The next chunk of the table being copied, as changes after the batch's own.

        ``run(sql)`` answers in the reader's read transaction, *after* the batch's changelog
        rows were read in it: the chunk shows exactly the state those rows lead to, so its rows
        overwrite nothing newer and miss nothing (no watermarks needed). The copy's progress
        goes into the checkpoint of the same staging commit. The last chunk swaps the shadow in
        (same commit) and journals the table as re-read (``S``)."""
        copies = self._copies
        copy = copies.queue[0]
        table = copy.table
        dec = self.decoders[table]
        schema = dec.schema
        d = self.dialect
        if copy.after is None and copy.done == 0:
            copies.started(copy, int(run(d.count_sql(schema, table))[0][0]))
        rows = run(d.chunk_sql(schema, table, copy.after, self.chunk_rows))
        self._chunked = True
        if isinstance(d, PostgresDialect) and run(d.rewritten_sql(table))[0][0]:
            log.warning("table_copy_chunk_deferred", table=table, reason="table rewritten")
            return  # the next batch's snapshot sees the rewritten table
        target = copies.target(copy)
        decode = dec.decode
        pos = position()
        for r in rows:
            yield Change(target, "I", decode(loads(r[0])), None, pos)
        after = d.key_after(tuple(rows[-1][1:])) if rows else copy.after
        if copies.chunk_applied(txn, copy, after, len(rows), len(rows) < self.chunk_rows, pos):
            self._frozen.discard(table)  # the copy with the new key took the mirror's place

    def _keyless(
        self, table: str, dec: RowDecoder, key: dict[str, Any] | None, txn: ApplyTxn
    ) -> None:
        """A change logged without (all of) its key, old or new: a key column was renamed or
        dropped in the ERP, and the trigger (until `triggers install`) could not read it.
        Which row went is unknown here, so the table is copied again online — from the start,
        since a copy under way may already hold that row; a copy not begun yet covers it."""
        copy = next((c for c in self._copies.queue if c.table == table), None)
        if copy is not None and copy.after is None and not copy.done:
            return
        log.warning(
            "change_without_key",
            table=table,
            missing=[k for k in dec.schema.key if key is None or k not in key],
            hint="the table is copied again online; staging equals the source when it is done",
        )
        self.recopy(table, txn)

    def to_change(self, e: Entry, txn: ApplyTxn) -> Change | None:
        cid, table, op, row, old, _at = e
        dec = self.decoders.get(table)
        if dec is None:
            return None  # a table no longer watched: its entries are dropped with cleanup
        pos = str(cid)
        # Positional arguments: this runs once per change of every trigger batch.
        if op == "T":
            return Change(table, "T", None, None, pos)
        key = dec.decode(loads(old)) if old else None
        if (key is None and op == "D") or (key is not None and len(key) < len(dec.schema.key)):
            self._keyless(table, dec, key, txn)
            return None
        if op == "D":
            return Change(table, "D", None, key, pos)
        image = loads(row)
        if dec.new_shape(image):  # a row image with other columns: the table may have changed
            dec = self.refresh_schema(table, txn)
            dec.new_shape(image)
            if not dec.knows(image):  # dropped again meanwhile: keep what the mirror knows
                image = {k: v for k, v in image.items() if k in dec.decoders}
        for k in dec.schema.key:
            if k not in image:  # logged while a key column was gone (see _keyless)
                self._keyless(table, dec, key, txn)
                return None
        return Change(table, "U" if op == "U" else "I", dec.decode(image), key, pos)

    def batch_changes(
        self,
        entries: Iterable[Entry],
        seen: _Seen,
        chunk: Callable[[ApplyTxn], Iterator[Change]] | None = None,
    ) -> Callable[[ApplyTxn], Iterator[Change]]:
        """Entries in the order given as changes for :meth:`ApplyPipeline.deliver`; ``seen``
        notes the last id and change time as they stream past. While tables are copied, a
        change of one also goes to its shadow, and ``chunk(txn)`` (the copy's next chunk, read
        after the entries) follows them."""

        def changes(txn: ApplyTxn) -> Iterator[Change]:
            self._chunked = False
            if self._retyped:
                self._follow_retyped(txn)
            if self._copies.requests:
                self._copies.take_requests(txn, {t: d.schema for t, d in self.decoders.items()})
            to_change = self.to_change
            copies = self._copies
            e: Entry | None = None
            frozen = self._frozen
            for e in entries:
                ch = to_change(e, txn)
                if ch is not None:
                    if not frozen or ch.table not in frozen:
                        yield ch
                    if copies.shadows:
                        shadow = copies.shadow_change(ch)
                        if shadow is not None:
                            yield shadow
            if e is not None:  # the pipeline asks where the batch ends once it is exhausted
                seen.last = e[0]
                seen.latest = e[5]
            if chunk is not None and copies.queue:
                yield from chunk(txn)

        return changes

    def copy_changes(
        self, rows_of: Callable[[str], Iterable[str]], seen: _Seen
    ) -> Callable[[ApplyTxn], Iterator[Change]]:
        """The initial copy of every watched table as changes (``rows_of(table)`` yields JSON
        texts); ``seen.copied`` counts the rows."""

        def changes(txn: ApplyTxn) -> Iterator[Change]:
            for table in self.tables:
                dec = self.decoders[table]
                yield Change(table, "T", position="0")  # start from empty mirrors
                for text in rows_of(table):
                    if self.stop_event.is_set():
                        raise FatalError(
                            "stopped during the initial copy; it restarts on next start"
                        )
                    yield Change(table, "I", values=dec.decode(loads(text)), position="0")
                    seen.copied += 1

        return changes

    def reached(
        self, position: int | str, extra: dict[str, Any], latest: Any, confirm: Callable[[], None]
    ) -> Reached:
        """Where a batch ends: its checkpoint, the commit's arguments, and the reader's confirm
        (the position becomes the committed one; the changelog entries it covers are deleted)."""
        chunked = self._chunked

        def confirmed() -> None:
            confirm()
            if chunked:
                # The fault suite stops the process here: a chunk and the copy's progress are
                # committed; a restart must go on after this chunk.
                failpoint("triggers.copy_chunk")

        return Reached(
            self.checkpoint(position, extra),
            {"slot": self.capture.changelog_table, "source_commit_at": _as_utc(latest)},
            confirmed,
        )

    def checkpoint(self, position: int | str, extra: dict[str, Any]) -> Checkpoint:
        return Checkpoint(
            self.name,
            str(position),
            "streaming",
            {
                "mode": "triggers",
                "tables": sorted(self.tables),
                "specs": {t: self.dialect.spec(t) for t in self.tables},
                "copying": self._copies.to_json(),
                **extra,
            },
        )


class _Seen:
    """What a batch's entries showed while they streamed into staging."""

    __slots__ = ("copied", "last", "latest")

    def __init__(self) -> None:
        self.last = 0  # the last changelog id
        self.latest: Any = None  # the time of the last change
        self.copied = 0  # rows of the initial copy


def _as_utc(v: Any) -> dt.datetime | None:
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=dt.UTC)
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            d = dt.datetime.fromisoformat(v)
            return d if d.tzinfo else d.replace(tzinfo=dt.UTC)
        return None
    return dt.datetime.fromtimestamp(float(v), dt.UTC)


def _seconds(row: Any) -> float:
    """A lag query's answer: the seconds in its first column, 0.0 when nothing is waiting."""
    return float(row[0]) if row and row[0] is not None else 0.0


def _delete_in_rounds(delete_batch: Callable[[], int], batch: int) -> tuple[int, bool]:
    """Run a DELETE of at most ``batch`` rows up to 10 times (bounded per cycle; the rest goes
    next cycle). Returns the rows deleted and whether a round deleted fewer than ``batch`` (all
    deleted)."""
    total = 0
    for _ in range(10):
        n = delete_batch()
        total += n
        if n < batch:
            return total, True
    return total, False


def _close_quietly(*conns: Any) -> None:
    """Close the connections that are open, ignoring errors (the connection may be gone)."""
    for c in conns:
        if c is not None:
            with contextlib.suppress(Exception):
                c.close()


class _Reader:
    """How one dialect finds the committed, unapplied changelog entries."""

    def __init__(self, src: TriggerSource) -> None:
        self.src = src
        self.cap = src.capture

    def initial_copy(self) -> None:
        raise NotImplementedError

    def resume(self, cp: Checkpoint) -> None:
        raise NotImplementedError

    def read_batch(self) -> int:
        raise NotImplementedError

    def read_batch_and_cleanup(self) -> int:
        """Read and apply a batch, then delete what the last staging commit covers (a no-op
        when nothing was committed since the last cleanup)."""
        n = self.read_batch()
        self.cleanup()
        return n

    def cleanup(self) -> int:
        return 0

    def lag_seconds(self) -> float | None:
        return None

    def open_doorbell(self) -> None:
        pass

    def wait(self, seconds: float, stop: threading.Event) -> None:
        stop.wait(seconds)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
class _PgReader(_Reader):
    """PgQ-style batches: transactions visible in this snapshot and not in the previous one."""

    BATCH_SQL = (
        "SELECT id, tbl, op::text, row_data::text, old_key::text, at FROM {cl} "
        "WHERE txid >= pg_snapshot_xmin(%(prev)s::pg_snapshot) "
        "AND txid < pg_snapshot_xmax(%(cur)s::pg_snapshot) "
        "AND NOT pg_visible_in_snapshot(txid, %(prev)s::pg_snapshot) "
        "AND pg_visible_in_snapshot(txid, %(cur)s::pg_snapshot) "
        "ORDER BY id"
    )

    def __init__(self, src: TriggerSource, d: PostgresDialect) -> None:
        super().__init__(src)
        self.d = d
        self.prev = ""  # the previous snapshot (in memory; may run ahead over empty batches)
        self.committed = ""  # the snapshot in the last staging commit (cleanup bound)
        self.last_id = 0
        self._read: psycopg.Connection[Any] | None = None
        self._aux: psycopg.Connection[Any] | None = None
        self._listen: psycopg.Connection[Any] | None = None
        self._cleaned = ""

    def _reader(self) -> psycopg.Connection[Any]:
        if self._read is None or self._read.closed:
            conn = self.d.connect("capture", autocommit=False)
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            self._read = conn
        return self._read

    def aux(self) -> psycopg.Connection[Any]:
        if self._aux is None or self._aux.closed:
            self._aux = self.d.connect("capture-cleanup", autocommit=True)
        return self._aux

    def initial_copy(self) -> None:
        conn = self._reader()
        src = self.src
        snap = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
        assert snap is not None
        t0 = time.monotonic()
        seen = _Seen()

        def rows_of(table: str) -> Iterator[str]:
            schema = src.decoders[table].schema
            with conn.cursor(name="sync_initial_copy") as cur:
                cur.itersize = self.cap.batch_size
                cur.execute(self.d.copy_sql(schema, table))
                for (text,) in cur:
                    yield text
            # A rewrite fires no row triggers: rows the snapshot could not see would be missing
            # for good, so nothing of this copy is committed (see PostgresDialect.rewritten_sql).
            row = conn.execute(self.d.rewritten_sql(table)).fetchone()
            if row is not None and row[0]:
                raise RetryableError(
                    f"{table} was rewritten (ALTER TABLE ... TYPE, TRUNCATE) after the initial "
                    "copy's snapshot was taken; the copy starts again"
                )

        def reached() -> Reached:
            row = conn.execute(
                f"SELECT coalesce(max(id), 0) FROM {self.d.cl} "
                "WHERE pg_visible_in_snapshot(txid, %s::pg_snapshot)",
                (snap[0],),
            ).fetchone()
            seen.last = int(row[0]) if row else 0
            return src.reached(seen.last, {"snapshot": snap[0]}, None, confirm)

        def confirm() -> None:
            self.prev = self.committed = snap[0]
            self.last_id = seen.last

        try:
            src.pipeline.deliver(src.copy_changes(rows_of, seen), reached)
        finally:
            conn.rollback()
        log.info(
            "initial_copy_done",
            source=src.name,
            rows=seen.copied,
            snapshot=snap[0],
            seconds=round(time.monotonic() - t0, 2),
        )

    def resume(self, cp: Checkpoint) -> None:
        snap = cp.extra.get("snapshot")
        if not snap:
            raise FatalError(f"checkpoint of {cp.source} has no snapshot; resync")
        self.prev = self.committed = str(snap)
        self.last_id = int(cp.position or 0)

    def read_batch(self) -> int:
        conn = self._reader()
        src = self.src
        copying = src.copying
        try:
            row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
            assert row is not None
            cur_snap: str = row[0]
            if cur_snap == self.prev and not copying:
                return 0
            with conn.cursor(name="sync_changelog_batch") as cur:
                cur.itersize = max(1000, min(self.cap.batch_size, 20000))
                cur.execute(
                    self.BATCH_SQL.format(cl=self.d.cl), {"prev": self.prev, "cur": cur_snap}
                )
                first = cur.fetchmany(1)
                if not first and not copying:
                    self.prev = cur_snap  # nothing committed in between: nothing to persist
                    return 0
                rest = _prefetched(lambda: cur.fetchmany(cur.itersize)) if first else None
                seen = _Seen()

                def reached() -> Reached:
                    last_id = max(self.last_id, seen.last)
                    return src.reached(last_id, {"snapshot": cur_snap}, seen.latest, confirm)

                def confirm() -> None:
                    self.last_id = max(self.last_id, seen.last)
                    self.prev = self.committed = cur_snap

                def chunk(txn: ApplyTxn) -> Iterator[Change]:
                    # Same REPEATABLE READ transaction: the snapshot the batch was read in.
                    return src.chunk_changes(
                        txn,
                        lambda q: conn.execute(q).fetchall(),
                        lambda: str(max(self.last_id, seen.last)),
                    )

                try:
                    n = src.pipeline.deliver(
                        src.batch_changes(_chain(first, rest or ()), seen, chunk), reached
                    )
                finally:
                    if rest is not None:
                        rest.close()  # the prefetching thread has ended: the rollback is ours
            log.debug("trigger_batch", source=src.name, changes=n, last_id=seen.last)
            return n
        finally:
            if not conn.closed:
                conn.rollback()

    def cleanup(self) -> int:
        if not self.committed or self.committed == self._cleaned:
            return 0
        conn = self.aux()
        sql = (
            f"DELETE FROM {self.d.cl} WHERE id = ANY(ARRAY("
            f"SELECT id FROM {self.d.cl} WHERE txid < pg_snapshot_xmax(%(s)s::pg_snapshot) "
            "AND pg_visible_in_snapshot(txid, %(s)s::pg_snapshot) LIMIT %(n)s))"
        )
        total, done = _delete_in_rounds(
            lambda: conn.execute(sql, {"s": self.committed, "n": self.cap.cleanup_batch}).rowcount,
            self.cap.cleanup_batch,
        )
        if done:
            self._cleaned = self.committed
        return total

    def lag_seconds(self) -> float | None:
        row = (
            self.aux()
            .execute(
                f"SELECT extract(epoch FROM clock_timestamp() - min(at))::float8 FROM {self.d.cl} "
                "WHERE txid >= pg_snapshot_xmin(%(s)s::pg_snapshot) "
                "AND NOT pg_visible_in_snapshot(txid, %(s)s::pg_snapshot)",
                {"s": self.committed},
            )
            .fetchone()
        )
        return _seconds(row)

    def open_doorbell(self) -> None:
        if not self.cap.notify:
            return
        conn = self.d.connect("capture-listen", autocommit=True)
        conn.execute(f"LISTEN {self.d.q(self.cap.changelog_table)}")
        self._listen = conn

    def wait(self, seconds: float, stop: threading.Event) -> None:
        if self._listen is None:
            stop.wait(seconds)
            return
        # The doorbell only shortens the wait; polling stays the fallback (a lost notification
        # costs at most poll_interval). Waited in slices, so a stop (SIGTERM) is noticed within
        # a fifth of a second, not after a whole poll_interval.
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            rang = False
            for _ in self._listen.notifies(timeout=min(left, 0.2), stop_after=1):
                rang = True
            if rang:
                break
        for _ in self._listen.notifies(timeout=0.0):
            pass

    def close(self) -> None:
        _close_quietly(self._read, self._aux, self._listen)
        self._read = self._aux = self._listen = None


def _chain(first: list[Any], rest: Iterable[Any]) -> Iterator[Entry]:
    yield from first
    yield from rest


def _prefetched(fetch: Callable[[], list[Any]]) -> Generator[Any, None, None]:
    """The rows of ``fetch()`` (called until it returns none), fetched one round ahead by a
    thread while the caller applies the round before.

    The server takes a while to produce each round of a large batch (snapshot visibility
    checks, JSON text); waiting for it with the staging writes stopped left both sides idle in
    turn. At most two rounds wait in memory. If the caller stops early (an error while
    applying), the thread finishes its round and ends before this generator closes, so the
    connection is free again for the caller's rollback.
    """
    rounds: queue.Queue[list[Any] | BaseException] = queue.Queue(maxsize=1)
    done = threading.Event()

    def work() -> None:
        try:
            while not done.is_set():
                rows = fetch()
                rounds.put(rows)
                if not rows:
                    return
        except BaseException as exc:  # handed to the caller's thread
            rounds.put(exc)

    worker = threading.Thread(target=work, name="changelog-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            got = rounds.get()
            if isinstance(got, BaseException):
                raise got
            if not got:
                return
            yield from got
    finally:
        done.set()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                rounds.get(timeout=0.05)  # unblock a worker waiting to hand over a round
        worker.join()


# ---------------------------------------------------------------------------------------------
class _MysqlReader(_Reader):
    """Read everything committed, apply, commit with the id set, then delete exactly that set."""

    def __init__(self, src: TriggerSource, d: MysqlDialect) -> None:
        super().__init__(src)
        self.d = d
        self.pending_delete: list[list[int]] = []
        self.last_id = 0
        self._conn: Any = None

    def conn(self) -> Any:
        if self._conn is None or not self._conn.open:
            self._conn = self.d.connect("capture", autocommit=True)
        return self._conn

    def _stream(self, sql: str, conn: Any | None = None) -> Iterator[Any]:
        c = conn or self.conn()
        cur = c.cursor(pymysql.cursors.SSCursor)
        try:
            cur.execute(sql)
            while True:
                rows = cur.fetchmany(5000)
                if not rows:
                    break
                yield from rows
        finally:
            cur.close()

    def initial_copy(self) -> None:
        src = self.src
        conn = self.d.connect("capture-copy", autocommit=False)
        t0 = time.monotonic()
        try:
            with conn.cursor() as c:
                c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                c.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            ids = _RangeBuilder()
            for (i,) in self._stream(f"SELECT id FROM {self.d.cl} ORDER BY id", conn):
                ids.add(int(i))
            last = ids.ranges[-1][1] if ids.ranges else 0
            seen = _Seen()

            def rows_of(table: str) -> Iterator[str]:
                schema = src.decoders[table].schema
                for (text,) in self._stream(self.d.copy_sql(schema, table), conn):
                    yield text

            def confirm() -> None:
                self.pending_delete = ids.ranges
                self.last_id = last

            src.pipeline.deliver(
                src.copy_changes(rows_of, seen),
                lambda: src.reached(last, {"applied": ids.ranges}, None, confirm),
            )
            conn.rollback()
        finally:
            conn.close()
        log.info(
            "initial_copy_done",
            source=src.name,
            rows=seen.copied,
            seconds=round(time.monotonic() - t0, 2),
        )
        self.cleanup()

    def resume(self, cp: Checkpoint) -> None:
        self.pending_delete = [list(r) for r in cp.extra.get("applied", [])]
        self.last_id = int(cp.position or 0)

    def read_batch(self) -> int:
        if self.pending_delete:
            self.cleanup()  # a crash (or error) after the last staging commit left them
        src = self.src
        if not src.copying:
            return self._read(None)
        # A table copy reads its chunk after the changelog in one consistent snapshot (the
        # trigger writes its changelog row in the ERP's own transaction: both are seen together).
        conn = self.conn()
        with conn.cursor() as c:
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            c.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        try:
            return self._read(conn)
        finally:
            with contextlib.suppress(Exception):
                conn.rollback()

    def _read(self, snapshot: Any) -> int:
        """One batch; ``snapshot``: the connection whose consistent-snapshot transaction also
        reads the copy's chunk (``None``: no copy, one READ COMMITTED statement)."""
        src = self.src
        rows = self._stream(
            f"SELECT id, tbl, op, row_data, old_key, UNIX_TIMESTAMP(at) FROM {self.d.cl} "
            "ORDER BY id"
        )
        first = next(rows, None)
        if first is None and snapshot is None:
            return 0
        applied = _RangeBuilder()
        seen = _Seen()

        def entries() -> Iterator[Entry]:
            if first is None:
                return
            for e in _chain([first], rows):
                applied.add(int(e[0]))
                yield (int(e[0]), e[1], e[2], e[3], e[4], e[5])

        def reached() -> Reached:
            last_id = max(self.last_id, seen.last)
            return src.reached(last_id, {"applied": applied.ranges}, seen.latest, confirm)

        def confirm() -> None:
            self.last_id = max(self.last_id, seen.last)
            self.pending_delete = applied.ranges

        def run(q: str) -> list[Any]:
            with snapshot.cursor() as c:
                c.execute(q)
                return list(c.fetchall())

        def chunk(txn: ApplyTxn) -> Iterator[Change]:
            return src.chunk_changes(txn, run, lambda: str(max(self.last_id, seen.last)))

        n = src.pipeline.deliver(
            src.batch_changes(entries(), seen, chunk if snapshot is not None else None), reached
        )
        log.debug("trigger_batch", source=src.name, changes=n, last_id=seen.last)
        return n

    def cleanup(self) -> int:
        """Delete the id set of the last staging commit, about ``cleanup_batch`` ids per statement.

        InnoDB locks every record a DELETE scans, also in READ COMMITTED, and waits when that
        record belongs to a writer's open transaction. A closed range ``id BETWEEN lo AND hi``
        reads the record after ``hi`` (possibly such an uncommitted entry), and a long ``IN``
        list becomes a table scan. So each applied range ``[lo, hi]`` is deleted as the
        half-open range ``lo <= id < hi`` — its scan stops at ``hi``, an entry we read, hence
        committed — plus the point ``id = hi``.
        """
        if not self.pending_delete:
            return 0
        step = self.cap.cleanup_batch
        total = 0
        conn = self.conn()
        preds: list[str] = []
        points: list[int] = []
        span = 0

        def flush() -> None:
            nonlocal total, span
            with conn.cursor() as c:
                if preds:
                    total += c.execute(f"DELETE FROM {self.d.cl} WHERE " + " OR ".join(preds))
                if points:
                    total += (
                        c.executemany(
                            f"DELETE FROM {self.d.cl} WHERE id = %s", [(p,) for p in points]
                        )
                        or 0
                    )
            preds.clear()
            points.clear()
            span = 0

        for lo, hi in self.pending_delete:
            a = int(lo)
            while a <= int(hi):
                b = min(int(hi), a + step - 1)
                if b > a:
                    preds.append(f"(id >= {a} AND id < {b})")
                points.append(b)
                span += b - a + 1
                if span >= step or len(preds) >= 500:
                    flush()
                a = b + 1
        flush()
        self.pending_delete = []
        return total

    def lag_seconds(self) -> float | None:
        with self.conn().cursor() as c:
            c.execute(
                "SELECT UNIX_TIMESTAMP(CURRENT_TIMESTAMP(6)) - UNIX_TIMESTAMP(MIN(at)) "
                f"FROM {self.d.cl}"
            )
            row = c.fetchone()
        return _seconds(row)

    def close(self) -> None:
        _close_quietly(self._conn)
        self._conn = None


# ---------------------------------------------------------------------------------------------
class _SqliteReader(_Reader):
    """An id cursor: SQLite draws AUTOINCREMENT ids in commit order (one writer at a time)."""

    def __init__(self, src: TriggerSource, d: SqliteDialect) -> None:
        super().__init__(src)
        self.d = d
        self.last_id = 0
        self.committed_id = 0
        self._cleaned = 0
        self._conn: sqlite3.Connection | None = None

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self.d.connect("capture")
        return self._conn

    def initial_copy(self) -> None:
        src = self.src
        conn = self.conn()
        t0 = time.monotonic()
        conn.execute("BEGIN")
        seen = _Seen()
        try:
            row = conn.execute(f"SELECT coalesce(max(id), 0) FROM {self.d.cl}").fetchone()
            last = int(row[0]) if row else 0

            def rows_of(table: str) -> Iterator[str]:
                schema = src.decoders[table].schema
                for (text,) in conn.execute(self.d.copy_sql(schema, table)):
                    yield text

            def confirm() -> None:
                self.last_id = self.committed_id = last

            src.pipeline.deliver(
                src.copy_changes(rows_of, seen), lambda: src.reached(last, {}, None, confirm)
            )
        finally:
            conn.execute("ROLLBACK")
        log.info(
            "initial_copy_done",
            source=src.name,
            rows=seen.copied,
            seconds=round(time.monotonic() - t0, 2),
        )

    def resume(self, cp: Checkpoint) -> None:
        self.last_id = self.committed_id = int(cp.position or 0)

    def read_batch(self) -> int:
        src = self.src
        conn = self.conn()
        copying = src.copying
        conn.execute("BEGIN")
        try:
            cur = conn.execute(
                f"SELECT id, tbl, op, row_data, old_key, at FROM {self.d.cl} WHERE id > ? "
                "ORDER BY id",
                (self.last_id,),
            )
            first = cur.fetchmany(1)
            if not first and not copying:
                return 0
            seen = _Seen()

            def confirm() -> None:
                self.last_id = self.committed_id = max(self.last_id, seen.last)

            def chunk(txn: ApplyTxn) -> Iterator[Change]:
                # The same read transaction: the chunk sees what the entries lead to.
                return src.chunk_changes(
                    txn,
                    lambda q: conn.execute(q).fetchall(),
                    lambda: str(max(self.last_id, seen.last)),
                )

            n = src.pipeline.deliver(
                src.batch_changes(_chain(first, cur), seen, chunk),
                lambda: src.reached(max(self.last_id, seen.last), {}, seen.latest, confirm),
            )
        finally:
            conn.execute("ROLLBACK")
        log.debug("trigger_batch", source=src.name, changes=n, last_id=seen.last)
        return n

    def cleanup(self) -> int:
        if self.committed_id <= self._cleaned:
            return 0
        conn = self.conn()
        total, done = _delete_in_rounds(
            lambda: (
                conn.execute(
                    f"DELETE FROM {self.d.cl} WHERE id IN (SELECT id FROM {self.d.cl} "
                    "WHERE id <= ? ORDER BY id LIMIT ?)",
                    (self.committed_id, self.cap.cleanup_batch),
                ).rowcount
            ),
            self.cap.cleanup_batch,
        )
        if done:
            self._cleaned = self.committed_id
        return total

    def lag_seconds(self) -> float | None:
        row = (
            self.conn()
            .execute(
                f"SELECT (julianday('now') - julianday(min(at))) * 86400.0 FROM {self.d.cl} "
                "WHERE id > ?",
                (self.committed_id,),
            )
            .fetchone()
        )
        return _seconds(row)

    def close(self) -> None:
        _close_quietly(self._conn)
        self._conn = None
