"""A loopback Shopware 6 Admin API emulator (``/api``), as the API is documented.

Behaviour a connector must get right, emulated on purpose:

* **OAuth2 client credentials**: ``POST /api/oauth/token`` with ``grant_type=client_credentials``,
  ``client_id`` (the integration's access key id) and ``client_secret`` answers a bearer token that
  expires after ``token_ttl`` seconds (600 by default, as Shopware's); an expired or unknown token
  is 401. ``expire_tokens()`` revokes every issued token at once.
* **Search** ``POST /api/search/<entity>`` with a criteria body: ``filter`` (``equals``,
  ``equalsAny``, ``range`` with ``gte``/``gt``/``lte``/``lt``, ``multi`` with ``AND``/``OR``),
  ``sort``, ``page``/``limit`` (limit at most 500), ``associations`` and ``includes``. Answers
  ``{"total", "data", "aggregations"}`` with ``Accept: application/json``.
  ``total-count-mode`` 0 (the default) makes ``total`` the size of *this page*, 1 the exact count.
  Associations are only loaded when asked for (otherwise ``null``).
* **Dates**: JSON shows ``2026-11-01T08:00:00.000+00:00`` (UTC); range filter values are read the
  way MySQL reads a DATETIME literal in Shopware's UTC session: ``2026-11-01 08:00:00.000`` or ISO
  with a numeric offset; a ``Z`` suffix is not a date MySQL accepts (HTTP 500, as Shopware answers).
* **A new order has no updatedAt**: Shopware sets ``updatedAt`` on the first *update*; an order
  nobody touched since checkout has ``updatedAt: null`` and only ``createdAt`` — a poll filtering
  on ``updatedAt`` alone never sees it.
* **Sync** ``POST /api/_action/sync`` (6.5 format: a list of operations
  ``{"action": "upsert", "entity": "product", "payload": [...]}``) runs in one transaction: an
  upsert of an unknown product id is an insert whose required fields are missing, and the whole
  request fails with 400 and ``errors[].source.pointer`` = ``/<operation>/<index>/<field>``.
* **Documents**: ``POST /api/_action/order/document/invoice/create`` (a list of
  ``{orderId, fileType, static, config: {documentNumber}}``) answers
  ``{"data": [{"documentId", "documentMediaId", "documentDeepLink"}], "errors": {orderId: [...]}}``;
  a document number already used for that type is an error. ``POST
  /api/_action/document/<id>/upload?fileName=…&extension=pdf`` with the raw PDF attaches the file to
  a *static* document only, and only once.
* **App webhooks**: :meth:`ShopwareEmulator.webhook_request` builds a ``checkout.order.placed``
  delivery (``{"data": {"payload": {"order": …}, "event": …}, "source": {…, "eventId"},
  "timestamp"}``) signed in ``shopware-shop-signature`` (hex HMAC-SHA256 of the raw body keyed with
  the app's shop secret), with the event id in ``X-Shopware-Event-Id`` too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from .base import Request, Response, ShopEmulator
from .orders import SampleOrder, generate_products

MAX_LIMIT = 500

_ORDER_STATE = {"processing": "open", "completed": "completed", "on-hold": "open"}
_PAYMENT = {"stripe": "credit_card", "mobilepay": "mobilepay", "bacs": "prepayment"}


def _uuid() -> str:
    return uuid.uuid4().hex


def _json_time(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+00:00"


def _parse_filter_time(value: Any) -> datetime:
    """A DATETIME literal as MySQL reads it in Shopware's UTC session (ValueError otherwise)."""
    s = str(value)
    if s.endswith("Z"):
        raise ValueError(f"Incorrect DATETIME value: '{s}'")
    t = datetime.fromisoformat(s.replace(" ", "T"))
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


