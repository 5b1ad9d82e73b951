"""A loopback Shopify Admin GraphQL API emulator (``POST /admin/api/<version>/graphql.json``).

Queries are parsed, validated and executed by graphql-core against a schema written from the
Admin GraphQL reference (the subset a connector uses: ``orders``, ``order``, ``productVariants``,
``locations``, ``inventorySetQuantities``, ``metafieldsSet``, ``orderUpdate``), so a connector that
asks for a field Shopify does not have gets Shopify's kind of error, and the answer holds exactly
the fields (and aliases) asked for.

Behaviour a connector must get right, emulated on purpose:

* **Authentication**: ``X-Shopify-Access-Token``; anything else is 401 with
  ``{"errors": "[API] Invalid API key or access token ..."}``.
* **API versions**: a version Shopify no longer (or not yet) serves is answered with the oldest
  supported one, and the ``X-Shopify-API-Version`` response header says which version answered.
* **Calculated query cost**: every answer carries ``extensions.cost`` (``requestedQueryCost``,
  ``actualQueryCost``, ``throttleStatus`` with ``maximumAvailable``, ``currentlyAvailable``,
  ``restoreRate``). The bucket refills ``restore_rate`` points a second; a query whose requested
  cost is more than what is available is refused with HTTP 200 and
  ``errors[].extensions.code = "THROTTLED"`` (``actualQueryCost`` null); a query over the single
  query maximum gets ``MAX_COST_EXCEEDED``. The difference between requested and actual cost is
  refunded. (The cost model is the documented one, simplified: objects 1, scalars 0, connections
  2 + ``first`` x node cost, mutations 10.)
* **Search syntax** (``query: "updated_at:>='…' AND updated_at:<'…'"``): terms Shopify does not
  understand are ignored — the list is then *not* filtered by them (the classic surprise); a date
  without an offset is read in the shop's time zone (``Europe/Copenhagen`` by default).
* **Cursor paging**: ``first``/``after`` with opaque cursors over the sort order
  (``sortKey: UPDATED_AT`` sorts by update time, then id); ``first`` above 250 is an error.
* **Search index lag**: ``hide_from_search(order_no)`` keeps an order out of filtered ``orders``
  results (as users of the polling API report for recently updated orders) until
  ``reindex()``; ``order(id:)`` still finds it.
* ``inventorySetQuantities`` is all or nothing: one bad quantity (unknown inventory item, item not
  stocked at the location, negative) fails the mutation with ``userErrors`` whose ``field`` is the
  path of the bad entry (``["input", "quantities", "3", "inventoryItemId"]``); at most 250
  quantities. Versions from 2026-04 require the ``@idempotent(key:)`` directive on it.
* ``metafieldsSet`` upserts by (owner, namespace, key), at most 25 per call; ``orderUpdate`` with a
  ``note`` replaces the note.
* Webhooks: :meth:`ShopifyEmulator.webhook_request` builds an ``orders/create``/``orders/updated``
  delivery (REST-format order JSON) with ``X-Shopify-Hmac-Sha256`` (base64 HMAC-SHA256 of the raw
  body, keyed with the app's client secret), ``X-Shopify-Webhook-Id`` and ``X-Shopify-Topic``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from graphql import (
    FieldNode,
    GraphQLError,
    GraphQLObjectType,
    OperationDefinitionNode,
    build_schema,
    get_named_type,
    graphql_sync,
    parse,
    validate,
)

from .base import Request, Response, ShopEmulator
from .orders import SampleOrder, generate_products

SUPPORTED_VERSIONS = ("2025-07", "2025-10", "2026-01", "2026-04")

SCHEMA = build_schema(
    """
    directive @idempotent(key: String!) on FIELD
    scalar DateTime
    scalar Decimal
    scalar UnsignedInt64
    scalar URL

    enum OrderSortKeys { CREATED_AT ID NUMBER PROCESSED_AT TOTAL_PRICE UPDATED_AT }
    enum OrderDisplayFinancialStatus {
      AUTHORIZED EXPIRED PAID PARTIALLY_PAID PARTIALLY_REFUNDED PENDING REFUNDED VOIDED
    }
    enum OrderDisplayFulfillmentStatus {
      FULFILLED IN_PROGRESS ON_HOLD OPEN PARTIALLY_FULFILLED PENDING_FULFILLMENT RESTOCKED
      SCHEDULED UNFULFILLED REQUEST_DECLINED
    }
    enum InventorySetQuantitiesUserErrorCode {
      INVALID_INVENTORY_ITEM INVALID_LOCATION ITEM_NOT_STOCKED_AT_LOCATION INVALID_NAME
      INVALID_REASON INVALID_QUANTITY_NEGATIVE INVALID_QUANTITY_TOO_HIGH COMPARE_QUANTITY_REQUIRED
      COMPARE_QUANTITY_STALE
    }

    type PageInfo {
      hasNextPage: Boolean!
      hasPreviousPage: Boolean!
      startCursor: String
      endCursor: String
    }
    type MoneyV2 { amount: Decimal! currencyCode: String! }
    type MoneyBag { shopMoney: MoneyV2! presentmentMoney: MoneyV2! }
    type MailingAddress {
      firstName: String lastName: String name: String company: String address1: String
      address2: String city: String zip: String provinceCode: String countryCodeV2: String
      phone: String
    }
    type Customer { id: ID! email: String firstName: String lastName: String displayName: String! }
    type TaxLine { title: String! rate: Float ratePercentage: Float priceSet: MoneyBag! }
    type ShippingLine { title: String! code: String source: String originalPriceSet: MoneyBag! }
    type Metafield { id: ID! namespace: String! key: String! type: String! value: String! }
    type LineItem {
      id: ID! name: String! title: String! sku: String quantity: Int!
      originalUnitPriceSet: MoneyBag! discountedUnitPriceSet: MoneyBag! taxLines: [TaxLine!]!
    }
    type LineItemConnection { nodes: [LineItem!]! pageInfo: PageInfo! }
    type Order {
      id: ID! legacyResourceId: UnsignedInt64! name: String! email: String phone: String
      note: String createdAt: DateTime! updatedAt: DateTime! processedAt: DateTime!
      cancelledAt: DateTime closed: Boolean! currencyCode: String!
      displayFinancialStatus: OrderDisplayFinancialStatus
      displayFulfillmentStatus: OrderDisplayFulfillmentStatus!
      paymentGatewayNames: [String!]!
      totalPriceSet: MoneyBag! subtotalPriceSet: MoneyBag totalTaxSet: MoneyBag
      totalShippingPriceSet: MoneyBag!
      customer: Customer billingAddress: MailingAddress shippingAddress: MailingAddress
      shippingLine: ShippingLine taxLines: [TaxLine!]!
      lineItems(first: Int, after: String): LineItemConnection!
      metafield(namespace: String, key: String!): Metafield
    }
    type OrderEdge { cursor: String! node: Order! }
    type OrderConnection { edges: [OrderEdge!]! nodes: [Order!]! pageInfo: PageInfo! }
    type Location { id: ID! name: String! isActive: Boolean! }
    type LocationConnection { nodes: [Location!]! pageInfo: PageInfo! }
    type InventoryQuantity { name: String! quantity: Int! }
    type InventoryLevel { id: ID! quantities(names: [String!]!): [InventoryQuantity!]! }
    type InventoryItem { id: ID! sku: String tracked: Boolean!
      inventoryLevel(locationId: ID!): InventoryLevel }
    type ProductVariant { id: ID! sku: String title: String! inventoryItem: InventoryItem! }
    type ProductVariantConnection { nodes: [ProductVariant!]! pageInfo: PageInfo! }

    input InventoryQuantityInput {
      inventoryItemId: ID! locationId: ID! quantity: Int! compareQuantity: Int
    }
    input InventorySetQuantitiesInput {
      name: String! reason: String! referenceDocumentUri: String ignoreCompareQuantity: Boolean
      quantities: [InventoryQuantityInput!]!
    }
    type InventoryChange { name: String! delta: Int! quantityAfterChange: Int }
    type InventoryAdjustmentGroup { id: ID! reason: String! changes: [InventoryChange!]! }
    type InventorySetQuantitiesUserError {
      code: InventorySetQuantitiesUserErrorCode field: [String!] message: String!
    }
    type InventorySetQuantitiesPayload {
      inventoryAdjustmentGroup: InventoryAdjustmentGroup
      userErrors: [InventorySetQuantitiesUserError!]!
    }
    input MetafieldsSetInput {
      ownerId: ID! namespace: String key: String! type: String value: String! compareDigest: String
    }
    type MetafieldsSetUserError { code: String field: [String!] message: String! elementIndex: Int }
    type MetafieldsSetPayload { metafields: [Metafield!] userErrors: [MetafieldsSetUserError!]! }
    input OrderInput { id: ID! note: String email: String }
    type UserError { field: [String!] message: String! }
    type OrderUpdatePayload { order: Order userErrors: [UserError!]! }

    type Query {
      orders(first: Int, after: String, last: Int, before: String, query: String,
             sortKey: OrderSortKeys, reverse: Boolean): OrderConnection!
      order(id: ID!): Order
      productVariants(first: Int, after: String, query: String): ProductVariantConnection!
      locations(first: Int, after: String): LocationConnection!
    }
    type Mutation {
      inventorySetQuantities(input: InventorySetQuantitiesInput!): InventorySetQuantitiesPayload
      metafieldsSet(metafields: [MetafieldsSetInput!]!): MetafieldsSetPayload
      orderUpdate(input: OrderInput!): OrderUpdatePayload
    }
    """
)

_FINANCIAL = {"processing": "PAID", "completed": "PAID", "on-hold": "AUTHORIZED"}


def _gid(kind: str, n: int | str) -> str:
    return f"gid://shopify/{kind}/{n}"


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _money(amount: Decimal, currency: str) -> dict[str, Any]:
    m = {"amount": f"{amount:.2f}", "currencyCode": currency}
    return {"shopMoney": m, "presentmentMoney": m}


class QueryError(Exception):
    """A GraphQL top-level error (``errors[]``) raised by a resolver."""


class ShopifyEmulator(ShopEmulator):
    """In-memory Shopify: ``orders`` (by order number), variants and inventory, metafields."""

    def __init__(
        self,
        access_token: str = "shpat_test_0123456789abcdef0123",
        client_secret: str = "shpss_test_fedcba9876543210",
        *,
        timezone: str = "Europe/Copenhagen",
        products: list[tuple[str, str, int]] | None = None,
        bucket_size: float = 2000.0,
        restore_rate: float = 1000.0,
        max_query_cost: float = 1000.0,
        locations: int = 1,
    ) -> None:
        super().__init__()
        self.access_token = access_token
        self.client_secret = client_secret
        self.tz = ZoneInfo(timezone)
        self.orders: dict[int, dict[str, Any]] = {}  # by order number
        self.hidden: set[int] = set()  # order numbers the search index has not caught up with
        self.variants: dict[str, dict[str, Any]] = {}  # by SKU
        self.levels: dict[tuple[int, int], int] = {}  # (inventory item id, location id) → qty
        self.metafields: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.location_ids = [70000 + i for i in range(1, locations + 1)]
        self.bucket_size = bucket_size
        self.restore_rate = restore_rate
        self.max_query_cost = max_query_cost
        self._available = bucket_size
        self._refilled_at = time.monotonic()
        self.throttled = 0  # THROTTLED answers given
        self.operations: list[str] = []  # root field names of every executed operation
        self.versions_used: list[str] = []
        self._next_id = 1
        self._bucket_lock = threading.Lock()
        for sku, name, qty in products if products is not None else generate_products():
            self.add_variant(sku, name, qty)

    # -- state helpers for tests -----------------------------------------------------------------
    def _id(self) -> int:
        self._next_id += 1
        return 5_000_000_000 + self._next_id

    def add_variant(self, sku: str, title: str, quantity: int | None) -> dict[str, Any]:
        with self.lock:
            vid, iid = self._id(), self._id()
            v = {"id": vid, "sku": sku, "title": title, "inventory_item_id": iid}
            self.variants[sku] = v
            if quantity is not None:  # None: not stocked at the location
                self.levels[(iid, self.location_ids[0])] = quantity
            return v

    def stock(self) -> dict[str, int | None]:
        """SKU → available quantity at the first location."""
        with self.lock:
            return {
                sku: self.levels.get((v["inventory_item_id"], self.location_ids[0]))
                for sku, v in self.variants.items()
            }

    def add_orders(self, orders: list[SampleOrder]) -> None:
        for o in orders:
            self.put_order(o)

    def put_order(self, o: SampleOrder) -> dict[str, Any]:
        with self.lock:
            old = self.orders.get(o.number)
            oid = old["legacy_id"] if old else self._id()
            self.orders[o.number] = {
                "legacy_id": oid,
                "sample": o,
                "created": o.created,
                "updated": o.modified,
                "cancelled": None,
                "financial": _FINANCIAL.get(o.status, "PAID") if o.paid else "PENDING",
                "fulfillment": "UNFULFILLED",
                "note": o.customer_note or None,
                "line_ids": old["line_ids"] if old else [self._id() for _ in o.lines],
            }
            return self.orders[o.number]

    def modify_order(self, number: int, at: datetime, *, status: str | None = None) -> None:
        """Bump the order's ``updatedAt``; ``status="cancelled"`` cancels it, ``"refunded"`` /
        ``"partially_refunded"`` change its financial status."""
        with self.lock:
            rec = self.orders[number]
            rec["updated"] = at
            if status == "cancelled":
                rec["cancelled"] = at
            elif status:
                rec["financial"] = status.upper()

    def hide_from_search(self, number: int) -> None:
        with self.lock:
            self.hidden.add(number)

    def reindex(self) -> None:
        with self.lock:
            self.hidden.clear()

    def legacy_id(self, number: int) -> int:
        return int(self.orders[number]["legacy_id"])

    def metafield(self, number: int, namespace: str, key: str) -> str | None:
        with self.lock:
            mf = self.metafields.get((_gid("Order", self.legacy_id(number)), namespace, key))
            return None if mf is None else str(mf["value"])

    def note(self, number: int) -> str | None:
        with self.lock:
            return self.orders[number]["note"]

    def reset_log(self) -> None:
        super().reset_log()
        with self.lock:
            self.operations.clear()

    def count_operations(self, root: str) -> int:
        with self.lock:
            return sum(1 for op in self.operations if op == root)

    # -- webhooks --------------------------------------------------------------------------------
    def rest_order(self, number: int) -> dict[str, Any]:
        """The order as a webhook (REST format) carries it."""
        with self.lock:
            rec = self.orders[number]
            o: SampleOrder = rec["sample"]
            address = {
                "first_name": o.first_name,
                "last_name": o.last_name,
                "address1": o.street,
                "city": o.city,
                "zip": o.postcode,
                "country_code": o.country,
                "phone": o.phone,
            }
            return {
                "id": rec["legacy_id"],
                "admin_graphql_api_id": _gid("Order", rec["legacy_id"]),
                "name": f"#{o.number}",
                "number": o.number - 1000,
                "order_number": o.number,
                "email": o.email,
                "created_at": rec["created"].astimezone(self.tz).isoformat(),
                "updated_at": rec["updated"].astimezone(self.tz).isoformat(),
                "cancelled_at": rec["cancelled"].isoformat() if rec["cancelled"] else None,
                "currency": o.currency,
                "financial_status": rec["financial"].lower(),
                "fulfillment_status": None,
                "total_price": f"{o.total:.2f}",
                "total_tax": f"{o.tax:.2f}",
                "note": rec["note"],
                "payment_gateway_names": [o.payment_method],
                "billing_address": address,
                "shipping_address": address,
                "customer": {"email": o.email, "first_name": o.first_name},
                "shipping_lines": [{"title": "PostNord", "code": "flat_rate"}],
                "line_items": [
                    {
                        "id": lid,
                        "sku": ln.sku,
                        "name": ln.name,
                        "title": ln.name,
                        "quantity": ln.quantity,
                        "price": f"{ln.price:.2f}",
                        "tax_lines": [{"rate": float(o.tax_rate), "title": "VAT"}],
                    }
                    for lid, ln in zip(rec["line_ids"], o.lines, strict=True)
                ],
            }

    def webhook_request(
        self, number: int, topic: str = "orders/create", *, webhook_id: str | None = None
    ) -> tuple[dict[str, str], bytes]:
        """(headers, body) of a signed webhook delivery of order ``number``."""
        body = json.dumps(self.rest_order(number)).encode("utf-8")
        digest = hmac.new(self.client_secret.encode(), body, hashlib.sha256).digest()
        return {
            "Content-Type": "application/json",
            "X-Shopify-Topic": topic,
            "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode("ascii"),
            "X-Shopify-Shop-Domain": "test-shop.myshopify.com",
            "X-Shopify-API-Version": "2025-10",
            "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4()),
            "X-Shopify-Triggered-At": _iso(datetime.now(UTC)),
        }, body

    # -- GraphQL objects -------------------------------------------------------------------------
    def _order_obj(self, number: int) -> dict[str, Any]:
        rec = self.orders[number]
        o: SampleOrder = rec["sample"]
        cur = o.currency
        gid = _gid("Order", rec["legacy_id"])
        address = {
            "firstName": o.first_name,
            "lastName": o.last_name,
            "name": f"{o.first_name} {o.last_name}",
            "company": None,
            "address1": o.street,
            "address2": None,
            "city": o.city,
            "zip": o.postcode,
            "provinceCode": None,
            "countryCodeV2": o.country,
            "phone": o.phone,
        }
        vat = [
            {
                "title": "VAT",
                "rate": float(o.tax_rate),
                "ratePercentage": float(o.tax_rate * 100),
                "priceSet": _money(o.tax, cur),
            }
        ]
        lines = [
            {
                "id": _gid("LineItem", lid),
                "name": ln.name,
                "title": ln.name,
                "sku": ln.sku,
                "quantity": ln.quantity,
                "originalUnitPriceSet": _money(ln.price, cur),
                "discountedUnitPriceSet": _money(ln.price, cur),
                "taxLines": vat,
            }
            for lid, ln in zip(rec["line_ids"], o.lines, strict=True)
        ]

        def line_items(info: Any, first: int | None = None, after: str | None = None) -> Any:
            return {"nodes": lines[: first or 250], "pageInfo": _page_info(False, None)}

        def metafield(info: Any, key: str, namespace: str | None = None) -> Any:
            return self.metafields.get((gid, namespace or "app", key))

        return {
            "id": gid,
            "legacyResourceId": str(rec["legacy_id"]),
            "name": f"#{o.number}",
            "email": o.email,
            "phone": o.phone,
            "note": rec["note"],
            "createdAt": _iso(rec["created"]),
            "updatedAt": _iso(rec["updated"]),
            "processedAt": _iso(rec["created"]),
            "cancelledAt": _iso(rec["cancelled"]) if rec["cancelled"] else None,
            "closed": False,
            "currencyCode": cur,
            "displayFinancialStatus": rec["financial"],
            "displayFulfillmentStatus": rec["fulfillment"],
            "paymentGatewayNames": [o.payment_method],
            "totalPriceSet": _money(o.total, cur),
            "subtotalPriceSet": _money(o.subtotal, cur),
            "totalTaxSet": _money(o.tax, cur),
            "totalShippingPriceSet": _money(o.shipping, cur),
            "customer": {
                "id": _gid("Customer", abs(hash(o.email)) % 10**9),
                "email": o.email,
                "firstName": o.first_name,
                "lastName": o.last_name,
                "displayName": f"{o.first_name} {o.last_name}",
            },
            "billingAddress": address,
            "shippingAddress": address,
            "shippingLine": {
                "title": "PostNord",
                "code": "flat_rate",
                "source": "shopify",
                "originalPriceSet": _money(o.shipping, cur),
            },
            "taxLines": vat,
            "lineItems": line_items,
            "metafield": metafield,
        }

    # -- search syntax ---------------------------------------------------------------------------
    def _search_time(self, value: str) -> datetime | None:
        value = value.strip("'\"")
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        # A date without an offset is the shop's local time.
        return t if t.tzinfo is not None else t.replace(tzinfo=self.tz)

    def _matches(self, rec: dict[str, Any], query: str | None) -> bool:
        if not query:
            return True
        for term in re.split(r"\s+AND\s+", query.strip()):
            m = re.fullmatch(r"(\w+):(<=|>=|<|>)?(.+)", term.strip())
            if not m:
                continue  # Shopify ignores what it does not understand
            field, op, value = m[1], m[2] or "=", m[3]
            if field in ("updated_at", "created_at"):
                bound = self._search_time(value)
                if bound is None:
                    continue
                t = rec["updated" if field == "updated_at" else "created"]
                ok = {
                    "<": t < bound,
                    "<=": t <= bound,
                    ">": t > bound,
                    ">=": t >= bound,
                    "=": t == bound,
                }[op]
                if not ok:
                    return False
            elif field == "name":
                if f"#{rec['sample'].number}" != value.strip("'\"") and str(
                    rec["sample"].number
                ) != value.strip("'\"#"):
                    return False
            elif field == "id" and str(rec["legacy_id"]) != value.strip("'\""):
                return False
            # other fields: ignored, like unknown ones
        return True

    # -- root resolvers --------------------------------------------------------------------------
    def _orders(
        self,
        info: Any,
        first: int | None = None,
        after: str | None = None,
        query: str | None = None,
        sortKey: str | None = None,
        reverse: bool = False,
        **_: Any,
    ) -> dict[str, Any]:
        if first is None:
            raise QueryError("you must provide one of first or last")
        if first > 250:
            raise QueryError("The 'first' argument must be at most 250")
        key = {
            "UPDATED_AT": lambda r: (r["updated"], r["legacy_id"]),
            "CREATED_AT": lambda r: (r["created"], r["legacy_id"]),
        }.get(sortKey or "ID", lambda r: (r["legacy_id"], r["legacy_id"]))
        recs = [
            r
            for n, r in self.orders.items()
            if self._matches(r, query) and not (query and n in self.hidden)
        ]
        recs.sort(key=key, reverse=reverse)
        start = 0
        if after:
            pos = json.loads(base64.b64decode(after))
            last = (datetime.fromisoformat(pos[0]), pos[1]) if pos[2] else (pos[1], pos[1])
            start = next(
                (i for i, r in enumerate(recs) if (key(r) < last if reverse else key(r) > last)),
                len(recs),
            )
        page = recs[start : start + first]
        edges = []
        for r in page:
            k = key(r)
            is_time = isinstance(k[0], datetime)
            cur = [k[0].isoformat() if is_time else k[0], k[1], is_time]
            edges.append(
                {
                    "cursor": base64.b64encode(json.dumps(cur).encode()).decode(),
                    "node": self._order_obj(r["sample"].number),
                }
            )
        has_next = start + first < len(recs)
        return {
            "edges": edges,
            "nodes": [e["node"] for e in edges],
            "pageInfo": _page_info(has_next, edges[-1]["cursor"] if edges else None),
        }

    def _order(self, info: Any, id: str) -> dict[str, Any] | None:
        for n, r in self.orders.items():
            if _gid("Order", r["legacy_id"]) == id:
                return self._order_obj(n)
        return None

    def _variant_obj(self, v: dict[str, Any]) -> dict[str, Any]:
        iid = v["inventory_item_id"]

        def level(info: Any, locationId: str) -> Any:
            loc = int(locationId.rsplit("/", 1)[-1])
            if (iid, loc) not in self.levels:
                return None

            def quantities(info: Any, names: list[str]) -> Any:
                return [{"name": n, "quantity": self.levels[(iid, loc)]} for n in names]

            return {"id": _gid("InventoryLevel", f"{iid}-{loc}"), "quantities": quantities}

        return {
            "id": _gid("ProductVariant", v["id"]),
            "sku": v["sku"],
            "title": v["title"],
            "inventoryItem": {
                "id": _gid("InventoryItem", iid),
                "sku": v["sku"],
                "tracked": True,
                "inventoryLevel": level,
            },
        }

    def _product_variants(
        self,
        info: Any,
        first: int | None = None,
        after: str | None = None,
        query: str | None = None,
    ) -> dict[str, Any]:
        if first is None or first > 250:
            raise QueryError("first must be given and at most 250")
        rows = sorted(self.variants.values(), key=lambda v: v["id"])
        if query:
            wanted = {m.strip("'\"") for m in re.findall(r"sku:(\"[^\"]*\"|'[^']*'|\S+)", query)}
            if wanted:  # terms it does not understand are ignored
                rows = [v for v in rows if v["sku"] in wanted]
        start = int(base64.b64decode(after)) if after else 0
        page = rows[start : start + first]
        end = start + len(page)
        return {
            "nodes": [self._variant_obj(v) for v in page],
            "pageInfo": _page_info(end < len(rows), base64.b64encode(str(end).encode()).decode()),
        }

    def _locations(self, info: Any, first: int | None = None, after: str | None = None) -> Any:
        nodes = [
            {"id": _gid("Location", loc), "name": f"Warehouse {i}", "isActive": True}
            for i, loc in enumerate(self.location_ids, start=1)
        ]
        return {"nodes": nodes[: first or 250], "pageInfo": _page_info(False, None)}

    def _set_quantities(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        if input.get("name") not in ("available", "on_hand"):
            return _user_errors(
                [("INVALID_NAME", ["input", "name"], "The quantity name must be available.")]
            )
        qs = input["quantities"]
        if len(qs) > 250:
            raise QueryError("The input array size of 251 is greater than the maximum of 250.")
        items = {v["inventory_item_id"] for v in self.variants.values()}
        errors = []
        for i, q in enumerate(qs):
            iid = int(str(q["inventoryItemId"]).rsplit("/", 1)[-1])
            loc = int(str(q["locationId"]).rsplit("/", 1)[-1])
            path = ["input", "quantities", str(i)]
            if iid not in items:
                errors.append(
                    (
                        "INVALID_INVENTORY_ITEM",
                        [*path, "inventoryItemId"],
                        "The specified inventory item could not be found.",
                    )
                )
            elif loc not in self.location_ids:
                errors.append(
                    (
                        "INVALID_LOCATION",
                        [*path, "locationId"],
                        "The specified location could not be found.",
                    )
                )
            elif (iid, loc) not in self.levels:
                errors.append(
                    (
                        "ITEM_NOT_STOCKED_AT_LOCATION",
                        [*path, "locationId"],
                        "The specified inventory item is not stocked at the location.",
                    )
                )
            elif q["quantity"] < 0:
                errors.append(
                    (
                        "INVALID_QUANTITY_NEGATIVE",
                        [*path, "quantity"],
                        "The quantity can't be negative.",
                    )
                )
            elif not input.get("ignoreCompareQuantity") and q.get("compareQuantity") is None:
                errors.append(
                    (
                        "COMPARE_QUANTITY_REQUIRED",
                        [*path, "compareQuantity"],
                        "The compareQuantity argument must be given to each quantity or ignored "
                        "using ignoreCompareQuantity.",
                    )
                )
        if errors:
            return _user_errors(errors)  # all or nothing
        changes = []
        for q in qs:
            iid = int(str(q["inventoryItemId"]).rsplit("/", 1)[-1])
            loc = int(str(q["locationId"]).rsplit("/", 1)[-1])
            before = self.levels[(iid, loc)]
            self.levels[(iid, loc)] = q["quantity"]
            changes.append(
                {
                    "name": input["name"],
                    "delta": q["quantity"] - before,
                    "quantityAfterChange": None,
                }
            )
        group = {"id": _gid("InventoryAdjustmentGroup", self._id()), "reason": input["reason"]}
        return {"inventoryAdjustmentGroup": {**group, "changes": changes}, "userErrors": []}

    def _metafields_set(self, info: Any, metafields: list[dict[str, Any]]) -> dict[str, Any]:
        if len(metafields) > 25:
            raise QueryError("The input array size is greater than the maximum of 25.")
        owners = {_gid("Order", r["legacy_id"]) for r in self.orders.values()}
        errors = []
        for i, mf in enumerate(metafields):
            if mf["ownerId"] not in owners:
                errors.append(
                    {
                        "code": "INVALID",
                        "field": ["metafields", str(i), "ownerId"],
                        "message": "Owner does not exist.",
                        "elementIndex": i,
                    }
                )
            elif not mf.get("type"):
                errors.append(
                    {
                        "code": "BLANK",
                        "field": ["metafields", str(i), "type"],
                        "message": "Type can't be blank.",
                        "elementIndex": i,
                    }
                )
        if errors:
            return {"metafields": [], "userErrors": errors}
        out = []
        for mf in metafields:
            k = (mf["ownerId"], mf.get("namespace") or "app", mf["key"])
            rec = self.metafields.get(k) or {"id": _gid("Metafield", self._id())}
            rec.update(namespace=k[1], key=k[2], type=mf["type"], value=mf["value"])
            self.metafields[k] = rec
            out.append(rec)
        return {"metafields": out, "userErrors": []}

    def _order_update(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        for n, r in self.orders.items():
            if _gid("Order", r["legacy_id"]) == input["id"]:
                if "note" in input:
                    r["note"] = input["note"]  # replaces the note
                return {"order": self._order_obj(n), "userErrors": []}
        return {"order": None, "userErrors": [{"field": ["id"], "message": "Order does not exist"}]}

    # -- cost ------------------------------------------------------------------------------------
    def _cost(self, doc: Any, variables: dict[str, Any]) -> int:
        op = next(d for d in doc.definitions if isinstance(d, OperationDefinitionNode))
        if op.operation.value == "mutation":
            return 10 * len(op.selection_set.selections)
        fragments = {d.name.value: d for d in doc.definitions if d.kind == "fragment_definition"}
        root = SCHEMA.query_type
        assert root is not None
        return self._sel_cost(op.selection_set, root, variables, fragments)

    def _fields(self, selection_set: Any, fragments: dict[str, Any]) -> list[FieldNode]:
        out: list[FieldNode] = []
        for sel in selection_set.selections if selection_set else []:
            if isinstance(sel, FieldNode):
                out.append(sel)
            elif sel.kind == "fragment_spread":
                out.extend(self._fields(fragments[sel.name.value].selection_set, fragments))
            else:  # inline fragment
                out.extend(self._fields(sel.selection_set, fragments))
        return out

    def _sel_cost(
        self, selection_set: Any, parent: GraphQLObjectType, variables: dict[str, Any], frags: Any
    ) -> int:
        total = 0
        for node in self._fields(selection_set, frags):
            if node.name.value not in parent.fields:
                continue
            named = get_named_type(parent.fields[node.name.value].type)
            if not isinstance(named, GraphQLObjectType):
                continue  # scalars and enums cost nothing
            inner = self._sel_cost(node.selection_set, named, variables, frags)
            if named.name.endswith("Connection"):
                first = 1
                for arg in node.arguments:
                    if arg.name.value in ("first", "last"):
                        v = arg.value
                        first = int(
                            variables.get(v.name.value, 1) if v.kind == "variable" else v.value
                        )
                # Connection: 2, plus `first` times one node (pageInfo is part of the 2).
                per_node = 0
                for child in self._fields(node.selection_set, frags):
                    if child.name.value in ("nodes", "edges"):
                        ctype = get_named_type(named.fields[child.name.value].type)
                        assert isinstance(ctype, GraphQLObjectType)
                        per_node = max(
                            per_node,
                            1 + self._sel_cost(child.selection_set, ctype, variables, frags),
                        )
                total += 2 + first * per_node
            else:
                total += 1 + inner
        return total

    def _throttle(self) -> dict[str, Any]:
        now = time.monotonic()
        self._available = min(
            self.bucket_size, self._available + (now - self._refilled_at) * self.restore_rate
        )
        self._refilled_at = now
        return {
            "maximumAvailable": self.bucket_size,
            "currentlyAvailable": int(self._available),
            "restoreRate": self.restore_rate,
        }

    # -- routing ---------------------------------------------------------------------------------
    def route(self, req: Request) -> Response:
        m = re.fullmatch(r"/admin/api/([^/]+)/graphql\.json", req.path)
        if not m:
            return Response(404, {"errors": "Not Found"})
        if req.headers.get("x-shopify-access-token") != self.access_token:
            return Response(
                401,
                {
                    "errors": "[API] Invalid API key or access token (unrecognized login or wrong "
                    "password)"
                },
            )
        version = m[1] if m[1] in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[0]
        headers = {"X-Shopify-API-Version": version}
        if req.method != "POST":
            return Response(405, {"errors": "Method Not Allowed"}, headers=headers)
        try:
            body = req.json() or {}
            doc = parse(body["query"])
        except (ValueError, KeyError, TypeError, GraphQLError) as exc:
            return Response(400, {"errors": [{"message": f"Parse error: {exc}"}]}, headers=headers)
        problems = validate(SCHEMA, doc)
        if problems:
            return Response(
                200,
                {"errors": [{"message": p.message, "extensions": {}} for p in problems]},
                headers=headers,
            )
        variables = body.get("variables") or {}
        requested = self._cost(doc, variables)
        with self._bucket_lock:
            status = self._throttle()
            if requested > self.max_query_cost:
                return Response(
                    200,
                    {
                        "errors": [
                            {
                                "message": f"Query cost is {requested}, which exceeds the single "
                                f"query max cost limit ({self.max_query_cost:g}).",
                                "extensions": {"code": "MAX_COST_EXCEEDED", "cost": requested},
                            }
                        ],
                        "extensions": {"cost": {"requestedQueryCost": requested}},
                    },
                    headers=headers,
                )
            if requested > self._available:
                self.throttled += 1
                return Response(
                    200,
                    {
                        "errors": [
                            {
                                "message": "Throttled",
                                "extensions": {
                                    "code": "THROTTLED",
                                    "documentation": "https://shopify.dev/api/usage/limits",
                                },
                            }
                        ],
                        "extensions": {
                            "cost": {
                                "requestedQueryCost": requested,
                                "actualQueryCost": None,
                                "throttleStatus": status,
                            }
                        },
                    },
                    headers=headers,
                )
            self._available -= requested
        op = next(d for d in doc.definitions if isinstance(d, OperationDefinitionNode))
        roots = [s.name.value for s in op.selection_set.selections if isinstance(s, FieldNode)]
        if version >= "2026-04" and "inventorySetQuantities" in roots:
            field = next(
                s
                for s in op.selection_set.selections
                if isinstance(s, FieldNode) and s.name.value == "inventorySetQuantities"
            )
            if not any(d.name.value == "idempotent" for d in field.directives):
                return Response(
                    200,
                    {"errors": [{"message": "The @idempotent directive is required."}]},
                    headers=headers,
                )
        with self.lock:
            self.operations.extend(roots)
            self.versions_used.append(version)
            root_value = {
                "orders": self._orders,
                "order": self._order,
                "productVariants": self._product_variants,
                "locations": self._locations,
                "inventorySetQuantities": self._set_quantities,
                "metafieldsSet": self._metafields_set,
                "orderUpdate": self._order_update,
            }
            result = graphql_sync(SCHEMA, body["query"], root_value, variable_values=variables)
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [{"message": e.message, "path": e.path} for e in result.errors]
        actual = min(requested, _count_objects(result.data))
        with self._bucket_lock:
            self._available = min(self.bucket_size, self._available + (requested - actual))
            status = self._throttle()
        out["extensions"] = {
            "cost": {
                "requestedQueryCost": requested,
                "actualQueryCost": actual,
                "throttleStatus": status,
            }
        }
        return Response(200, out, headers=headers)


def _page_info(has_next: bool, end: str | None) -> dict[str, Any]:
    return {
        "hasNextPage": has_next,
        "hasPreviousPage": False,
        "startCursor": None,
        "endCursor": end,
    }


def _user_errors(errors: list[tuple[str, list[str], str]]) -> dict[str, Any]:
    return {
        "inventoryAdjustmentGroup": None,
        "userErrors": [{"code": c, "field": f, "message": m} for c, f, m in errors],
    }


def _count_objects(data: Any) -> int:
    if isinstance(data, dict):
        return 1 + sum(_count_objects(v) for v in data.values())
    if isinstance(data, list):
        return sum(_count_objects(v) for v in data)
    return 0
