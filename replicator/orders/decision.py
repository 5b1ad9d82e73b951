"""The decision for one order: what its import attempt comes to, as a pure function.

:func:`decide` judges an order before the ERP is asked — the payload's size and shape, a readable
e-number, the import criteria — and either settles its fate (:class:`Outcome`: failed, skipped,
or the same fate as recorded) or says what to write (:class:`Write`). The caller does the write and
turns what it returned into an outcome with :func:`written` or raised with :func:`write_failed`.

Nothing here touches the ledger, the ERP, the log or the clock: the order, its ledger entry, the
criteria, the ``[orders]`` settings and the time go in; an outcome comes out, and the caller
records it (in the ledger, the cycle's counters, the log). So it can run on worker threads and be
tested without a database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from replicator.config.orders import ImportCriteria, OrdersSection
from replicator.errors_map import is_retryable, is_schema_mismatch
from replicator.mappers.expr import get_path
from replicator.mappers.orders import OrderRejected
from replicator.orders.inbox import PayloadError, no_e_number_reason, parse_payload
from replicator.orders.ledger import Entry
from replicator.orders.writer import WriteResult, db_message


@dataclass(frozen=True)
class Outcome:
    """What one order's import attempt decided; recorded by the caller.

    ``values``     ledger columns to set (empty: nothing to record)
    ``event``      the timeline event (name, detail), or None
    ``note``       how the cycle counts it: ("new" | "skip" | "error", reason), or None
    ``transient``  the ERP was unavailable (its message): the order waits, the run stops
    ``unfit``      the mapping no longer fits the ERP (why): re-validate it before the next order
    """

    shop: str
    e_number: str
    values: dict[str, Any]
    event: tuple[str, str] | None
    note: tuple[str, str] | None
    transient: str | None = None
    unfit: str | None = None


@dataclass(frozen=True)
class Write:
    """The order passed every check: write ``payload`` to the ERP."""

    payload: dict[str, Any]
    auto_invoice: bool


def check_criteria(
    crit: ImportCriteria, payload: Mapping[str, Any], status: str | None
) -> str | None:
    """None when the order may be imported, else why not (shown to the shop owner)."""
    found = next(
        (v for f in crit.status_fields if (v := get_path(payload, f)) not in ("", None)), None
    )
    st = str(found or status or "").lower()
    allowed = [s.lower() for s in crit.statuses]
    if st not in allowed:
        shown = st or "(none)"
        return f"status {shown!r} is not imported (orders.criteria statuses: {', '.join(allowed)})"
    if crit.fulfillment_statuses:
        ful = next(
            (v for f in crit.fulfillment_fields if (v := get_path(payload, f)) not in ("", None)),
            "",
        )
        wanted = [s.lower() for s in crit.fulfillment_statuses]
        if str(ful).lower() not in wanted:
            return (
                f"fulfilment {str(ful) or '(none)'!r} is not imported "
                f"(orders.criteria fulfillment_statuses: {', '.join(wanted)})"
            )
    if crit.paid_only and not get_path(payload, crit.paid_field):
        return f"not paid yet ({crit.paid_field} is empty; orders.criteria paid_only = true)"
    if crit.mode == "wait_for_invoice" and not get_path(payload, crit.invoice_field):
        return (
            f"waiting for the shop's invoice ({crit.invoice_field} is empty; mode wait_for_invoice)"
        )
    return None


def retry_delay(ocfg: OrdersSection, attempts: int) -> timedelta:
    """How long an order the ERP could not take waits before its next attempt."""
    seconds = min(ocfg.backoff_max * 10, max(1.0, ocfg.backoff_initial) * 2 ** min(attempts, 12))
    return timedelta(seconds=min(seconds, ocfg.interval * 4))


def failed(entry: Entry, mapping_hash: str, reason: str, kind: str) -> Outcome:
    """The order cannot be imported as it is (``kind``: input, mapping, ...): parked as failed."""
    return Outcome(
        entry.shop,
        entry.e_number,
        {
            "state": "failed",
            "last_error": reason,
            "error_kind": kind,
            "mapping_hash": mapping_hash,
            "attempts": entry.attempts + 1,
            "next_attempt_at": None,
        },
        ("failed", reason),
        ("error", reason),
    )


def decide(
    entry: Entry, crit: ImportCriteria, ocfg: OrdersSection, mapping_hash: str
) -> Outcome | Write:
    """Judge an order before the ERP write: its fate, or what to write."""
    shop, e = entry.shop, entry.e_number
    raw = entry.payload
    if len(raw) > ocfg.max_payload_bytes:
        return failed(
            entry,
            mapping_hash,
            f"payload is {len(raw) / 1e6:.1f} MB, above the limit of "
            f"{ocfg.max_payload_bytes / 1e6:.1f} MB (orders.max_payload_bytes)",
            "input",
        )
    try:
        payload = parse_payload(raw)
    except PayloadError as exc:
        return failed(entry, mapping_hash, str(exc), "input")
    if not isinstance(payload, dict):
        return failed(entry, mapping_hash, "payload is not a JSON object", "input")
    if e.startswith("unreadable-"):
        return failed(
            entry, mapping_hash, no_e_number_reason(payload, ocfg.e_number_fields), "input"
        )
    why = check_criteria(crit, payload, entry.shop_status)
    if why is not None:
        if entry.state == "skipped" and entry.last_error == why:
            # Same fate as recorded: nothing to log, count or add to the timeline.
            return Outcome(shop, e, {}, None, None)
        return Outcome(
            shop,
            e,
            {"state": "skipped", "last_error": why, "error_kind": None},
            ("skipped", why),
            ("skip", why),
        )
    return Write(payload, auto_invoice=crit.mode == "auto_invoice")


def written(entry: Entry, res: WriteResult, at: datetime) -> Outcome:
    """The ERP write succeeded at ``at``: a new ERP order, or the e-number was already there."""
    shop, e = entry.shop, entry.e_number
    values = {
        "state": "delivered",
        "erp_order_no": res.order_number,
        "attempts": entry.attempts + 1,
        "last_error": None,
        "error_kind": None,
        "next_attempt_at": None,
        "delivered_at": at,
    }
    if res.created:
        return Outcome(
            shop,
            e,
            values,
            ("written", f"ERP order {res.order_number}, {res.lines} line(s)"),
            ("new", ""),
        )
    return Outcome(
        shop,
        e,
        values,
        (
            "found in ERP",
            f"ERP order {res.order_number} already has this e-number; recorded it",
        ),
        ("skip", f"already in the ERP as order {res.order_number}"),
    )


def unforeseen(exc: BaseException) -> bool:
    """An error of the write no rule below knows (worth a traceback in the log)."""
    return not (isinstance(exc, (OrderRejected, sa.exc.DBAPIError)) or is_retryable(exc))


def write_failed(
    entry: Entry, exc: BaseException, now: datetime, ocfg: OrdersSection, mapping_hash: str
) -> Outcome:
    """The ERP write raised ``exc`` (after the in-place retries)."""
    if isinstance(exc, OrderRejected):
        return failed(entry, mapping_hash, exc.reason, exc.kind)
    if is_retryable(exc):
        msg = db_message(exc)
        attempts = entry.attempts + 1
        return Outcome(
            entry.shop,
            entry.e_number,
            {
                "state": "awaiting",
                "attempts": attempts,
                "last_error": msg,
                "error_kind": "transient",
                "next_attempt_at": now + retry_delay(ocfg, attempts),
            },
            ("retry later", f"ERP unavailable: {msg}"),
            ("error", f"ERP unavailable, will retry: {msg}"),
            transient=msg,
        )
    if isinstance(exc, sa.exc.DBAPIError):
        if is_schema_mismatch(exc):
            # Not this order's fault: park it as a mapping problem (retried when the mapping
            # changes); the caller re-validates the mapping before the next order.
            why = db_message(exc)
            reason = f"the mapping no longer fits the ERP: {why}"
            return replace(failed(entry, mapping_hash, reason, "mapping"), unfit=why)
        return failed(entry, mapping_hash, f"ERP rejected the order: {db_message(exc)}", "input")
    # Bad input never stops the line: whatever this order triggers, park it.
    return failed(
        entry, mapping_hash, f"unexpected error: {type(exc).__name__}: {str(exc)[:200]}", "input"
    )
