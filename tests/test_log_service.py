"""Every log record carries its service, so ``sync-daemon logs --service X`` finds them all."""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

from replicator.log import add_sink, remove_sink, setup_logging
from replicator.schedules import Schedule
from replicator.services import Service, ServiceRunner
from replicator.state import DaemonState


def test_every_record_carries_its_service() -> None:
    records: list[dict[str, Any]] = []

    def sink(event_dict: MutableMapping[str, Any]) -> None:
        records.append(dict(event_dict))

    setup_logging(stream=io.StringIO())
    add_sink(sink)
    try:
        structlog.get_logger("replicator.orders.coordinator").info("from_importer")
        structlog.get_logger("replicator.cdc.logical").info("from_capture")
        structlog.get_logger("replicator.push.stock").info("from_stock")
        structlog.get_logger("replicator.config").warning("from_config")
        logging.getLogger("sqlalchemy.pool").warning("from_a_driver")

        def reconcile(_now: dt.datetime) -> str:
            # Module code run by the "reconcile" service: the service's name wins.
            structlog.get_logger("replicator.push.stock").info("inside_reconcile")
            return "done"

        runner = ServiceRunner(
            [Service("reconcile", Schedule.parse("every 1h"), reconcile)],
            DaemonState(),
            None,
            threading.Event(),
        )
        runner.run_one(runner.services[0])
    finally:
        remove_sink(sink)
        setup_logging(stream=io.StringIO())
    by_event = {r["event"]: r.get("service") for r in records}
    assert by_event["from_importer"] == "orders"
    assert by_event["from_capture"] == "capture"
    assert by_event["from_stock"] == "stock_push"
    assert by_event["from_config"] == "daemon"
    assert by_event["from_a_driver"] == "daemon"
    assert by_event["inside_reconcile"] == "reconcile"
    assert by_event["service_run"] == "reconcile"
    assert all(r.get("service") for r in records), [r for r in records if not r.get("service")]
