"""The HA lease tables (``sync_ha_lease``, ``sync_ha_nodes``; PostgreSQL staging only).

The lease is one row: the holder's node name, an **epoch** (the fencing token, raised by every
takeover) and an expiry on the database's clock (``clock_timestamp()``, so the nodes' clocks do
not matter). The policy — when to take, renew, release, and how commits are fenced — is in
:mod:`replicator.ha`; this module is the SQL. It runs on the lease's own engine (short timeouts,
never fenced), the one staging engine that is not the shared one.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from replicator.staging import schema


class LeaseTable:
    """The lease named ``name`` and the nodes that compete for it."""

    def __init__(self, engine: sa.Engine, name: str) -> None:
        self.engine = engine
        self.name = name

    def create(self) -> None:
        with self.engine.begin() as c:
            for ddl in schema.HA_DDL:
                c.exec_driver_sql(ddl)

    def try_acquire(self, node: str, seconds: float) -> int | None:
        """Take the lease for ``seconds`` when nobody holds it or it expired: the new epoch."""
        with self.engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO sync_ha_lease (name, holder, epoch, expires_at, acquired_at, "
                "renewed_at) VALUES (%s, '', 0, clock_timestamp(), clock_timestamp(), "
                "clock_timestamp()) ON CONFLICT (name) DO NOTHING",
                (self.name,),
            )
            row = c.exec_driver_sql(
                "UPDATE sync_ha_lease SET holder = %s, epoch = epoch + 1, "
                "expires_at = clock_timestamp() + make_interval(secs => %s), "
                "acquired_at = clock_timestamp(), renewed_at = clock_timestamp() "
                "WHERE name = %s AND expires_at <= clock_timestamp() RETURNING epoch",
                (node, seconds, self.name),
            ).fetchone()
        return None if row is None else int(row[0])

    def renew(self, node: str, epoch: int, seconds: float) -> bool:
        """Extend the lease; False when it is no longer ``node``'s at ``epoch``."""
        with self.engine.begin() as c:
            row = c.exec_driver_sql(
                "UPDATE sync_ha_lease SET expires_at = clock_timestamp() + "
                "make_interval(secs => %s), renewed_at = clock_timestamp() "
                "WHERE name = %s AND holder = %s AND epoch = %s "
                "AND expires_at > clock_timestamp() RETURNING epoch",
                (seconds, self.name, node, epoch),
            ).fetchone()
        return row is not None

    def release(self, node: str, epoch: int) -> None:
        """Let the lease expire now (if it is still ``node``'s at ``epoch``)."""
        with self.engine.begin() as c:
            c.exec_driver_sql(
                "UPDATE sync_ha_lease SET expires_at = clock_timestamp() "
                "WHERE name = %s AND holder = %s AND epoch = %s",
                (self.name, node, epoch),
            )

    def announce(self, node: str, role: str, host: str, pid: int, health_url: str) -> None:
        """Record a node and its role."""
        with self.engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO sync_ha_nodes (node, role, host, pid, health_url, seen_at) "
                "VALUES (%s, %s, %s, %s, %s, clock_timestamp()) ON CONFLICT (node) DO UPDATE "
                "SET role = excluded.role, host = excluded.host, pid = excluded.pid, "
                "health_url = excluded.health_url, seen_at = excluded.seen_at",
                (node, role, host, pid, health_url),
            )

    def holds(self, dbapi_conn: Any, node: str, epoch: int) -> bool:
        """Inside the caller's (driver-level) transaction: whether ``node`` still holds the
        lease at ``epoch``, share-locking the row so a takeover waits for that transaction."""
        cur = dbapi_conn.cursor()
        try:
            cur.execute(
                "SELECT 1 FROM sync_ha_lease WHERE name = %s AND holder = %s AND epoch = %s "
                "AND expires_at > clock_timestamp() FOR SHARE",
                (self.name, node, epoch),
            )
            return cur.fetchone() is not None
        finally:
            cur.close()

    def state(self) -> dict[str, Any] | None:
        """Holder, epoch, expiry and whether it is still valid; None when never taken."""
        with self.engine.connect() as c:
            row = c.exec_driver_sql(
                "SELECT holder, epoch, expires_at, expires_at > clock_timestamp(), acquired_at "
                "FROM sync_ha_lease WHERE name = %s",
                (self.name,),
            ).fetchone()
        if row is None:
            return None
        return {
            "holder": row[0],
            "epoch": int(row[1]),
            "expires_at": row[2],
            "valid": bool(row[3]),
            "acquired_at": row[4],
        }

    def nodes(self, within: float) -> list[dict[str, Any]]:
        """Nodes seen in the last ``within`` seconds, with how long ago (``age``)."""
        with self.engine.connect() as c:
            rows = c.exec_driver_sql(
                "SELECT node, role, host, pid, health_url, "
                "EXTRACT(EPOCH FROM clock_timestamp() - seen_at) FROM sync_ha_nodes "
                "WHERE seen_at > clock_timestamp() - make_interval(secs => %s) ORDER BY node",
                (within,),
            ).fetchall()
        return [
            {
                "node": r[0],
                "role": r[1],
                "host": r[2],
                "pid": r[3],
                "health_url": r[4],
                "age": float(r[5]),
            }
            for r in rows
        ]
