"""The staging store: one staging database, its system tables, and the way in for its users.

Any SQLAlchemy URL; SQLite (a file under the state directory) by default, PostgreSQL supported.
:class:`StagingStore` is a facade: it opens the database (:mod:`~replicator.staging.engine`),
creates the system tables (:mod:`~replicator.staging.schema`) and hands out the parts that own
them — :attr:`~StagingStore.catalog` (mirrors), :attr:`~StagingStore.mirror_rows` (reading
them), :attr:`~StagingStore.journal` (change journal and cursors), :attr:`~StagingStore.state`
(checkpoints, services, liveness) — and apply transactions (:mod:`~replicator.staging.apply`). Its own methods keep the names capture, the
daemon and the CLI call, and pass through.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.changes import Checkpoint, TableSchema
from replicator.config.core import redact_url
from replicator.db import connect_error, one_line
from replicator.errors import AccessError, SyncError
from replicator.staging import lag, schema
from replicator.staging.apply import ApplyTxn
from replicator.staging.engine import StagingDb, shared_engine
from replicator.staging.journal import Journal, JournalReader
from replicator.staging.mirrors import MirrorInfo, Mirrors
from replicator.staging.rows import MirrorRows
from replicator.staging.state import SourceState

log = structlog.get_logger(__name__)


class StagingStore:
    """Mirror tables + change journal + checkpoints in one SQLAlchemy database."""

    def __init__(self, url: str, *, journal: bool = True, role: str = "staging") -> None:
        self.url = url
        self.engine = shared_engine(url, role)
        self.db = StagingDb(self.engine, url)
        self.dialect = self.db.dialect
        self.catalog = Mirrors(self.db)
        self.mirror_rows = MirrorRows(self.catalog)
        self.journal = Journal(self.db, enabled=journal)
        self.state = SourceState(self.db)
        self._ready = False
        self._checkpointer: tuple[threading.Event, threading.Thread] | None = None

    @property
    def journal_enabled(self) -> bool:
        return self.journal.enabled

    # ------------------------------------------------------------------ set-up
    def q(self, ident: str) -> str:
        """Quote an identifier for the staging dialect."""
        return self.db.q(ident)

    def to_storage(self, v: Any) -> Any:
        """A value for a system-table column (PostgreSQL takes Python values as they are)."""
        return self.db.to_storage(v)

    def setup(self) -> None:
        """Create the system tables and the ``replication_status`` view (idempotent)."""
        if self._ready:
            return
        self.check_open()  # opening first: its error names the store; the DDL's would not
        with self.engine.begin() as conn:
            for stmt in schema.system_ddl(self.dialect):
                conn.exec_driver_sql(stmt)
            self.journal.upgrade(conn)
            conn.exec_driver_sql(schema.replication_status_view(self.dialect))
        self.catalog.load()
        self._ready = True

    def check_open(self) -> None:
        """Open the store once, creating nothing in it (the read model's :meth:`setup`): a
        store that cannot be opened raises the error that names where it is."""
        self._private_sqlite_file()
        try:
            self.engine.connect().close()
        except sa.exc.DBAPIError as exc:
            raise self._open_error(exc) from None

    def _private_sqlite_file(self) -> None:
        """The staging file holds customer payloads: owner-only (0600), whatever the umask.
        SQLite gives its -wal and -shm files the database file's permissions."""
        if self.db.dialect != "sqlite":
            return
        path = sa.engine.make_url(self.url).database
        if not path or path == ":memory:" or path.startswith("file:"):
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return  # the connect below fails and names the path
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError as exc:  # someone else's file: say so, the store still works
            log.warning("staging_file_not_private", path=path, error=str(exc))
        finally:
            os.close(fd)

    def _open_error(self, exc: sa.exc.DBAPIError) -> SyncError:
        """The one-line error for a staging store that cannot be opened, naming where it is."""
        if self.db.dialect == "sqlite":
            path = sa.engine.make_url(self.url).database or ":memory:"
            return AccessError(
                f"staging store {path}: cannot open it ({one_line(exc.orig or exc)}): the folder must "
                "exist and be writable by this user (staging.url, or daemon.state_dir)"
            )
        return connect_error(
            "cannot reach the staging store", redact_url(self.url), exc.orig or exc
        )

    # ------------------------------------------------------------------ mirrors
    mirror_name = staticmethod(Mirrors.mirror_name)
    shadow_of = staticmethod(Mirrors.shadow_of)

    def mirror(self, table: str) -> MirrorInfo | None:
        return self.catalog.get(table)

    def mirrors(self) -> list[MirrorInfo]:
        return self.catalog.all()

    def refresh_mirrors(self) -> None:
        """Re-read the mirror definitions (another process may have added tables or columns)."""
        self.setup()
        self.catalog.refresh()

    def ensure_mirror(self, schema: TableSchema, conn: sa.Connection | None = None) -> MirrorInfo:
        """See :meth:`Mirrors.ensure_mirror`."""
        return self.catalog.ensure_mirror(schema, conn)

    def alter_mirror(
        self,
        conn: sa.Connection,
        schema: TableSchema,
        *,
        renamed: dict[str, str],
        dropped: Sequence[str],
        retyped: Sequence[str],
    ) -> MirrorInfo:
        """See :meth:`Mirrors.alter_mirror`."""
        return self.catalog.alter_mirror(
            conn, schema, renamed=renamed, dropped=dropped, retyped=retyped
        )

    def backfill_column(self, conn: sa.Connection, table: str, column: str, value: Any) -> None:
        self.catalog.backfill_column(conn, table, column, value)

    def ensure_shadow(
        self, schema: TableSchema, *, fresh: bool, conn: sa.Connection | None = None
    ) -> MirrorInfo:
        """See :meth:`Mirrors.ensure_shadow`."""
        self.setup()
        return self.catalog.ensure_shadow(schema, fresh=fresh, conn=conn)

    def swap_shadow(self, conn: sa.Connection, table: str) -> None:
        self.catalog.swap_shadow(conn, table)

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """All rows of a mirror, ordered by key (tests and the fault suite compare with the source)."""
        return self.mirror_rows.rows(table)

    def rows_by_key(self, table: str, keys: Sequence[Sequence[Any]]) -> dict[str, dict[str, Any]]:
        return self.mirror_rows.rows_by_key(table, keys)

    def checksum(self, table: str) -> tuple[int, str]:
        return self.mirror_rows.checksum(table)

    # ------------------------------------------------------------------ checkpoints and state
    def load_checkpoint(self, source: str) -> Checkpoint | None:
        self.setup()
        return self.state.load_checkpoint(source)

    def write_checkpoint(
        self,
        conn: sa.Connection,
        cp: Checkpoint,
        *,
        slot: str | None = None,
        changes: int = 0,
        source_commit_at: dt.datetime | None = None,
        replicated: bool = True,
    ) -> None:
        """Upsert the checkpoint row inside the caller's transaction."""
        self.state.write_checkpoint(
            conn,
            cp,
            slot=slot,
            changes=changes,
            source_commit_at=source_commit_at,
            replicated=replicated,
        )

    def record_heartbeat(
        self,
        source: str,
        *,
        sent_at: dt.datetime,
        lag_seconds: float | None,
        lag_bytes: int | None = None,
        server_position: str | None = None,
        conn: sa.Connection | None = None,
    ) -> None:
        """Record that a heartbeat came through the stream (or was written, in trigger mode)."""
        self.state.record_heartbeat(
            source,
            sent_at=sent_at,
            lag_seconds=lag_seconds,
            lag_bytes=lag_bytes,
            server_position=server_position,
            conn=conn,
        )

    def save_service(self, st: Any) -> None:
        self.state.save_service(st)

    def mark_alive(self, pid: int, host: str, started_at: dt.datetime, interval: float) -> None:
        self.state.mark_alive(pid, host, started_at, interval)

    def mark_stopped(self, pid: int, host: str, exit_code: int) -> None:
        self.state.mark_stopped(pid, host, exit_code)

    def load_liveness(self) -> dict[str, Any] | None:
        self.setup()
        return self.state.load_liveness()

    def load_services(self) -> list[dict[str, Any]]:
        self.setup()
        return self.state.load_services()

    def replication_status(self) -> list[dict[str, Any]]:
        self.setup()
        return self.state.replication_status()

    def request_recopy(self, source: str, table: str) -> None:
        self.setup()
        self.state.request_recopy(source, table)

    def recopy_requests(self, source: str) -> list[str]:
        self.setup()
        return self.state.recopy_requests(source)

    def take_recopy_request(self, conn: sa.Connection, source: str, table: str) -> None:
        self.state.take_recopy_request(conn, source, table)

    def record_lag_sample(self) -> int:
        """One lag history sample per source, from :meth:`replication_status` (see
        :func:`replicator.staging.lag.record_lag_sample`: never raises for a database problem)."""
        return lag.record_lag_sample(self.engine, self.replication_status())

    # ------------------------------------------------------------------ apply
    @contextmanager
    def transaction(self, source: str = "") -> Iterator[ApplyTxn]:
        """An apply transaction; rolled back unless :meth:`ApplyTxn.commit` was called."""
        self.setup()
        txn = ApplyTxn(self, source)
        try:
            yield txn
        finally:
            txn.close()

    def begin(self, source: str = "", *, spill: bool = False) -> ApplyTxn:
        """An apply transaction; ``spill``: a flush before it is open parks the chunk in a spill
        table (SQLite; see :class:`ApplyTxn`), for a source whose transactions may stay open
        across cycles of the daemon's loop."""
        self.setup()
        return ApplyTxn(self, source, spill=spill)

    def reset_source(self, source: str, tables: Sequence[str]) -> None:
        """Forget a source: empty its mirrors and drop its checkpoint (resync, re-snapshot)."""
        self.setup()
        with self.engine.begin() as conn:
            self.catalog.empty(conn, tables)
            self.state.forget(conn, source)

    # ------------------------------------------------------------------ journal
    def journal_event(
        self, conn: sa.Connection, source: str, table: str, op: str, position: str
    ) -> None:
        """A table-level journal entry (no row key): a truncate, a re-copy or a schema change.
        Consumers treat an entry without a key as "anything in this table may have changed"."""
        self.journal.event(conn, source, table, op, position)

    def journal_reader(self, consumer: str, tables: Sequence[str] = ()) -> JournalReader:
        """A reader of the journal for ``consumer`` (see :class:`JournalReader`)."""
        self.setup()
        return JournalReader(self.journal, consumer, tables)

    def journal_commit(self, consumer: str, journal_id: int) -> None:
        """Move ``consumer``'s cursor (after its work for entries up to ``journal_id`` is done)."""
        self.journal.commit(consumer, journal_id)

    def journal_cursors(self) -> list[str]:
        """The names of the journal's consumers (pushers, the stream sink)."""
        self.setup()
        return self.journal.consumers()

    def journal_backlog(self, consumer: str) -> tuple[int, Any]:
        """How many journal entries wait for ``consumer``, and when the oldest was committed."""
        self.setup()
        return self.journal.backlog(consumer)

    def journal_prune(self, keep_seconds: float) -> int:
        """Delete journal entries every consumer has read and that are older than ``keep_seconds``."""
        return self.journal.prune(keep_seconds)

    # ------------------------------------------------------------------ running
    def start_checkpointer(self, interval: float = 1.0) -> None:
        """SQLite: checkpoint the WAL from a thread of its own (the daemon calls this).

        By default SQLite checkpoints inside the commit that crosses 1000 WAL pages, in the
        committing (capture) thread; after a large source transaction that one commit then
        copies hundreds of megabytes back into the database and every change behind it waits.
        Here the apply path never checkpoints (``wal_autocheckpoint=0`` on its connections) and
        a background thread runs PASSIVE checkpoints, which never block writers or readers.
        """
        if self.db.dialect != "sqlite" or self._checkpointer is not None:
            return
        path = self.engine.url.database
        if not path or path == ":memory:":
            return

        @sa.event.listens_for(self.engine, "connect")
        def _no_autocheckpoint(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")

        self.engine.dispose()  # connections made before now still checkpoint on commit
        stop = threading.Event()

        def run() -> None:
            conn = sqlite3.connect(path, timeout=5, check_same_thread=False)
            try:
                while not stop.wait(interval):
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    except sqlite3.Error as exc:
                        log.warning("wal_checkpoint_failed", error=str(exc))
            finally:
                conn.close()

        thread = threading.Thread(target=run, name="sqlite-checkpoint", daemon=True)
        thread.start()
        self._checkpointer = (stop, thread)

    def dispose(self) -> None:
        if self._checkpointer is not None:
            stop, thread = self._checkpointer
            stop.set()
            thread.join(5)
            self._checkpointer = None
        self.engine.dispose()
