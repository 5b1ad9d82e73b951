"""A loopback WooCommerce REST v3 emulator (``/wp-json/wc/v3``), as the API is documented.

Behaviour a connector must get right, emulated on purpose:

* ``modified_after``/``modified_before`` are compared against the GMT column only with
  ``dates_are_gmt=true``; otherwise their wall-clock is read in the shop's local time zone
  (``Europe/Copenhagen`` by default), so a connector that forgets the flag gets the wrong orders.
  Any UTC offset in the value is ignored, like WordPress's date query does with the local column.
  Both bounds are exclusive (WordPress ``date_query`` defaults to ``inclusive=false``).
* ``per_page`` is at most 100 (400 ``rest_invalid_param`` otherwise); ``X-WP-Total`` and
  ``X-WP-TotalPages`` headers; a page past the end is ``[]``.
* HTTP basic auth with consumer key/secret (query-string keys accepted too); 401 JSON otherwise.
* ``POST products/batch`` accepts at most 100 items (413 otherwise) and reports per-item errors.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from .base import Request, Response, ShopEmulator
from .orders import SampleOrder, generate_products

_PREFIX = "/wp-json/wc/v3"


def _fmt(d: Decimal) -> str:
    return f"{d:.2f}"


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S")


class WooCommerceEmulator(ShopEmulator):
    """In-memory WooCommerce: ``orders``, ``products`` (by id), ``notes`` (by order id)."""

    def __init__(
        self,
        consumer_key: str = "ck_test_0123456789abcdef",
        consumer_secret: str = "cs_test_fedcba9876543210",
        *,
        timezone: str = "Europe/Copenhagen",
        products: list[tuple[str, str, int]] | None = None,
    ) -> None:
        super().__init__()
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.tz = ZoneInfo(timezone)
        self.orders: dict[int, dict[str, Any]] = {}
        self.products: dict[int, dict[str, Any]] = {}
        self.notes: dict[int, list[dict[str, Any]]] = {}
        self._next_line_id = 1
        self._next_product_id = 100
        self._next_note_id = 1
        for sku, name, qty in products if products is not None else generate_products():
            self.add_product(sku, name, qty)

    # -- state helpers for tests -----------------------------------------------------------------
    def add_product(self, sku: str, name: str, quantity: int | None) -> dict[str, Any]:
        with self.lock:
            pid = self._next_product_id
            self._next_product_id += 1
            product = {
                "id": pid,
                "name": name,
                "slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
                "type": "simple",
                "status": "publish",
                "sku": sku,
                "price": "100.00",
                "regular_price": "100.00",
                "manage_stock": quantity is not None,
                "stock_quantity": quantity,
                "stock_status": "instock" if (quantity or 0) > 0 else "outofstock",
            }
            self.products[pid] = product
            return product

    def stock(self) -> dict[str, int | None]:
        """SKU → stock quantity, as the shop has it now."""
        with self.lock:
            return {p["sku"]: p["stock_quantity"] for p in self.products.values()}

    def add_orders(self, orders: list[SampleOrder]) -> None:
        for o in orders:
            self.put_order(o)

    def put_order(self, o: SampleOrder) -> dict[str, Any]:
        """Insert or replace the order with id ``o.number``, rendered as WooCommerce JSON."""
        with self.lock:
            old = self.orders.get(o.number)
            line_ids = [li["id"] for li in old["line_items"]] if old else []
            lines = []
            for i, ln in enumerate(o.lines):
                if i < len(line_ids):
                    lid = line_ids[i]
                else:
                    lid = self._next_line_id
                    self._next_line_id += 1
                total = ln.price * ln.quantity
                lines.append(
                    {
                        "id": lid,
                        "name": ln.name,
                        "product_id": self._product_id(ln.sku),
                        "variation_id": 0,
                        "quantity": ln.quantity,
                        "tax_class": "",
                        "subtotal": _fmt(total),
                        "subtotal_tax": _fmt(total * o.tax_rate),
                        "total": _fmt(total),
                        "total_tax": _fmt(total * o.tax_rate),
                        "sku": ln.sku,
                        "price": float(ln.price),
                        "meta_data": [],
                    }
                )
            address = {
                "first_name": o.first_name,
                "last_name": o.last_name,
                "company": "",
                "address_1": o.street,
                "address_2": "",
                "city": o.city,
                "state": "",
                "postcode": o.postcode,
                "country": o.country,
            }
            order = {
                "id": o.number,
                "parent_id": 0,
                "number": str(o.number),
                "order_key": f"wc_order_{o.number:08x}",
                "created_via": "checkout",
                "version": "9.4.2",
                "status": o.status,
                "currency": o.currency,
                "date_created": _iso(o.created.astimezone(self.tz)),
                "date_created_gmt": _iso(o.created.astimezone(UTC)),
                "date_modified": _iso(o.modified.astimezone(self.tz)),
                "date_modified_gmt": _iso(o.modified.astimezone(UTC)),
                "discount_total": "0.00",
                "shipping_total": _fmt(o.shipping),
                "shipping_tax": _fmt(o.shipping * o.tax_rate),
                "total": _fmt(o.total),
                "total_tax": _fmt(o.tax),
                "prices_include_tax": False,
                "customer_id": 0,
                "customer_note": o.customer_note,
                "billing": {**address, "email": o.email, "phone": o.phone},
                "shipping": {**address, "phone": o.phone},
                "payment_method": o.payment_method,
                "payment_method_title": o.payment_title,
                "transaction_id": "",
                "date_paid": _iso(o.paid.astimezone(self.tz)) if o.paid else None,
                "date_paid_gmt": _iso(o.paid.astimezone(UTC)) if o.paid else None,
                "line_items": lines,
                "tax_lines": [],
                "shipping_lines": [
                    {
                        "id": 9000 + o.number,
                        "method_title": "PostNord",
                        "method_id": "flat_rate",
                        "total": _fmt(o.shipping),
                        "total_tax": _fmt(o.shipping * o.tax_rate),
                    }
                ],
                "fee_lines": [],
                "coupon_lines": [],
                "meta_data": [
                    {"id": i + 1, "key": k, "value": v} for i, (k, v) in enumerate(o.meta.items())
                ],
            }
            self.orders[o.number] = order
            return order

    def modify_order(self, order_id: int, at: datetime, **changes: Any) -> dict[str, Any]:
        """Bump the order's modified time to ``at`` (aware) and apply top-level ``changes``."""
        with self.lock:
            order = self.orders[order_id]
            order.update(changes)
            order["date_modified"] = _iso(at.astimezone(self.tz))
            order["date_modified_gmt"] = _iso(at.astimezone(UTC))
            return order

    def _product_id(self, sku: str) -> int:
        for p in self.products.values():
            if p["sku"] == sku:
                return int(p["id"])
        return 0

    # -- routing ---------------------------------------------------------------------------------
    def _authorized(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode("utf-8").partition(":")
            except ValueError:
                return False
            return user == self.consumer_key and pw == self.consumer_secret
        return (
            req.arg("consumer_key") == self.consumer_key
            and req.arg("consumer_secret") == self.consumer_secret
        )

    def route(self, req: Request) -> Response:
        if not req.path.startswith(_PREFIX + "/"):
            return _error(
                404, "rest_no_route", "No route was found matching the URL and request method."
            )
        if not self._authorized(req):
            return _error(401, "woocommerce_rest_cannot_view", "Sorry, you cannot list resources.")
        path = req.path[len(_PREFIX) :].rstrip("/")
        with self.lock:
            if req.method == "GET" and path == "/orders":
                return self._list_orders(req)
            if (m := re.fullmatch(r"/orders/(\d+)", path)) and req.method == "GET":
                order = self.orders.get(int(m[1]))
                if order is None:
                    return _error(404, "woocommerce_rest_shop_order_invalid_id", "Invalid ID.")
                return Response(200, order)
            if (m := re.fullmatch(r"/orders/(\d+)/notes", path)) and req.method == "POST":
                return self._add_note(int(m[1]), req)
            if (m := re.fullmatch(r"/orders/(\d+)/notes", path)) and req.method == "GET":
                # "List all order notes" (REST API v3): every note of the order, newest first.
                if int(m[1]) not in self.orders:
                    return _error(404, "woocommerce_rest_shop_order_invalid_id", "Invalid ID.")
                return Response(200, list(reversed(self.notes.get(int(m[1]), []))))
            if path == "/products" and req.method == "GET":
                return self._list_products(req)
            if path == "/products" and req.method == "POST":
                body = req.json() or {}
                p = self.add_product(
                    body.get("sku", ""), body.get("name", ""), body.get("stock_quantity")
                )
                return Response(201, p)
            if path == "/products/batch" and req.method == "POST":
                return self._batch_products(req)
        return _error(
            404, "rest_no_route", "No route was found matching the URL and request method."
        )

    def _paging(self, req: Request) -> tuple[int, int] | Response:
        try:
            per_page = int(req.arg("per_page", "10") or 10)
            page = int(req.arg("page", "1") or 1)
        except ValueError:
            return _error(400, "rest_invalid_param", "Invalid parameter(s): per_page, page")
        if not 1 <= per_page <= 100:
            return _error(
                400,
                "rest_invalid_param",
                "Invalid parameter(s): per_page (must be between 1 and 100)",
            )
        if page < 1:
            return _error(400, "rest_invalid_param", "Invalid parameter(s): page")
        return page, per_page

    def _page(self, rows: list[dict[str, Any]], page: int, per_page: int) -> Response:
        total = len(rows)
        return Response(
            200,
            rows[(page - 1) * per_page : page * per_page],
            headers={"X-WP-Total": str(total), "X-WP-TotalPages": str(math.ceil(total / per_page))},
        )

    def _bound(self, value: str) -> datetime:
        # The offset, if any, is dropped: WordPress compares the wall-clock against one column.
        m = re.match(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?)", value)
        if not m:
            raise ValueError(value)
        return datetime.fromisoformat(m[1].replace(" ", "T"))

    def _list_orders(self, req: Request) -> Response:
        paging = self._paging(req)
        if isinstance(paging, Response):
            return paging
        page, per_page = paging
        gmt = (req.arg("dates_are_gmt") or "").lower() in ("1", "true", "yes")
        column = "date_modified_gmt" if gmt else "date_modified"
        rows = list(self.orders.values())
        try:
            if after := req.arg("modified_after"):
                a = self._bound(after)
                rows = [r for r in rows if datetime.fromisoformat(r[column]) > a]
            if before := req.arg("modified_before"):
                b = self._bound(before)
                rows = [r for r in rows if datetime.fromisoformat(r[column]) < b]
        except ValueError:
            return _error(400, "rest_invalid_param", "Invalid parameter(s): modified_after")
        if (status := req.arg("status")) and status != "any":
            wanted = set(status.split(","))
            rows = [r for r in rows if r["status"] in wanted]
        orderby = req.arg("orderby", "date")
        key = {"date": "date_created_gmt", "modified": "date_modified_gmt", "id": "id"}.get(
            orderby or "date", "date_created_gmt"
        )
        rows.sort(key=lambda r: (r[key], r["id"]), reverse=req.arg("order", "desc") == "desc")
        return self._page(rows, page, per_page)

    def _list_products(self, req: Request) -> Response:
        paging = self._paging(req)
        if isinstance(paging, Response):
            return paging
        rows = sorted(self.products.values(), key=lambda p: p["id"])
        if sku := req.arg("sku"):
            wanted = set(sku.split(","))
            rows = [p for p in rows if p["sku"] in wanted]
        return self._page(rows, *paging)

    def _batch_products(self, req: Request) -> Response:
        body = req.json() or {}
        items = [*body.get("create", []), *body.get("update", []), *body.get("delete", [])]
        if len(items) > 100:
            return _error(
                413,
                "rest_request_entity_too_large",
                "Unable to accept more than 100 items for this request.",
            )
        updated = []
        for item in body.get("update", []):
            product = self.products.get(int(item.get("id", 0)))
            if product is None:
                updated.append(
                    {
                        "id": item.get("id"),
                        "error": {
                            "code": "woocommerce_rest_product_invalid_id",
                            "message": "Invalid ID.",
                            "data": {"status": 400},
                        },
                    }
                )
                continue
            for k, v in item.items():
                if k != "id":
                    product[k] = v
            if "stock_quantity" in item:
                product["stock_status"] = (
                    "instock" if (item["stock_quantity"] or 0) > 0 else "outofstock"
                )
            updated.append(product)
        return Response(200, {"update": updated})

    def _add_note(self, order_id: int, req: Request) -> Response:
        if order_id not in self.orders:
            return _error(404, "woocommerce_rest_shop_order_invalid_id", "Invalid ID.")
        body = req.json() or {}
        if not body.get("note"):
            return _error(400, "rest_missing_callback_param", "Missing parameter(s): note")
        note = {
            "id": self._next_note_id,
            "author": "WooCommerce",
            "date_created_gmt": _iso(datetime.now(UTC)),
            "note": body["note"],
            "customer_note": bool(body.get("customer_note", False)),
        }
        self._next_note_id += 1
        self.notes.setdefault(order_id, []).append(note)
        return Response(201, note)


def _error(status: int, code: str, message: str) -> Response:
    return Response(status, {"code": code, "message": message, "data": {"status": status}})
