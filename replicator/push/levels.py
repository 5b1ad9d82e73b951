"""What the stock pusher publishes per SKU, and which SKUs a journal entry touches.

Per SKU: the sum over its rows in the configured tables (optionally only some warehouses) of
on-hand - reserved, minus quantities on webshop orders not yet imported into the ERP (from the
order ledger, when ``subtract_unimported_orders``), minus a safety buffer, never below 0 —
absolute quantities, so a replay is harmless. Read from the mirrors, or straight from the ERP
for an ERP webhook.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.config.push import StockPushSection
from replicator.orders.ledger import payloads_in_states
from replicator.push.common import SkuFilter, erp_table
from replicator.staging import StagingStore

log = structlog.get_logger(__name__)

_UNIMPORTED_STATES = ("awaiting", "failed", "update-pending")
_LOOKUP_CHUNK = 500


def dec(v: Any) -> Decimal:
    if v is None or v == "":
        return Decimal(0)
    if isinstance(v, Decimal):
        return v
    try:
        return Decimal(str(v))
    except InvalidOperation:
        return Decimal(0)


class StockLevels:
    """The quantity to publish per SKU, from the mirrors or the ERP."""

    def __init__(
        self,
        cfg: StockPushSection,
        store: StagingStore,
        skus: SkuFilter,
        erp: Callable[[], sa.Engine],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.filter = skus
        self._erp = erp

    def columns(self) -> list[str]:
        c = self.cfg
        cols = [c.sku_column, c.on_hand_column]
        if c.reserved_column:
            cols.append(c.reserved_column)
        if c.warehouse_column:
            cols.append(c.warehouse_column)
        return cols

    def accumulate(self, rows: Iterable[Sequence[Any]], totals: dict[str, Decimal]) -> None:
        c = self.cfg
        wanted = set(c.warehouses)
        has_res = c.reserved_column is not None
        wh_idx = 3 if has_res else 2
        for r in rows:
            sku = r[0]
            if sku is None:
                continue
            sku = str(sku)
            if wanted and c.warehouse_column and str(r[wh_idx]) not in wanted:
                continue
            q = dec(r[1]) - (dec(r[2]) if has_res else 0)
            totals[sku] = totals.get(sku, Decimal(0)) + q

    def mirror_totals(self, skus: Sequence[str] | None) -> dict[str, Decimal]:
        """Sum of on-hand - reserved per SKU from the mirrors (all SKUs when ``skus`` is None)."""
        totals: dict[str, Decimal] = {}
        catalog = self.store.catalog
        for table in self.cfg.tables:
            info = catalog.find(table)
            if info is None:
                continue  # not captured yet: nothing to publish from it
            where = None if skus is None else (self.cfg.sku_column, skus)
            self.accumulate(
                self.store.mirror_rows.column_rows(info, self.columns(), where_in=where), totals
            )
        return totals

    def unimported(self) -> dict[str, Decimal]:
        """SKU → quantity on webshop orders not yet imported into the ERP (order ledger)."""
        if not self.cfg.subtract_unimported_orders:
            return {}
        try:
            payloads = payloads_in_states(self.store.engine, _UNIMPORTED_STATES)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("stock_unimported_orders_unreadable", error=str(exc).splitlines()[0])
            return {}
        out: dict[str, Decimal] = {}
        for raw in payloads:
            for sku, qty in order_lines(raw):
                out[sku] = out.get(sku, Decimal(0)) + qty
        return out

    def publish(self, total: Decimal, unimported: Decimal) -> int:
        q = total - unimported - self.cfg.safety_buffer
        return max(0, math.floor(q))

    def quantities(self, skus: Sequence[str] | None = None) -> dict[str, int]:
        """The quantity to publish per SKU, from the mirrors (excluded SKUs left out).

        With ``skus``, a SKU without rows gets 0 (its rows were deleted).
        """
        totals = self.mirror_totals(skus)
        unimported = self.unimported()
        names: Iterable[str] = totals if skus is None else skus
        return {
            s: self.publish(totals.get(s, Decimal(0)), unimported.get(s, Decimal(0)))
            for s in names
            if not self.filter.excluded(s)
        }

    def skus_of(self, entries: list[dict[str, Any]]) -> tuple[dict[str, int], bool]:
        """SKU → oldest journal id touching it; and whether a full local diff is needed."""
        found: dict[str, int] = {}
        full = False
        lookups: dict[str, list[tuple[list[Any], int]]] = {}
        for e in entries:
            if e["op"] == "T" or e["key"] is None:
                full = True
                continue
            info = self.store.catalog.find(e["table"])
            if info is None:
                full = True
                continue
            key = list(info.schema.key)
            if self.cfg.sku_column in key:
                sku = e["key"][key.index(self.cfg.sku_column)]
                if sku is not None:
                    found.setdefault(str(sku), e["id"])
            elif e["op"] == "D":
                full = True  # the row is gone, and with it which SKU it belonged to
            else:
                lookups.setdefault(e["table"], []).append((e["key"], e["id"]))
        for table, keys in lookups.items():
            info = self.store.catalog.find(table)
            assert info is not None  # found above
            skus = self.store.mirror_rows.column_by_key(
                info, self.cfg.sku_column, [k for k, _ in keys]
            )
            for (exists, sku), (_, jid) in zip(skus, keys, strict=True):
                if not exists:
                    full = True  # deleted since: its SKU is found by the full diff
                elif sku is not None:
                    found.setdefault(str(sku), jid)
        return found, full
        return found, full

    def from_erp(self, skus: Sequence[str]) -> dict[str, int]:
        """Published quantities read straight from the ERP (SKUs without rows are left out)."""
        totals: dict[str, Decimal] = {}
        cols = self.columns()
        with self._erp().connect() as conn:
            for table in self.cfg.tables:
                t = erp_table(table, cols)
                for i in range(0, len(skus), _LOOKUP_CHUNK):
                    chunk = list(skus[i : i + _LOOKUP_CHUNK])
                    q = sa.select(*(t.c[c] for c in cols)).where(
                        t.c[self.cfg.sku_column].in_(chunk)
                    )
                    self.accumulate(conn.execute(q).fetchall(), totals)
        unimported = self.unimported()
        return {s: self.publish(q, unimported.get(s, Decimal(0))) for s, q in totals.items()}


def order_lines(raw: Any) -> list[tuple[str, Decimal]]:
    """(SKU, quantity) of an order payload as a shop sent it (WooCommerce, Magento, Shopify
    by poll or webhook, Shopware)."""
    try:
        data = json.loads(bytes(raw).decode("utf-8") if not isinstance(raw, str) else raw)
    except (ValueError, TypeError):
        return []
    if not isinstance(data, dict):
        return []
    out: list[tuple[str, Decimal]] = []
    for line in data.get("line_items") or []:  # WooCommerce
        if isinstance(line, dict) and line.get("sku"):
            out.append((str(line["sku"]), dec(line.get("quantity"))))
    for item in data.get("items") or []:  # Magento (children of configurables carry no qty)
        if isinstance(item, dict) and item.get("sku") and not item.get("parent_item_id"):
            out.append((str(item["sku"]), dec(item.get("qty_ordered"))))
    items = data.get("lineItems")
    if isinstance(items, dict):  # Shopify GraphQL: a connection
        items = items.get("nodes")
    for line in items if isinstance(items, list) else []:
        if not isinstance(line, dict):
            continue
        payload = line.get("payload")
        number = payload.get("productNumber") if isinstance(payload, dict) else None
        sku = line.get("sku") or number  # Shopify / Shopware
        if sku:
            out.append((str(sku), dec(line.get("quantity"))))
    return out
