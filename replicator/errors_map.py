"""Where a driver error enters the product: the one place that says what kind of failure it is.

psycopg, PyMySQL, sqlite3 (bare or wrapped by SQLAlchemy), httpx and the operating system each
raise their own exceptions. This module reads them — SQLSTATE first, then the MySQL error number,
then the exception class, and only where a driver gives no code, the message — and answers with
the tree of :mod:`replicator.errors`:

* :func:`is_access_refused` — credentials, database, role, privilege or a path: a person must fix
  access (:class:`~replicator.errors.AccessError`, exit 4);
* :func:`is_retryable` — the connection was lost or refused, the server restarts, a lock or
  serialization conflict, a timeout: not the work's fault, the same work may succeed later;
* :func:`is_schema_mismatch` — the ERP no longer has the table/column/type a statement needs;
* :func:`is_unique_violation` — a unique index refused a second row;
* :func:`classify` — all of the above as one :class:`~replicator.errors.SyncError` subclass;
* :func:`replication_start_error` — why ``START_REPLICATION`` was refused.

What to *do* about a kind stays with the caller, and the two policies in the product differ on
purpose: capture stops when access is refused (``classify`` says :class:`AccessError` before it
asks :func:`is_retryable`), while an order waits for a password or GRANT to be fixed (the order
import asks :func:`is_retryable`, which does not hold refused access against the order) instead
of being parked as bad input.

A shop's HTTP *answers* (429, 5xx, 401/403, 404) are mapped where they arrive, in
:mod:`replicator.connectors._http`, onto the connector contract (``ShopUnavailable`` is a
:class:`RetryableError`, ``ShopError`` a :class:`FatalError`), so they reach this module already
classified; an httpx transport failure that escapes raw is retryable here.

The rules are checked against errors provoked from real servers (PostgreSQL, MariaDB, SQLite, a
loopback HTTP server) in ``tests/test_errors_classification.py``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import psycopg
import pymysql
import sqlalchemy as sa

from replicator.errors import (
    AccessError,
    DaemonAlreadyRunning,
    FatalError,
    RetryableError,
    SchemaError,
    SlotMissingError,
    SyncError,
)

# SQLSTATEs / MySQL error numbers that mean "try again": serialization failure, deadlock, lock not
# available, query cancelled, admin shutdown, crash shutdown, cannot connect now, too many
# connections (and every 08xxx connection exception); lock wait timeout, deadlock, cannot connect,
# server gone, lost connection, too many connections, server shutting down.
# 42501 / 1142 / 1143: the role lacks a privilege. For an order that is not the order's fault: it
# waits and is retried once the DBA has fixed the GRANT, instead of being parked as bad input
# (capture, through :func:`classify`, sees the same error as access refused first).
_RETRY_SQLSTATE = {
    "40001",
    "40P01",
    "55P03",
    "57014",
    "57P01",
    "57P02",
    "57P03",
    "53300",
    "42501",
}
_RETRY_MYSQL = {1205, 1213, 2002, 2003, 2006, 2013, 2055, 1040, 1053, 1142, 1143}

# The ERP's schema no longer has what a statement writes: undefined table/column/function,
# datatype mismatch, a NOT NULL column nothing fills; MariaDB: unknown column, no such table,
# field without default, column cannot be null.
_SCHEMA_SQLSTATE = {"42P01", "42703", "42883", "42804", "23502"}
_SCHEMA_MYSQL = {1054, 1146, 1364, 1048}

# Access refused, by code: invalid authorization (no such role, pg_hba), wrong password, no such
# database, insufficient privilege; MariaDB: access denied to a database / for a user (password or
# plugin), unknown database; SQLite: the file cannot be opened, or its permissions refuse.
_ACCESS_SQLSTATE = {"28000", "28P01", "3D000", "42501"}
_ACCESS_MYSQL = {1044, 1045, 1049, 1698}
_ACCESS_SQLITE = {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM}

# SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY (extended codes).
_UNIQUE_SQLITE = {2067, 1555}

# Access refused, by message, for errors that carry no code. Needed because libpq reports a failed
# *connection* (wrong password, no pg_hba.conf entry, no such database or role) with no SQLSTATE
# at all: psycopg's exception holds only the server's FATAL text. The other fragments are the same
# refusals as other drivers word them, for an error that reaches us without its code (re-raised
# as text, or from a driver that has none).
ACCESS_REFUSED_TEXT = (
    "must be superuser or replication role",
    "permission denied",
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "Access denied for user",
    "Unknown database",
    "unable to open database file",
)

# How each driver says that the server or the connection failed rather than the statement (the
# DB-API's "operational" classes); SQLAlchemy wraps them in its own OperationalError. Capture maps
# these to RetryableError where it calls the ERP.
DRIVER_UNAVAILABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
    sqlite3.OperationalError,
)

# How a store reached through SQLAlchemy (staging) fails under a statement: the server went away,
# the disk filled, the file could not be read. Capture maps these to RetryableError and resumes
# from the staging checkpoint.
STORE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sqlite3.OperationalError,
    OSError,
)

# START_REPLICATION refusals: the slot does not exist (undefined object), or another walsender
# streams from it (object in use: "replication slot ... is active for PID ...").
_SLOT_MISSING_SQLSTATE = "42704"
_SLOT_IN_USE_SQLSTATE = "55006"


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception: SQLAlchemy's ``orig`` when it wrapped one, else ``exc``."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a server sent with the error (psycopg), or None."""
    state = getattr(driver_error(exc), "sqlstate", None)
    return state if isinstance(state, str) else None


