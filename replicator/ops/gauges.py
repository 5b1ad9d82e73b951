"""What the daemon knows, as Prometheus gauges (:mod:`replicator.metrics` owns the registry).

Two kinds of figures: those that need a query (the slot's retained WAL on the ERP, orders by
state in the ledger) are collected by a background service every 15 seconds
(:func:`collect_queried`), so a scrape never waits on a database; those the daemon holds in
memory (lag, heartbeat age, breakers) are refreshed at scrape time (:func:`refresh_live`), so an
age is never stale by a scrape interval.
"""

from __future__ import annotations

import sqlalchemy as sa
import structlog

from replicator import metrics
from replicator.cdc.supervisor import CaptureSupervisor
from replicator.config import Config
from replicator.ops.readmodel import orders_by_shop_and_state, slot_lag
from replicator.state import DaemonState

log = structlog.get_logger(__name__, service="daemon")


def collect_queried(cfg: Config, staging: sa.Engine, *, orders: bool) -> str:
    """Set the gauges that need a query; returns the service's one-line result."""
    parts = []
    if cfg.capture.mode == "logical" and cfg.erp.dialect == "postgresql":
        for s in slot_lag(cfg):
            if s["slot"] == cfg.capture.slot:
                metrics.SLOT_RETAINED_WAL_BYTES.labels("erp", s["slot"]).set(
                    s["retained_wal_bytes"] or 0
                )
                metrics.REPLICATION_LAG_BYTES.labels("erp", s["slot"]).set(s["lag_bytes"] or 0)
                parts.append(f"slot retains {s['retained_wal_bytes']} bytes")
                if s["warning"]:
                    log.warning("slot_at_risk", slot=s["slot"], warning=s["warning"])
    if orders:
        rows = orders_by_shop_and_state(staging)
        for shop, state, n in rows:
            metrics.ORDERS.labels(shop, state).set(n)
        parts.append(f"{sum(r[2] for r in rows)} orders in the ledger")
    return ", ".join(parts)


def refresh_live(cfg: Config, capture: CaptureSupervisor, state: DaemonState) -> None:
    """Set the gauges of what the daemon holds in memory (called right before a scrape)."""
    p = capture.progress
    source = capture.source_name
    slot = cfg.capture.slot if cfg.capture.mode == "logical" else ""
    if p is not None:
        if p.lag_seconds is not None:
            metrics.REPLICATION_LAG_SECONDS.labels(source, slot).set(p.lag_seconds)
        if p.last_applied_at is not None:
            metrics.LAST_REPLICATION_TIMESTAMP.labels(source).set(p.last_applied_at.timestamp())
        if p.snapshot_table is not None:
            metrics.SNAPSHOT_ROWS.labels(source, p.snapshot_table, "done").set(p.snapshot_done)
            metrics.SNAPSHOT_ROWS.labels(source, p.snapshot_table, "total").set(p.snapshot_total)
    age = capture.heartbeat_age()
    if age is not None:
        metrics.HEARTBEAT_AGE.labels(source).set(age)
    for s in state.services.values():
        metrics.BREAKER_OPEN.labels(s.name).set(1 if s.breaker_open else 0)
