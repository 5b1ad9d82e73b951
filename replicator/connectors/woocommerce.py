"""The WooCommerce REST v3 connector (``/wp-json/wc/v3``).

Orders are polled with ``modified_after``/``modified_before`` and ``dates_are_gmt=true``: without
the flag WooCommerce reads the dates in the shop's local time zone, and a shop in Copenhagen would
be polled an hour or two off. WooCommerce's date bounds are exclusive, so the request starts one
second early and the window ``[since, until)`` is enforced here on ``date_modified_gmt``.

The e-number is the order ``number`` (equal to the id unless a sequential-numbers plugin is
installed); the id is kept in ``ShopOrder.extra["order_id"]``.

Credentials go as HTTP basic auth (WooCommerce accepts it over HTTPS), never as query parameters,
so they cannot end up in a proxy log or in an error message.

Invoices: WooCommerce has no attachment API; the invoice becomes a private order note naming the
file (and linking to it when ``invoice_url`` is configured).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import structlog

from replicator.connectors._http import RestShopConnector, ShopHttp, ceil_second, raw_json
from replicator.connectors.base import ShopError, ShopOrder, StockUpdate

log = structlog.get_logger(__name__)

MAX_PER_PAGE = 100  # WooCommerce rejects per_page > 100
MAX_BATCH = 100  # products/batch accepts at most 100 items per request
# Below this many unknown SKUs, look them up one by one; above, list the catalogue once.
_SKU_LOOKUP_LIMIT = 10


def _gmt(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _wc_date(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


class WooCommerceConnector(RestShopConnector):
    """One WooCommerce shop."""

    def __init__(
        self,
        name: str,
        url: str,
        consumer_key: str,
        consumer_secret: str,
        *,
        timeout: float = 30.0,
        per_page: int = MAX_PER_PAGE,
        invoice_url: str | None = None,
        verify_tls: bool = True,
    ) -> None:
        self.name = name
        self.per_page = max(1, min(per_page, MAX_PER_PAGE))
        self.invoice_url = invoice_url
        self.http = ShopHttp(
            name,
            url.rstrip("/") + "/wp-json/wc/v3",
            auth=httpx.BasicAuth(consumer_key, consumer_secret),
            timeout=timeout,
            secrets=(consumer_key, consumer_secret),
            auth_hint=(
                "check consumer_key/consumer_secret and that the key has read/write permission "
                "(WooCommerce → Settings → Advanced → REST API)"
            ),
            verify=verify_tls,
        )
        self._sku_ids: dict[str, int] = {}

    # -- orders ----------------------------------------------------------------------------------
    def _order(self, data: dict[str, Any]) -> ShopOrder:
        raw = raw_json(data)
        updated = _gmt(data.get("date_modified_gmt")) or _gmt(data.get("date_created_gmt"))
        if updated is None:
            raise ShopError(f"shop {self.name!r}: order {data.get('id')} has no date_modified_gmt")
        return ShopOrder(
            shop=self.name,
            e_number=str(data.get("number") or data["id"]),
            status=str(data.get("status", "")),
            updated_at=updated,
            payload=data,
            raw=raw,
            extra={"order_id": data["id"]},
        )

    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        since = since.astimezone(UTC)
        until = until.astimezone(UTC) if until is not None else None
        params: dict[str, Any] = {
            # Bounds are exclusive and whole seconds: start one second early, filter below.
            "modified_after": _wc_date(since.replace(microsecond=0) - timedelta(seconds=1)),
            "dates_are_gmt": "true",
            "orderby": "modified",
            "order": "asc",
            "per_page": self.per_page,
        }
        if until is not None:
            params["modified_before"] = _wc_date(ceil_second(until))
        seen: set[int] = set()
        requests = 0
        # Offset paging over a list that changes while we read it can shift an order onto a page
        # already read. The total changing between pages gives that away: read the window again
        # and yield only what was missed (at most twice; the importer's overlap covers the rest).
        for _ in range(3):
            totals: set[str] = set()
            page, total_pages = 1, 1
            while page <= total_pages:
                resp, rows = self.http.request("GET", "/orders", params={**params, "page": page})
                requests += 1
                if not isinstance(rows, list):
                    raise ShopError(f"shop {self.name!r}: GET /orders did not return a list")
                total_pages = int(resp.headers.get("X-WP-TotalPages") or 0)
                totals.add(resp.headers.get("X-WP-Total") or "")
                if not rows:
                    break
                for data in rows:
                    if data["id"] in seen:
                        continue
                    seen.add(data["id"])
                    order = self._order(data)
                    if order.updated_at >= since and (until is None or order.updated_at < until):
                        yield order
                page += 1
            if len(totals) <= 1:
                break
            log.info("orders changed while paging; reading the window again", shop=self.name)
        log.debug("woocommerce orders fetched", shop=self.name, orders=len(seen), requests=requests)

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        if not e_number.isdigit():
            return None  # WooCommerce order ids are numeric
        _, data = self.http.request("GET", f"/orders/{e_number}", missing_ok=True)
        if data is None:
            return None
        return self._order(data)

    # -- stock -----------------------------------------------------------------------------------
    def _iter_products(self) -> Iterator[dict[str, Any]]:
        page, total_pages = 1, 1
        while page <= total_pages:
            resp, rows = self.http.request(
                "GET", "/products", params={"per_page": MAX_PER_PAGE, "page": page, "orderby": "id"}
            )
            total_pages = int(resp.headers.get("X-WP-TotalPages") or 0)
            if not rows:
                break
            for p in rows:
                if p.get("sku"):
                    self._sku_ids[p["sku"]] = int(p["id"])
                yield p
            page += 1

    def _resolve_skus(self, skus: list[str]) -> None:
        unknown = [s for s in dict.fromkeys(skus) if s not in self._sku_ids]
        if not unknown:
            return
        if len(unknown) > _SKU_LOOKUP_LIMIT:
            for _ in self._iter_products():
                pass
            return
        for sku in unknown:
            _, rows = self.http.request("GET", "/products", params={"sku": sku})
            for p in rows or []:
                if p.get("sku") == sku:
                    self._sku_ids[sku] = int(p["id"])

    def push_stock(self, updates: list[StockUpdate]) -> list[str]:
        if not updates:
            return []
        latest = {u.sku: u.quantity for u in updates}  # the last quantity of a SKU wins
        self._resolve_skus(list(latest))
        missing = [s for s in latest if s not in self._sku_ids]
        items = [
            {"id": self._sku_ids[s], "stock_quantity": q}
            for s, q in latest.items()
            if s in self._sku_ids
        ]
        by_id = {self._sku_ids[s]: s for s in latest if s in self._sku_ids}
        refused: list[str] = []
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i : i + MAX_BATCH]
            _, data = self.http.request("POST", "/products/batch", json_body={"update": chunk})
            for result in (data or {}).get("update", []):
                if isinstance(result, dict) and "error" in result:
                    sku = by_id.get(int(result.get("id") or 0), str(result.get("id")))
                    refused.append(sku)
                    # The product may have been deleted or re-created: look it up again next time.
                    self._sku_ids.pop(sku, None)
        skipped = missing + refused
        log.info(
            "stock_pushed", shop=self.name, written=len(items) - len(refused), skipped=len(skipped)
        )
        if skipped:
            log.warning(
                "stock skipped for SKUs the shop does not have",
                shop=self.name,
                count=len(skipped),
                skus=skipped[:10],
            )
        return skipped

    def fetch_stock(self) -> Iterator[StockUpdate]:
        for p in self._iter_products():
            # Products that do not manage stock have no quantity to reconcile.
            if p.get("sku") and p.get("manage_stock") and p.get("stock_quantity") is not None:
                yield StockUpdate(sku=p["sku"], quantity=int(p["stock_quantity"]))

    # -- invoices --------------------------------------------------------------------------------
    def _order_notes(self, order: ShopOrder) -> list[str]:
        _, notes = self.http.request("GET", f"/orders/{order.extra['order_id']}/notes")
        return [str(n.get("note") or "") for n in notes or [] if isinstance(n, dict)]

    def _add_invoice_note(self, order: ShopOrder, e_number: str, filename: str, text: str) -> None:
        if self.invoice_url:
            text += ": " + self.invoice_url.format(filename=filename, e_number=e_number)
        self.http.request(
            "POST",
            f"/orders/{order.extra['order_id']}/notes",
            json_body={"note": text, "customer_note": False},
        )