class ShopwareEmulator(ShopEmulator):
    """In-memory Shopware 6: ``orders`` and ``products`` (by id), ``documents``."""

    def __init__(
        self,
        client_id: str = "SWIATESTACCESSKEY0123456789",
        client_secret: str = "c2VjcmV0LWFjY2Vzcy1rZXktZm9yLXRlc3RzLTAxMjM0NTY3ODk",
        *,
        shop_secret: str = "app-shop-secret-0123456789",
        products: list[tuple[str, str, int]] | None = None,
        token_ttl: float = 600.0,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.shop_secret = shop_secret
        self.token_ttl = token_ttl
        self.tokens: dict[str, float] = {}  # token → expiry (monotonic)
        self.tokens_issued = 0
        self.orders: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.documents: dict[str, dict[str, Any]] = {}
        self.documents_allowed = True  # False: the integration lacks document:create (403)
        for sku, name, qty in products if products is not None else generate_products():
            self.add_product(sku, name, qty)

    # -- state helpers for tests -----------------------------------------------------------------
    def add_product(self, sku: str, name: str, stock: int) -> dict[str, Any]:
        with self.lock:
            p = {
                "id": _uuid(),
                "productNumber": sku,
                "name": name,
                "stock": stock,
                "availableStock": stock,
                "active": True,
            }
            self.products[p["id"]] = p
            return p

    def stock(self) -> dict[str, int]:
        with self.lock:
            return {p["productNumber"]: p["stock"] for p in self.products.values()}

    def add_orders(self, orders: list[SampleOrder], *, touched: bool = True) -> None:
        for o in orders:
            self.put_order(o, touched=touched)

    def put_order(self, o: SampleOrder, *, touched: bool = True) -> dict[str, Any]:
        """The order as placed at ``o.created``; ``touched``: also updated at ``o.modified``
        (otherwise ``updatedAt`` stays null, as after a checkout nobody touched)."""
        with self.lock:
            old = self.by_number(str(o.number))
            oid = old["id"] if old else _uuid()
            self.orders[oid] = {
                "id": oid,
                "sample": o,
                "createdAt": o.created,
                "updatedAt": o.modified if touched else None,
                "state": _ORDER_STATE.get(o.status, "open"),
                "payment": "paid" if o.paid else "open",
                "delivery": "open",
                "customFields": None,
            }
            return self.orders[oid]

    def by_number(self, number: str) -> dict[str, Any] | None:
        for r in self.orders.values():
            if str(r["sample"].number) == number:
                return r
        return None

    def order_id(self, number: str) -> str:
        rec = self.by_number(number)
        assert rec is not None
        return str(rec["id"])

    def modify_order(self, number: str, at: datetime, *, status: str | None = None) -> None:
        with self.lock:
            rec = self.by_number(number)
            assert rec is not None
            rec["updatedAt"] = at
            if status in ("cancelled", "open", "in_progress", "completed"):
                rec["state"] = status
            elif status:
                rec["payment"] = status

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def order_documents(self, number: str) -> list[dict[str, Any]]:
        oid = self.order_id(number)
        with self.lock:
            return [d for d in self.documents.values() if d["orderId"] == oid]

    # -- entity JSON -----------------------------------------------------------------------------
    def order_json(self, rec: dict[str, Any], associations: dict[str, Any]) -> dict[str, Any]:
        o: SampleOrder = rec["sample"]
        cur_id = "b7d2554b0ce847cd82f3ac9bd1c0dfca"
        address = {
            "id": hashlib.md5(f"{rec['id']}-addr".encode()).hexdigest(),
            "firstName": o.first_name,
            "lastName": o.last_name,
            "street": o.street,
            "zipcode": o.postcode,
            "city": o.city,
            "phoneNumber": o.phone,
            "company": None,
            "country": {"iso": o.country, "name": "Denmark"},
        }
        tax = float(o.tax_rate * 100)
        out: dict[str, Any] = {
            "id": rec["id"],
            "versionId": "0fa91ce3e96a4bc2be4bd9ce752c3425",
            "orderNumber": str(o.number),
            "orderDateTime": _json_time(o.created),
            "createdAt": _json_time(rec["createdAt"]),
            "updatedAt": _json_time(rec["updatedAt"]),
            "currencyId": cur_id,
            "amountTotal": float(o.total),
            "amountNet": float(o.subtotal + o.shipping),
            "positionPrice": float(o.subtotal),
            "shippingTotal": float(o.shipping),
            "taxStatus": "net",
            "customerComment": o.customer_note or None,
            "customFields": rec["customFields"],
            "stateId": hashlib.md5(rec["state"].encode()).hexdigest(),
            "stateMachineState": None,
            "currency": None,
            "orderCustomer": None,
            "billingAddress": None,
            "addresses": None,
            "deliveries": None,
            "transactions": None,
            "lineItems": None,
        }
        state = lambda name: {"technicalName": name, "name": name.replace("_", " ").title()}  # noqa: E731
        loaders = {
            "stateMachineState": lambda: state(rec["state"]),
            "currency": lambda: {"id": cur_id, "isoCode": o.currency, "symbol": "kr."},
            "orderCustomer": lambda: {
                "email": o.email,
                "firstName": o.first_name,
                "lastName": o.last_name,
                "customerNumber": None,
            },
            "billingAddress": lambda: address,
            "addresses": lambda: [address],
            "deliveries": lambda: [
                {
                    "shippingCosts": {"totalPrice": float(o.shipping)},
                    "shippingOrderAddress": address,
                    "shippingMethod": {"name": "PostNord", "technicalName": "postnord"},
                    "stateMachineState": state(rec["delivery"]),
                }
            ],
            "transactions": lambda: [
                {
                    "amount": {"totalPrice": float(o.total)},
                    "paymentMethod": {
                        "name": o.payment_title,
                        "technicalName": _PAYMENT.get(o.payment_method, o.payment_method),
                    },
                    "stateMachineState": state(rec["payment"]),
                }
            ],
            "lineItems": lambda: [
                {
                    "id": hashlib.md5(f"{rec['id']}-{i}".encode()).hexdigest(),
                    "type": "product",
                    "label": ln.name,
                    "quantity": ln.quantity,
                    "unitPrice": float(ln.price),
                    "totalPrice": float(ln.price * ln.quantity),
                    "payload": {"productNumber": ln.sku},
                    "price": {"taxRules": [{"taxRate": tax, "percentage": 100}]},
                    "position": i,
                }
                for i, ln in enumerate(o.lines, start=1)
            ],
        }
        for name in associations:
            top = name.split(".")[0]
            if top in loaders:
                out[top] = loaders[top]()
        return out

    def webhook_request(
        self, number: str, *, event_id: str | None = None, event: str = "checkout.order.placed"
    ) -> tuple[dict[str, str], bytes]:
        """(headers, body) of a signed app webhook delivery carrying order ``number``."""
        rec = self.by_number(number)
        assert rec is not None
        everything = {
            k: {}
            for k in (
                "stateMachineState",
                "currency",
                "orderCustomer",
                "billingAddress",
                "addresses",
                "deliveries",
                "transactions",
                "lineItems",
            )
        }
        eid = event_id or _uuid()
        body = json.dumps(
            {
                "data": {"payload": {"order": self.order_json(rec, everything)}, "event": event},
                "source": {
                    "url": "http://shopware.test",
                    "appVersion": "1.0.0",
                    "shopId": "c2hvcElkMDEyMzQ1",
                    "eventId": eid,
                },
                "timestamp": int(time.time()),
            }
        ).encode("utf-8")
        signature = hmac.new(self.shop_secret.encode(), body, hashlib.sha256).hexdigest()
        return {
            "Content-Type": "application/json",
            "shopware-shop-signature": signature,
            "X-Shopware-Event-Id": eid,
        }, body

    # -- criteria --------------------------------------------------------------------------------
    def _value(self, obj: dict[str, Any], field: str) -> Any:
        cur: Any = obj
        for part in field.split("."):
            if isinstance(cur, list):
                cur = cur[0] if cur else None
            if not isinstance(cur, dict):
                return None
            cur = cur.get(part)
        return cur

    def _match(self, obj: dict[str, Any], f: dict[str, Any]) -> bool:
        kind = f.get("type")
        if kind == "multi":
            results = [self._match(obj, q) for q in f.get("queries", [])]
            return all(results) if f.get("operator", "and").lower() == "and" else any(results)
        if kind == "not":
            return not all(self._match(obj, q) for q in f.get("queries", []))
        value = self._value(obj, f["field"])
        if kind == "equals":
            return value == f.get("value") or (
                value is not None and str(value) == str(f.get("value"))
            )
        if kind == "equalsAny":
            wanted = f.get("value")
            wanted = wanted.split("|") if isinstance(wanted, str) else wanted
            return value is not None and str(value) in {str(w) for w in wanted}
        if kind == "range":
            if value is None:
                return False  # NULL compares as nothing in SQL
            if isinstance(value, str):
                value = _parse_filter_time(value)
            for op, bound in (f.get("parameters") or {}).items():
                b = _parse_filter_time(bound) if isinstance(value, datetime) else bound
                if not {"gte": value >= b, "gt": value > b, "lte": value <= b, "lt": value < b}[op]:
                    return False
            return True
        raise ValueError(f"unsupported filter type {kind!r}")

    def _search(self, req: Request, rows: list[dict[str, Any]]) -> Response:
        crit = req.json() or {}
        limit = int(crit.get("limit") or 25)
        page = int(crit.get("page") or 1)
        if limit > MAX_LIMIT or limit < 1:
            return _error(
                400, "FRAMEWORK__INVALID_LIMIT_QUERY", f"The limit must be 1..{MAX_LIMIT}"
            )
        try:
            rows = [r for r in rows if all(self._match(r, f) for f in crit.get("filter") or [])]
        except ValueError as exc:
            # MySQL refuses the literal; Shopware answers with a server error.
            return _error(500, "FRAMEWORK__SQL_ERROR", str(exc))
        for s in reversed(crit.get("sort") or []):
            desc = str(s.get("order", "ASC")).upper() == "DESC"
            # MySQL sorts NULL first ascending.
            rows.sort(
                key=lambda r, fld=s["field"]: (
                    self._value(r, fld) is not None,
                    self._value(r, fld) or "",
                ),
                reverse=desc,
            )
        start = (page - 1) * limit
        data = rows[start : start + limit]
        mode = int(crit.get("total-count-mode") or 0)
        total = len(rows) if mode == 1 else len(data)
        includes = (crit.get("includes") or {}).get(req.path.rsplit("/", 1)[-1])
        if includes:
            data = [{k: v for k, v in r.items() if k in includes} for r in data]
        return Response(200, {"total": total, "data": data, "aggregations": []})

    # -- routing ---------------------------------------------------------------------------------
    def _token(self, req: Request) -> Response:
        body = req.json() or {}
        if (
            body.get("grant_type") != "client_credentials"
            or body.get("client_id") != self.client_id
            or body.get("client_secret") != self.client_secret
        ):
            return Response(
                401,
                {
                    "errors": [
                        {
                            "code": "0",
                            "status": "401",
                            "title": "Unauthorized",
                            "detail": "Client authentication failed",
                        }
                    ]
                },
            )
        token = "eyJ0" + _uuid() + _uuid()
        self.tokens[token] = time.monotonic() + self.token_ttl
        self.tokens_issued += 1
        return Response(
            200, {"token_type": "Bearer", "expires_in": int(self.token_ttl), "access_token": token}
        )

    def _authorized(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return False
        expiry = self.tokens.get(auth[7:])
        return expiry is not None and time.monotonic() < expiry

    def route(self, req: Request) -> Response:
        if not req.path.startswith("/api/"):
            return Response(404, raw=b"<html>Not Found</html>", content_type="text/html")
        with self.lock:
            if req.path == "/api/oauth/token" and req.method == "POST":
                return self._token(req)
            if not self._authorized(req):
                return Response(
                    401,
                    {
                        "errors": [
                            {
                                "code": "9",
                                "status": "401",
                                "title": "Unauthorized",
                                "detail": "The resource owner or authorization server denied "
                                "the request.",
                            }
                        ]
                    },
                )
            path = req.path[len("/api") :]
            if path == "/search/order" and req.method == "POST":
                assoc = (req.json() or {}).get("associations") or {}
                rows = [self.order_json(r, assoc) for r in self.orders.values()]
                return self._search(req, rows)
            if path == "/search/product" and req.method == "POST":
                return self._search(req, [dict(p) for p in self.products.values()])
            if path == "/search/document" and req.method == "POST":
                return self._search(
                    req,
                    [
                        {k: v for k, v in d.items() if k != "content"}
                        for d in self.documents.values()
                    ],
                )
            if path == "/_action/sync" and req.method == "POST":
                return self._sync(req)
            if (m := re.fullmatch(r"/_action/order/document/(\w+)/create", path)) and (
                req.method == "POST"
            ):
                if not self.documents_allowed:
                    return _error(403, "FRAMEWORK__MISSING_PRIVILEGE_ERROR", "document:create")
                return self._create_documents(m[1], req)
            if (m := re.fullmatch(r"/_action/document/(\w+)/upload", path)) and (
                req.method == "POST"
            ):
                return self._upload(m[1], req)
            if (m := re.fullmatch(r"/order/(\w+)", path)) and req.method == "PATCH":
                rec = self.orders.get(m[1])
                if rec is None:
                    return _error(404, "FRAMEWORK__ENTITY_NOT_FOUND", f"order {m[1]} not found")
                body = req.json() or {}
                if "customFields" in body:
                    rec["customFields"] = {**(rec["customFields"] or {}), **body["customFields"]}
                return Response(204, raw=b"")
        return _error(404, "FRAMEWORK__ROUTE_NOT_FOUND", f"No route found for {req.path}")

    def _sync(self, req: Request) -> Response:
        ops = req.json()
        if isinstance(ops, dict):
            ops = list(ops.values())
        errors = []
        for n, op in enumerate(ops or []):
            if op.get("entity") != "product" or op.get("action") != "upsert":
                errors.append((f"/{n}", "unsupported operation in this emulator"))
                continue
            for i, item in enumerate(op.get("payload") or []):
                if item.get("id") not in self.products:
                    # An upsert of an unknown id is an insert: the required fields are missing.
                    for fld in ("name", "productNumber", "taxId", "price"):
                        if fld not in item:
                            errors.append((f"/{n}/{i}/{fld}", "This value should not be blank."))
                elif not isinstance(item.get("stock", 0), int):
                    errors.append((f"/{n}/{i}/stock", "This value should be of type int."))
        if errors:
            # One transaction: nothing is written.
            return Response(
                400,
                {
                    "errors": [
                        {
                            "code": "c1051bb4-d103-4f74-8988-acbcafc7fdc3",
                            "status": "400",
                            "detail": msg,
                            "template": msg,
                            "source": {"pointer": ptr},
                        }
                        for ptr, msg in errors
                    ]
                },
            )
        written: list[str] = []
        for op in ops or []:
            for item in op.get("payload") or []:
                p = self.products[item["id"]]
                p.update({k: v for k, v in item.items() if k != "id"})
                p["availableStock"] = p["stock"]
                written.append(item["id"])
        return Response(200, {"data": {"product": written}, "notFound": [], "deleted": []})

    def _create_documents(self, type_name: str, req: Request) -> Response:
        ops = req.json()
        if not isinstance(ops, list) or not ops:
            return _error(
                400,
                "FRAMEWORK__INVALID_REQUEST_PARAMETER",
                "Request parameters must be an array of documents object",
            )
        data, errors = [], {}
        for op in ops:
            oid = str(op.get("orderId"))
            number = str((op.get("config") or {}).get("documentNumber") or "")
            if oid not in self.orders:
                errors[oid] = [{"code": "CHECKOUT__ORDER_NOT_FOUND", "detail": "Order not found"}]
                continue
            if number and any(
                d["config"].get("documentNumber") == number
                and d["documentType"]["technicalName"] == type_name
                for d in self.documents.values()
            ):
                errors[oid] = [
                    {
                        "code": "DOCUMENT__NUMBER_ALREADY_EXISTS",
                        "detail": f"Document number {number} has already been allocated.",
                    }
                ]
                continue
            did = _uuid()
            self.documents[did] = {
                "id": did,
                "orderId": oid,
                "documentType": {"technicalName": type_name},
                "static": bool(op.get("static", False)),
                "config": {"documentNumber": number, **(op.get("config") or {})},
                "documentMediaFileId": None,
                "deepLinkCode": _uuid(),
                "fileName": None,
                "content": None,
            }
            data.append(
                {
                    "documentId": did,
                    "documentMediaId": None,
                    "documentDeepLink": self.documents[did]["deepLinkCode"],
                }
            )
        return Response(200, {"data": data, "errors": errors})

    def _upload(self, did: str, req: Request) -> Response:
        doc = self.documents.get(did)
        if doc is None:
            return _error(404, "DOCUMENT__INVALID_DOCUMENT_ID", f"The document {did} is invalid")
        if not doc["static"]:
            return _error(400, "DOCUMENT__GENERATION_ERROR", "This document is not static")
        if doc["documentMediaFileId"]:
            return _error(400, "DOCUMENT__GENERATION_ERROR", "Document already exists")
        name, ext = req.arg("fileName"), req.arg("extension")
        if not name or not ext:
            return _error(400, "CONTENT__MEDIA_EMPTY_FILE", "fileName and extension are required")
        doc.update(documentMediaFileId=_uuid(), fileName=f"{name}.{ext}", content=req.body)
        return Response(
            200,
            {
                "documentId": did,
                "documentMediaId": doc["documentMediaFileId"],
                "documentDeepLink": doc["deepLinkCode"],
            },
        )


def _error(status: int, code: str, detail: str) -> Response:
    return Response(
        status, {"errors": [{"status": str(status), "code": code, "title": code, "detail": detail}]}
    )
