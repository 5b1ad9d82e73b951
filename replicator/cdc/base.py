"""The capture contract: the interface every capture source keeps, and what it reports.

A capture source (logical replication, trigger changelog) turns ERP writes into
:class:`~replicator.changes.Change` events and hands them, with the source position they reach,
to the staging store's apply path. The change types live in :mod:`replicator.changes` (staging
imports them too). The contract each backend must keep:

* changes of one source transaction are delivered in commit order, and a transaction is never
  split across two positions: the position passed to ``commit`` covers whole transactions only;
* a position is confirmed to the source (slot flush, changelog cleanup) only after the staging
  transaction that holds it has committed;
* ``Change.values`` holds only the columns whose new value is known: a column left out (an
  unchanged TOAST value) keeps what staging already has.
"""

from __future__ import annotations

import datetime as dt
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["CaptureSource", "Progress"]


@dataclass(slots=True)
class Progress:
    """What a capture source reports to status, health checks and metrics (positions are
    integers: an LSN for logical replication, a changelog id for triggers)."""

    received_lsn: int = 0
    confirmed_lsn: int = 0
    server_wal_end: int = 0
    changes: int = 0
    transactions: int = 0
    last_commit_at: dt.datetime | None = None
    lag_seconds: float | None = None
    last_applied_at: dt.datetime | None = None
    last_heartbeat_at: dt.datetime | None = None
    # An incremental snapshot in progress ("snapshot public.items: 120,000 of 1,250,000 rows").
    snapshot_table: str | None = None
    snapshot_done: int = 0
    snapshot_total: int = 0


class CaptureSource(ABC):
    """One ERP database captured into staging.

    The daemon calls ``start`` once, then ``run_cycle`` repeatedly from its main loop, and
    ``close`` on shutdown (also after a failure). ``run_cycle`` returns within about
    ``timeout`` seconds so that the loop can answer signals, reload and write heartbeats.
    """

    name: str
    progress: Progress

    @abstractmethod
    def start(self) -> None:
        """Connect, verify or create what capture needs, take the initial snapshot if due."""

    @abstractmethod
    def run_cycle(self, timeout: float, stop: threading.Event) -> int:
        """Read and apply what is available; return the number of changes applied."""

    @abstractmethod
    def heartbeat(self) -> None:
        """Record a heartbeat in the source so an idle source still advances."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; never raises."""
