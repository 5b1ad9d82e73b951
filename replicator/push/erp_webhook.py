"""The ERP-side webhook: ERPs that call out on changes (as e-conomic does) trigger an immediate
refresh of one SKU or one invoice.

``GET|POST /webhooks/erp?type=stockUpdate&number=SKU`` and ``?type=invoiceBooked&number=INVOICE``
(parameters in the query string, or in a form/JSON body for POST). The caller authenticates with
the shared secret ``stock_push.webhook_secret`` (or ``invoice_push.webhook_secret``), sent as the
``X-Webhook-Secret`` (or ``Secret``) header or the ``secret`` query parameter; it is compared in
constant time. Answers (text/plain):

* ``200 Success`` — the SKU/invoice was read from the ERP and pushed to the shop(s);
* ``400`` unknown ``type``, missing ``number``, or a ``number`` no ERP column holds (a NUL or
  other control character, invalid Unicode, over 200 characters), or a body that is not UTF-8
  form data / JSON within :mod:`replicator.safejson`'s limits — the message names the field;
* ``401`` bad or missing secret;
* ``404`` unknown SKU/invoice (not in the ERP, or a value its key column cannot hold); ``409`` the invoice is not booked;
* ``422`` the invoice cannot be attached (e.g. its PDF is missing; the reason is recorded);
* ``503`` the shop is unavailable — the push is queued and retried by the pusher, and the ERP
  may call again (``Retry-After`` is set).

The route is public (it checks its own secret, not ``health.token``). The refresh reads the ERP
directly, so it does not wait for capture; the captured change follows through the journal and
finds the quantity already pushed (no second request).

Wiring (for ``replicator/daemon.py``)::

    from replicator.push.erp_webhook import erp_webhook_secret, make_erp_webhook_handler

    secret = erp_webhook_secret(cfg)
    if secret is not None:
        handler = make_erp_webhook_handler(secret, stock=stock, invoices=invoices)
        health.add_route("GET", "/webhooks/erp", handler, public=True)
        health.add_route("POST", "/webhooks/erp", handler, public=True, max_body=65536)
"""

from __future__ import annotations

import hmac
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import sqlalchemy as sa
import structlog

from replicator import safejson
from replicator.web.server import Request, Response, RouteHandler

if TYPE_CHECKING:
    from replicator.config import Config
    from replicator.push.invoices import InvoicePushService
    from replicator.push.stock import StockPushService

log = structlog.get_logger(__name__)

SUCCESS = "Success"


def erp_webhook_secret(cfg: Config) -> str | None:
    """The configured shared secret, or None when the ERP webhook is not configured."""
    for section in (cfg.stock_push, cfg.invoice_push):
        if section is not None and section.webhook_secret is not None:
            return section.webhook_secret.get_secret_value()
    return None


class _BadRequest(ValueError):
    """A parameter or body the webhook cannot use; the message names it (answered 400)."""


# SKUs and invoice numbers are short codes; anything longer is refused before the ERP sees it.
MAX_NUMBER = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Only ASCII white space around the number is ignored (what a form or a URL may add).
_SPACE = " \t\r\n\f\v"


def _params(req: Request) -> dict[str, str]:
    """Query parameters, completed by a form or JSON body on POST (the query wins)."""
    params = dict(req.query)
    if req.method == "POST" and req.body:
        ctype = req.headers.get("content-type", "")
        if "json" in ctype:
            try:
                # Within the depth and number limits; only the fields used are checked for
                # unstorable text (by _check_number), so stray fields cannot refuse a call.
                data = safejson.loads(req.body, check_text=False)
            except safejson.JsonRefused as exc:
                raise _BadRequest(f"body: {exc}") from None
            if isinstance(data, dict):
                for k, v in data.items():
                    params.setdefault(str(k), "" if v is None else str(v))
        else:
            try:
                text = req.body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _BadRequest(
                    f"body: not UTF-8 text (invalid byte at position {exc.start})"
                ) from None
            for k, v in parse_qsl(text, keep_blank_values=True):
                params.setdefault(k, v)
    return params