def mysql_errno(exc: BaseException) -> int | None:
    """The MySQL/MariaDB error number (PyMySQL puts it first in ``args``), or None."""
    orig = driver_error(exc)
    if not isinstance(orig, pymysql.err.MySQLError):
        return None
    args: tuple[Any, ...] = tuple(orig.args or ())
    return args[0] if args and isinstance(args[0], int) else None


def sqlite_errorcode(exc: BaseException) -> int | None:
    """The SQLite (extended) result code of an ``sqlite3`` error, or None; ``& 0xFF`` is the
    primary code."""
    code = getattr(driver_error(exc), "sqlite_errorcode", None)
    return code if isinstance(code, int) else None


def is_access_refused(exc: BaseException) -> bool:
    """Whether a retry cannot help until a person fixes access (credentials, database, role,
    privilege, a file's path or permissions).

    An error that carries a code is judged by its code alone: the wording would also match, say,
    ``relation "x" does not exist``, which is a schema problem, not refused access."""
    state, errno, sqlite_code = sqlstate(exc), mysql_errno(exc), sqlite_errorcode(exc)
    if sqlite_code is not None:
        return (sqlite_code & 0xFF) in _ACCESS_SQLITE
    if state is not None or errno is not None:
        return state in _ACCESS_SQLSTATE or errno in _ACCESS_MYSQL
    text = str(exc)
    return any(f in text for f in ACCESS_REFUSED_TEXT)


def _code_says_retry(exc: BaseException) -> bool:
    state = sqlstate(exc)
    if state is not None and (state in _RETRY_SQLSTATE or state.startswith("08")):
        return True
    return mysql_errno(exc) in _RETRY_MYSQL


def is_retryable(exc: BaseException) -> bool:
    """Whether the same work may succeed later, unchanged: network and server failures, locks,
    serialization conflicts, timeouts. The failure is not the work's fault, so refused access
    counts too where a driver reports it as a failed connection or a missing privilege (an order
    waits for the DBA's fix); :func:`classify` puts access apart first."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, SyncError):
        return False
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated or _code_says_retry(exc):
            return True
        # SQLAlchemy's OperationalError/InterfaceError: the database, not the statement, failed.
        return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    if _code_says_retry(exc):
        return True
    return isinstance(
        exc,
        (
            *DRIVER_UNAVAILABLE,
            sa.exc.DisconnectionError,
            sa.exc.TimeoutError,  # the pool had no connection in time
            httpx.TransportError,  # refused, reset, timed out, cut mid-response
            OSError,  # ConnectionError, TimeoutError, a socket or file that failed under a driver
        ),
    )


def is_schema_mismatch(exc: BaseException) -> bool:
    """Whether the server says a statement no longer fits its schema (undefined table, column or
    function, datatype mismatch, a NOT NULL column nothing fills)."""
    return sqlstate(exc) in _SCHEMA_SQLSTATE or mysql_errno(exc) in _SCHEMA_MYSQL


def is_unique_violation(exc: BaseException) -> bool:
    """Whether a unique index refused the row (SQLSTATE 23505, MySQL 1062, SQLite's unique or
    primary-key constraint)."""
    if sqlite_errorcode(exc) in _UNIQUE_SQLITE:
        return True
    return sqlstate(exc) == "23505" or mysql_errno(exc) == 1062


def classify(exc: BaseException) -> type[SyncError]:
    """The class of :mod:`replicator.errors` a failure belongs to.

    A :class:`SyncError` keeps its own class. Otherwise, in this order: access refused →
    :class:`AccessError`; retryable → :class:`RetryableError`; schema mismatch →
    :class:`SchemaError`; anything else → :class:`FatalError`."""
    if isinstance(exc, SyncError):
        return type(exc)
    if is_access_refused(exc):
        return AccessError
    if is_retryable(exc):
        return RetryableError
    if is_schema_mismatch(exc):
        return SchemaError
    return FatalError


def replication_start_error(slot: str, state: str | None, message: str) -> SyncError:
    """The error for a refused ``START_REPLICATION``: the slot is gone, another process streams
    from it, or something a reconnect may fix. ``state`` is the result's SQLSTATE (None when libpq
    failed before the server answered); then the server's wording is all there is to go on."""
    text = message.strip()
    if state == _SLOT_MISSING_SQLSTATE or (
        state is None and "does not exist" in text and "slot" in text
    ):
        return SlotMissingError(f"replication slot {slot!r} is gone: {text}")
    if state == _SLOT_IN_USE_SQLSTATE or (state is None and "is active for PID" in text):
        return DaemonAlreadyRunning(text)
    return RetryableError(f"START_REPLICATION failed: {text}")
