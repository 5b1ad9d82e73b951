"""The pushers' tables: what each shop last accepted (``push_stock_pushed``) and the invoice queue
(``push_invoices``). The pushers in :mod:`replicator.push` keep their policy; the SQL is here.

Times are ISO text (portable across SQLite and PostgreSQL staging), as the pushers give them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from replicator.db import reading
from replicator.staging import schema
from replicator.staging.engine import StagingDb

_CHUNK = 500  # values per IN (…) list


class PushedStock:
    """Per shop and SKU, the quantity the shop last accepted (refused SKUs are marked)."""

    def __init__(self, db: StagingDb) -> None:
        self.db = db
        with db.engine.begin() as conn:
            conn.exec_driver_sql(schema.PUSH_STOCK_DDL)

    def of_shop(self, shop: str, skus: Sequence[str] | None = None) -> dict[str, int]:
        """SKU → quantity last accepted by ``shop`` (only ``skus`` when given)."""
        p = self.db.ph
        sql = f"SELECT sku, quantity FROM push_stock_pushed WHERE shop = {p}"
        out: dict[str, int] = {}
        with reading(self.db.engine) as conn:
            if skus is None:
                rows = conn.exec_driver_sql(sql, (shop,)).fetchall()
                return {str(s): int(q) for s, q in rows}
            for i in range(0, len(skus), _CHUNK):
                chunk = list(skus[i : i + _CHUNK])
                rows = conn.exec_driver_sql(
                    f"{sql} AND sku IN ({self.db.phs(len(chunk))})", (shop, *chunk)
                ).fetchall()
                out.update((str(s), int(q)) for s, q in rows)
        return out

    def record(
        self, shop: str, quantities: Mapping[str, int], refused: Iterable[str], at: str
    ) -> None:
        """Replace what ``shop`` holds for these SKUs, in one transaction."""
        refused_set = set(refused)
        p = self.db.ph
        skus = list(quantities)
        with self.db.engine.begin() as conn:
            for i in range(0, len(skus), _CHUNK):
                chunk = skus[i : i + _CHUNK]
                conn.exec_driver_sql(
                    f"DELETE FROM push_stock_pushed WHERE shop = {p} "
                    f"AND sku IN ({self.db.phs(len(chunk))})",
                    (shop, *chunk),
                )
            self.db.executemany(
                conn,
                "INSERT INTO push_stock_pushed (shop, sku, quantity, refused, pushed_at) "
                f"VALUES ({self.db.phs(5)})",
                [(shop, s, int(q), int(s in refused_set), at) for s, q in quantities.items()],
            )


class InvoiceQueue:
    """Invoices the invoice pusher found booked: pending, attached or failed, with attempts."""

    _COLUMNS = frozenset(
        {"number", "e_number", "state", "attempts", "last_error", "filename"}
        | {"next_attempt_at", "attached_at"}
    )

    def __init__(self, db: StagingDb) -> None:
        self.db = db
        with db.engine.begin() as conn:
            conn.exec_driver_sql(schema.PUSH_INVOICES_DDL)

    def all(self) -> list[dict[str, Any]]:
        """Every invoice, oldest first."""
        with reading(self.db.engine) as conn:
            res = conn.exec_driver_sql(
                "SELECT invoice_key, number, shop, e_number, state, attempts, last_error, "
                "filename, queued_at, attached_at FROM push_invoices ORDER BY queued_at"
            )
            return [dict(r._mapping) for r in res]

    def known(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are queued already."""
        out: set[str] = set()
        with reading(self.db.engine) as conn:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                rows = conn.exec_driver_sql(
                    "SELECT invoice_key FROM push_invoices WHERE invoice_key IN "
                    f"({self.db.phs(len(chunk))})",
                    tuple(chunk),
                ).fetchall()
                out.update(r[0] for r in rows)
        return out

    def add(self, shop: str, items: Sequence[tuple[str, str]], at: str) -> None:
        """Queue (invoice key, number) pairs as pending."""
        p = self.db.ph
        with self.db.engine.begin() as conn:
            for key, number in items:
                conn.exec_driver_sql(
                    "INSERT INTO push_invoices (invoice_key, number, shop, state, queued_at) "
                    f"VALUES ({p}, {p}, {p}, 'pending', {p})",
                    (key, number, shop, at),
                )

    def update(self, key: str, **values: Any) -> None:
        """Set columns of one invoice's row."""
        unknown = set(values) - self._COLUMNS
        if unknown:  # column names go into the SQL text: only the table's own
            raise ValueError(f"push_invoices has no column(s) {', '.join(sorted(unknown))}")
        p = self.db.ph
        sets = ", ".join(f"{k} = {p}" for k in values)
        with self.db.engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE push_invoices SET {sets} WHERE invoice_key = {p}", (*values.values(), key)
            )

    def get(self, key: str) -> dict[str, Any] | None:
        with reading(self.db.engine) as conn:
            row = conn.exec_driver_sql(
                f"SELECT * FROM push_invoices WHERE invoice_key = {self.db.ph}", (key,)
            ).fetchone()
        return dict(row._mapping) if row is not None else None

    def due(self, now: str, limit: int) -> list[tuple[str, str | None, int]]:
        """(key, number, attempts) of pending invoices and failed ones whose retry time came."""
        with reading(self.db.engine) as conn:
            rows = conn.exec_driver_sql(
                "SELECT invoice_key, number, attempts FROM push_invoices WHERE state = 'pending' "
                "OR (state = 'failed' AND next_attempt_at IS NOT NULL "
                f"AND next_attempt_at <= {self.db.ph}) ORDER BY queued_at LIMIT {int(limit)}",
                (now,),
            ).fetchall()
        return [(r[0], r[1], int(r[2])) for r in rows]

    def oldest_pending(self) -> Any:
        """When the oldest pending invoice was queued (None when none is)."""
        with reading(self.db.engine) as conn:
            return conn.exec_driver_sql(
                "SELECT MIN(queued_at) FROM push_invoices WHERE state = 'pending'"
            ).scalar()
