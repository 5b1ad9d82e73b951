"""``check-config --connect``: everything a first ``run`` needs, checked before it runs.

Each check yields a :class:`Check` — what was checked, whether it passed, one line that names
the problem and the statement or setting that fixes it — and a failed check never stops the
others from being reported (an operator fixes them all in one go). The checks only read: they
never create the publication or the slot, and never write to a shop.

Checked: the ERP connection; for logical capture ``wal_level``, the REPLICATION attribute, the
publication (it covers the tables, or the role may create it), the slot (plugin, not lost, or a
free slot to create it), SELECT on every watched table and its key; the staging store; every
polled shop's reachability and credentials (one read of the last minute's orders) and every
inbox folder.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from replicator.cdc.tables import describe_tables
from replicator.config import Config
from replicator.config.shops import ShopSection
from replicator.connectors import make_connector
from replicator.db import make_engine, one_line, pg_connect
from replicator.errors import EXIT_ACCESS, EXIT_FAILURE, EXIT_SOURCE, SyncError
from replicator.errors_map import is_access_refused
from replicator.orders.mappings import check_mappings
from replicator.staging import StagingStore


@dataclass(frozen=True)
class Check:
    """One line of ``check-config --connect``; ``exit_code`` is 0 when it passed."""

    what: str
    text: str
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _failed(what: str, exc: BaseException) -> Check:
    code = EXIT_ACCESS if is_access_refused(exc) else EXIT_FAILURE
    return Check(what, f"cannot connect: {one_line(exc)}", code)


def preflight(cfg: Config) -> Iterator[Check]:
    """Every check, in the order a first run meets them."""
    if cfg.erp.dialect == "postgresql":
        yield from _erp_postgresql(cfg)
    yield from _staging(cfg)
    if cfg.orders.enabled and cfg.shops:
        yield from _mappings(cfg)
    for shop in cfg.shops:
        yield _shop(cfg, shop)


def _mappings(cfg: Config) -> Iterator[Check]:
    """Every order mapping against the live ERP, with the daemon's start-up messages."""
    try:
        engine = make_engine(cfg.erp.writer_url, "check")
    except Exception as exc:
        yield _failed("mappings", exc)
        return
    try:
        for line in check_mappings(cfg, engine):
            yield Check("mapping", line)
    except SyncError as exc:
        yield Check("mapping", str(exc), exc.exit_code)
    except Exception as exc:
        yield _failed("mappings", exc)
    finally:
        engine.dispose()


def _erp_postgresql(cfg: Config) -> Iterator[Check]:
    what = f"erp {cfg.erp.redacted}"
    try:
        conn = pg_connect(cfg.erp.url, "check", connect_timeout=cfg.erp.connect_timeout)
    except psycopg.OperationalError as exc:
        yield _failed(what, exc)
        return
    with conn:
        (ver,) = conn.execute("SHOW server_version").fetchone() or ("?",)
        (wal,) = conn.execute("SHOW wal_level").fetchone() or ("?",)
        yield Check(what, f"PostgreSQL {ver}, wal_level={wal}")
        if cfg.capture.mode != "logical":
            return
        if wal != "logical":
            yield Check(
                "erp wal_level",
                f"is {wal!r}; logical capture needs 'logical': ALTER SYSTEM SET wal_level = "
                "logical; then restart PostgreSQL",
                EXIT_SOURCE,
            )
        yield from _role(conn)
        yield from _publication(conn, cfg)
        yield from _slot(conn, cfg)
        yield from _tables(conn, cfg)


def _role(conn: psycopg.Connection[Any]) -> Iterator[Check]:
    user, repl, superuser = conn.execute(
        "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone() or ("?", False, False)
    if repl or superuser:
        yield Check("erp role", f"{user} may stream (REPLICATION)")
    else:
        yield Check(
            "erp role",
            f"{user} lacks the REPLICATION attribute: ALTER ROLE {user} REPLICATION",
            EXIT_ACCESS,
        )


def _publication(conn: psycopg.Connection[Any], cfg: Config) -> Iterator[Check]:
    pub = cfg.capture.publication
    what = f"erp publication {pub}"
    row = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (pub,))
    found = row.fetchone()
    wanted = set(cfg.capture.tables)
    if found is not None:
        if found[0]:
            yield Check(what, "exists (FOR ALL TABLES)")
            return
        have = {
            f"{s}.{t}"
            for s, t in conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (pub,),
            ).fetchall()
        }
        missing = sorted(wanted - have)
        if not missing:
            yield Check(what, f"exists and covers the {len(wanted)} table(s)")
            return
        (owner,) = conn.execute(
            "SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = %s", (pub,)
        ).fetchone() or (False,)
        if owner:
            yield Check(what, f"lacks {', '.join(missing)}; the daemon adds them at start")
        else:
            yield Check(
                what,
                f"lacks {', '.join(missing)} and this role does not own it: ALTER PUBLICATION "
                f"{pub} ADD TABLE {', '.join(missing)}",
                EXIT_ACCESS,
            )
        return
    (can_create,) = conn.execute(
        "SELECT has_database_privilege(current_database(), 'CREATE')"
    ).fetchone() or (False,)
    not_owned = [
        t
        for t in sorted(wanted)
        if not (
            conn.execute(
                "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s",
                tuple(t.split(".", 1)),
            ).fetchone()
            or (False,)
        )[0]
    ]
    if can_create and not not_owned:
        yield Check(what, "missing; the daemon creates it at start")
    else:
        yield Check(
            what,
            "missing, and this role may not create it: have a DBA run CREATE PUBLICATION "
            f"{pub} FOR TABLE {', '.join(sorted(wanted))}",
            EXIT_ACCESS,
        )


