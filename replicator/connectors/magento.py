"""The Magento 2 REST connector (``/rest/V1``, bearer token of an integration).

Orders are searched by ``updated_at`` (``gteq since`` AND ``lt until``, ``YYYY-MM-DD HH:MM:SS`` in
UTC), sorted by ``updated_at`` then ``entity_id``. Magento answers a ``currentPage`` past the last
page with the last page again, so paging stops when ``currentPage * pageSize >= total_count`` or
when a page brings no order not already seen — never on an empty page alone.

The e-number is the ``increment_id`` (what the customer sees, e.g. ``000001234``); the internal
``entity_id`` is kept in ``ShopOrder.extra["entity_id"]``.

Stock goes through MSI source items (``POST /inventory/source-items``) of one source (``default``
unless configured); Magento validates a whole request and saves nothing if one SKU is unknown, so a
refused chunk is retried item by item to save the rest. Invoices become an order comment.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from replicator.connectors._http import RestShopConnector, ShopHttp, ceil_second, raw_json
from replicator.connectors.base import ShopError, ShopOrder, StockUpdate

log = structlog.get_logger(__name__)

MAX_PAGE_SIZE = 100
MAX_BATCH = 100  # source items per request: Magento has no hard limit, big requests hit PHP limits


def _mage_date(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _parse_mage_date(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def criteria(
    filters: list[tuple[str, str, str]],
    *,
    sort: Sequence[tuple[str, str]] = (),
    page_size: int | None = None,
    page: int | None = None,
) -> dict[str, str]:
    """searchCriteria query parameters; each (field, condition, value) is its own AND-ed group."""
    params: dict[str, str] = {}
    for g, (field, cond, value) in enumerate(filters):
        base = f"searchCriteria[filter_groups][{g}][filters][0]"
        params[f"{base}[field]"] = field
        params[f"{base}[value]"] = value
        params[f"{base}[condition_type]"] = cond
    for i, (field, direction) in enumerate(sort):
        params[f"searchCriteria[sortOrders][{i}][field]"] = field
        params[f"searchCriteria[sortOrders][{i}][direction]"] = direction
    if page_size is not None:
        params["searchCriteria[pageSize]"] = str(page_size)
    if page is not None:
        params["searchCriteria[currentPage]"] = str(page)
    return params


class MagentoConnector(RestShopConnector):
    """One Magento 2 store."""

    def __init__(
        self,
        name: str,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        per_page: int = MAX_PAGE_SIZE,
        source_code: str = "default",
        verify_tls: bool = True,
    ) -> None:
        self.name = name
        self.per_page = max(1, min(per_page, MAX_PAGE_SIZE))
        self.source_code = source_code
        self.http = ShopHttp(
            name,
            url.rstrip("/") + "/rest/V1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            secrets=(token,),
            auth_hint=(
                "check the token (System → Integrations: the access token, with the Sales and "
                "Inventory resources allowed)"
            ),
            verify=verify_tls,
        )

    def _search(
        self, path: str, filters: list[tuple[str, str, str]], sort: list[tuple[str, str]], key: str
    ) -> Iterator[dict[str, Any]]:
        """Every item of a paged search, once, despite the repeat-the-last-page quirk.

        If ``total_count`` changes between pages, items may have shifted onto pages already read:
        the search runs again (at most twice) and yields only what was missed.
        """
        seen: set[Any] = set()
        for attempt in range(3):
            totals: set[int] = set()
            previous: list[Any] | None = None
            page = 1
            while True:
                params = criteria(filters, sort=sort, page_size=self.per_page, page=page)
                _, data = self.http.request("GET", path, params=params)
                if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                    raise ShopError(
                        f"shop {self.name!r}: GET {path} did not return a search result"
                    )
                items = data["items"]
                total = int(data.get("total_count") or 0)
                totals.add(total)
                ids = [it.get(key) for it in items]
                if not items or ids == previous:
                    break  # the quirk: past the end, Magento answers the last page again
                fresh = [it for it in items if it.get(key) not in seen]
                for it in fresh:
                    seen.add(it.get(key))
                    yield it
                # On a re-read most pages are already seen: only the first pass may stop on that.
                if (attempt == 0 and not fresh) or page * self.per_page >= total:
                    break
                previous, page = ids, page + 1
            if len(totals) <= 1:
                break
            log.info(
                "search results changed while paging; reading again", shop=self.name, path=path
            )

    def _order(self, data: dict[str, Any]) -> ShopOrder:
        raw = raw_json(data)
        return ShopOrder(
            shop=self.name,
            e_number=str(data["increment_id"]),
            status=str(data.get("status", "")),
            updated_at=_parse_mage_date(data.get("updated_at") or data["created_at"]),
            payload=data,
            raw=raw,
            extra={"entity_id": data.get("entity_id"), "state": data.get("state")},
        )

    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        since = since.astimezone(UTC)
        until = until.astimezone(UTC) if until is not None else None
        # Magento keeps whole seconds: round the bounds outwards, filter exactly below.
        filters = [("updated_at", "gteq", _mage_date(since))]
        if until is not None:
            filters.append(("updated_at", "lt", _mage_date(ceil_second(until))))
        sort = [("updated_at", "ASC"), ("entity_id", "ASC")]
        for data in self._search("/orders", filters, sort, "entity_id"):
            order = self._order(data)
            if order.updated_at >= since.replace(microsecond=0) and (
                until is None or order.updated_at < until
            ):
                yield order

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        params = criteria([("increment_id", "eq", e_number)], page_size=1, page=1)
        _, data = self.http.request("GET", "/orders", params=params)
        items = (data or {}).get("items") or []
        for it in items:
            if str(it.get("increment_id")) == e_number:
                return self._order(it)
        return None

    # -- stock -----------------------------------------------------------------------------------
    def _source_item(self, u: StockUpdate) -> dict[str, Any]:
        return {
            "sku": u.sku,
            "source_code": self.source_code,
            "quantity": u.quantity,
            "status": 1 if u.quantity > 0 else 0,
        }

    def push_stock(self, updates: list[StockUpdate]) -> list[str]:
        latest = {u.sku: u for u in updates}  # the last quantity of a SKU wins
        items = [self._source_item(u) for u in latest.values()]
        failed: list[str] = []
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i : i + MAX_BATCH]
            try:
                self.http.request(
                    "POST", "/inventory/source-items", json_body={"sourceItems": chunk}
                )
            except ShopError:
                if len(chunk) == 1:
                    failed.append(chunk[0]["sku"])
                    continue
                # One bad SKU fails the whole request: save the others one by one.
                for item in chunk:
                    try:
                        self.http.request(
                            "POST", "/inventory/source-items", json_body={"sourceItems": [item]}
                        )
                    except ShopError:
                        failed.append(item["sku"])
        log.info(
            "stock_pushed", shop=self.name, written=len(items) - len(failed), skipped=len(failed)
        )
        if failed:
            log.warning(
                "stock refused for SKUs (not products of this source?)",
                shop=self.name,
                source=self.source_code,
                count=len(failed),
                skus=failed[:10],
            )
        return failed

    def fetch_stock(self) -> Iterator[StockUpdate]:
        filters = [("source_code", "eq", self.source_code)]
        for it in self._search("/inventory/source-items", filters, [("sku", "ASC")], "sku"):
            yield StockUpdate(sku=str(it["sku"]), quantity=int(float(it.get("quantity") or 0)))

    # -- invoices --------------------------------------------------------------------------------
    def _order_notes(self, order: ShopOrder) -> list[str]:
        # The order entity carries its comment history (OrderInterface status_histories).
        histories = order.payload.get("status_histories") or []
        return [str(h.get("comment") or "") for h in histories if isinstance(h, dict)]

    def _add_invoice_note(self, order: ShopOrder, e_number: str, filename: str, text: str) -> None:
        self.http.request(
            "POST",
            f"/orders/{order.extra['entity_id']}/comments",
            json_body={
                "statusHistory": {
                    "comment": text,
                    "is_customer_notified": 0,
                    "is_visible_on_front": 0,
                    "parent_id": order.extra["entity_id"],
                }
            },
        )
