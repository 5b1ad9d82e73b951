"""Operations read, never write: ``status``, ``lag``, ``logs``, every Manage page GET and
``/metrics`` (with the queried gauges) leave the staging store and the ERP as they found them.

Two guards, each shown to fire before it is trusted (a guard that cannot fail proves nothing):

* **What changed**: a fingerprint of the staging database — its tables, views and indexes and
  every row of every table — taken before and after. On SQLite also the bytes of the database
  file and its WAL, and ``PRAGMA data_version`` of a connection held open across the run, which
  moves whenever another connection commits anything. Any effective write, ``CREATE TABLE``
  included, changes one of them.
* **What was tried** (PostgreSQL): the staging and ERP databases are switched to
  ``default_transaction_read_only`` for the run, so even a write that changes nothing (an
  ``UPDATE`` matching no row, a ``CREATE TABLE IF NOT EXISTS`` of an existing table) fails, and
  the test requires every command to succeed and every page to answer 200.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from replicator import cli
from replicator.changes import Checkpoint
from replicator.config import Config, load_config
from replicator.logstore import LogStore
from replicator.ops.checks import engine_check
from replicator.ops.gauges import collect_queried
from replicator.orders.ledger import Ledger
from replicator.staging import StagingStore
from replicator.staging.lag import record_lag_sample
from replicator.state import DaemonState
from replicator.web.app import WebContext, mount
from replicator.web.server import HttpServer
from tests.conftest import PgServer
from tests.helpers import write_config

SLOT = "sync_slot"


def _write_config(tmp_path: Path, staging_url: str, erp_url: str) -> Path:
    return write_config(
        tmp_path / "config.toml",
        {
            "erp": {"dsn": erp_url, "connect_timeout": 5},
            "capture": {"mode": "logical", "tables": ["public.items"], "slot": SLOT},
            "staging": {"url": staging_url},
            "health": {"listen": "127.0.0.1:0"},
            "daemon": {"state_dir": str(tmp_path / "state")},
            "schedules": {"orders": "*/5 * * * *", "reconcile": "30 2 * * *"},
        },
    )


def _fill(cfg: Config) -> None:
    """A staging store as a running daemon leaves it: checkpoint, heartbeat, lag history,
    liveness, services, orders in every state with events, log records."""
    store = StagingStore(cfg.staging_url)
    store.setup()
    engine = store.engine
    with engine.begin() as conn:
        store.write_checkpoint(
            conn, Checkpoint(source="erp", position="0/16B3748", state="streaming"), slot=SLOT
        )
    now = datetime.now(UTC)
    store.record_heartbeat("erp", sent_at=now, lag_seconds=1.5, lag_bytes=2048)
    for minutes in range(30, 0, -5):
        record_lag_sample(
            engine,
            [{"source": "erp", "lag_seconds": minutes / 3, "lag_bytes": minutes * 100}],
            at=now - timedelta(minutes=minutes),
        )
    store.mark_alive(os.getpid(), socket.gethostname(), now, 5.0)
    state = DaemonState()
    svc = state.service("orders")
    svc.last_run_at, svc.last_ok, svc.last_result = now, True, "total 3, new 3"
    store.save_service(svc)
    led = Ledger(engine)
    naive = now.replace(tzinfo=None)
    for e, st, diff in [
        ("1001", "delivered", None),
        ("1002", "awaiting", None),
        ("1003", "failed", None),
        ("1004", "update-pending", [{"field": "total", "old": "9.50", "new": "12.00"}]),
    ]:
        with led.begin() as conn:
            led.insert(
                conn,
                shop="demo",
                e_number=e,
                state=st,
                erp_order_no="SO1" if st in ("delivered", "update-pending") else None,
                last_error="no ERP item" if st == "failed" else None,
                payload_hash=f"h{e}",
                payload=json.dumps({"number": e}).encode(),
                first_seen=naive,
                last_seen=naive,
                pending_payload=b'{"number": "1004", "total": "12.00"}' if diff else None,
                diff=json.dumps(diff) if diff else None,
                update_queued=bool(diff),
            )
            led.event(conn, "demo", e, naive, "downloaded", "by poll")
            if st == "failed":
                led.event(conn, "demo", e, naive, "failed", "no ERP item")
    logs = LogStore(engine)
    logs.start()
    logs.sink({"event": "order_failed", "level": "error", "service": "orders"})
    logs.sink({"event": "capture_batch", "level": "info", "service": "capture"})
    assert logs.flush(5)
    logs.stop()
    store.dispose()


# --------------------------------------------------------------------------------- the guards


def _fingerprint(url: str) -> dict[str, Any]:
    """Every table, view and index of the database and a digest of every table's rows."""
    engine = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool
    )
    try:
        insp = sa.inspect(engine)
        out: dict[str, Any] = {"views": sorted(insp.get_view_names())}
        with engine.connect() as conn:
            for name in sorted(insp.get_table_names()):
                rows = conn.execute(sa.text(f'SELECT * FROM "{name}"')).all()
                digest = hashlib.sha256(repr(sorted(repr(tuple(r)) for r in rows)).encode())
                indexes = sorted(str(i["name"]) for i in insp.get_indexes(name))
                out[name] = (len(rows), digest.hexdigest(), indexes)
        return out
    finally:
        engine.dispose()


