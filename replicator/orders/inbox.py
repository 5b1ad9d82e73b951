"""The one order inbox, keyed by (shop, e-number), that webhooks, polling and the sweep all feed.

An order may arrive three ways (a webhook, the next poll, the daily reconciliation sweep); the
inbox turns each arrival into exactly one of:

``new``       first time seen: a ledger row in state ``awaiting`` (the importer picks it up);
``same``      same payload as already recorded (by hash): only ``last_seen`` moves;
``changed``   a new version of an order not yet in the ERP: the newer payload replaces the older;
``update``    a new version of an order already in the ERP: ``update-pending`` with a field diff.

The payload is kept exactly as received (bytes); its hash is taken over the canonical JSON (sorted
keys) so a webhook and a REST poll of the same order version compare equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
import structlog

from replicator import safejson
from replicator.connectors.base import ShopOrder
from replicator.failpoints import failpoint
from replicator.orders.ledger import Entry, Ledger

log = structlog.get_logger(__name__)

Outcome = Literal["new", "same", "changed", "update"]
MAX_DIFF = 200


class PayloadError(ValueError):
    """The payload cannot be read as an order (not UTF-8, not JSON, not an object)."""


def parse_payload(raw: bytes) -> Any:
    """Decode a raw payload; numbers with a fraction become Decimal (money stays exact).

    Parsed within :mod:`replicator.safejson`'s limits (nesting depth, number size) and refused
    when a string holds what the stores cannot (NUL, a lone surrogate): the order is then parked
    as failed with the message, which names the field and the limit.
    """
    try:
        return safejson.loads(raw, decimal=True)
    except safejson.JsonRefused as exc:
        raise PayloadError(str(exc)) from None


def payload_hash(raw: bytes) -> str:
    try:
        canonical = json.dumps(parse_payload(raw), sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    except PayloadError:
        return hashlib.sha256(raw).hexdigest()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def diff_payloads(old: bytes, new: bytes) -> list[dict[str, Any]]:
    """Field-by-field differences (dotted paths) between two payload versions."""
    try:
        a_obj, b_obj = parse_payload(old), parse_payload(new)
    except PayloadError:
        return [{"field": "(payload)", "old": "(unreadable)", "new": "(unreadable)"}]
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(a_obj, "", a)
    _flatten(b_obj, "", b)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) or (key in a) != (key in b):
            out.append({"field": key, "old": a.get(key), "new": b.get(key)})
            if len(out) >= MAX_DIFF:
                break
    return out


# The ledger's e_number column is VARCHAR(100); "unreadable-" plus a delivery id must fit too.
MAX_E_NUMBER = 100
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _e_number_value(v: Any) -> str | None:
    if v is None or v == "" or isinstance(v, dict | list | bool):
        return None
    text = str(v)
    if len(text) > MAX_E_NUMBER or safejson.field_problem(text) is not None:
        return None
    return text


def e_number_from(payload: Any, fields: tuple[str, ...]) -> str | None:
    if not isinstance(payload, dict):
        return None
    for f in fields:
        e = _e_number_value(payload.get(f))
        if e is not None:
            return e
    return None


def no_e_number_reason(payload: Any, fields: tuple[str, ...]) -> str:
    """Why ``payload`` yields no e-number, for the failed order's reason."""
    looked = ", ".join(fields)
    if isinstance(payload, dict):
        for f in fields:
            v = payload.get(f)
            if isinstance(v, str | int) and len(str(v)) > MAX_E_NUMBER:
                return (
                    f"the e-number in field {f} is {len(str(v))} characters long "
                    f"(limit {MAX_E_NUMBER}; looked at: {looked})"
                )
    return f"payload carries no e-number (looked at: {looked})"


def read_webhook(raw: bytes, delivery_id: str | None, fields: tuple[str, ...]) -> tuple[Any, str]:
    """A webhook body's payload (None when it is not readable JSON) and its e-number.

    A body without a readable e-number gets ``unreadable-<delivery id or body hash>``, so it is
    parked in the ledger instead of lost (a delivery id that is not a short plain token is not
    used: the key must fit the ledger).
    """
    try:
        payload = parse_payload(raw)
    except PayloadError:
        payload = None
    e_number = e_number_from(payload, fields)
    if e_number is None:
        if delivery_id is None or not _DELIVERY_ID.fullmatch(delivery_id):
            delivery_id = hashlib.sha256(raw).hexdigest()[:12]
        e_number = f"unreadable-{delivery_id}"
    return payload, e_number


@dataclass(frozen=True)
class Offered:
    outcome: Outcome
    entry_state: str


