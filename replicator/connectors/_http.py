"""HTTP plumbing shared by the REST connectors: one ``httpx.Client`` per shop, and the mapping of
transport and HTTP failures onto the connector error contract.

Mapping (the contract in :mod:`replicator.connectors.base`; this is the HTTP part of the error
classification that :mod:`replicator.errors_map` does for database drivers):

* connection refused/reset, timeouts, 5xx, 429 → :class:`ShopUnavailable` (``retry_after`` from a
  ``Retry-After`` header, seconds or HTTP date);
* a body cut short or not JSON → :class:`ShopUnavailable`: that is what a proxy or a crashing PHP
  worker produces, and it usually passes;
* 401/403 → :class:`ShopError` naming the shop and the credential to check; 404 of an endpoint →
  :class:`ShopError` about the URL; other 4xx → :class:`ShopError` with the shop's own message.

Secrets never reach a message: credentials travel in headers (never in the URL), messages name the
path without its query string, and every message is scrubbed of the configured secrets anyway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import structlog

from replicator import __version__
from replicator.connectors.base import ShopConnector, ShopError, ShopOrder, ShopUnavailable

log = structlog.get_logger(__name__)

USER_AGENT = f"sync-daemon/{__version__}"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class ShopHttp:
    """A shop's REST endpoint: ``request()`` returns decoded JSON or raises the contract errors."""

    def __init__(
        self,
        shop: str,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        secrets: tuple[str, ...] = (),
        auth_hint: str = "check the shop's credentials",
        verify: bool = True,
    ) -> None:
        self.shop = shop
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._secrets = tuple(s for s in secrets if s)
        self._auth_hint = auth_hint
        self.client = httpx.Client(
            base_url=self.base_url,
            auth=auth,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})},
            # Connect fast or not at all; reads may legitimately take a while on a busy shop.
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=verify,
            follow_redirects=False,
        )

    def close(self) -> None:
        self.client.close()

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json_body: Any = None,
        missing_ok: bool = False,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        refused_ok: bool = False,
        forbidden_ok: bool = False,
    ) -> tuple[httpx.Response, Any]:
        """Send one request; return (response, decoded JSON). ``missing_ok``: a 404 returns
        (response, None) instead of raising (the *resource* is missing, not the endpoint).
        ``refused_ok``: a 400/422 returns (response, decoded body) for the caller to read the
        shop's per-item errors; ``forbidden_ok``: a 403 returns (response, None) (a privilege the
        caller has a fallback for). ``content``/``headers``: a raw body (e.g. a PDF) and its type."""
        what = f"{method} {path}"
        try:
            resp = self.client.request(
                method, path, params=params, json=json_body, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise ShopUnavailable(
                self._msg(f"{what} timed out after {self.timeout:g}s ({type(exc).__name__})")
            ) from None
        except httpx.RemoteProtocolError as exc:
            raise ShopUnavailable(
                self._msg(
                    f"{what}: the connection was cut mid-response ({exc}); a proxy or the shop's "
                    "server dropped it"
                )
            ) from None
        except httpx.TransportError as exc:
            raise ShopUnavailable(
                self._msg(f"{what}: cannot reach {self.base_url} ({type(exc).__name__}: {exc})")
            ) from None
        status = resp.status_code
        if status == 429:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            hint = f"; retry after {retry_after:g}s" if retry_after is not None else ""
            raise ShopUnavailable(self._msg(f"{what}: rate limited (HTTP 429){hint}"), retry_after)
        if status >= 500:
            raise ShopUnavailable(
                self._msg(f"{what}: the shop answered HTTP {status}{self._detail(resp)}"),
                parse_retry_after(resp.headers.get("Retry-After")),
            )
        if status == 403 and forbidden_ok:
            return resp, None
        if status in (401, 403):
            raise ShopError(
                self._msg(
                    f"{what}: the shop refused our credentials (HTTP {status}): {self._auth_hint}"
                )
            )
        if status == 404 and missing_ok:
            return resp, None
        if status in (400, 422) and refused_ok:
            try:
                return resp, json.loads(resp.content) if resp.content else None
            except (ValueError, UnicodeDecodeError):
                return resp, None
        if status == 404:
            raise ShopError(
                self._msg(
                    f"{what}: not found (HTTP 404){self._detail(resp)}; check the shop's url "
                    f"({self.base_url}) and that its REST API is enabled"
                )
            )
        if 300 <= status < 400:
            where = resp.headers.get("Location", "?").split("?", 1)[0]
            raise ShopError(
                self._msg(
                    f"{what}: redirected (HTTP {status}) to {where}; set the shop's url to the "
                    "address the shop really answers on (https? www?)"
                )
            )
        if status >= 400:
            raise ShopError(
                self._msg(
                    f"{what}: the shop rejected the request (HTTP {status}){self._detail(resp)}"
                )
            )
        try:
            data = json.loads(resp.content) if resp.content else None
        except (ValueError, UnicodeDecodeError):
            ctype = resp.headers.get("Content-Type", "?")
            raise ShopUnavailable(
                self._msg(
                    f"{what}: the answer is not JSON (HTTP {status}, {ctype}, {len(resp.content)} "
                    "bytes); a proxy or a cut connection probably mangled it"
                )
            ) from None
        return resp, data

    def _msg(self, text: str) -> str:
        return self.scrub(f"shop {self.shop!r}: {text}")

    @staticmethod
    def _detail(resp: httpx.Response) -> str:
        """The shop's own error message, short (WooCommerce ``message``, Magento ``message``)."""
        try:
            body = resp.json()
        except ValueError:
            return ""
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            msg = body["message"]
            if isinstance(body.get("parameters"), dict):
                for k, v in body["parameters"].items():
                    msg = msg.replace(f"%{k}", str(v))
            return f": {msg[:200]}"
        return ""


def raw_json(data: Any) -> bytes:
    """An order as compact UTF-8 JSON: the raw bytes a :class:`ShopOrder` keeps."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def ceil_second(t: datetime) -> datetime:
    """``t`` rounded up to a whole second (the shops filter on whole seconds): an exclusive
    upper bound that still admits everything before ``t``."""
    whole = t.replace(microsecond=0)
    if whole < t:
        whole += timedelta(seconds=1)
    return whole


class RestShopConnector(ShopConnector):
    """What the REST connectors (Magento, WooCommerce) share around their :class:`ShopHttp`."""

    http: ShopHttp

    def close(self) -> None:
        self.http.close()

    def _invoice_order(self, e_number: str, filename: str) -> ShopOrder:
        """The shop order an invoice goes to; :class:`ShopError` when the shop does not know it."""
        order = self.fetch_order(e_number)
        if order is None:
            raise ShopError(
                f"shop {self.name!r}: order {e_number} not found; cannot attach {filename}"
            )
        return order

    def _push_all_or_nothing(
        self,
        latest: dict[str, int],
        ids: dict[str, str],
        batch: int,
        send: Callable[[list[tuple[str, int]]], list[int]],
    ) -> list[str]:
        """Push absolute quantities through an API whose stock request is one transaction
        (Shopify's ``inventorySetQuantities``, Shopware's ``_action/sync``).

        ``ids`` maps the SKUs the shop knows to its ids; ``send`` writes one chunk and returns the
        indexes of the entries the shop refused — then nothing of the chunk was written, so the
        refused entries are dropped (and forgotten in ``ids``: looked up again next time) and the
        rest is sent again. Returns the skipped SKUs: unknown to the shop, then refused."""
        missing = [s for s in latest if s not in ids]
        todo = [(s, q) for s, q in latest.items() if s in ids]
        refused: list[str] = []
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            while chunk:
                answer = send(chunk)
                bad = {j for j in answer if 0 <= j < len(chunk)}
                if not answer:
                    break
                if not bad:
                    raise ShopError(
                        f"shop {self.name!r}: the shop refused stock entries it did not name"
                    )
                for j in sorted(bad):
                    refused.append(chunk[j][0])
                    ids.pop(chunk[j][0], None)
                chunk = [c for j, c in enumerate(chunk) if j not in bad]
        skipped = missing + refused
        log.info(
            "stock pushed", shop=self.name, written=len(todo) - len(refused), skipped=len(skipped)
        )
        if skipped:
            log.warning(
                "stock skipped for SKUs the shop does not have or refused",
                shop=self.name,
                unknown=missing[:10],
                refused=refused[:10],
            )
        return skipped

    @staticmethod
    def _invoice_text(filename: str, pdf: bytes) -> str:
        """How an attached invoice is described on the order (name, size, short sha256); it
        starts with :meth:`_invoice_marker`."""
        digest = hashlib.sha256(pdf).hexdigest()[:16]
        return f"{RestShopConnector._invoice_marker(filename)}{len(pdf)} bytes, sha256 {digest})"

    @staticmethod
    def _invoice_marker(filename: str) -> str:
        """What identifies our note/comment for one invoice file on the shop order."""
        return f"Invoice {filename} ("

    def attach_invoice(self, e_number: str, filename: str, pdf: bytes) -> None:
        """Attach the invoice as an order note/comment — unless it is already there.

        The shops take no idempotency key for notes, so a crash between the shop accepting the
        note and our commit would attach it a second time after the restart. Reading the order's
        notes back first closes that window: a note carrying this invoice's marker means we
        attached it before, and nothing is written again.
        """
        order = self._invoice_order(e_number, filename)
        marker = self._invoice_marker(filename)
        if any(text.startswith(marker) for text in self._order_notes(order)):
            log.info(
                "invoice already on the shop order; not attached again",
                shop=self.name,
                e_number=e_number,
                filename=filename,
            )
            return
        self._add_invoice_note(order, e_number, filename, self._invoice_text(filename, pdf))

    def _order_notes(self, order: ShopOrder) -> list[str]:
        """The texts of the notes/comments on the shop order."""
        raise NotImplementedError

    def _add_invoice_note(self, order: ShopOrder, e_number: str, filename: str, text: str) -> None:
        """Write one invoice note/comment on the shop order."""
        raise NotImplementedError
