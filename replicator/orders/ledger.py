"""The order ledger in the staging store: every order's fate, its timeline, and per-shop state.

Tables (prefix ``order_``, defined in :mod:`replicator.staging.schema`, created on first use;
this module is the only code that reads or writes them):

``order_ledger``    one row per (shop, e-number): state (awaiting, delivered, failed, skipped,
                    update-pending), ERP order number, attempts, last error (+ its kind and the
                    mapping files' hash when it failed), the raw payload as received and its hash,
                    first/last seen, and for update-pending the new payload and a field diff.
                    This row *is* the inbox entry: webhooks, polling and the sweep all upsert it.
``order_events``    the timeline: downloaded, skipped+why, written, failed+why, update detected...
``order_shops``     per shop: the download watermark, consecutive failed cycles, cancelled flag,
                    next probe time, last reconciliation sweep.

Times are naive UTC (portable across SQLite and PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from replicator.db import reading
from replicator.staging import StagingStore, schema, shared_engine

STATES = ("awaiting", "delivered", "failed", "skipped", "update-pending")

# The tables are defined with every other staging table, in replicator.staging.schema.
ledger_t = schema.order_ledger
events_t = schema.order_events
shops_t = schema.order_shops


@dataclass(frozen=True)
class Entry:
    """One ledger row."""

    shop: str
    e_number: str
    erp_order_no: str | None
    state: str
    attempts: int
    last_error: str | None
    error_kind: str | None
    mapping_hash: str | None
    payload_hash: str
    payload: bytes
    shop_status: str | None
    first_seen: datetime
    last_seen: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    pending_payload: bytes | None
    pending_hash: str | None
    diff: str | None
    update_queued: bool


@dataclass(frozen=True)
class Event:
    at: datetime
    event: str
    detail: str | None


@dataclass(frozen=True)
class ShopState:
    shop: str
    watermark: datetime | None = None
    last_success_at: datetime | None = None
    consecutive_failures: int = 0
    cancelled: bool = False
    cancelled_reason: str | None = None
    next_probe_at: datetime | None = None
    last_reconcile_at: datetime | None = None
    last_error: str | None = None


_ENTRY_COLS = [ledger_t.c[f] for f in Entry.__dataclass_fields__]


def entry_from_row(row: Any) -> Entry:
    """An :class:`Entry` from a ``order_ledger`` row (blobs as bytes, flags as bool)."""
    m = row._mapping
    values = {f: m[f] for f in Entry.__dataclass_fields__}
    values["payload"] = bytes(values["payload"])
    if values["pending_payload"] is not None:
        values["pending_payload"] = bytes(values["pending_payload"])
    values["update_queued"] = bool(values["update_queued"])
    return Entry(**values)


class Ledger:
    """Access to the order tables of the staging store."""

    def __init__(self, staging: str | sa.Engine | StagingStore) -> None:
        """``staging``: the store, its engine, or its URL (then the process's engine for it)."""
        if isinstance(staging, StagingStore):
            self.engine = staging.engine
        elif isinstance(staging, str):
            self.engine = shared_engine(staging, "orders")
        else:
            self.engine = staging
        schema.create_tables(self.engine, *schema.ORDER_TABLES)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- orders ---------------------------------------------------------------------------------

    def get(self, shop: str, e_number: str, conn: sa.Connection | None = None) -> Entry | None:
        q = sa.select(*_ENTRY_COLS).where(ledger_t.c.shop == shop, ledger_t.c.e_number == e_number)
        if conn is not None:
            row = conn.execute(q).first()
        else:
            with reading(self.engine) as c:
                row = c.execute(q).first()
        return None if row is None else entry_from_row(row)

    def get_many(
        self, shop: str, e_numbers: Sequence[str], conn: sa.Connection | None = None
    ) -> list[Entry]:
        """Entries of one shop, in the order of ``e_numbers`` (missing ones left out)."""
        q = sa.select(*_ENTRY_COLS).where(
            ledger_t.c.shop == shop, ledger_t.c.e_number.in_(list(e_numbers))
        )
        if conn is not None:
            rows = conn.execute(q).all()
        else:
            with reading(self.engine) as c:
                rows = c.execute(q).all()
        found = {r.e_number: entry_from_row(r) for r in rows}
        return [found[e] for e in e_numbers if e in found]

    def find(self, e_number: str, shop: str | None = None) -> list[Entry]:
        q = sa.select(*_ENTRY_COLS).where(ledger_t.c.e_number == e_number)
        if shop:
            q = q.where(ledger_t.c.shop == shop)
        with reading(self.engine) as c:
            return [entry_from_row(r) for r in c.execute(q)]

    def list_orders(
        self,
        state: str | None = None,
        shop: str | None = None,
        limit: int | None = None,
        update_pending_queued: bool | None = None,
    ) -> list[Entry]:
        # Newest orders first; last_seen moves every cycle and would order nothing.
        q = sa.select(*_ENTRY_COLS).order_by(ledger_t.c.first_seen.desc(), ledger_t.c.id.desc())
        if state:
            q = q.where(ledger_t.c.state == state)
        if shop:
            q = q.where(ledger_t.c.shop == shop)
        if update_pending_queued is not None:
            q = q.where(ledger_t.c.update_queued == update_pending_queued)
        if limit:
            q = q.limit(limit)
        with reading(self.engine) as c:
            return [entry_from_row(r) for r in c.execute(q)]

    def counts(self, shop: str | None = None) -> dict[str, int]:
        q = sa.select(ledger_t.c.state, sa.func.count()).group_by(ledger_t.c.state)
        if shop:
            q = q.where(ledger_t.c.shop == shop)
        with reading(self.engine) as c:
            return {str(s): int(n) for s, n in c.execute(q)}

    def due(self, shop: str, now: datetime, limit: int = 1000) -> list[tuple[str, str]]:
        """(e-number, state) of orders to work on now: awaiting ones whose retry time has come,
        and update-pending ones not yet queued for a person."""
        q = (
            sa.select(ledger_t.c.e_number, ledger_t.c.state)
            .where(
                ledger_t.c.shop == shop,
                sa.or_(
                    sa.and_(
                        ledger_t.c.state == "awaiting",
                        sa.or_(
                            ledger_t.c.next_attempt_at.is_(None), ledger_t.c.next_attempt_at <= now
                        ),
                    ),
                    sa.and_(
                        ledger_t.c.state == "update-pending", ledger_t.c.update_queued.is_(False)
                    ),
                ),
            )
            .order_by(ledger_t.c.id)
            .limit(limit)
        )
        with reading(self.engine) as c:
            return [(str(e), str(s)) for e, s in c.execute(q)]

    def mapping_failures(self, shop: str, mapping_hash: str) -> list[str]:
        """E-numbers parked for a mapping problem under other mapping files than the current."""
        q = sa.select(ledger_t.c.e_number).where(
            ledger_t.c.shop == shop,
            ledger_t.c.state == "failed",
            ledger_t.c.error_kind == "mapping",
            sa.or_(ledger_t.c.mapping_hash.is_(None), ledger_t.c.mapping_hash != mapping_hash),
        )
        with reading(self.engine) as c:
            return [str(r[0]) for r in c.execute(q)]

    def insert(self, conn: sa.Connection, **values: Any) -> None:
        values.setdefault("attempts", 0)
        values.setdefault("update_queued", False)
        conn.execute(ledger_t.insert().values(**values))

    def insert_many(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Insert new ledger rows in one executemany (all rows carry the same keys)."""
        if rows:
            conn.execute(
                ledger_t.insert(), [{"attempts": 0, "update_queued": False, **r} for r in rows]
            )

    def update_many(
        self, conn: sa.Connection, updates: list[tuple[str, str, dict[str, Any]]]
    ) -> None:
        """Apply (shop, e-number, values) updates, one executemany per distinct set of columns."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for shop, e, values in updates:
            key = tuple(sorted(values))
            groups.setdefault(key, []).append(
                {"b_shop": shop, "b_e": e, **{f"v_{k}": v for k, v in values.items()}}
            )
        for cols, params in groups.items():
            stmt = (
                ledger_t.update()
                .where(ledger_t.c.shop == sa.bindparam("b_shop"))
                .where(ledger_t.c.e_number == sa.bindparam("b_e"))
                .values({c: sa.bindparam(f"v_{c}") for c in cols})
            )
            conn.execute(stmt, params)

    def events_many(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Insert timeline events (dicts with shop, e_number, at, event, detail) at once."""
        if rows:
            conn.execute(events_t.insert(), rows)

    def update(self, conn: sa.Connection, shop: str, e_number: str, **values: Any) -> None:
        conn.execute(
            ledger_t.update()
            .where(ledger_t.c.shop == shop, ledger_t.c.e_number == e_number)
            .values(**values)
        )

    def event(
        self,
        conn: sa.Connection,
        shop: str,
        e_number: str,
        at: datetime,
        event: str,
        detail: str | None = None,
    ) -> None:
        conn.execute(
            events_t.insert().values(
                shop=shop, e_number=e_number, at=at, event=event, detail=detail
            )
        )

    def add_event(self, shop: str, e_number: str, event: str, detail: str | None = None) -> None:
        """One timeline event in a transaction of its own (for features beside the import)."""
        at = datetime.now(UTC).replace(tzinfo=None)
        with self.engine.begin() as conn:
            self.event(conn, shop, e_number, at, event, detail)

    def events(self, shop: str, e_number: str) -> list[Event]:
        q = (
            sa.select(events_t.c.at, events_t.c.event, events_t.c.detail)
            .where(events_t.c.shop == shop, events_t.c.e_number == e_number)
            .order_by(events_t.c.id)
        )
        with reading(self.engine) as c:
            return [Event(r.at, r.event, r.detail) for r in c.execute(q)]

    def e_numbers(
        self, shop: str, since: datetime | None = None
    ) -> list[tuple[str, str, str | None]]:
        """(e-number, state, ERP order number) of a shop's orders first seen since ``since``."""
        q = sa.select(ledger_t.c.e_number, ledger_t.c.state, ledger_t.c.erp_order_no).where(
            ledger_t.c.shop == shop
        )
        if since is not None:
            q = q.where(ledger_t.c.first_seen >= since)
        with reading(self.engine) as c:
            return [(str(e), str(s), o) for e, s, o in c.execute(q)]

    # -- shops ----------------------------------------------------------------------------------

    def shop_state(self, shop: str) -> ShopState:
        with reading(self.engine) as c:
            row = c.execute(sa.select(shops_t).where(shops_t.c.shop == shop)).first()
        if row is None:
            return ShopState(shop)
        m = dict(row._mapping)
        m["cancelled"] = bool(m["cancelled"])
        return ShopState(**m)

    def shop_states(self) -> list[ShopState]:
        with reading(self.engine) as c:
            rows = c.execute(sa.select(shops_t).order_by(shops_t.c.shop)).all()
        return [
            ShopState(**{**r._mapping, "cancelled": bool(r._mapping["cancelled"])}) for r in rows
        ]

    def save_shop(self, state: ShopState, conn: sa.Connection | None = None) -> None:
        values = {f: getattr(state, f) for f in ShopState.__dataclass_fields__}

        def run(c: sa.Connection) -> None:
            done = c.execute(
                shops_t.update().where(shops_t.c.shop == state.shop).values(**values)
            ).rowcount
            if not done:
                c.execute(shops_t.insert().values(**values))

        if conn is not None:
            run(conn)
        else:
            with self.engine.begin() as c:
                run(c)

    def tally(self, entries: Sequence[Entry]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in entries:
            out[e.state] = out.get(e.state, 0) + 1
        return out


def payloads_in_states(engine: sa.Engine, states: Sequence[str]) -> list[bytes]:
    """The payloads (the pending update where there is one) of orders in ``states``; none when
    the order import never ran on this staging store (no ledger table)."""
    with reading(engine) as conn:
        exists = sa.inspect(conn).has_table(ledger_t.name)
    if not exists:
        return []
    q = sa.select(sa.func.coalesce(ledger_t.c.pending_payload, ledger_t.c.payload)).where(
        ledger_t.c.state.in_(list(states))
    )
    with reading(engine) as c:
        return [bytes(r[0]) for r in c.execute(q)]