def _file_bytes(db: Path) -> dict[str, str]:
    """The SQLite database file and its WAL, hashed (the ``-shm`` index is not data)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal"))
        if p.exists()
    }


class WriteGuard:
    """Records the state of a staging store; :meth:`changes` says what differs since."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite_file: Path | None = None
        self._watch: sqlite3.Connection | None = None
        if url.startswith("sqlite:///"):
            self.sqlite_file = Path(url.removeprefix("sqlite:///"))
            # Held open for the whole run: data_version moves when any other connection commits,
            # and no reader closing last checkpoints the WAL into the file behind our back.
            self._watch = sqlite3.connect(self.sqlite_file)
        self.before = self._state()

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"fingerprint": _fingerprint(self.url)}
        if self._watch is not None and self.sqlite_file is not None:
            state["data_version"] = self._watch.execute("PRAGMA data_version").fetchone()[0]
            state["files"] = _file_bytes(self.sqlite_file)
        return state

    def changes(self) -> list[str]:
        after = self._state()
        return [k for k in self.before if self.before[k] != after[k]]

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()


@contextmanager
def _read_only(pg: PgServer | None, *databases: str) -> Iterator[None]:
    """New sessions of ``databases`` run read-only transactions for the block (PostgreSQL)."""
    if pg is None or not databases:
        yield
        return
    with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
        for db in databases:
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    try:
        yield
    finally:
        with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
            for db in databases:
                admin.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')


# ------------------------------------------------------------------------------ the operations


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def _manage_paths() -> list[str]:
    panels = ["orders", "updates", "logs", "services", "replication", "summary"]
    return [
        "/",
        "/?q=100&service=orders&level=error&since=all",
        "/order?shop=demo&e=1003",
        "/order?shop=demo&e=1004",
        "/order?shop=demo&e=nope",
        "/fragments/timeline?shop=demo&e=1003",
        *(f"/fragments/{p}" for p in panels),
        "/static/manage.css",
        "/metrics",
        "/healthz",
        "/readyz",
    ]


def _serve(cfg: Config, *, with_store: bool) -> dict[str, int]:
    """The Manage page as the daemon mounts it (the store given, or only its engine, and no
    log store: the page then reads the log records itself); every GET, and its status."""
    store = StagingStore(cfg.staging_url)  # not set up: a reader creates nothing
    state = DaemonState(capture_connected=True)
    state.service("orders")
    server = HttpServer(cfg.health)
    server.add_check("staging", engine_check(store.engine))
    mount(
        server,
        WebContext(
            config=cfg,
            staging_engine=store.engine,
            store=store if with_store else None,
            daemon_state=lambda: state,
        ),
    )
    server.start()
    try:
        statuses = {}
        for path in _manage_paths():
            r = httpx.get(server.url + path, timeout=20)
            statuses[path] = r.status_code
        return statuses
    finally:
        server.stop()
        store.dispose()


