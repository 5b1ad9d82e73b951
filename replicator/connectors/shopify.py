"""The Shopify connector: the Admin GraphQL API at a pinned, configurable API version
(``POST /admin/api/<version>/graphql.json``, ``X-Shopify-Access-Token``), and the receiver of
Shopify's ``orders/create`` / ``orders/updated`` webhooks.

Orders: the ``orders`` query with a search filter ``updated_at:>='since' AND updated_at:<'until'``
(UTC, with ``Z``: a date without an offset would be read in the shop's time zone), sorted by
``UPDATED_AT``, paged with ``pageInfo.endCursor``. Shopify ignores search terms it does not
understand — the list is then silently unfiltered — so the window is also enforced here on
``updatedAt``. Orders whose ``updatedAt`` lies in a window but which the search index has not
caught up with yet are not returned by that poll; the daily reconciliation sweep re-reads the
last days and catches them.

The e-number is the order's ``name`` (``#1001``, what the merchant and the customer see), or the
numeric id (``e_number_field = "id"``); the GraphQL id (``gid://shopify/Order/…``) is kept in
``ShopOrder.extra["gid"]`` for API calls.

Rate limits are by calculated query cost: every answer's ``extensions.cost.throttleStatus`` tells
the bucket (``currentlyAvailable``, ``maximumAvailable``, ``restoreRate``). Before a query the
connector projects the bucket forward and sleeps until the query's last known cost is available;
a ``THROTTLED`` answer is waited out for exactly the time the bucket needs to refill (a few times
at most, never a tight loop), then reported as :class:`ShopUnavailable` with ``retry_after``.

Stock: ``inventorySetQuantities`` (absolute ``available`` quantities at one location, up to 250
per call, ``ignoreCompareQuantity`` since the ERP is the source of truth). The mutation is all or
nothing: refused entries (``userErrors[].field`` = ``["input", "quantities", "<i>", …]``) are
reported per SKU and the rest is sent again. SKU → inventory item is resolved with
``productVariants(query: "sku:…")`` once and cached.

Invoices: Shopify has no invoice attachment; the ERP invoice (file name, size, hash and the
``invoice_url`` link when configured) is recorded on the order in a metafield
(``invoice_target = "metafield"``, default ``sync_daemon.erp_invoice``) or appended to the order
note (``"note"``) — once: an invoice already recorded there is not written again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from replicator import safejson
from replicator.connectors._http import RestShopConnector, ShopHttp, ceil_second, raw_json
from replicator.connectors.base import ShopError, ShopOrder, ShopUnavailable, StockUpdate
from replicator.connectors.webhook import WebhookDelivery, WebhookReceiver

log = structlog.get_logger(__name__)

DEFAULT_API_VERSION = "2025-10"
MAX_PER_PAGE = 10  # orders with 10 lines each cost about 75 points; one query may cost 1000
MAX_QUANTITIES = 250  # inventorySetQuantities accepts at most 250 quantities per call
_SKUS_PER_LOOKUP = 50
_LINES_PER_ORDER = 10
_THROTTLE_RETRIES = 4

_MONEY = "shopMoney { amount currencyCode }"
_ADDRESS = (
    "firstName lastName name company address1 address2 city zip provinceCode countryCodeV2 phone"
)
ORDER_FIELDS = f"""
fragment OrderFields on Order {{
  id legacyResourceId name email phone note createdAt updatedAt processedAt cancelledAt
  currencyCode displayFinancialStatus displayFulfillmentStatus paymentGatewayNames
  totalPriceSet {{ {_MONEY} }} subtotalPriceSet {{ {_MONEY} }} totalTaxSet {{ {_MONEY} }}
  totalShippingPriceSet {{ {_MONEY} }}
  customer {{ email firstName lastName }}
  billingAddress {{ {_ADDRESS} }}
  shippingAddress {{ {_ADDRESS} }}
  shippingLine {{ title code }}
  lineItems(first: {_LINES_PER_ORDER}) {{
    nodes {{ id name sku quantity originalUnitPriceSet {{ {_MONEY} }}
             discountedUnitPriceSet {{ {_MONEY} }} taxLines {{ title rate }} }}
    pageInfo {{ hasNextPage endCursor }}
  }}
}}
"""
ORDERS_QUERY = (
    """
