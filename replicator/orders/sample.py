"""The sample ERP and sample shop orders: used by the tests, the benchmark and demos.

* :func:`install_sample_erp` creates the sample ERP schema (``config/erp-sample/*.sql``) in an
  empty PostgreSQL or MariaDB database, plus ``extra_items`` items ``SKU-1``..``SKU-n``;
* :func:`sample_order` builds a WooCommerce-shaped order as the REST API returns it;
* :class:`ListShop` is a shop that serves orders from memory through the real
  :class:`~replicator.connectors.base.ShopConnector` contract (a stand-in for a webshop, e.g. to
  try a mapping without one), and can be switched "down" to behave like an unreachable shop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from replicator.connectors.base import ShopConnector, ShopOrder, ShopUnavailable
from replicator.db import make_engine

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = ROOT / "config" / "erp-sample"
SAMPLE_MAPPING = ROOT / "config" / "mappings" / "orders.toml"


def sample_sql(dialect: str) -> list[str]:
    """The statements of the sample schema for ``postgresql`` or ``mysql`` (MariaDB)."""
    name = "postgresql.sql" if dialect == "postgresql" else "mariadb.sql"
    text = (SAMPLE_DIR / name).read_text(encoding="utf-8")
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def install_sample_erp(url: str, extra_items: int = 50) -> None:
    engine = make_engine(url, "sample-erp")
    try:
        with engine.begin() as conn:
            for stmt in sample_sql(engine.dialect.name):
                conn.exec_driver_sql(stmt)
            if extra_items:
                conn.execute(
                    sa.text(
                        "INSERT INTO items (item_no, sku, description, price) "
                        "VALUES (:i, :s, :d, :p)"
                    ),
                    [
                        {"i": f"X-{n:05d}", "s": f"SKU-X{n}", "d": f"Item {n}", "p": n}
                        for n in range(1, extra_items + 1)
                    ],
                )
    finally:
        engine.dispose()


def sample_order(
    number: int,
    *,
    lines: int = 2,
    status: str = "processing",
    paid: bool = True,
    email: str | None = None,
    skus: list[str] | None = None,
    modified: datetime | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A WooCommerce REST v3 order with ``lines`` lines (SKU-X1.. by default)."""
    skus = skus or [f"SKU-X{(number + i) % 50 + 1}" for i in range(lines)]
    items = [
        {
            "id": number * 100 + i,
            "name": f"Item {sku}",
            "sku": sku,
            "quantity": i + 1,
            "price": "9.50",
            "total": f"{9.5 * (i + 1):.2f}",
            "tax_class": "",
        }
        for i, sku in enumerate(skus)
    ]
    mod = (modified or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S")
    order: dict[str, Any] = {
        "id": number,
        "number": str(number),
        "status": status,
        "currency": "EUR",
        "date_created": mod,
        "date_modified": mod,
        "date_paid": mod if paid else None,
        "total": f"{sum(9.5 * (i + 1) for i in range(len(skus))) + 4.9:.2f}",
        "customer_id": 0,
        "customer_note": "",
        "payment_method": "paypal",
        "billing": {
            "first_name": "Anna",
            "last_name": f"Kunde{number}",
            "company": "",
            "address_1": "Hauptstr. 1",
            "city": "Berlin",
            "postcode": "10115",
            "country": "de",
            "email": email if email is not None else f"kunde{number}@example.com",
        },
        "shipping": {
            "first_name": "Anna",
            "last_name": f"Kunde{number}",
            "address_1": "Hauptstr. 1",
            "city": "Berlin",
            "postcode": "10115",
            "country": "de",
        },
        "shipping_lines": [{"method_id": "flat_rate", "total": "4.90"}],
        "line_items": items,
    }
    order.update(overrides)
    return order


class ListShop(ShopConnector):
    """A shop serving orders from memory, keyed by e-number (the ``number`` field)."""

    def __init__(self, name: str = "shop") -> None:
        self.name = name
        self.orders: dict[str, tuple[datetime, bytes, dict[str, Any]]] = {}
        self.down = False
        # Errors raised by the next fetches, one each (e.g. a 429 with Retry-After).
        self.failures: list[Exception] = []
        self.fetches = 0
        self._lock = threading.Lock()

    def put(
        self,
        payload: dict[str, Any],
        *,
        raw: bytes | None = None,
        updated_at: datetime | None = None,
    ) -> str:
        e = str(payload.get("number") or payload.get("id"))
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        with self._lock:
            self.orders[e] = (updated_at or datetime.now(UTC), body, payload)
        return e

    def _order(self, e: str) -> ShopOrder:
        at, raw, payload = self.orders[e]
        return ShopOrder(self.name, e, str(payload.get("status", "")), at, payload, raw)

    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        self.fetches += 1
        if self.failures:
            raise self.failures.pop(0)
        if self.down:
            raise ShopUnavailable(f"shop {self.name} is unreachable (connection refused)")
        with self._lock:
            keys = [
                e
                for e, (at, _, _) in self.orders.items()
                if at >= since and (until is None or at < until)
            ]
        for e in keys:
            yield self._order(e)

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        with self._lock:
            return self._order(e_number) if e_number in self.orders else None
