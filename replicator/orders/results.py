"""What an import run reports, and the clock it runs on.

:class:`CycleResult` holds the counters of one cycle (or one work-off) and the reason for every
skipped or errored order; every part of the order import adds to it and the daemon, the CLI and
notifications read it. Times in the order import are naive UTC, as the ledger stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive(t: datetime) -> datetime:
    """``t`` as naive UTC (an aware time is converted; a naive one is taken as UTC)."""
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


@dataclass(frozen=True)
class OrderNote:
    shop: str
    e_number: str
    reason: str


@dataclass
class CycleResult:
    """Counters of one cycle, and the reason for every skipped or errored order."""

    total: int = 0
    new: int = 0
    skipped: int = 0
    errored: int = 0
    updated: int = 0
    # Seen again with the same payload: their fate is already recorded (not "skipped" again).
    unchanged: int = 0
    skipped_orders: list[OrderNote] = field(default_factory=list)
    errored_orders: list[OrderNote] = field(default_factory=list)
    shops: dict[str, str] = field(default_factory=dict)

    def skip(self, shop: str, e: str, reason: str) -> None:
        self.skipped += 1
        self.skipped_orders.append(OrderNote(shop, e, reason))

    def error(self, shop: str, e: str, reason: str) -> None:
        self.errored += 1
        self.errored_orders.append(OrderNote(shop, e, reason))

    @property
    def ok(self) -> bool:
        return all(s == "ok" for s in self.shops.values())

    def summary(self) -> str:
        return (
            f"total {self.total}, new {self.new}, skipped {self.skipped}, errored {self.errored}"
            + (f", updated {self.updated}" if self.updated else "")
            + (f", unchanged {self.unchanged}" if self.unchanged else "")
        )
