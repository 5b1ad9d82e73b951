"""Booked invoices: when an ERP invoice row reaches the booked state, attach its PDF to the
webshop order with its e-number — once.

The cycle (:meth:`InvoicePushService.run_cycle`):

1. read new change-journal entries of the invoice table (the pusher's own cursor); for every
   upserted row that is booked (``state_column`` = ``booked_value``) and not yet known, queue it
   in ``push_invoices`` (state ``pending``). Drafts and deletions are ignored;
2. move the cursor past those entries — only after the queue rows committed;
3. work the queue: find the e-number (a column of the invoice row, or via the ERP order), load
   the PDF (file path, URL, or bytea/blob column), attach it through the shop's connector, mark
   the row ``attached``. A missing PDF, an unknown order or a shop refusal marks it ``failed``
   with the reason (and an ``invoice_failed`` event in the order ledger's timeline); failed rows
   are retried every ``retry_seconds`` up to ``max_attempts``. A shop that is down leaves the
   row ``pending`` (no attempt counted) and is left alone until its back-off ends.

Why nothing is lost and nothing is attached twice: the queue row is durable before the cursor
moves, so a crash re-reads the entries and finds them queued (an invoice key is queued once,
ever); an invoice is ``attached`` only after the shop accepted the PDF. A crash between the
shop's answer and the ``attached`` commit does not attach it twice either: the shops offer no
idempotency key for order notes/comments, so the connector reads the order's notes back before
writing and skips an invoice whose note (marked ``Invoice <filename> (``) is already there.

Wiring (for ``replicator/daemon.py``)::

    from replicator.push.invoices import InvoicePushService

    if cfg.invoice_push is not None and cfg.invoice_push.enabled:
        invoices = InvoicePushService(cfg, store, connectors)   # connectors: {shop name: connector}
        threading.Thread(target=invoices.run_forever, args=(stop_event,), name="push-invoices",
                         daemon=True).start()
        # status: invoices.progress, invoices.status() (counts per state, last failures)
        ...
        invoices.close()
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from replicator import metrics
from replicator.config import Config
from replicator.config.push import InvoicePushSection
from replicator.connectors.base import ShopConnector, ShopError, ShopUnavailable
from replicator.errors import RetryableError
from replicator.failpoints import failpoint
from replicator.orders.ledger import Ledger
from replicator.push.common import (
    ErpReads,
    ProgressReporter,
    ShopGate,
    push_section,
    select_connectors,
    utcnow_text,
)
from replicator.push.invoice_docs import InvoiceDocuments, InvoiceFailure, fmt
from replicator.staging import StagingStore, to_json
from replicator.staging.push import InvoiceQueue

log = structlog.get_logger(__name__)

CONSUMER = "push:invoices"


@dataclass
class InvoiceResult:
    """One invoice's outcome: ``state`` attached, failed, pending, not-booked or unknown."""

    number: str
    state: str
    detail: str = ""


