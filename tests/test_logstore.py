"""The staging store's log table: sink → writer thread → query/purge, and ``sync-daemon logs``."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from replicator.cli import main
from replicator.commands.logs import parse_since
from replicator.db import make_engine
from replicator.log import add_sink, remove_sink, setup_logging
from replicator.logstore import LogStore, log_records


@pytest.fixture
def engine(staging_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(staging_url, "test-logstore")
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def store(engine: sa.Engine) -> Iterator[LogStore]:
    setup_logging(stream=io.StringIO())
    s = LogStore(engine, retention_days=7, flush_interval=0.2)
    s.start()
    add_sink(s.sink)
    try:
        yield s
    finally:
        remove_sink(s.sink)
        s.stop()


def test_records_flow_from_structlog_to_the_table(store: LogStore) -> None:
    log = structlog.get_logger("replicator.orders")
    log.info("order_imported", service="orders", e_number="E1001", lines=3)
    log.warning("order_retry", service="orders", e_number="E1002")
    log.error("order_failed", service="orders", e_number="E1003", reason="unknown SKU 'X-1'")
    structlog.get_logger("replicator.cdc").error(
        "slot_lag_high", service="capture", dsn="postgresql://sync:hunter2@db/erp"
    )
    log.debug("not_stored", service="orders")  # below the root level: never reaches the sink
    assert store.flush()

    records = store.query()
    assert [r.event for r in records] == [
        "order_imported",
        "order_retry",
        "order_failed",
        "slot_lag_high",
    ]
    first = records[0]
    assert first.level == "info" and first.service == "orders"
    assert first.logger == "replicator.orders"
    assert first.fields == {"e_number": "E1001", "lines": 3}
    assert first.at.tzinfo is not None
    assert abs((datetime.now(UTC) - first.at).total_seconds()) < 60
    # Secrets were scrubbed before the sink saw them.
    assert records[-1].fields["dsn"] == "postgresql://sync:***@db/erp"

    assert [r.event for r in store.query(level="warning")] == [
        "order_retry",
        "order_failed",
        "slot_lag_high",
    ]
    assert [r.event for r in store.query(service="orders", level="error")] == ["order_failed"]
    assert [r.event for r in store.query(limit=2)] == ["order_failed", "slot_lag_high"]
    assert store.query(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert store.dropped == 0


def test_purge_deletes_past_retention(store: LogStore, engine: sa.Engine) -> None:
    now = datetime.now(UTC)
    log = structlog.get_logger("replicator.sweep")
    for days in (30, 8, 1):
        ts = (now - timedelta(days=days)).isoformat()
        store.sink({"event": f"old_{days}d", "level": "info", "timestamp": ts, "service": "sweep"})
    log.info("fresh", service="sweep")
    assert store.flush()
    assert len(store.query()) == 4
    assert store.purge() == 2
    assert [r.event for r in store.query()] == ["old_1d", "fresh"]


def test_full_queue_drops_and_counts_without_blocking(engine: sa.Engine) -> None:
    s = LogStore(engine, queue_size=5)  # writer not started: the queue fills up
    t0 = time.monotonic()
    for i in range(50):
        s.sink({"event": f"e{i}", "level": "error"})
    assert time.monotonic() - t0 < 0.5
    assert s.dropped == 45
    s.sink({"event": object(), "level": "info", "weird": object()})  # odd values: still no raise
    s.start()
    assert s.flush()
    s.stop()
    assert len(s.query()) == 5


def test_failed_insert_is_counted_not_raised(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 's.db'}", "test")
    s = LogStore(eng, flush_interval=0.1)
    with eng.begin() as conn:
        conn.execute(sa.text("DROP TABLE log_records"))  # the store vanishes under the writer
    s.start()
    s.sink({"event": "lost", "level": "error"})
    assert s.flush()
    s.stop()
    assert s.dropped == 1
    eng.dispose()


def test_parse_since() -> None:
    now = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("1h", now) == now - timedelta(hours=1)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-11-21T05:00:00+00:00") == datetime(2026, 11, 21, 5, tzinfo=UTC)


def test_logs_command(
    store: LogStore, staging_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = structlog.get_logger("replicator.orders")
    log.info("order_imported", service="orders", e_number="E1001")
    log.error("order_failed", service="orders", e_number="E1003", reason="unknown SKU")
    structlog.get_logger("replicator.cdc").warning("slot_lag_high", service="capture")
    assert store.flush()
    remove_sink(store.sink)

    config = tmp_path / "config.toml"
    config.write_text(
        "[erp]\ndsn = 'postgresql://sync@127.0.0.1:1/erp'\n"
        "[capture]\ntables = ['stock']\n"
        f"[staging]\nurl = '{staging_url}'\n"
    )
    assert main(["logs", "--config", str(config), "--level", "warning"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "ERROR" in out[0] and "order_failed" in out[0]
    assert 'reason="unknown SKU"' in out[0] and "e_number=E1003" in out[0]
    assert "WARNING" in out[1] and "slot_lag_high" in out[1]

    args = ["logs", "-c", str(config), "--service", "orders", "--since", "1h", "--json"]
    assert main([*args, "--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["event"] == "order_failed" and rec["service"] == "orders"
    assert rec["fields"] == {"e_number": "E1003", "reason": "unknown SKU"}
    assert rec["at"].endswith("Z")


def test_logs_command_without_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "[erp]\ndsn = 'postgresql://sync@127.0.0.1:1/erp'\n[capture]\ntables = ['stock']\n"
        f"[staging]\nurl = 'sqlite:///{tmp_path / 'empty.db'}'\n"
    )
    assert main(["logs", "--config", str(config)]) == 0
    assert "no log records yet" in capsys.readouterr().out
    # Reading did not create the table.
    eng = make_engine(f"sqlite:///{tmp_path / 'empty.db'}", "test")
    assert not sa.inspect(eng).has_table(log_records.name)
    eng.dispose()
