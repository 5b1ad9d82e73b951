"""The Shopware 6 Admin API connector (``/api``, OAuth2 client credentials of an integration), and
the receiver of a Shopware app's webhooks.

Credentials: the integration's access key id and secret access key (Settings → System →
Integrations) are exchanged at ``POST /api/oauth/token`` for a bearer token that lives ten minutes;
the token is renewed shortly before it expires (and once more if the shop says 401 anyway), never
per request.

Orders: ``POST /api/search/order`` with a criteria body — a ``range`` filter on ``updatedAt``
(``gte since``, ``lt until``, written as the UTC ``YYYY-MM-DD HH:MM:SS.fff`` the database keeps),
sorted by ``updatedAt`` then ``id``, ``page``/``limit`` with ``total-count-mode: 1`` (without it
``total`` is only the size of the page), and the associations the mapping needs (line items,
addresses, deliveries, transactions, customer, currency, states). Shopware sets ``updatedAt`` only
on an *update*: an order nobody touched since checkout has ``updatedAt`` null, so a second search
asks for ``updatedAt IS NULL AND createdAt`` in the window; the two sorted streams are merged.
If ``total`` changes while paging (an order moved in or out of the window), the search runs again
and yields only what was missed. The e-number is the ``orderNumber``.

Stock: absolute ``stock`` per product number, written with ``POST /api/_action/sync`` (upserts of
``{id, stock}``, 100 per operation, ``indexing-behavior: use-queue-indexing`` so the shop indexes
afterwards instead of in the request). Product number → id is resolved once and cached. A sync
request is one transaction: when Shopware refuses items (``errors[].source.pointer``
``/<operation>/<index>/…``) nothing was written, so the refused ones are reported and the rest is
sent again.

Invoices: the ERP's PDF becomes a *static* ``invoice`` document of the order
(``POST /api/_action/order/document/invoice/create`` with the invoice number as
``documentNumber``, then ``POST /api/_action/document/<id>/upload``) — once: an invoice document
with that number is reused, and one that already has its file is left alone. Where the API does
not allow it (Shopware before 6.4.12 has no such endpoint; an integration without the
``document:create`` privilege gets 403) the fallback is the order's custom field
``sync_daemon_invoice``, which names the file (and links to it with ``invoice_url``).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import time
from collections.abc import Generator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

import httpx
import structlog

from replicator import safejson
from replicator.connectors._http import USER_AGENT, RestShopConnector, ShopHttp, raw_json
from replicator.connectors.base import ShopError, ShopOrder, StockUpdate
from replicator.connectors.webhook import WebhookDelivery, WebhookReceiver

log = structlog.get_logger(__name__)

MAX_LIMIT = 500
MAX_BATCH = 100  # products per sync operation
_STATE: dict[str, Any] = {"stateMachineState": {}}
ORDER_ASSOCIATIONS: dict[str, Any] = {
    "lineItems": {},
    "currency": {},
    "orderCustomer": {},
    "stateMachineState": {},
    "billingAddress": {"associations": {"country": {}}},
    # Not used by the shipped mapping, but part of what an app webhook carries: asking for it
    # keeps the polled order and the webhook's the same payload (the ledger compares them).
    "addresses": {"associations": {"country": {}}},
    "deliveries": {
        "associations": {
            "shippingOrderAddress": {"associations": {"country": {}}},
            "shippingMethod": {},
            **_STATE,
        }
    },
    "transactions": {
        # The latest transaction is the one that counts (a retried payment adds one).
        "sort": [{"field": "createdAt", "order": "DESC"}],
        "associations": {"paymentMethod": {}, **_STATE},
    },
}


def _sw_time(t: datetime) -> str:
    """A filter value as the database keeps it: UTC, milliseconds, no offset."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


