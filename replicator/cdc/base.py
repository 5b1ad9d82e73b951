"""The capture contract: change events, table schemas, and the interface every capture source keeps.

A capture source (logical replication, trigger changelog) turns ERP writes into :class:`Change`
events and hands them, with the source position they reach, to the staging store's apply path.
The contract each backend must keep:

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
from dataclasses import dataclass, field
from typing import Any, Literal

Op = Literal["I", "U", "D", "T"]


@dataclass(frozen=True, slots=True)
class Column:
    """A source column: name, source type name (``format_type``), type OID where known."""

    name: str
    type_name: str
    type_oid: int = 0
    nullable: bool = True
    attnum: int = 0  # the column's number in the source catalog (0: not known); survives a rename


@dataclass(frozen=True, slots=True)
class TableSchema:
    """A watched table as the source describes it."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> Column | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(slots=True)
class Change:
    """One row change (or a truncate) of a watched table.

    ``values``: the new row image for I/U (columns absent are unchanged); ``key``: the key of the
    row before the change for U (when the key changed) and D.
    """

    table: str
    op: Op
    values: dict[str, Any] | None = None
    key: dict[str, Any] | None = None
    position: str = ""


@dataclass(slots=True)
class Checkpoint:
    """Where a source stands in staging, written in the same transaction as the data it covers."""

    source: str
    position: str
    state: str = "streaming"  # "snapshot" while the initial copy runs, then "streaming"
    extra: dict[str, Any] = field(default_factory=dict)


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