def _slot(conn: psycopg.Connection[Any], cfg: Config) -> Iterator[Check]:
    slot = cfg.capture.slot
    what = f"erp slot {slot}"
    row = conn.execute(
        "SELECT plugin, database = current_database(), active, wal_status "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        used, limit = conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots), "
            "current_setting('max_replication_slots')::int"
        ).fetchone() or (0, 0)
        if used >= limit:
            yield Check(
                what,
                f"missing, and all {limit} slots are taken (max_replication_slots): drop an "
                "unused slot or raise the setting",
                EXIT_SOURCE,
            )
        else:
            yield Check(what, f"missing; the daemon creates it at start ({used}/{limit} used)")
        return
    plugin, same_db, active, wal_status = row
    if plugin != "pgoutput" or not same_db:
        yield Check(
            what,
            f"exists with plugin {plugin!r} or in another database: choose another capture.slot",
            EXIT_SOURCE,
        )
    elif wal_status == "lost":
        yield Check(
            what,
            "is lost (WAL removed): sync-daemon resync --yes takes a new snapshot",
            EXIT_SOURCE,
        )
    else:
        yield Check(what, f"exists (pgoutput, wal_status {wal_status}, active={active})")


def _tables(conn: psycopg.Connection[Any], cfg: Config) -> Iterator[Check]:
    for table in cfg.capture.tables:
        (ok,) = conn.execute(
            "SELECT has_table_privilege(to_regclass(%s), 'SELECT')", (table,)
        ).fetchone() or (None,)
        if ok is False:
            yield Check(
                f"table {table}",
                f"no SELECT right: GRANT SELECT ON {table} TO {conn.info.user}",
                EXIT_ACCESS,
            )
    try:
        for t in describe_tables(conn, cfg):
            yield Check(
                f"table {t.qualified}", f"{len(t.columns)} columns, key ({', '.join(t.key)})"
            )
    except SyncError as exc:
        yield Check("erp tables", one_line(exc), exc.exit_code)


def _staging(cfg: Config) -> Iterator[Check]:
    if cfg.staging.url is None:
        try:
            os.makedirs(cfg.daemon.state_dir, exist_ok=True)
        except OSError as exc:
            yield Check(
                "staging",
                f"daemon.state_dir {cfg.daemon.state_dir}: cannot create it ({exc.strerror})",
                EXIT_ACCESS,
            )
            return
    store = StagingStore(cfg.staging_url)
    try:
        store.setup()
        yield Check("staging", f"{store.dialect} reachable and writable")
    except SyncError as exc:
        yield Check("staging", str(exc), exc.exit_code)
    finally:
        store.dispose()


def _shop(cfg: Config, shop: ShopSection) -> Check:
    """One read that proves the URL and the credentials (orders of the last minute)."""
    what = f"shop {shop.name}"
    if shop.kind == "inbox":
        assert shop.inbox_dir is not None
        folder = cfg.resolve_path(shop.inbox_dir)
        if not folder.is_dir():
            return Check(what, f"inbox_dir {folder} does not exist", EXIT_ACCESS)
        if not os.access(folder, os.W_OK | os.X_OK):
            return Check(what, f"inbox_dir {folder} is not writable by this user", EXIT_ACCESS)
        return Check(what, f"inbox_dir {folder} exists and is writable")
    if shop.kind == "webhook" and shop.url is None:
        return Check(what, "receives webhooks only (nothing to reach)")
    base = Path(cfg.source_path).parent if cfg.source_path else None
    try:
        connector = make_connector(shop, base)
    except SyncError as exc:
        return Check(what, one_line(exc), exc.exit_code)
    now = dt.datetime.now(dt.UTC)
    try:
        next(iter(connector.fetch_orders(now - dt.timedelta(minutes=1), now)), None)
    except SyncError as exc:
        code = EXIT_FAILURE if exc.exit_code == EXIT_FAILURE else EXIT_ACCESS
        return Check(what, f"{shop.url}: {one_line(exc)}", code)
    finally:
        connector.close()
    return Check(what, f"{shop.url}: reachable, credentials accepted")