class _ClientCredentials(httpx.Auth):
    """Bearer token from ``/api/oauth/token``, renewed before it expires and once after a 401.

    A refused or failed token request is returned as the response of the request itself, so the
    caller's usual mapping applies (401 → bad credentials, 5xx → shop unavailable)."""

    requires_response_body = True

    def __init__(
        self, token_url: str, client_id: str, client_secret: str, timeout: httpx.Timeout
    ) -> None:
        self.token_url = token_url
        self.timeout = timeout
        self._body = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
        }
        self.token: str | None = None
        self.renew_at = 0.0
        self.issued = 0

    def _token_request(self) -> httpx.Request:
        # Built here, outside the client: it needs the client's identity headers spelled out.
        return httpx.Request(
            "POST",
            self.token_url,
            json=self._body,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            extensions={"timeout": self.timeout.as_dict()},
        )

    def _store(self, resp: httpx.Response) -> bool:
        if resp.status_code != 200:
            return False
        try:
            data = resp.json()
            token, ttl = str(data["access_token"]), float(data.get("expires_in") or 600)
        except (ValueError, KeyError, TypeError):
            return False
        self.token = token
        # Renew with a tenth of the lifetime (at most a minute) to spare: a request never
        # leaves with a token about to expire on its way.
        self.renew_at = time.monotonic() + ttl - min(60.0, ttl / 10)
        self.issued += 1
        return True

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        renewed = False
        if self.token is None or time.monotonic() >= self.renew_at:
            resp = yield self._token_request()
            if not self._store(resp):
                return  # the token endpoint's answer is the answer
            renewed = True
        request.headers["Authorization"] = f"Bearer {self.token}"
        response = yield request
        if response.status_code == 401 and not renewed:
            # Revoked or expired early (the shop's clock, a restart): one fresh token, one retry.
            resp = yield self._token_request()
            if not self._store(resp):
                return
            request.headers["Authorization"] = f"Bearer {self.token}"
            yield request