query Orders($first: Int!, $after: String, $query: String!) {
  orders(first: $first, after: $after, query: $query, sortKey: UPDATED_AT) {
    pageInfo { hasNextPage endCursor }
    nodes { ...OrderFields }
  }
}
"""
    + ORDER_FIELDS
)
ORDER_QUERY = (
    """
query Order($id: ID!) { order(id: $id) { ...OrderFields } }
"""
    + ORDER_FIELDS
)
MORE_LINES_QUERY = f"""
query MoreLines($id: ID!, $after: String) {{
  order(id: $id) {{
    lineItems(first: {_LINES_PER_ORDER}, after: $after) {{
      nodes {{ id name sku quantity originalUnitPriceSet {{ {_MONEY} }}
               discountedUnitPriceSet {{ {_MONEY} }} taxLines {{ title rate }} }}
      pageInfo {{ hasNextPage endCursor }}
    }}
  }}
}}
"""
VARIANTS_QUERY = """
query Variants($first: Int!, $after: String, $query: String) {
  productVariants(first: $first, after: $after, query: $query) {
    pageInfo { hasNextPage endCursor }
    nodes { sku inventoryItem { id } }
  }
}
"""
STOCK_QUERY = """
query Stock($first: Int!, $after: String, $location: ID!) {
  productVariants(first: $first, after: $after) {
    pageInfo { hasNextPage endCursor }
    nodes { sku inventoryItem { inventoryLevel(locationId: $location) {
      quantities(names: ["available"]) { name quantity } } } }
  }
}
"""
LOCATIONS_QUERY = "query { locations(first: 2) { nodes { id name isActive } } }"
SET_QUANTITIES = """
mutation SetStock($input: InventorySetQuantitiesInput!) {
  inventorySetQuantities(input: $input)%s {
    inventoryAdjustmentGroup { id }
    userErrors { code field message }
  }
}
"""
INVOICE_READ = """
query Invoice($id: ID!, $namespace: String!, $key: String!) {
  order(id: $id) { note metafield(namespace: $namespace, key: $key) { value } }
}
"""
METAFIELDS_SET = """
mutation Record($metafields: [MetafieldsSetInput!]!) {
  metafieldsSet(metafields: $metafields) { metafields { id } userErrors { field message } }
}
"""
NOTE_SET = """
mutation Note($input: OrderInput!) {
  orderUpdate(input: $input) { order { id } userErrors { field message } }
}
"""


def _gid(kind: str, value: str) -> str:
    return value if value.startswith("gid://") else f"gid://shopify/{kind}/{value}"


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _search_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Bucket:
    """What the last answer said about the cost bucket, projected forward by the restore rate."""

    def __init__(self) -> None:
        self.available: float | None = None
        self.maximum: float | None = None
        self.restore = 50.0
        self.at = time.monotonic()
        self.costs: dict[str, float] = {}  # last requested cost per query text and page size

    def update(self, cost: Mapping[str, Any] | None) -> None:
        status = (cost or {}).get("throttleStatus")
        if not isinstance(status, Mapping):
            return
        try:
            self.available = float(status["currentlyAvailable"])
            self.maximum = float(status["maximumAvailable"])
            self.restore = max(1.0, float(status["restoreRate"]))
        except (KeyError, TypeError, ValueError):
            return
        self.at = time.monotonic()

    def wait_for(self, needed: float) -> float:
        """Seconds until ``needed`` points are available (0 when they are or nothing is known)."""
        if self.available is None:
            return 0.0
        if self.maximum is not None:
            needed = min(needed, self.maximum)
        now_available = self.available + (time.monotonic() - self.at) * self.restore
        if self.maximum is not None:
            now_available = min(now_available, self.maximum)
        return max(0.0, (needed - now_available) / self.restore)


class ShopifyConnector(RestShopConnector):
    """One Shopify store, through the Admin GraphQL API."""

    def __init__(
        self,
        name: str,
        url: str,
        access_token: str,
        *,
        api_version: str = DEFAULT_API_VERSION,
        timeout: float = 30.0,
        per_page: int = MAX_PER_PAGE,
        e_number_field: str = "name",
        location_id: str | None = None,
        invoice_target: str = "metafield",
        invoice_url: str | None = None,
        metafield: str = "sync_daemon.erp_invoice",
        verify_tls: bool = True,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.api_version = api_version
        self.per_page = max(1, min(per_page, MAX_PER_PAGE))
        self.e_number_field = e_number_field
        self.invoice_target = invoice_target
        self.invoice_url = invoice_url
        self.mf_namespace, _, self.mf_key = metafield.partition(".")
        self.max_wait = max_wait
        self._sleep = sleep
        self._location = _gid("Location", location_id) if location_id else None
        self._items: dict[str, str] = {}  # SKU → inventory item GID
        self._bucket = _Bucket()
        self._version_warned = False
        self.http = ShopHttp(
            name,
            url.rstrip("/") + f"/admin/api/{api_version}",
            headers={"X-Shopify-Access-Token": access_token, "Content-Type": "application/json"},
            timeout=timeout,
            secrets=(access_token,),
            auth_hint=(
                "check the token (the Admin API access token of the app, with the read_orders, "
                "write_inventory and write_orders scopes)"
            ),
            verify=verify_tls,
        )

    # -- GraphQL ---------------------------------------------------------------------------------
    def _wait(self, seconds: float, why: str) -> None:
        if seconds <= 0:
            return
        if seconds > self.max_wait:
            raise ShopUnavailable(
                f"shop {self.name!r}: {why}; the query cost bucket needs {seconds:.0f}s to refill",
                retry_after=seconds,
            )
        log.debug("shopify cost wait", shop=self.name, seconds=round(seconds, 2), why=why)
        self._sleep(seconds)

    def gql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run one query or mutation; returns ``data``, or raises the contract errors."""
        for attempt in range(_THROTTLE_RETRIES + 1):
            # Slow down before the bucket is empty: wait until this query's last cost is there.
            key = f"{query}|{(variables or {}).get('first')}"
            expected = self._bucket.costs.get(key, 0.0)
            self._wait(self._bucket.wait_for(expected), "the bucket is low")
            resp, body = self.http.request(
                "POST", "/graphql.json", json_body={"query": query, "variables": variables or {}}
            )
            self._check_version(resp.headers.get("X-Shopify-API-Version"))
            if not isinstance(body, dict):
                raise ShopError(f"shop {self.name!r}: the GraphQL answer is not an object")
            cost = (body.get("extensions") or {}).get("cost")
            self._bucket.update(cost)
            if isinstance(cost, Mapping) and cost.get("requestedQueryCost") is not None:
                self._bucket.costs[key] = float(cost["requestedQueryCost"])
            errors = body.get("errors") or []
            if isinstance(errors, str):  # authentication errors come as one string
                raise ShopError(f"shop {self.name!r}: {errors[:200]}")
            codes = {str((e.get("extensions") or {}).get("code")) for e in errors}
            if "THROTTLED" in codes:
                needed = float((cost or {}).get("requestedQueryCost") or 0)
                wait = max(self._bucket.wait_for(needed), 0.1)
                if attempt == _THROTTLE_RETRIES:
                    raise ShopUnavailable(
                        f"shop {self.name!r}: throttled by Shopify (query cost {needed:g}) "
                        f"{attempt + 1} times",
                        retry_after=wait,
                    )
                log.info("shopify throttled; waiting", shop=self.name, seconds=round(wait, 2))
                self._wait(wait, "Shopify answered THROTTLED")
                continue
            if "MAX_COST_EXCEEDED" in codes:
                raise ShopError(
                    f"shop {self.name!r}: the query costs more than Shopify allows for one query; "
                    "lower per_page"
                )
            if errors:
                msgs = "; ".join(str(e.get("message")) for e in errors[:3])
                raise ShopError(f"shop {self.name!r}: GraphQL errors: {msgs[:300]}")
            data = body.get("data")
            if not isinstance(data, dict):
                raise ShopError(f"shop {self.name!r}: the GraphQL answer has no data")
            return data
        raise AssertionError("unreachable")

    def _check_version(self, answered: str | None) -> None:
        if answered and answered != self.api_version and not self._version_warned:
            self._version_warned = True
            log.warning(
                "shopify answered with another API version than the pinned one; the pinned "
                "version is no longer (or not yet) supported: pin a supported api_version",
                shop=self.name,
                pinned=self.api_version,
                answered=answered,
            )

    # -- orders ----------------------------------------------------------------------------------
    def _complete_lines(self, node: dict[str, Any]) -> None:
        """Fetch the lines of an order beyond the first page (large B2B orders)."""
        items = node.get("lineItems") or {}
        page = items.get("pageInfo") or {}
        while page.get("hasNextPage"):
            data = self.gql(MORE_LINES_QUERY, {"id": node["id"], "after": page.get("endCursor")})
            more = ((data.get("order") or {}).get("lineItems")) or {}
            items.setdefault("nodes", []).extend(more.get("nodes") or [])
            page = more.get("pageInfo") or {}
        items["pageInfo"] = {"hasNextPage": False, "endCursor": None}

    def _order(self, node: dict[str, Any]) -> ShopOrder:
        try:
            updated = _time(node.get("updatedAt") or node["createdAt"])
            e_number = (
                str(node["legacyResourceId"]) if self.e_number_field == "id" else str(node["name"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShopError(
                f"shop {self.name!r}: order {node.get('id')} lacks {exc} in the GraphQL answer"
            ) from None
        status = (
            "cancelled"
            if node.get("cancelledAt")
            else str(node.get("displayFinancialStatus") or "").lower()
        )
        return ShopOrder(
            shop=self.name,
            e_number=e_number,
            status=status,
            updated_at=updated,
            payload=node,
            raw=raw_json(node),
            extra={"gid": node.get("id"), "legacy_id": node.get("legacyResourceId")},
        )

    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        since = since.astimezone(UTC)
        until = until.astimezone(UTC) if until is not None else None
        search = f"updated_at:>='{_search_time(since.replace(microsecond=0))}'"
        if until is not None:
            search += f" AND updated_at:<'{_search_time(ceil_second(until))}'"
        after: str | None = None
        seen: set[str] = set()
        while True:
            data = self.gql(ORDERS_QUERY, {"first": self.per_page, "after": after, "query": search})
            conn = data.get("orders") or {}
            for node in conn.get("nodes") or []:
                if node.get("id") in seen:
                    continue
                seen.add(node.get("id"))
                order = self._order(node)
                # Enforced here too: Shopify drops search terms it cannot parse without a word.
                if order.updated_at < since.replace(microsecond=0) or (
                    until is not None and order.updated_at >= until
                ):
                    continue
                self._complete_lines(node)
                yield order
            page = conn.get("pageInfo") or {}
            if not page.get("hasNextPage") or not page.get("endCursor"):
                break
            after = page["endCursor"]

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        if self.e_number_field == "id":
            if not e_number.isdigit():
                return None
            node = self.gql(ORDER_QUERY, {"id": _gid("Order", e_number)}).get("order")
        else:
            name = e_number if e_number.startswith("#") else f"#{e_number}"
            data = self.gql(ORDERS_QUERY, {"first": 5, "after": None, "query": f"name:'{name}'"})
            nodes = [n for n in (data.get("orders") or {}).get("nodes") or [] if n["name"] == name]
            node = nodes[0] if nodes else None
        if not node:
            return None
        self._complete_lines(node)
        return self._order(node)

    # -- stock -----------------------------------------------------------------------------------
    def _location_id(self) -> str:
        if self._location is None:
            nodes = (self.gql(LOCATIONS_QUERY).get("locations") or {}).get("nodes") or []
            active = [n for n in nodes if n.get("isActive", True)]
            if len(active) != 1:
                raise ShopError(
                    f"shop {self.name!r}: the store has {len(active)} active locations; set "
                    "location_id in its [[shops]] section to the one the ERP stock belongs to"
                )
            self._location = str(active[0]["id"])
        return self._location

    def _resolve(self, skus: list[str]) -> None:
        unknown = [s for s in dict.fromkeys(skus) if s not in self._items]
        for i in range(0, len(unknown), _SKUS_PER_LOOKUP):
            chunk = unknown[i : i + _SKUS_PER_LOOKUP]
            query = " OR ".join("sku:" + json.dumps(s) for s in chunk)
            after: str | None = None
            while True:
                # Asking for as many as there are SKUs keeps the requested cost (what must be
                # in the bucket) at a fifth of first: 250; duplicates come on further pages.
                data = self.gql(
                    VARIANTS_QUERY, {"first": len(chunk), "after": after, "query": query}
                )
                conn = data.get("productVariants") or {}
                for v in conn.get("nodes") or []:
                    if v.get("sku") in chunk and v.get("inventoryItem"):
                        self._items[v["sku"]] = v["inventoryItem"]["id"]
                page = conn.get("pageInfo") or {}
                if not page.get("hasNextPage"):
                    break
                after = page.get("endCursor")

    def _set(self, quantities: list[dict[str, Any]]) -> list[int]:
        """One inventorySetQuantities call; the indexes of refused entries (nothing is saved
        when there are any)."""
        directive = ""
        if self.api_version >= "2026-01":
            # From 2026-04 Shopify requires an idempotency key on this mutation.
            key = hashlib.sha256(json.dumps(quantities, sort_keys=True).encode()).hexdigest()
            directive = f' @idempotent(key: "{key[:32]}")'
        data = self.gql(
            SET_QUANTITIES % directive,
            {
                "input": {
                    "name": "available",
                    "reason": "correction",
                    "ignoreCompareQuantity": True,
                    "referenceDocumentUri": "logistics://sync-daemon/erp-stock",
                    "quantities": quantities,
                }
            },
        )
        errors = (data.get("inventorySetQuantities") or {}).get("userErrors") or []
        bad: list[int] = []
        for e in errors:
            field = e.get("field") or []
            if len(field) >= 3 and field[1] == "quantities" and str(field[2]).isdigit():
                bad.append(int(field[2]))
            else:
                raise ShopError(
                    f"shop {self.name!r}: inventorySetQuantities refused: {e.get('message')}"
                )
        return sorted(set(bad))

    def push_stock(self, updates: list[StockUpdate]) -> list[str]:
        if not updates:
            return []
        latest = {u.sku: u.quantity for u in updates}  # the last quantity of a SKU wins
        location = self._location_id()
        self._resolve(list(latest))

        def send(chunk: list[tuple[str, int]]) -> list[int]:
            return self._set(
                [
                    {"inventoryItemId": self._items[s], "locationId": location, "quantity": q}
                    for s, q in chunk
                ]
            )

        return self._push_all_or_nothing(latest, self._items, MAX_QUANTITIES, send)

    def fetch_stock(self) -> Iterator[StockUpdate]:
        location = self._location_id()
        after: str | None = None
        while True:
            data = self.gql(STOCK_QUERY, {"first": 100, "after": after, "location": location})
            conn = data.get("productVariants") or {}
            for v in conn.get("nodes") or []:
                level = (v.get("inventoryItem") or {}).get("inventoryLevel")
                if v.get("sku") and level:
                    for q in level.get("quantities") or []:
                        if q.get("name") == "available":
                            yield StockUpdate(sku=v["sku"], quantity=int(q["quantity"]))
            page = conn.get("pageInfo") or {}
            if not page.get("hasNextPage"):
                break
            after = page.get("endCursor")

    # -- invoices --------------------------------------------------------------------------------
    def attach_invoice(self, e_number: str, filename: str, pdf: bytes) -> None:
        order = self._invoice_order(e_number, filename)
        gid = str(order.extra["gid"])
        text = self._invoice_text(filename, pdf)
        if self.invoice_url:
            text += ": " + self.invoice_url.format(filename=filename, e_number=e_number)
        current = (
            self.gql(INVOICE_READ, {"id": gid, "namespace": self.mf_namespace, "key": self.mf_key})
        ).get("order") or {}
        if self.invoice_target == "note":
            note = str(current.get("note") or "")
            if filename in note:
                log.info("invoice already on the order note", shop=self.name, e_number=e_number)
                return
            data = self.gql(
                NOTE_SET, {"input": {"id": gid, "note": (note + "\n" if note else "") + text}}
            )
            errors = (data.get("orderUpdate") or {}).get("userErrors") or []
        else:
            value = str((current.get("metafield") or {}).get("value") or "")
            if filename in value:
                log.info("invoice already in the metafield", shop=self.name, e_number=e_number)
                return
            data = self.gql(
                METAFIELDS_SET,
                {
                    "metafields": [
                        {
                            "ownerId": gid,
                            "namespace": self.mf_namespace,
                            "key": self.mf_key,
                            "type": "multi_line_text_field",
                            "value": (value + "\n" if value else "") + text,
                        }
                    ]
                },
            )
            errors = (data.get("metafieldsSet") or {}).get("userErrors") or []
        if errors:
            raise ShopError(
                f"shop {self.name!r}: order {e_number}: Shopify refused the invoice record: "
                + "; ".join(str(e.get("message")) for e in errors)
            )


class ShopifyWebhookReceiver(WebhookReceiver):
    """Shopify webhooks (``orders/create``, ``orders/updated``): ``X-Shopify-Hmac-Sha256`` is the
    base64 HMAC-SHA256 of the raw body keyed with the app's client secret; duplicates share
    ``X-Shopify-Webhook-Id``. The body is the order in Shopify's REST format; its e-number is
    ``name`` (or ``id`` with ``e_number_field = "id"``), as the poll sees it."""

    signature_header = "X-Shopify-Hmac-Sha256"
    delivery_header = "X-Shopify-Webhook-Id"
    topic_header = "X-Shopify-Topic"

    def __init__(self, *args: Any, e_number_field: str = "name", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.e_number_field = e_number_field

    def expected_signature(self, body: bytes) -> bytes:
        return base64.b64encode(hmac.new(self._secret, body, hashlib.sha256).digest())

    def delivery_for(self, headers: Mapping[str, str], body: bytes) -> WebhookDelivery | None:
        e_number: str | None = None
        try:
            # A hostile body (too deep, huge numbers, NUL) is stored raw and
            # parked by the import with the reason, never half-read here.
            data = safejson.loads(body)
        except safejson.JsonRefused:
            data = None
        if isinstance(data, dict):
            value = data.get("id") if self.e_number_field == "id" else data.get("name")
            e_number = str(value) if value not in (None, "") else None
        return WebhookDelivery(
            shop=self.shop,
            delivery_id=self._header(headers, self.delivery_header),
            topic=self._header(headers, self.topic_header),
            e_number=e_number,
            payload_sha256=hashlib.sha256(body).hexdigest(),
            raw=body,
            trusted_e_number=e_number is not None,
        )