def _check_number(number: str) -> None:
    """Refuse at the edge what no ERP column holds (PostgreSQL refuses NUL in text)."""
    problem = safejson.field_problem(number)
    if problem is None and _CONTROL.search(number):
        problem = "contains a control character"
    if problem is None and len(number) > MAX_NUMBER:
        problem = f"longer than {MAX_NUMBER} characters"
    if problem is not None:
        raise _BadRequest(f"number: {problem}")


def _text(status: int, text: str, **headers: str) -> Response:
    resp = Response.text(text + ("\n" if status != 200 else ""), status)
    resp.headers.update(headers)
    return resp


def make_erp_webhook_handler(
    secret: str,
    *,
    stock: StockPushService | None = None,
    invoices: InvoicePushService | None = None,
) -> RouteHandler:
    """An ``HttpServer`` route handler for ``/webhooks/erp``."""
    if not secret:
        raise ValueError("the ERP webhook needs a non-empty shared secret")
    expected = secret.encode()

    def handler(req: Request) -> Response:
        try:
            params = _params(req)
        except _BadRequest as exc:
            return _text(400, f"Bad request: {exc}")
        given = (
            req.headers.get("x-webhook-secret")
            or req.headers.get("secret")
            or params.get("secret")
            or ""
        )
        if not hmac.compare_digest(given.encode(), expected):
            log.warning("erp_webhook_unauthorized", client=req.client)
            return _text(401, "Unauthorized: bad or missing secret")
        kind = params.get("type", "")
        number = params.get("number", "").strip(_SPACE)
        if kind.lower() not in ("stockupdate", "invoicebooked"):
            return _text(400, f"Unknown type {kind!r}: use type=stockUpdate or type=invoiceBooked")
        if not number:
            return _text(400, "Missing number (the SKU or the invoice number)")
        try:
            _check_number(number)
        except _BadRequest as exc:
            return _text(400, f"Bad request: {exc}")
        try:
            if kind.lower() == "stockupdate":
                return _stock(stock, number)
            return _invoice(invoices, number)
        except sa.exc.DataError:
            # The ERP's key column cannot hold this value (e.g. letters for an integer SKU),
            # so no row has it.
            return _text(404, f"Unknown number {number!r}: the ERP cannot hold such a value")
        except Exception as exc:
            log.exception("erp_webhook_failed", type=kind, number=number)
            return _text(500, f"Internal error: {type(exc).__name__}")

    return handler


def _stock(stock: StockPushService | None, sku: str) -> Response:
    if stock is None:
        return _text(400, "type=stockUpdate: the stock push is not configured ([stock_push])")
    res = stock.refresh_sku(sku)
    if not res.found:
        return _text(404, f"Unknown SKU {sku!r}: no stock rows in the ERP")
    errors = {s: r.error for s, r in res.shops.items() if r.error}
    if errors:
        detail = "; ".join(f"{s}: {e}" for s, e in errors.items())
        return _text(503, f"Shop unavailable, update queued: {detail}", **{"Retry-After": "60"})
    log.info("erp_webhook", type="stockUpdate", number=sku, quantity=res.quantity)
    return _text(200, SUCCESS)


def _invoice(invoices: InvoicePushService | None, number: str) -> Response:
    if invoices is None:
        return _text(400, "type=invoiceBooked: the invoice push is not configured ([invoice_push])")
    res = invoices.refresh_invoice(number)
    log.info("erp_webhook", type="invoiceBooked", number=number, state=res.state)
    status: dict[str, Any] = {
        "attached": (200, SUCCESS),
        "unknown": (404, f"Unknown invoice {number!r}: not found in the ERP"),
        "not-booked": (409, f"Invoice {number!r} is not booked"),
        "failed": (422, f"Invoice {number!r} cannot be attached: {res.detail}"),
        "pending": (503, f"Shop unavailable, invoice {number!r} queued: {res.detail}"),
    }
    code, text = status.get(res.state, (500, json.dumps(res.state)))
    return _text(code, text, **({"Retry-After": "60"} if code == 503 else {}))
