"""Prometheus metrics of the daemon: one registry, the metric objects, scrape-time refreshers.

This module owns the :data:`REGISTRY` that ``GET /metrics`` (:mod:`replicator.web.server`) renders;
nothing else in the daemon creates metric objects or registries. Features import the metric they
update and set it where the work happens, e.g.::

    from replicator import metrics
    metrics.CHANGES_APPLIED.labels(source="erp", table="public.stock", op="update").inc(n)
    metrics.REPLICATION_LAG_SECONDS.labels(source="erp", slot="sync_daemon").set(lag)
    with metrics.LOOP_DURATION.time():
        run_one_cycle()

Values that are only correct when computed *at scrape time* (the age of the last heartbeat, the
order counts per state) register a refresher with :func:`on_scrape`; :func:`render` runs every
refresher right before it serialises the registry, so an age is never stale by a scrape interval::

    metrics.on_scrape(lambda: metrics.HEARTBEAT_AGE.labels(source="erp").set(
        time.time() - capture.last_heartbeat_at))

A refresher that raises is logged and skipped: a broken refresher must not break the scrape.
:func:`add_collector` registers a full custom collector (``collect()`` yielding metric
families) for values that have dynamic label sets, e.g. one series per slot read from
``pg_replication_slots`` on each scrape.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from replicator import __version__

log = structlog.get_logger(__name__)

__all__ = [
    "BREAKER_OPEN",
    "CHANGES_APPLIED",
    "CONTENT_TYPE",
    "HEARTBEAT_AGE",
    "INFO",
    "LAST_REPLICATION_TIMESTAMP",
    "LOOP_DURATION",
    "ORDERS",
    "PUSH_LAG_SECONDS",
    "REGISTRY",
    "REPLICATION_LAG_BYTES",
    "REPLICATION_LAG_SECONDS",
    "SLOT_RETAINED_WAL_BYTES",
    "SNAPSHOT_ROWS",
    "add_collector",
    "on_scrape",
    "remove_on_scrape",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Our own registry, not prometheus_client's global default: tests and a second daemon instance
# in one process must not collide.
REGISTRY = CollectorRegistry(auto_describe=True)

# Process metrics (RSS, open fds, CPU seconds) help an operator; a no-op off Linux.
ProcessCollector(registry=REGISTRY)

REPLICATION_LAG_SECONDS = Gauge(
    "sync_replication_lag_seconds",
    "Seconds between a change's commit on the source and its commit in the staging store.",
    ["source", "slot"],
    registry=REGISTRY,
)
REPLICATION_LAG_BYTES = Gauge(
    "sync_replication_lag_bytes",
    "Bytes of WAL between the source's current position and the position confirmed by the slot.",
    ["source", "slot"],
    registry=REGISTRY,
)
SLOT_RETAINED_WAL_BYTES = Gauge(
    "sync_slot_retained_wal_bytes",
    "WAL bytes the source keeps on disk for the replication slot (restart_lsn to current).",
    ["source", "slot"],
    registry=REGISTRY,
)
CHANGES_APPLIED = Counter(
    "sync_changes_applied",
    "Captured row changes applied to the staging store.",
    ["source", "table", "op"],
    registry=REGISTRY,
)
ORDERS = Gauge(
    "sync_orders",
    "Webshop orders in the order ledger by state (awaiting, delivered, failed, skipped, ...).",
    ["shop", "state"],
    registry=REGISTRY,
)
PUSH_LAG_SECONDS = Gauge(
    "sync_push_lag_seconds",
    "Seconds the oldest change not yet pushed to the webshop has been waiting.",
    ["pusher"],
    registry=REGISTRY,
)
STREAM_BACKLOG = Gauge(
    "sync_stream_backlog",
    "Journal entries committed to staging and not yet acknowledged by JetStream (PubAck).",
    ["stream"],
    registry=REGISTRY,
)
STREAM_LAG_SECONDS = Gauge(
    "sync_stream_lag_seconds",
    "Seconds the oldest journal entry not yet in the JetStream stream has been waiting.",
    ["stream"],
    registry=REGISTRY,
)
STREAM_PUBLISHED = Counter(
    "sync_stream_published_total",
    "Changes published to JetStream (PubAck received), duplicates dropped by the server included.",
    ["stream"],
    registry=REGISTRY,
)
HA_ACTIVE = Gauge(
    "sync_ha_active",
    "1 while this daemon holds the HA lease (active), 0 while it is the standby.",
    ["node"],
    registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    "sync_breaker_open",
    "1 while the circuit breaker of an external service is open (calls suspended), else 0.",
    ["service"],
    registry=REGISTRY,
)
LAST_REPLICATION_TIMESTAMP = Gauge(
    "sync_last_replication_timestamp_seconds",
    "Unix time of the last change (or heartbeat) committed to staging from the source.",
    ["source"],
    registry=REGISTRY,
)
SNAPSHOT_ROWS = Gauge(
    "sync_snapshot_rows",
    "An online copy of a table in progress: rows copied (kind=done) and to copy (kind=total).",
    ["source", "table", "kind"],
    registry=REGISTRY,
)
HEARTBEAT_AGE = Gauge(
    "sync_heartbeat_age_seconds",
    "Seconds since the last heartbeat of the source reached staging (computed at scrape).",
    ["source"],
    registry=REGISTRY,
)
LOOP_DURATION = Histogram(
    "sync_loop_duration_seconds",
    "Duration of one cycle of the daemon's main loop.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    registry=REGISTRY,
)
# Exposed as sync_info{version="..."} 1.
INFO = Info("sync", "Version of the running sync-daemon.", registry=REGISTRY)
INFO.info({"version": __version__})


class Collector(Protocol):
    """What :func:`add_collector` accepts (prometheus_client's collector protocol)."""

    def collect(self) -> Iterable[Metric]: ...


_refreshers: list[Callable[[], None]] = []
_refresh_lock = threading.Lock()


def on_scrape(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` right before every scrape (to set gauges from live state). Returns ``fn``."""
    with _refresh_lock:
        if fn not in _refreshers:
            _refreshers.append(fn)
    return fn


def remove_on_scrape(fn: Callable[[], None]) -> None:
    with _refresh_lock:
        if fn in _refreshers:
            _refreshers.remove(fn)


def add_collector(collector: Collector) -> None:
    """Register a custom collector whose ``collect()`` is called on every scrape."""
    REGISTRY.register(collector)  # type: ignore[arg-type]


def render(registry: CollectorRegistry | None = None) -> bytes:
    """Run the scrape refreshers, then serialise ``registry`` (default :data:`REGISTRY`)."""
    with _refresh_lock:
        refreshers = list(_refreshers)
    for fn in refreshers:
        try:
            fn()
        except Exception as exc:  # never let one refresher break the whole scrape
            log.warning(
                "metrics_refresher_failed",
                refresher=getattr(fn, "__name__", repr(fn)),
                error=f"{type(exc).__name__}: {exc}",
            )
    return generate_latest(registry or REGISTRY)