class ShopwareConnector(RestShopConnector):
    """One Shopware 6 shop."""

    def __init__(
        self,
        name: str,
        url: str,
        client_id: str,
        client_secret: str,
        *,
        timeout: float = 30.0,
        per_page: int = 100,
        invoice_url: str | None = None,
        verify_tls: bool = True,
    ) -> None:
        self.name = name
        self.per_page = max(1, min(per_page, MAX_LIMIT))
        self.invoice_url = invoice_url
        base = url.rstrip("/")
        self.auth = _ClientCredentials(
            base + "/api/oauth/token",
            client_id,
            client_secret,
            httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self.http = ShopHttp(
            name,
            base + "/api",
            auth=self.auth,
            headers={
                "Content-Type": "application/json",
                # Bulk writes are indexed by the shop's queue afterwards, not inside the request.
                "indexing-behavior": "use-queue-indexing",
            },
            timeout=timeout,
            secrets=(client_id, client_secret),
            auth_hint=(
                "check client_id and client_secret (Settings → System → Integrations: the access "
                "key id and secret access key; the integration needs the order, product and "
                "document privileges)"
            ),
            verify=verify_tls,
        )
        self._product_ids: dict[str, str] = {}  # product number → id

    # -- search ----------------------------------------------------------------------------------
    def _search(self, entity: str, criteria: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every entity of a paged search once; reads again (twice at most) when the total
        changed while paging, since offset paging then shifts entities between pages."""
        seen: set[str] = set()
        for _ in range(3):
            totals: set[int] = set()
            page = 1
            while True:
                body = {
                    **criteria,
                    "page": page,
                    "limit": self.per_page,
                    "total-count-mode": 1,
                }
                _, data = self.http.request("POST", f"/search/{entity}", json_body=body)
                if not isinstance(data, dict) or not isinstance(data.get("data"), list):
                    raise ShopError(
                        f"shop {self.name!r}: POST /search/{entity} did not return a search result"
                    )
                rows = data["data"]
                total = int(data.get("total") or 0)
                totals.add(total)
                for row in rows:
                    if row.get("id") not in seen:
                        seen.add(row.get("id"))
                        yield row
                if len(rows) < self.per_page or page * self.per_page >= total:
                    break
                page += 1
            if len(totals) <= 1:
                break
            log.info("search results changed while paging; reading again", shop=self.name)

    # -- orders ----------------------------------------------------------------------------------
    def _order(self, data: dict[str, Any]) -> ShopOrder:
        try:
            updated = _parse_time(data.get("updatedAt") or data["createdAt"])
            e_number = str(data["orderNumber"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShopError(
                f"shop {self.name!r}: order {data.get('id')} lacks {exc} in the search result"
            ) from None
        state = (data.get("stateMachineState") or {}).get("technicalName")
        return ShopOrder(
            shop=self.name,
            e_number=e_number,
            status=str(state or ""),
            updated_at=updated,
            payload=data,
            raw=raw_json(data),
            extra={"order_id": data.get("id")},
        )

    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        since = since.astimezone(UTC)
        until = until.astimezone(UTC) if until is not None else None
        window: dict[str, str] = {"gte": _sw_time(since)}
        if until is not None:
            window["lt"] = _sw_time(until)
        updated = {
            "filter": [{"type": "range", "field": "updatedAt", "parameters": window}],
            "sort": [{"field": "updatedAt", "order": "ASC"}, {"field": "id", "order": "ASC"}],
            "associations": ORDER_ASSOCIATIONS,
        }
        never_updated = {
            "filter": [
                {"type": "equals", "field": "updatedAt", "value": None},
                {"type": "range", "field": "createdAt", "parameters": window},
            ],
            "sort": [{"field": "createdAt", "order": "ASC"}, {"field": "id", "order": "ASC"}],
            "associations": ORDER_ASSOCIATIONS,
        }
        streams = [
            (self._order(d) for d in self._search("order", updated)),
            (self._order(d) for d in self._search("order", never_updated)),
        ]
        seen: set[str] = set()
        for order in heapq.merge(*streams, key=lambda o: o.updated_at):
            if order.e_number in seen:
                continue
            seen.add(order.e_number)
            if order.updated_at >= since and (until is None or order.updated_at < until):
                yield order

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        criteria = {
            "filter": [{"type": "equals", "field": "orderNumber", "value": e_number}],
            "associations": ORDER_ASSOCIATIONS,
        }
        for data in self._search("order", criteria):
            if str(data.get("orderNumber")) == e_number:
                return self._order(data)
        return None

    # -- stock -----------------------------------------------------------------------------------
    def _resolve(self, numbers: list[str]) -> None:
        unknown = [n for n in dict.fromkeys(numbers) if n not in self._product_ids]
        for i in range(0, len(unknown), MAX_BATCH):
            chunk = unknown[i : i + MAX_BATCH]
            criteria = {
                "filter": [{"type": "equalsAny", "field": "productNumber", "value": chunk}],
                "includes": {"product": ["id", "productNumber", "stock"]},
            }
            for p in self._search("product", criteria):
                self._product_ids[str(p["productNumber"])] = str(p["id"])

    def _sync(self, payload: list[dict[str, Any]]) -> list[int]:
        """One sync request; the indexes of refused items (nothing was written if any)."""
        resp, data = self.http.request(
            "POST",
            "/_action/sync",
            json_body=[
                {
                    "key": "sync-daemon-stock",
                    "action": "upsert",
                    "entity": "product",
                    "payload": payload,
                }
            ],
            refused_ok=True,
        )
        if resp.status_code < 400:
            return []
        bad: set[int] = set()
        for err in (data or {}).get("errors") or []:
            pointer = str((err.get("source") or {}).get("pointer") or "")
            parts = pointer.strip("/").split("/")
            if len(parts) >= 2 and parts[1].isdigit():
                bad.add(int(parts[1]))
        if not bad:
            detail = "; ".join(str(e.get("detail")) for e in ((data or {}).get("errors") or [])[:3])
            raise ShopError(f"shop {self.name!r}: the stock sync was refused: {detail[:300]}")
        return sorted(bad)

    def push_stock(self, updates: list[StockUpdate]) -> list[str]:
        if not updates:
            return []
        latest = {u.sku: u.quantity for u in updates}  # the last quantity of a SKU wins
        self._resolve(list(latest))

        def send(chunk: list[tuple[str, int]]) -> list[int]:
            return self._sync([{"id": self._product_ids[s], "stock": q} for s, q in chunk])

        return self._push_all_or_nothing(latest, self._product_ids, MAX_BATCH, send)

    def fetch_stock(self) -> Iterator[StockUpdate]:
        criteria = {
            "sort": [{"field": "productNumber", "order": "ASC"}],
            "includes": {"product": ["id", "productNumber", "stock"]},
        }
        for p in self._search("product", criteria):
            if p.get("productNumber") and p.get("stock") is not None:
                self._product_ids[str(p["productNumber"])] = str(p["id"])
                yield StockUpdate(sku=str(p["productNumber"]), quantity=int(p["stock"]))

    # -- invoices --------------------------------------------------------------------------------
    def attach_invoice(self, e_number: str, filename: str, pdf: bytes) -> None:
        order = self._invoice_order(e_number, filename)
        order_id = str(order.extra["order_id"])
        number = PurePath(filename).stem
        existing = [
            d
            for d in self._search(
                "document",
                {
                    "filter": [
                        {"type": "equals", "field": "orderId", "value": order_id},
                        {
                            "type": "equals",
                            "field": "documentType.technicalName",
                            "value": "invoice",
                        },
                    ]
                },
            )
            if str((d.get("config") or {}).get("documentNumber")) == number
        ]
        if existing and existing[0].get("documentMediaFileId"):
            log.info("invoice document already there", shop=self.name, e_number=e_number)
            return
        if existing:
            # Created before, the upload did not happen (a crash in between): finish it.
            document_id = str(existing[0]["id"])
        else:
            resp, data = self.http.request(
                "POST",
                "/_action/order/document/invoice/create",
                json_body=[
                    {
                        "orderId": order_id,
                        "fileType": "pdf",
                        "static": True,
                        "config": {
                            "documentNumber": number,
                            "documentDate": datetime.now(UTC).isoformat(),
                        },
                    }
                ],
                missing_ok=True,
                refused_ok=True,
                forbidden_ok=True,
            )
            if resp.status_code in (403, 404):
                self._invoice_fallback(order, e_number, filename, pdf)
                return
            created = (data or {}).get("data") or []
            if not created:
                errors = (data or {}).get("errors") or {}
                raise ShopError(
                    f"shop {self.name!r}: order {e_number}: Shopware did not create the invoice "
                    f"document {number}: {json.dumps(errors)[:300]}"
                )
            document_id = str(created[0]["documentId"])
        self.http.request(
            "POST",
            f"/_action/document/{document_id}/upload",
            params={
                "fileName": number,
                "extension": PurePath(filename).suffix.lstrip(".") or "pdf",
            },
            content=pdf,
            headers={"Content-Type": "application/pdf"},
        )

    def _invoice_fallback(self, order: ShopOrder, e_number: str, filename: str, pdf: bytes) -> None:
        """No document API (old Shopware) or no privilege: name the invoice in a custom field."""
        fields = order.payload.get("customFields") or {}
        current = str(fields.get("sync_daemon_invoice") or "")
        if filename in current:
            return
        text = self._invoice_text(filename, pdf)
        if self.invoice_url:
            text += ": " + self.invoice_url.format(filename=filename, e_number=e_number)
        log.warning(
            "shopware does not take invoice documents from this integration; the invoice is "
            "named in the order's custom field sync_daemon_invoice instead",
            shop=self.name,
            e_number=e_number,
        )
        self.http.request(
            "PATCH",
            f"/order/{order.extra['order_id']}",
            json_body={
                "customFields": {"sync_daemon_invoice": (current + "\n" if current else "") + text}
            },
        )


class ShopwareWebhookReceiver(WebhookReceiver):
    """Webhooks of a Shopware app: ``shopware-shop-signature`` is the hex HMAC-SHA256 of the raw
    body keyed with the shop secret the app got at registration; the event id
    (``X-Shopware-Event-Id``, or ``source.eventId`` in the body) stays the same across retries.

    The body is an envelope ``{"data": {"payload": {...}, "event": ...}, "source": ..}``; an event
    that carries the order (``checkout.order.placed``, order state changes) hands the order itself
    to the ledger, in the shape the Admin API search returns, with its ``orderNumber`` as
    e-number. Events without an order (``order.written`` carries only ids) are acknowledged and
    left to the next poll."""

    signature_header = "shopware-shop-signature"
    delivery_header = "X-Shopware-Event-Id"
    topic_header = ""  # no such header: the event name is in the body (data.event)

    def expected_signature(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).hexdigest().encode("ascii")

    def delivery_for(self, headers: Mapping[str, str], body: bytes) -> WebhookDelivery | None:
        try:
            # A hostile body (too deep, huge numbers, NUL) is stored raw and
            # parked by the import with the reason, never half-read here.
            envelope = safejson.loads(body)
        except safejson.JsonRefused:
            envelope = None
        if not isinstance(envelope, dict):
            # Signed but unreadable: stored as it came, parked as failed by the import.
            return WebhookDelivery(
                shop=self.shop,
                delivery_id=self._header(headers, self.delivery_header),
                topic=None,
                e_number=None,
                payload_sha256=hashlib.sha256(body).hexdigest(),
                raw=body,
            )
        data: dict[str, Any] = _obj(envelope.get("data"))
        order = _obj(data.get("payload")).get("order")
        if not isinstance(order, dict):
            return None
        source = _obj(envelope.get("source"))
        raw = raw_json(order)
        number = order.get("orderNumber")
        return WebhookDelivery(
            shop=self.shop,
            delivery_id=self._header(headers, self.delivery_header) or source.get("eventId"),
            topic=str(data.get("event")) if data.get("event") else None,
            e_number=str(number) if number not in (None, "") else None,
            payload_sha256=hashlib.sha256(raw).hexdigest(),
            raw=raw,
            trusted_e_number=number not in (None, ""),
        )


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
