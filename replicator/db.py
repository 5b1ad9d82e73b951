"""Database connections: one place that opens them, sets ``application_name`` and timeouts.

A DBA must see who is connected in ``pg_stat_activity``; every connection the daemon opens goes
through here so it always carries ``application_name`` (``sync-daemon/<role>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from replicator.errors import AccessError, RetryableError, SyncError
from replicator.errors_map import is_access_refused
from replicator.pgvalues import register as register_pg_values

APP = "sync-daemon"


def one_line(exc: BaseException) -> str:
    """A driver's message on one line (libpq writes several, with the server's FATAL last)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def connect_error(what: str, where: str, exc: BaseException) -> SyncError:
    """The one-line error for a failed connection: what was reached, where, and the cause;
    :class:`AccessError` when a retry cannot help, else :class:`RetryableError`."""
    cls: type[SyncError] = AccessError if is_access_refused(exc) else RetryableError
    return cls(f"{what} ({where}): {one_line(exc)}")


# A silent network partition (no RST, no FIN) must not hang a query or the replication stream
# for the kernel's default of hours: keepalives notice a dead peer after ~25 s idle, and
# tcp_user_timeout bounds how long sent data may stay unacknowledged.
# Dates and times Python cannot hold (infinity, BC, year 10000+) load as PostgreSQL's text instead
# of raising, on every connection of the process (see replicator.pgvalues).
register_pg_values(psycopg.adapters)

PG_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}


def app_name(role: str) -> str:
    return f"{APP}/{role}"


def pg_connect(
    dsn: str, role: str, *, connect_timeout: float = 10.0, **kwargs: Any
) -> psycopg.Connection[Any]:
    """A psycopg connection to a PostgreSQL ERP with application_name and UTC/ISO settings."""
    return psycopg.connect(
        dsn,
        application_name=app_name(role),
        connect_timeout=max(1, int(connect_timeout)),
        options="-c timezone=UTC -c datestyle=ISO",
        **{**PG_KEEPALIVES, **kwargs},
    )


def sqlalchemy_url(url: str) -> sa.URL:
    """Normalise a URL for SQLAlchemy: ``postgresql://`` uses psycopg 3, ``mysql://`` PyMySQL."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    elif u.drivername in ("mysql", "mariadb"):
        u = u.set(drivername="mysql+pymysql")
    return u


def make_engine(url: str, role: str, **kwargs: Any) -> sa.Engine:
    """A SQLAlchemy engine with application_name (PostgreSQL) or WAL + busy timeout (SQLite)."""
    u = sqlalchemy_url(url)
    connect_args: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql":
        connect_args = {"application_name": app_name(role), "connect_timeout": 10, **PG_KEEPALIVES}
    elif u.get_backend_name() == "mysql":
        connect_args = {"connect_timeout": 10, "program_name": app_name(role)}
    elif u.get_backend_name() == "sqlite":
        connect_args = {"timeout": 30, "check_same_thread": False}
    engine = sa.create_engine(u, connect_args=connect_args, pool_pre_ping=True, **kwargs)
    if u.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
            # Python's sqlite3 opens transactions lazily and not for DDL; take control so that
            # BEGIN covers everything, as on PostgreSQL.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: sa.Connection) -> None:
            # A writer takes the write lock at BEGIN: a deferred transaction that read first
            # could not take it later (SQLITE_BUSY without waiting) once another writer had
            # committed. A reader (see `reading`) takes no lock at all.
            if conn.get_execution_options().get(_READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


_READ_ONLY = "sync_read_only"


@contextmanager
def reading(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection for reads only (``with reading(engine) as conn``).

    On SQLite its transaction starts with a plain (deferred) BEGIN instead of the writers'
    BEGIN IMMEDIATE: in WAL mode it reads the last commit without taking the write lock, so
    ``status``, the Manage page, ``/metrics``, readiness checks and journal readers neither
    wait behind a capture transaction nor hold one up. Elsewhere it is ``engine.connect()``.
    Writing through it is a mistake (on SQLite the write could fail at once with "database is
    locked" instead of waiting).
    """
    with engine.connect() as conn:
        conn.execution_options(**{_READ_ONLY: True})
        yield conn


def null_pool_engine(url: str, role: str) -> sa.Engine:
    """An engine without pooling, for short-lived CLI commands."""
    return make_engine(url, role, poolclass=NullPool)