def _run_operations(cfg: Config, path: Path) -> None:
    """Every operations read, each required to succeed (a refused write would fail it)."""
    code, out = _cli("status", "--config", str(path))
    assert code == 0, out
    assert "demo/1003" in out and "running" in out
    code, out = _cli("status", "--config", str(path), "--json", "--all")
    assert code == 0 and json.loads(out)["orders"]["counts"]["failed"] == 1
    code, out = _cli("lag", "--config", str(path))
    assert f"slot {SLOT}" in out, out
    code, out = _cli("logs", "--config", str(path), "--level", "error")
    assert code == 0 and "order_failed" in out and "capture_batch" not in out
    for with_store in (True, False):
        statuses = _serve(cfg, with_store=with_store)
        expected = {p: 404 if p.endswith("e=nope") else 200 for p in statuses}
        assert statuses == expected
    engine = StagingStore(cfg.staging_url).engine
    result = collect_queried(cfg, engine, orders=True)
    assert "4 orders in the ledger" in result and "slot retains" in result
    engine.dispose()


# ----------------------------------------------------------------------------------- the tests


@pytest.fixture
def site(
    tmp_path: Path, staging_url: str, erp_db: str, pg_server: PgServer
) -> Iterator[tuple[Config, Path, list[str]]]:
    """A filled staging store, an ERP with the capture slot, the config naming both, and the
    PostgreSQL databases (staging when it is PostgreSQL, and the ERP) to make read-only."""
    with psycopg.connect(pg_server.dsn(erp_db.rsplit("/", 1)[1]), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
    path = _write_config(tmp_path, staging_url, erp_db)
    cfg = load_config(path)
    _fill(cfg)
    gc.collect()  # the filling store's engine (shared per URL) goes with its pooled sessions
    databases = [u.rsplit("/", 1)[1] for u in (staging_url, erp_db) if u.startswith("postgresql")]
    yield cfg, path, databases


def test_operations_never_write(site: tuple[Config, Path, list[str]], pg_server: PgServer) -> None:
    cfg, path, databases = site
    guard = WriteGuard(cfg.staging_url)
    try:
        with _read_only(pg_server, *databases):
            _run_operations(cfg, path)
        assert guard.changes() == []
    finally:
        guard.close()


def _mark_alive(cfg: Config) -> None:
    """An UPDATE of one row (the liveness mark)."""
    store = StagingStore(cfg.staging_url)
    try:
        store.mark_alive(os.getpid(), socket.gethostname(), datetime.now(UTC), 5.0)
    finally:
        store.dispose()


def _create_table(cfg: Config) -> None:
    """A table created and nothing in it (what a reader constructing a ``Ledger`` would do)."""
    store = StagingStore(cfg.staging_url)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE sync_probe (id INTEGER PRIMARY KEY)")
    finally:
        store.dispose()


@pytest.mark.parametrize("write", [_mark_alive, _create_table], ids=["update", "create-table"])
def test_the_guards_see_a_write(
    site: tuple[Config, Path, list[str]], pg_server: PgServer, write: Callable[[Config], None]
) -> None:
    """The same guards refuse and flag one small write, so the test above can fail."""
    cfg, _path, databases = site
    guard = WriteGuard(cfg.staging_url)
    try:
        if cfg.staging_url.startswith("postgresql"):
            with _read_only(pg_server, *databases), pytest.raises(Exception, match="read-only"):
                write(cfg)
        write(cfg)
        changed = guard.changes()
        assert "fingerprint" in changed
        if cfg.staging_url.startswith("sqlite"):
            assert {"data_version", "files"} <= set(changed)
    finally:
        guard.close()
