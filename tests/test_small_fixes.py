"""Smaller operator-facing fixes: private staging file, sizes for people, breakers that open and
close, no SQLAlchemy warning for ERP column types it does not know."""

from __future__ import annotations

import datetime as dt
import io
import os
import stat
import threading
import warnings
from pathlib import Path

import psycopg
import sqlalchemy as sa

from replicator.log import setup_logging
from replicator.schedules import Schedule
from replicator.services import BREAKER_AFTER, Service, ServiceRunner
from replicator.staging import StagingStore
from replicator.state import DaemonState
from replicator.status import human_bytes


def test_staging_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = StagingStore(f"sqlite:///{tmp_path / 'new.db'}")
        store.setup()
        store.dispose()
        loose = tmp_path / "old.db"
        loose.touch(0o644)
        store = StagingStore(f"sqlite:///{loose}")
        store.setup()
        store.dispose()
    finally:
        os.umask(old)
    for name in ("new.db", "old.db"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    wal = tmp_path / "new.db-wal"
    if wal.exists():
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_sizes_for_people() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(4 * 1024**3) == "4.0 GB"
    assert human_bytes(1536) == "1.5 kB"
    assert human_bytes(None) == "unknown"


def test_breaker_opens_after_failures_in_a_row_and_closes_on_success() -> None:
    failing = {"on": True}

    def run(_now: dt.datetime) -> str:
        if failing["on"]:
            raise ConnectionError("shop unreachable")
        return "ok"

    state = DaemonState()
    svc = Service("stock_push", Schedule.parse("continuous"), run)
    runner = ServiceRunner([svc], state, None, threading.Event())
    for _ in range(BREAKER_AFTER - 1):
        runner.run_one(svc)
    assert not state.service("stock_push").breaker_open
    runner.run_one(svc)
    st = state.service("stock_push")
    assert st.breaker_open and st.failures == BREAKER_AFTER
    # Continuous, but with the breaker open it is only probed once a minute.
    assert not runner.due(svc, dt.datetime.now().astimezone())
    assert runner.due(svc, dt.datetime.now().astimezone() + dt.timedelta(seconds=61))
    failing["on"] = False
    runner.run_one(svc)
    assert not state.service("stock_push").breaker_open


def test_service_breaker_reports_a_cancelled_shop() -> None:
    cancelled = {"on": True}
    state = DaemonState()
    svc = Service(
        "orders", Schedule.parse("every 10s"), lambda _n: "ok", breaker=lambda: cancelled["on"]
    )
    runner = ServiceRunner([svc], state, None, threading.Event())
    runner.run_one(svc)
    assert state.service("orders").breaker_open
    cancelled["on"] = False
    runner.run_one(svc)
    assert not state.service("orders").breaker_open


def test_unknown_erp_column_types_do_not_warn(erp_db: str) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE depot (id int PRIMARY KEY, at point, area polygon)")
    setup_logging(stream=io.StringIO())
    engine = sa.create_engine(erp_db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            setup_logging(stream=io.StringIO())  # installs the filter again after simplefilter
            cols = sa.inspect(engine).get_columns("depot")
    finally:
        engine.dispose()
    assert [c["name"] for c in cols] == ["id", "at", "area"]
    assert not [w for w in caught if "Did not recognize type" in str(w.message)], caught