class Inbox:
    """Records arrivals in the ledger, whichever way they came."""

    def __init__(self, ledger: Ledger, e_number_fields: tuple[str, ...] = ("number", "id")) -> None:
        self.ledger = ledger
        self.e_number_fields = e_number_fields

    def receive(
        self,
        orders: Sequence[ShopOrder],
        source: str,
        now: datetime,
        acknowledge: Callable[[Sequence[ShopOrder]], None] | None = None,
    ) -> list[Offered]:
        """The one acknowledgement rule of every intake path (design invariant 6): store the
        orders in one staging transaction, and only after that commit tell the source.

        ``acknowledge`` is the source's own "done" (inbox files → processed/); a webhook's is the
        2xx its receiver sends once this returns; a polled shop's is the watermark the importer
        saves after the whole window went through here. A crash before the acknowledgement
        leaves the orders with the source, which offers them again; this inbox then recognises
        them (``same``), so nothing is lost and nothing is stored twice.
        """
        if not orders:
            return []
        failpoint("orders.receive")
        offered = self.offer_many(list(orders), source, now)
        failpoint("orders.acknowledge")
        if acknowledge is not None:
            acknowledge(orders)
        return offered

    def offer(self, order: ShopOrder, source: str, now: datetime) -> Offered:
        raw = order.raw or json.dumps(order.payload, default=str).encode("utf-8")
        return self.offer_raw(order.shop, order.e_number, raw, source, now, status=order.status)

    def offer_many(self, orders: list[ShopOrder], source: str, now: datetime) -> list[Offered]:
        """A page of orders in one staging transaction (the poll and sweep path); orders not
        seen before are inserted with one executemany."""
        if not orders:
            return []
        items = []
        for o in orders:
            raw = o.raw or json.dumps(o.payload, default=str).encode("utf-8")
            items.append((o, raw, payload_hash(raw)))
        try:
            with self.ledger.begin() as conn:
                return self._offer_many(conn, items, source, now)
        except sa.exc.IntegrityError:
            # A webhook inserted one of these meanwhile: fall back to one transaction each.
            return [self.offer(o, source, now) for o in orders]

    def _offer_many(
        self,
        conn: sa.Connection,
        items: list[tuple[ShopOrder, bytes, str]],
        source: str,
        now: datetime,
    ) -> list[Offered]:
        out: list[Offered | None] = [None] * len(items)
        by_shop: dict[str, set[str]] = {}
        for o, _, _ in items:
            by_shop.setdefault(o.shop, set()).add(o.e_number)
        known = {
            (x.shop, x.e_number)
            for shop, es in by_shop.items()
            for x in self.ledger.get_many(shop, sorted(es), conn)
        }
        new_rows, events, later = [], [], []
        for i, (o, raw, h) in enumerate(items):
            key = (o.shop, o.e_number)
            if key in known:
                later.append(i)
                continue
            known.add(key)  # a second copy in the same page takes the "seen before" path
            status = o.status[:60] if o.status else None
            new_rows.append(
                {
                    "shop": o.shop,
                    "e_number": o.e_number,
                    "state": "awaiting",
                    "payload": raw,
                    "payload_hash": h,
                    "shop_status": status,
                    "first_seen": now,
                    "last_seen": now,
                }
            )
            events.append(
                {
                    "shop": o.shop,
                    "e_number": o.e_number,
                    "at": now,
                    "event": "downloaded",
                    "detail": f"via {source}, {len(raw)} bytes",
                }
            )
            out[i] = Offered("new", "awaiting")
        self.ledger.insert_many(conn, new_rows)
        self.ledger.events_many(conn, events)
        for i in later:
            o, raw, h = items[i]
            out[i] = self._offer(conn, o.shop, o.e_number, raw, h, source, now, o.status)
        return [x for x in out if x is not None]

    def offer_webhook(
        self,
        shop: str,
        raw: bytes,
        delivery_id: str | None,
        now: datetime,
        e_number: str | None = None,
    ) -> Offered:
        """A webhook body: the e-number is read from the payload (unless the receiver knew it);
        unreadable bodies are parked."""
        payload, read = read_webhook(raw, delivery_id, self.e_number_fields)
        e_number = e_number or read
        status = payload.get("status") if isinstance(payload, dict) else None
        src = f"webhook {delivery_id}" if delivery_id else "webhook"
        order = ShopOrder(
            shop=shop,
            e_number=e_number,
            status=str(status) if status else "",
            updated_at=now,
            payload=payload if isinstance(payload, dict) else {},
            raw=raw,
        )
        # The receiver answers 2xx when this returns: that answer is the acknowledgement.
        return self.receive([order], src, now)[0]

    def offer_raw(
        self,
        shop: str,
        e_number: str,
        raw: bytes,
        source: str,
        now: datetime,
        status: str | None = None,
    ) -> Offered:
        h = payload_hash(raw)
        for attempt in range(2):
            try:
                with self.ledger.begin() as conn:
                    return self._offer(conn, shop, e_number, raw, h, source, now, status)
            except sa.exc.IntegrityError:
                # Two feeds (webhook and poll) inserted the same new order at once: the row
                # exists now, so the second attempt takes the "seen before" path.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _offer(
        self,
        conn: sa.Connection,
        shop: str,
        e: str,
        raw: bytes,
        h: str,
        source: str,
        now: datetime,
        status: str | None,
    ) -> Offered:
        led = self.ledger
        cur: Entry | None = led.get(shop, e, conn)
        status = status[:60] if status else None
        if cur is None:
            led.insert(
                conn,
                shop=shop,
                e_number=e,
                state="awaiting",
                payload=raw,
                payload_hash=h,
                shop_status=status,
                first_seen=now,
                last_seen=now,
            )
            led.event(conn, shop, e, now, "downloaded", f"via {source}, {len(raw)} bytes")
            return Offered("new", "awaiting")
        if h in (cur.payload_hash, cur.pending_hash):
            led.update(conn, shop, e, last_seen=now)
            return Offered("same", cur.state)
        if cur.state in ("awaiting", "failed", "skipped"):
            led.update(
                conn,
                shop,
                e,
                payload=raw,
                payload_hash=h,
                shop_status=status,
                last_seen=now,
                state="awaiting",
                next_attempt_at=None,
            )
            led.event(conn, shop, e, now, "changed", f"new version via {source} (was {cur.state})")
            return Offered("changed", "awaiting")
        base = cur.payload
        diff = diff_payloads(base, raw)
        led.update(
            conn,
            shop,
            e,
            pending_payload=raw,
            pending_hash=h,
            last_seen=now,
            state="update-pending",
            update_queued=False,
            shop_status=status,
            diff=json.dumps(diff, default=str, ensure_ascii=False),
        )
        fields = ", ".join(d["field"] for d in diff[:8]) + (" ..." if len(diff) > 8 else "")
        led.event(conn, shop, e, now, "update detected", f"via {source}: {fields}")
        return Offered("update", "update-pending")
