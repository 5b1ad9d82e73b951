"""What staging records about the replication and the daemon, beside the data.

``sync_checkpoints``: where each source stands, written in the same transaction as the changes
it covers (:meth:`SourceState.write_checkpoint`), with the last heartbeat and lag; the
``replication_status`` view shows it. ``sync_recopy_requests``: online re-copies an operator
asked for. ``sync_services``: what each service last did, for ``sync-daemon status`` in another
process. ``sync_daemon``: the daemon's liveness mark.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import sqlalchemy as sa

from replicator.changes import Checkpoint
from replicator.db import reading
from replicator.staging.engine import StagingDb
from replicator.staging.values import to_json


class SourceState:
    """Checkpoints, heartbeats, re-copy requests, service state and liveness."""

    def __init__(self, db: StagingDb) -> None:
        self.db = db

    def forget(self, conn: sa.Connection, source: str) -> None:
        """Drop ``source``'s checkpoint, in ``conn``'s transaction (resync, re-snapshot)."""
        conn.exec_driver_sql(f"DELETE FROM sync_checkpoints WHERE source = {self.db.ph}", (source,))

    # -- checkpoints ------------------------------------------------------------------------------
    def load_checkpoint(self, source: str) -> Checkpoint | None:
        with reading(self.db.engine) as conn:
            row = conn.exec_driver_sql(
                f"SELECT position, state, extra FROM sync_checkpoints WHERE source = {self.db.ph}",
                (source,),
            ).fetchone()
        if row is None:
            return None
        return Checkpoint(source=source, position=row[0], state=row[1], extra=json.loads(row[2]))

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
        now = self.db.now()
        commit_at = self.db.to_storage(source_commit_at) if source_commit_at else None
        p = self.db.ph
        updated = conn.exec_driver_sql(
            f"UPDATE sync_checkpoints SET position = {p}, state = {p}, extra = {p}, "
            f"updated_at = {p}, slot = COALESCE({p}, slot), "
            f"changes_applied = changes_applied + {p}, "
            f"last_replication_at = CASE WHEN {p} THEN {p} ELSE last_replication_at END, "
            f"source_commit_at = COALESCE({p}, source_commit_at) WHERE source = {p}",
            (
                cp.position,
                cp.state,
                to_json(cp.extra),
                now,
                slot,
                changes,
                replicated,
                now,
                commit_at,
                cp.source,
            ),
        ).rowcount
        if not updated:
            conn.exec_driver_sql(
                "INSERT INTO sync_checkpoints (source, slot, position, state, extra, updated_at, "
                f"last_replication_at, source_commit_at, changes_applied) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
                (
                    cp.source,
                    slot,
                    cp.position,
                    cp.state,
                    to_json(cp.extra),
                    now,
                    now if replicated else None,
                    commit_at,
                    changes,
                ),
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
        if conn is None:
            with self.db.engine.begin() as c:
                self.record_heartbeat(
                    source,
                    sent_at=sent_at,
                    lag_seconds=lag_seconds,
                    lag_bytes=lag_bytes,
                    server_position=server_position,
                    conn=c,
                )
            return
        p = self.db.ph
        conn.exec_driver_sql(
            f"UPDATE sync_checkpoints SET heartbeat_at = {p}, heartbeat_sent_at = {p}, "
            f"lag_seconds = COALESCE({p}, lag_seconds), lag_bytes = COALESCE({p}, lag_bytes), "
            f"server_position = COALESCE({p}, server_position) WHERE source = {p}",
            (
                self.db.now(),
                self.db.to_storage(sent_at),
                lag_seconds,
                lag_bytes,
                server_position,
                source,
            ),
        )

    def save_service(self, st: Any) -> None:
        """Persist what a service last did, so ``sync-daemon status`` (another process) sees it."""
        p = self.db.ph
        values = (
            self.db.to_storage(st.last_run_at) if st.last_run_at else None,
            None if st.last_ok is None else ("yes" if st.last_ok else "no"),
            st.last_result,
            self.db.to_storage(st.next_run_at) if st.next_run_at else None,
            st.progress,
            "yes" if st.breaker_open else "no",
            st.failures,
            self.db.now(),
            st.name,
        )
        with self.db.engine.begin() as conn:
            n = conn.exec_driver_sql(
                f"UPDATE sync_services SET last_run_at = {p}, last_ok = {p}, last_result = {p}, "
                f"next_run_at = {p}, progress = {p}, breaker_open = {p}, failures = {p}, "
                f"updated_at = {p} WHERE name = {p}",
                values,
            ).rowcount
            if not n:
                conn.exec_driver_sql(
                    "INSERT INTO sync_services (last_run_at, last_ok, last_result, next_run_at, "
                    "progress, breaker_open, failures, updated_at, name) "
                    f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
                    values,
                )

    def mark_alive(self, pid: int, host: str, started_at: dt.datetime, interval: float) -> None:
        """The daemon's liveness mark: written at start and every ``interval`` s by its main loop.

        The whole row is written each time, so a second daemon that starts on the same staging
        and exits again (it cannot take the source) is overwritten by the one that runs.
        """
        p = self.db.ph
        values = (pid, host, self.db.to_storage(started_at), self.db.now(), interval, "daemon")
        with self.db.engine.begin() as conn:
            n = conn.exec_driver_sql(
                f"UPDATE sync_daemon SET pid = {p}, host = {p}, started_at = {p}, alive_at = {p}, "
                f"alive_interval = {p}, stopped_at = NULL, exit_code = NULL WHERE name = {p}",
                values,
            ).rowcount
            if not n:
                conn.exec_driver_sql(
                    "INSERT INTO sync_daemon (pid, host, started_at, alive_at, alive_interval, "
                    f"name) VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
                    values,
                )

    def mark_stopped(self, pid: int, host: str, exit_code: int) -> None:
        """The daemon stops (only its own mark: a failed second daemon leaves the first's)."""
        p = self.db.ph
        with self.db.engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE sync_daemon SET stopped_at = {p}, exit_code = {p} "
                f"WHERE name = 'daemon' AND pid = {p} AND host = {p}",
                (self.db.now(), exit_code, pid, host),
            )

    def load_liveness(self) -> dict[str, Any] | None:
        """The daemon's liveness row (timestamps as aware datetimes), or None if it never ran."""
        with reading(self.db.engine) as conn:
            row = conn.exec_driver_sql("SELECT * FROM sync_daemon WHERE name = 'daemon'").first()
        if row is None:
            return None
        d = dict(row._mapping)
        for k in ("started_at", "alive_at", "stopped_at"):
            if isinstance(d[k], str):
                d[k] = dt.datetime.fromisoformat(d[k])
            if d[k] is not None and d[k].tzinfo is None:
                d[k] = d[k].replace(tzinfo=dt.UTC)
        return d

    def load_services(self) -> list[dict[str, Any]]:
        with reading(self.db.engine) as conn:
            rows = conn.exec_driver_sql("SELECT * FROM sync_services ORDER BY name")
            out = []
            for r in rows:
                d = dict(r._mapping)
                d["last_ok"] = None if d["last_ok"] is None else d["last_ok"] == "yes"
                d["breaker_open"] = d["breaker_open"] == "yes"
                for k in ("last_run_at", "next_run_at", "updated_at"):
                    if isinstance(d[k], str):
                        d[k] = dt.datetime.fromisoformat(d[k])
                out.append(d)
            return out

    def replication_status(self) -> list[dict[str, Any]]:
        return replication_status(self.db.engine)

    # -- online re-copy requests ---------------------------------------------------------------
    def request_recopy(self, source: str, table: str) -> None:
        """``sync-daemon resync --table``: ask the capture of ``source`` to copy ``table`` again,
        online; the daemon takes the request with its next commit (or at its next start)."""
        p = self.db.ph
        with self.db.engine.begin() as conn:
            conn.exec_driver_sql(
                f"DELETE FROM sync_recopy_requests WHERE source = {p} AND source_table = {p}",
                (source, table),
            )
            conn.exec_driver_sql(
                "INSERT INTO sync_recopy_requests (source, source_table, requested_at) "
                f"VALUES ({p}, {p}, {p})",
                (source, table, self.db.now()),
            )

    def recopy_requests(self, source: str) -> list[str]:
        """Tables whose re-copy was asked for and not yet taken up."""
        with reading(self.db.engine) as conn:
            return [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT source_table FROM sync_recopy_requests WHERE source = "
                    f"{self.db.ph} ORDER BY requested_at",
                    (source,),
                )
            ]

    def take_recopy_request(self, conn: sa.Connection, source: str, table: str) -> None:
        """A request taken up, in the transaction that records the copy in the checkpoint."""
        p = self.db.ph
        conn.exec_driver_sql(
            f"DELETE FROM sync_recopy_requests WHERE source = {p} AND source_table = {p}",
            (source, table),
        )


def replication_status(engine: sa.Engine) -> list[dict[str, Any]]:
    """The ``replication_status`` view, one row per source (it must exist: see
    :func:`has_replication_status`). A function of the engine, so the read model can read it
    without a :class:`~replicator.staging.StagingStore`."""
    with reading(engine) as conn:
        res = conn.exec_driver_sql("SELECT * FROM replication_status ORDER BY source")
        return [dict(r._mapping) for r in res]


def has_replication_status(engine: sa.Engine) -> bool:
    """Whether the ``replication_status`` view exists yet (nothing that only reads creates it)."""
    with reading(engine) as conn:
        return "replication_status" in sa.inspect(conn).get_view_names()
