"""Plumbing shared by the pushers: config sections, choosing connectors, a shop's gate (token
bucket + back-off after failures), SKU filters, direct ERP reads and progress reporting.

The pushers read the change journal with :class:`replicator.staging.JournalReader` (an in-memory
read position; the durable cursor moves only after the work the entries stand for is done) and
keep their own state in staging tables through :mod:`replicator.staging.push`. Every push is
idempotent (absolute quantities, "attached once" bookkeeping), so entries looked at twice after
a restart do no harm.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar, cast

import sqlalchemy as sa
import structlog

from replicator.config import Config
from replicator.connectors import WebhookOnlyConnector
from replicator.connectors.base import ShopConnector
from replicator.db import make_engine
from replicator.push.ratelimit import TokenBucket

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
Section = TypeVar("Section")


def utcnow_text() -> str:
    """A UTC timestamp as ISO text (portable across SQLite and PostgreSQL staging)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def push_section(
    cfg: Config | Section, section_type: type[Section], name: str, erp_url: str | None
) -> tuple[Section, str | None]:
    """A pusher's config section and the ERP URL for its direct reads.

    ``cfg`` is either the section itself (then ``erp_url`` is taken as given) or the whole config
    (then its ``[name]`` section must exist, and ``erp_url`` defaults to the config's ERP URL).
    """
    if isinstance(cfg, section_type):
        return cfg, erp_url
    section = getattr(cfg, name)
    if section is None:
        raise ValueError(f"no [{name}] section in the config")
    return section, erp_url or cast(Config, cfg).erp.url


class ErpReads:
    """The ERP engine a pusher reads from directly (ERP webhooks), made on first use."""

    _erp_url: str | None
    _erp_engine: sa.Engine | None

    def _erp(self) -> sa.Engine:
        if self._erp_engine is None:
            if not self._erp_url:
                raise RuntimeError("no ERP URL given for direct reads")
            self._erp_engine = make_engine(self._erp_url, "push")
        return self._erp_engine

    def close(self) -> None:
        if self._erp_engine is not None:
            self._erp_engine.dispose()
            self._erp_engine = None


def can_push(conn: ShopConnector) -> bool:
    """Whether a connector implements the outbound API (webhook-only and inbox shops do not)."""
    if isinstance(conn, WebhookOnlyConnector):
        return False
    return type(conn).push_stock is not ShopConnector.push_stock


def select_connectors(
    connectors: Mapping[str, ShopConnector] | Iterable[ShopConnector], names: Sequence[str] = ()
) -> dict[str, ShopConnector]:
    """Connectors by shop name: the ``names`` asked for, or every one that can push."""
    if isinstance(connectors, Mapping):
        by_name = dict(connectors)
    else:
        by_name = {c.name: c for c in connectors}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"no connector for shop(s) {', '.join(missing)}")
        return {n: by_name[n] for n in names}
    return {n: c for n, c in by_name.items() if can_push(c)}


class SkuFilter:
    """Per-SKU exclusions: exact SKUs or shell patterns (``GIFT-*``)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.exact = {p for p in patterns if not any(ch in p for ch in "*?[")}
        self.globs = [p for p in patterns if p not in self.exact]

    def excluded(self, sku: str) -> bool:
        return sku in self.exact or any(fnmatch.fnmatchcase(sku, g) for g in self.globs)


class ShopGate:
    """One shop's request budget and failure back-off, shared by every thread that pushes."""

    def __init__(
        self, name: str, rate: float, burst: int, max_backoff: float, clock: Clock
    ) -> None:
        self.name = name
        self.bucket = TokenBucket(rate, burst, clock=clock)
        self.clock = clock
        self.max_backoff = max_backoff
        self.blocked_until = 0.0
        self.failures = 0
        self.last_error: str | None = None
        self.lock = threading.Lock()  # one request at a time per shop and pusher

    def blocked(self, now: float | None = None) -> bool:
        return (self.clock() if now is None else now) < self.blocked_until

    def failed(self, error: str, retry_after: float | None) -> float:
        """Record a failure; returns the seconds until the next attempt."""
        self.failures += 1
        self.last_error = error
        if retry_after is not None:
            wait = min(max(retry_after, 0.0), self.max_backoff)
            self.bucket.pause(wait)
        else:
            wait = min(self.max_backoff, 0.5 * 2 ** min(self.failures - 1, 20))
        self.blocked_until = self.clock() + wait
        return wait

    def ok(self) -> None:
        if self.failures:
            log.info("shop_push_recovered", shop=self.name, after_failures=self.failures)
        self.failures = 0
        self.last_error = None
        self.blocked_until = 0.0


def erp_table(table: str, columns: Iterable[str]) -> sa.TableClause:
    """A lightweight SQLAlchemy table for direct ERP reads (quoting per the ERP's dialect)."""
    schema, _, name = table.rpartition(".")
    return sa.table(name, *(sa.column(c) for c in dict.fromkeys(columns)), schema=schema or None)


class ProgressReporter:
    """A progress string for status output, logged every ``interval`` seconds while it moves."""

    def __init__(
        self,
        pusher: str,
        interval: float,
        clock: Clock = time.monotonic,
        callback: Callable[[str], None] | None = None,
    ) -> None:
        self.pusher = pusher
        self.interval = interval
        self.clock = clock
        self.callback = callback
        self.text = "idle"
        self._logged = 0.0

    def set(self, text: str, *, force_log: bool = False) -> None:
        self.text = text
        if self.callback is not None:
            self.callback(text)
        now = self.clock()
        if force_log or now - self._logged >= self.interval:
            self._logged = now
            log.info("push_progress", pusher=self.pusher, progress=text)

    def idle(self) -> None:
        self.text = "idle"
        if self.callback is not None:
            self.callback(self.text)
