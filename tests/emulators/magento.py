"""A loopback Magento 2 REST emulator (``/rest/V1``), as the API is documented — quirks included.

* ``searchCriteria`` in the query string (``searchCriteria[filter_groups][0][filters][0][field]``
  ...): filters inside a group are OR-ed, groups are AND-ed; ``sortOrders``; ``pageSize`` and
  ``currentPage``. Dates are ``YYYY-MM-DD HH:MM:SS`` in UTC.
* **The quirk**: a ``currentPage`` past the last page answers the last page again (Magento clamps
  the page number), so a client that loops "until a page is empty" never stops.
* Bearer-token auth; 401 ``{"message": "The consumer isn't authorized to access %resources."}``.
* MSI stock: ``POST /inventory/source-items`` (unknown SKU → 400 for the whole request),
  ``GET /inventory/source-items``, ``GET /products`` (with ``extension_attributes.stock_item``),
  ``GET /stockItems/<sku>``; order comments ``POST /orders/<id>/comments``.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .base import Request, Response, ShopEmulator
from .orders import SampleOrder, generate_products

_PREFIX = "/rest/V1"
_MAGENTO_STATE = {"processing": "processing", "on-hold": "holded", "completed": "complete"}


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_search_criteria(query: list[tuple[str, str]]) -> dict[str, Any]:
    """``searchCriteria[a][0][b]=v`` pairs → nested dicts (numeric keys become ints)."""
    root: dict[str, Any] = {}
    for key, value in query:
        if not key.startswith("searchCriteria"):
            continue
        parts = re.findall(r"\[([^\]]*)\]", key[len("searchCriteria") :])
        node = root
        for i, part in enumerate(parts):
            k: Any = int(part) if part.isdigit() else part
            if i == len(parts) - 1:
                node[k] = value
            else:
                node = node.setdefault(k, {})
    return root


def _match(row: dict[str, Any], flt: dict[str, Any]) -> bool:
    field, value = str(flt.get("field", "")), flt.get("value", "")
    cond = flt.get("condition_type", "eq")
    have = row.get(field)
    if have is None:
        return cond == "null"
    a, b = str(have), str(value)
    if isinstance(have, int | float) and re.fullmatch(r"-?\d+(\.\d+)?", b):
        x, y = float(have), float(b)
        return {
            "eq": x == y, "neq": x != y, "gt": x > y, "gteq": x >= y, "lt": x < y, "lteq": x <= y,
        }.get(cond, False) or (cond == "in" and str(have) in b.split(","))  # fmt: skip
    if cond == "in":
        return a in b.split(",")
    if cond == "like":
        return re.fullmatch(re.escape(b).replace("%", ".*"), a) is not None
    # Magento compares dates as strings in the DB's format, which sorts chronologically.
    return {
        "eq": a == b,
        "neq": a != b,
        "gt": a > b,
        "gteq": a >= b,
        "lt": a < b,
        "lteq": a <= b,
    }.get(cond, False)


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, int | float) else (1, "" if v is None else str(v))


def search(
    rows: list[dict[str, Any]], criteria: dict[str, Any], total_bias: int = 0
) -> dict[str, Any]:
    """Apply searchCriteria as Magento does, including the past-the-last-page quirk."""
    for group in criteria.get("filter_groups", {}).values():
        filters = list(group.get("filters", {}).values())
        rows = [r for r in rows if any(_match(r, f) for f in filters)]
    for so in reversed(list(criteria.get("sortOrders", {}).values())):
        desc = str(so.get("direction", "ASC")).upper() == "DESC"
        sort_field = str(so.get("field", ""))

        def key(r: dict[str, Any], f: str = sort_field) -> tuple[int, Any]:
            return _sort_key(r.get(f))

        rows = sorted(rows, key=key, reverse=desc)
    total = len(rows)
    page_size = int(criteria.get("pageSize", 0) or 0)
    if page_size > 0:
        last = max(1, math.ceil(total / page_size))
        # The quirk: Magento clamps currentPage to the last page instead of answering [].
        page = min(max(1, int(criteria.get("currentPage", 1) or 1)), last)
        rows = rows[(page - 1) * page_size : page * page_size]
    return {"items": rows, "search_criteria": criteria, "total_count": total + total_bias}


class MagentoEmulator(ShopEmulator):
    """In-memory Magento: ``orders`` by entity_id, ``source_items`` by (sku, source), comments."""

    def __init__(
        self,
        token: str = "mg_token_3f9a1c77e2b54d0e",
        *,
        products: list[tuple[str, str, int]] | None = None,
    ) -> None:
        super().__init__()
        self.token = token
        self.orders: dict[int, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.source_items: dict[tuple[str, str], dict[str, Any]] = {}
        self.comments: dict[int, list[dict[str, Any]]] = {}
        self._next_entity = 1
        # Some Magento versions over-count total_count (joined collections); a test can emulate it.
        self.total_count_bias = 0
        for sku, name, qty in products if products is not None else generate_products():
            self.add_product(sku, name, qty)

    # -- state helpers for tests -----------------------------------------------------------------
    def add_product(self, sku: str, name: str, quantity: int, source: str = "default") -> None:
        with self.lock:
            pid = len(self.products) + 1
            self.products[sku] = {
                "id": pid,
                "sku": sku,
                "name": name,
                "attribute_set_id": 4,
                "price": 100,
                "status": 1,
                "visibility": 4,
                "type_id": "simple",
            }
            self.source_items[(sku, source)] = {
                "sku": sku,
                "source_code": source,
                "quantity": quantity,
                "status": 1 if quantity > 0 else 0,
            }

    def stock(self, source: str = "default") -> dict[str, int]:
        with self.lock:
            return {
                sku: int(si["quantity"])
                for (sku, src), si in self.source_items.items()
                if src == source
            }

    def add_orders(self, orders: list[SampleOrder]) -> None:
        for o in orders:
            self.put_order(o)

    def entity_id(self, increment_id: str) -> int:
        for eid, o in self.orders.items():
            if o["increment_id"] == increment_id:
                return eid
        raise KeyError(increment_id)

    def put_order(self, o: SampleOrder) -> dict[str, Any]:
        """Insert or replace the order whose increment_id is ``o.number`` (zero-padded to 9)."""
        increment_id = f"{o.number:09d}"
        with self.lock:
            try:
                eid = self.entity_id(increment_id)
            except KeyError:
                eid = self._next_entity
                self._next_entity += 1
            address = {
                "address_type": "billing",
                "firstname": o.first_name,
                "lastname": o.last_name,
                "street": [o.street],
                "city": o.city,
                "postcode": o.postcode,
                "country_id": o.country,
                "telephone": o.phone,
                "email": o.email,
            }
            items = []
            for i, ln in enumerate(o.lines):
                row = ln.price * ln.quantity
                items.append(
                    {
                        "item_id": eid * 100 + i,
                        "order_id": eid,
                        "sku": ln.sku,
                        "name": ln.name,
                        "product_type": "simple",
                        "qty_ordered": ln.quantity,
                        "price": float(ln.price),
                        "row_total": float(row),
                        "tax_percent": float(o.tax_rate * 100),
                        "tax_amount": float((row * o.tax_rate).quantize(Decimal("0.01"))),
                    }
                )
            order = {
                "entity_id": eid,
                "increment_id": increment_id,
                "state": _MAGENTO_STATE.get(o.status, "new"),
                "status": _MAGENTO_STATE.get(o.status, "pending"),
                "created_at": _ts(o.created),
                "updated_at": _ts(o.modified),
                "order_currency_code": o.currency,
                "base_currency_code": o.currency,
                "customer_email": o.email,
                "customer_firstname": o.first_name,
                "customer_lastname": o.last_name,
                "customer_is_guest": 1,
                "billing_address": address,
                "extension_attributes": {
                    "shipping_assignments": [
                        {"shipping": {"address": {**address, "address_type": "shipping"}}}
                    ]
                },
                "items": items,
                "payment": {
                    "method": o.payment_method,
                    "additional_information": [o.payment_title],
                    # Set once the order is invoiced/captured (OrderPaymentInterface amount_paid).
                    **({"amount_paid": float(o.total)} if o.paid else {}),
                },
                "shipping_amount": float(o.shipping),
                "shipping_description": "PostNord - Fixed",
                "subtotal": float(o.subtotal),
                "tax_amount": float(o.tax),
                "grand_total": float(o.total),
                "status_histories": [],
            }
            self.orders[eid] = order
            return order

    def modify_order(self, entity_id: int, at: datetime, **changes: Any) -> dict[str, Any]:
        with self.lock:
            order = self.orders[entity_id]
            order.update(changes)
            order["updated_at"] = _ts(at)
            return order

    # -- routing ---------------------------------------------------------------------------------
    def route(self, req: Request) -> Response:
        if not req.path.startswith(_PREFIX + "/"):
            return Response(404, {"message": "Request does not match any route."})
        if req.headers.get("authorization", "") != f"Bearer {self.token}":
            return Response(
                401,
                {
                    "message": "The consumer isn't authorized to access %resources.",
                    "parameters": {"resources": "Magento_Sales::actions_view"},
                },
            )
        path = req.path[len(_PREFIX) :].rstrip("/")
        criteria = parse_search_criteria(req.query)
        with self.lock:
            if path == "/orders" and req.method == "GET":
                return Response(
                    200, search(list(self.orders.values()), criteria, self.total_count_bias)
                )
            if (m := re.fullmatch(r"/orders/(\d+)", path)) and req.method == "GET":
                order = self.orders.get(int(m[1]))
                if order is None:
                    return Response(
                        404, {"message": "The entity that was requested doesn't exist."}
                    )
                return Response(200, order)
            if (m := re.fullmatch(r"/orders/(\d+)/comments", path)) and req.method == "POST":
                return self._comment(int(m[1]), req)
            if path == "/products" and req.method == "GET":
                rows = []
                for sku, p in self.products.items():
                    si = self.source_items.get((sku, "default"))
                    qty = si["quantity"] if si else 0
                    stock_item = {"qty": qty, "is_in_stock": qty > 0}
                    rows.append({**p, "extension_attributes": {"stock_item": stock_item}})
                return Response(200, search(rows, criteria))
            if (m := re.fullmatch(r"/stockItems/([^/]+)", path)) and req.method == "GET":
                return self._stock_item(m[1])
            if path == "/inventory/source-items" and req.method == "GET":
                return Response(200, search(list(self.source_items.values()), criteria))
            if path == "/inventory/source-items" and req.method == "POST":
                return self._save_source_items(req)
        return Response(404, {"message": "Request does not match any route."})

    def _stock_item(self, sku: str) -> Response:
        p = self.products.get(sku)
        if p is None:
            return Response(
                404,
                {
                    "message": "The Product that was requested doesn't exist. "
                    "Verify the product and try again."
                },
            )
        qty = sum(si["quantity"] for (s, _), si in self.source_items.items() if s == sku)
        return Response(
            200,
            {
                "item_id": p["id"],
                "product_id": p["id"],
                "stock_id": 1,
                "qty": qty,
                "is_in_stock": qty > 0,
            },
        )

    def _save_source_items(self, req: Request) -> Response:
        body = req.json() or {}
        items = body.get("sourceItems")
        if not isinstance(items, list):
            return Response(400, {"message": '"sourceItems" is required. Enter and try again.'})
        unknown = [i.get("sku") for i in items if i.get("sku") not in self.products]
        if unknown:
            # Magento validates the whole request and saves nothing when one item is bad.
            return Response(
                400,
                {
                    "message": "Validation Failed",
                    "errors": [
                        {
                            "message": 'Product with SKU "%sku" does not exist',
                            "parameters": {"sku": s},
                        }
                        for s in unknown
                    ],
                },
            )
        for i in items:
            qty = i.get("quantity", 0)
            self.source_items[(i["sku"], i.get("source_code", "default"))] = {
                "sku": i["sku"],
                "source_code": i.get("source_code", "default"),
                "quantity": qty,
                "status": int(i.get("status", 1 if qty > 0 else 0)),
            }
        return Response(200, [])

    def _comment(self, entity_id: int, req: Request) -> Response:
        if entity_id not in self.orders:
            return Response(404, {"message": "The entity that was requested doesn't exist."})
        body = req.json() or {}
        history = body.get("statusHistory") or {}
        if not history.get("comment"):
            return Response(400, {"message": '"comment" is required. Enter and try again.'})
        entry = {**history, "created_at": _ts(datetime.now(UTC)), "parent_id": entity_id}
        self.comments.setdefault(entity_id, []).append(entry)
        self.orders[entity_id]["status_histories"].append(entry)
        return Response(200, True)
