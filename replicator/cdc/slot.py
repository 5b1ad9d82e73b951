"""The replication slot that logical capture streams from, and the ERP sessions that guard it.

Owned here: whether the ERP can serve logical capture at all (``wal_level``); the per-slot
advisory lock that keeps a second daemon off the slot; finding the slot and deciding at start
whether this process may stream from it (the slot handover: a copy that did not finish, a slot
lost or invalidated, a slot another process streams); creating it with an exported snapshot and
dropping it; opening the pgoutput stream from a position. The slot's SQL and the replication
protocol commands are written only here.

What is done with the exported snapshot is :mod:`replicator.cdc.initial_copy`'s; what is done
with the stream (decode, apply, confirm) is :class:`replicator.cdc.logical.LogicalSource`'s.
This module holds no connection between calls: the caller owns the connections it is given.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import structlog
from psycopg import pq, sql

from replicator.changes import Checkpoint
from replicator.config.core import ErpSection
from replicator.db import PG_KEEPALIVES, app_name, pg_connect
from replicator.errors import DaemonAlreadyRunning, FatalError, RetryableError, SlotMissingError
from replicator.errors_map import replication_start_error

log = structlog.get_logger(__name__, service="capture")


class ExportedSnapshot:
    """A slot just created and the snapshot it exported, named for ``SET TRANSACTION SNAPSHOT``.

    The snapshot lives only while the walsender that exported it is open: :meth:`release` it
    once another session has imported the snapshot, so the walsender is not held for the whole
    copy.
    """

    def __init__(self, repl: psycopg.Connection[Any], consistent_point: str, name: str) -> None:
        self._repl = repl
        self.consistent_point = consistent_point
        self.name = name

    def release(self) -> None:
        self._repl.close()


class ReplicationSlot:
    """One logical replication slot (pgoutput) on the ERP, and the lock that makes it ours."""

    def __init__(self, erp: ErpSection, name: str) -> None:
        self.erp = erp
        self.name = name
        self._lock_key = f"sync-daemon:{name}"

    def connect(self) -> psycopg.Connection[Any]:
        """The regular connection capture keeps (lock, heartbeat, catalog queries): the server
        is checked for ``wal_level = logical`` and the slot's advisory lock is taken on it."""
        conn = pg_connect(
            self.erp.url, "capture", autocommit=True, connect_timeout=self.erp.connect_timeout
        )
        try:
            self._check_and_lock(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_and_lock(self, conn: psycopg.Connection[Any]) -> None:
        (wal_level,) = conn.execute("SHOW wal_level").fetchone() or ("",)
        if wal_level != "logical":
            raise FatalError(
                f"the ERP server has wal_level={wal_level}; logical replication needs "
                "wal_level=logical (ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL), "
                'or use capture.mode = "triggers"'
            )
        locked = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s))", (self._lock_key,)
        ).fetchone()
        if not locked or not locked[0]:
            holder = conn.execute(
                "SELECT a.pid, a.application_name, a.client_addr::text FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid AND l.granted "
                "AND l.pid <> pg_backend_pid() LIMIT 1",
                (self._lock_key,),
            ).fetchone()
            who = (
                f" (pid {holder[0]}, {holder[1]}, from {holder[2] or 'local socket'})"
                if holder
                else ""
            )
            raise DaemonAlreadyRunning(
                f"another sync-daemon already captures slot {self.name!r} on this ERP{who}; "
                "only one may capture a slot"
            )

    def unlock(self, conn: psycopg.Connection[Any]) -> None:
        """Release the slot's advisory lock; never raises.

        Released explicitly: a closed socket returns before the server's session ends, and a
        capture started right after would still find the slot's lock held.
        """
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self._lock_key,))

    def row(self, conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
        """The slot's row in ``pg_replication_slots`` (None: no such slot); a slot of another
        output plugin is a FatalError."""
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(
                "SELECT slot_name, plugin, active_pid, confirmed_flush_lsn::text AS confirmed, "
                "wal_status, database FROM pg_replication_slots WHERE slot_name = %s",
                (self.name,),
            )
            row = cur.fetchone()
        if row is not None and row["plugin"] != "pgoutput":
            raise FatalError(f"slot {self.name!r} uses plugin {row['plugin']!r}, not pgoutput")
        return row

    def drop(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (self.name,))

    def take_over(self, conn: psycopg.Connection[Any], checkpoint: Checkpoint | None) -> bool:
        """Decide at start whether the slot and staging's ``checkpoint`` belong together; True
        when an initial copy is due (no slot yet, or the slot of a copy that did not finish,
        which is dropped here: its snapshot is gone).

        A streaming checkpoint whose slot is missing or invalidated raises SlotMissingError: it
        is never recreated silently, since the changes between the loss and now are gone; only
        ``sync-daemon resync`` takes a new snapshot, on purpose.
        """
        slot = self.row(conn)
        if checkpoint is None and slot is None:
            return True
        if checkpoint is not None and checkpoint.state == "snapshot":
            log.warning(
                "snapshot_restarting",
                slot=self.name,
                reason="the previous initial copy did not finish",
            )
            if slot is not None:
                self.drop(conn)
            return True
        if checkpoint is None:
            raise FatalError(
                f"replication slot {self.name!r} exists but the staging store has no checkpoint for "
                f"it (a new or emptied staging store?). Run `sync-daemon resync` to take a new "
                "snapshot, or point staging.url at the store that belongs to this slot."
            )
        if slot is None:
            raise SlotMissingError(
                f"replication slot {self.name!r} is gone (dropped by someone, or lost in a failover). "
                f"Changes made since {checkpoint.position} may be lost, so it is not recreated silently. "
                "Run `sync-daemon resync` to take a new snapshot on purpose."
            )
        if slot["active_pid"] is not None:
            raise DaemonAlreadyRunning(
                f"replication slot {self.name!r} is in use by pid {slot['active_pid']}; "
                "only one consumer may stream a slot"
            )
        if slot["wal_status"] == "lost":
            raise SlotMissingError(
                f"replication slot {self.name!r} was invalidated (wal_status=lost, "
                "max_slot_wal_keep_size exceeded). Run `sync-daemon resync`."
            )
        return False

    @contextlib.contextmanager
    def create_exported(self) -> Iterator[ExportedSnapshot]:
        """Create the slot on a replication connection, exporting a snapshot at its consistent
        point; the walsender is closed on leaving, if it was not released before."""
        repl = self._walsender("snapshot")
        try:
            row = repl.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(
                    sql.Identifier(self.name)
                )
            ).fetchone()
            assert row is not None
            consistent_point, snapshot_name = row[1], row[2]
            log.info("slot_created", slot=self.name, consistent_point=consistent_point)
            yield ExportedSnapshot(repl, consistent_point, snapshot_name)
        finally:
            repl.close()

    def start_stream(self, lsn: str, publication: str) -> psycopg.Connection[Any]:
        """A replication connection in COPY_BOTH, streaming pgoutput from ``lsn`` for
        ``publication`` (logical messages included: heartbeats and snapshot watermarks)."""
        repl = self._walsender("capture", options="-c timezone=UTC -c datestyle=ISO")
        try:
            self._start_replication(repl, lsn, publication)
        except BaseException:
            repl.close()
            raise
        return repl

    def _walsender(self, role: str, **kwargs: Any) -> psycopg.Connection[Any]:
        """A replication connection (``replication=database``: a walsender) to the ERP."""
        return psycopg.connect(
            self.erp.url,
            replication="database",
            autocommit=True,
            application_name=app_name(role),
            connect_timeout=int(self.erp.connect_timeout),
            **PG_KEEPALIVES,
            **kwargs,
        )

    def _start_replication(self, repl: psycopg.Connection[Any], lsn: str, publication: str) -> None:
        pgconn = repl.pgconn
        command = (
            f"START_REPLICATION SLOT {sql.Identifier(self.name).as_string(repl)} LOGICAL "
            f"{lsn} (proto_version '1', publication_names "
            f"{sql.Literal(publication).as_string(repl)}, messages 'true')"
        )
        pgconn.send_query(command.encode())
        deadline = time.monotonic() + self.erp.connect_timeout
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
            raise replication_start_error(self.name, code.decode() if code else None, msg)
        pgconn.nonblocking = 1
