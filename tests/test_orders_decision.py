"""The decision for one order is a pure function: no ledger, no ERP, no clock — only data in,
an outcome out (replicator.orders.decision)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import sqlalchemy as sa

from replicator.config.orders import ImportCriteria, OrdersSection
from replicator.mappers.orders import OrderRejected
from replicator.orders.decision import Outcome, Write, decide, unforeseen, write_failed, written
from replicator.orders.ledger import Entry
from replicator.orders.writer import WriteResult

NOW = datetime(2026, 11, 26, 12, 0, 0)
OCFG = OrdersSection()
CRIT = ImportCriteria()


def entry(payload: object, *, e: str = "100", state: str = "awaiting", **kw: object) -> Entry:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    fields: dict[str, object] = {
        "shop": "shop",
        "e_number": e,
        "erp_order_no": None,
        "state": state,
        "attempts": 0,
        "last_error": None,
        "error_kind": None,
        "mapping_hash": None,
        "payload_hash": "h",
        "payload": raw,
        "shop_status": None,
        "first_seen": NOW,
        "last_seen": NOW,
        "next_attempt_at": None,
        "delivered_at": None,
        "pending_payload": None,
        "pending_hash": None,
        "diff": None,
        "update_queued": False,
    }
    fields.update(kw)
    return Entry(**fields)  # type: ignore[arg-type]


PAID = {"id": 100, "status": "processing", "date_paid": "2026-11-26T10:00:00"}


def test_an_order_meeting_the_criteria_is_to_be_written() -> None:
    step = decide(entry(PAID), CRIT, OCFG, "m1")
    assert step == Write(PAID, auto_invoice=False)


def test_an_unpaid_order_is_skipped_once_then_unchanged() -> None:
    unpaid = {**PAID, "date_paid": None}
    first = decide(entry(unpaid), CRIT, OCFG, "m1")
    assert isinstance(first, Outcome) and first.values["state"] == "skipped"
    assert first.note is not None and first.note[0] == "skip"
    why = first.values["last_error"]
    again = decide(entry(unpaid, state="skipped", last_error=why), CRIT, OCFG, "m1")
    assert again == Outcome("shop", "100", {}, None, None)


def test_bad_input_fails_with_the_reason_and_the_mapping_hash() -> None:
    for raw, reason in (
        (b"{not json", "JSON"),
        (json.dumps([1, 2]).encode(), "not a JSON object"),
    ):
        o = decide(entry(raw), CRIT, OCFG, "m1")
        assert isinstance(o, Outcome) and o.values["state"] == "failed"
        assert o.values["mapping_hash"] == "m1" and o.values["attempts"] == 1
        assert reason.lower() in o.values["last_error"].lower()
    o = decide(entry(PAID, e="unreadable-1"), CRIT, OCFG, "m1")
    assert isinstance(o, Outcome) and o.values["error_kind"] == "input"


def test_what_the_write_returned_or_raised_becomes_the_outcome() -> None:
    e = entry(PAID)
    at = NOW + timedelta(seconds=1)
    new = written(e, WriteResult("SO1", True, 2), at)
    assert new.values["delivered_at"] == at and new.note == ("new", "")
    found = written(e, WriteResult("SO1", False), at)
    assert found.event is not None and found.event[0] == "found in ERP"

    rejected = write_failed(e, OrderRejected("no such item", "mapping"), NOW, OCFG, "m1")
    assert rejected.values["error_kind"] == "mapping" and rejected.transient is None

    down = sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    retry = write_failed(e, down, NOW, OCFG, "m1")
    assert retry.transient and retry.values["state"] == "awaiting"
    assert retry.values["next_attempt_at"] > NOW

    odd = ValueError("boom")
    assert unforeseen(odd) and not unforeseen(down)
    assert write_failed(e, odd, NOW, OCFG, "m1").values["last_error"].startswith("unexpected")