class InvoicePushService(ErpReads):
    """Attaches booked invoices' PDFs to the shop orders, once."""

    pusher = "invoices"

    def __init__(
        self,
        cfg: Config | InvoicePushSection,
        store: StagingStore,
        connectors: Mapping[str, ShopConnector] | Iterable[ShopConnector],
        *,
        clock: Callable[[], float] = time.monotonic,
        erp_url: str | None = None,
        on_progress: Callable[[str], None] | None = None,
        consumer: str = CONSUMER,
        base_dir: Path | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        section, self._erp_url = push_section(cfg, InvoicePushSection, "invoice_push", erp_url)
        if base_dir is None and not isinstance(cfg, InvoicePushSection) and cfg.source_path:
            base_dir = Path(cfg.source_path).parent
        self.cfg = section
        self.store = store
        self.clock = clock
        shops = select_connectors(connectors, (section.shop,) if section.shop else ())
        if not shops:
            raise ValueError("invoice_push: no shop with REST access to attach invoices to")
        if len(shops) > 1:
            raise ValueError(
                f"invoice_push.shop: several shops ({', '.join(shops)}); name the one whose "
                "orders get the invoices"
            )
        ((self.shop, self.connector),) = shops.items()
        self.gate = ShopGate(self.shop, section.rate_limit, section.burst, 300.0, clock)
        self.reader = store.journal_reader(consumer, [section.table])
        self._progress = ProgressReporter("invoices", 10.0, clock, on_progress)
        self._lock = threading.Lock()  # one attach at a time (cycle vs. ERP webhook)
        self._erp_engine: sa.Engine | None = None
        self.docs = InvoiceDocuments(section, store, self._erp, base_dir)
        self._ledger = ledger if ledger is not None else self._find_ledger()
        self.last_cycle: dict[str, Any] = {}
        self._queued = InvoiceQueue(store.db)

    # ------------------------------------------------------------------ state
    def _find_ledger(self) -> Ledger | None:
        try:
            return Ledger(self.store)
        except Exception as exc:  # never let the timeline stop invoices
            log.warning("invoice_ledger_unavailable", error=str(exc))
            return None

    @property
    def progress(self) -> str:
        return self._progress.text

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice the pusher knows, oldest first (status output, tests)."""
        return self._queued.all()

    def status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        failures = []
        for inv in self.invoices():
            counts[inv["state"]] = counts.get(inv["state"], 0) + 1
            if inv["state"] == "failed":
                failures.append({"number": inv["number"], "error": inv["last_error"]})
        return {
            "progress": self.progress,
            "counts": counts,
            "failures": failures[-10:],
            "cursor": self.reader.committed,
            "last_cycle": self.last_cycle,
        }

    def _queue(self, items: list[tuple[str, str]]) -> int:
        """Queue (invoice key, number) pairs not seen before; returns how many were new."""
        known = self._queued.known([k for k, _ in items]) if items else set()
        new = [(k, n) for k, n in dict(items).items() if k not in known]
        if new:
            self._queued.add(self.shop, new, utcnow_text())
        return len(new)

    def _set(self, key: str, **values: Any) -> None:
        self._queued.update(key, **values)

    def _row_state(self, key: str) -> dict[str, Any] | None:
        return self._queued.get(key)

    # ------------------------------------------------------------------ timeline
    def _timeline(self, e_number: str | None, event: str, detail: str) -> None:
        if self._ledger is None or not e_number:
            return
        try:
            self._ledger.add_event(self.shop, e_number, event, detail)
        except Exception as exc:  # the timeline is a courtesy, never a reason to fail
            log.warning("invoice_timeline_failed", e_number=e_number, error=str(exc))

    # ------------------------------------------------------------------ attaching
    def _attach(self, key: str, number: str | None, attempts: int) -> InvoiceResult:
        """Try one queued invoice; the outcome is recorded before returning."""
        label = number or key
        e_number: str | None = None
        try:
            row = self.docs.invoice_row(key, number)
            if row is None:
                raise InvoiceFailure("the invoice row no longer exists in the ERP")
            label = str(row.get(self.cfg.number_column, label))
            ctx = {**row, "number": label}
            e_number = self.docs.e_number(row)
            ctx["e_number"] = e_number
            filename = fmt(self.cfg.filename, ctx)
            pdf = self.docs.pdf(ctx)
            if not self.gate.bucket.acquire(max_wait=30.0):
                return InvoiceResult(label, "pending", "rate limit")
            with self._lock:
                self.connector.attach_invoice(e_number, filename, pdf)
            failpoint("invoices.attach")
        except (ShopUnavailable, RetryableError) as exc:
            wait = self.gate.failed(str(exc), getattr(exc, "retry_after", None))
            self._set(key, last_error=str(exc), e_number=e_number)
            log.warning(
                "invoice_push_retry",
                invoice=label,
                e_number=e_number,
                error=str(exc),
                retry_in_seconds=round(wait, 1),
            )
            return InvoiceResult(label, "pending", str(exc))
        except (InvoiceFailure, ShopError) as exc:
            attempts += 1
            retry = attempts < self.cfg.max_attempts
            nxt = (
                (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.cfg.retry_seconds)).isoformat(
                    timespec="milliseconds"
                )
                if retry
                else None
            )
            self._set(
                key,
                state="failed",
                attempts=attempts,
                last_error=str(exc),
                e_number=e_number,
                next_attempt_at=nxt,
            )
            log.error(
                "invoice_push_failed",
                invoice=label,
                e_number=e_number,
                error=str(exc),
                attempts=attempts,
                retry=retry,
            )
            self._timeline(e_number, "invoice_failed", f"invoice {label}: {exc}")
            return InvoiceResult(label, "failed", str(exc))
        self.gate.ok()
        self._set(
            key,
            state="attached",
            attempts=attempts + 1,
            last_error=None,
            e_number=e_number,
            filename=filename,
            attached_at=utcnow_text(),
            next_attempt_at=None,
        )
        log.info(
            "invoice_attached",
            invoice=label,
            e_number=e_number,
            shop=self.shop,
            filename=filename,
            bytes=len(pdf),
        )
        self._timeline(e_number, "invoice_attached", f"invoice {label} attached as {filename}")
        return InvoiceResult(label, "attached", filename)

    def _due(self, limit: int = 100) -> list[tuple[str, str | None, int]]:
        return self._queued.due(utcnow_text(), limit)

    def run_cycle(self, now: float | None = None) -> dict[str, Any]:
        """Queue newly booked invoices from the journal, then attach what is due."""
        started = time.monotonic()
        entries = self.reader.read(self.cfg.journal_batch)
        booked: list[tuple[str, str]] = []
        for e in entries:
            if e["op"] != "U" or e["key"] is None:
                continue  # deletions and truncates are not bookings
            info = self.store.catalog.find(self.cfg.table)
            if info is None:
                continue
            row = self.docs.mirror_row(
                self.cfg.table, dict(zip(info.schema.key, e["key"], strict=True))
            )
            if row is None or not self.docs.booked(row):
                continue  # a draft, or gone again
            booked.append((to_json(e["key"]), str(row.get(self.cfg.number_column))))
        queued = self._queue(booked)
        if entries:
            self.reader.commit(entries[-1]["id"])  # durable in push_invoices: safe to move on
        results: list[InvoiceResult] = []
        if not self.gate.blocked(self.clock() if now is None else now):
            due = self._due()
            for i, (key, number, attempts) in enumerate(due, 1):
                self._progress.set(f"Attaching invoice {i} of {len(due)} ({number})")
                res = self._attach(key, number, attempts)
                results.append(res)
                if res.state == "pending" and self.gate.blocked():
                    break  # the shop is unavailable: leave the rest for later
        self._progress.idle()
        summary: dict[str, Any] = {
            "read": len(entries),
            "queued": queued,
            "attached": sum(r.state == "attached" for r in results),
            "failed": sum(r.state == "failed" for r in results),
            "waiting": sum(r.state == "pending" for r in results),
        }
        oldest = self._queued.oldest_pending()
        lag = 0.0
        if oldest:
            lag = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(str(oldest))).total_seconds()
        metrics.PUSH_LAG_SECONDS.labels(pusher="invoices").set(max(0.0, lag))
        if entries or results:
            summary["seconds"] = round(time.monotonic() - started, 3)
            log.info("invoice_push_cycle", **summary)
        self.last_cycle = summary
        return summary

    # ------------------------------------------------------------------ ERP webhook
    def refresh_invoice(self, number: str) -> InvoiceResult:
        """Read one invoice straight from the ERP by number and attach it now (if booked, once)."""
        row = self.docs.erp_row(self.cfg.table, self.cfg.number_column, number)
        if row is None:
            return InvoiceResult(number, "unknown", f"invoice {number} not found in the ERP")
        if not self.docs.booked(row):
            return InvoiceResult(number, "not-booked", f"invoice {number} is not booked")
        key = self.docs.key_of(row)
        self._queue([(key, number)])
        state = self._row_state(key)
        assert state is not None
        if state["state"] == "attached":
            return InvoiceResult(number, "attached", state["filename"] or "")
        return self._attach(key, number, int(state["attempts"]))

    # ------------------------------------------------------------------ running
    def run_forever(self, stop: threading.Event, interval: float = 2.0) -> None:
        while not stop.is_set():
            try:
                self.run_cycle()
            except Exception as exc:
                log.exception("invoice_push_cycle_failed", error=str(exc))
                stop.wait(5.0)
            stop.wait(interval)

    def close(self) -> None:
        super().close()
        self.docs.close()
