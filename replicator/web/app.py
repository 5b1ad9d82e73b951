"""The Manage page: orders, updates, logs, services and replication, served by the HTTP server.

:func:`mount` puts the page on the daemon's :class:`~replicator.web.server.HttpServer` (at ``/``),
so it shares the server's protection: bound to a loopback address by default, and with
``health.token`` required (bearer or basic auth — a browser asks for it) on every route mounted
here when the server listens elsewhere. Write actions (accept / ignore / cancel an order update)
are POSTs checked by :class:`~replicator.web.csrf.CsrfGuard` (signed double-submit cookie plus
an Origin check); everything else only reads.

Pages are rendered on the server with Jinja2 (autoescaped) from ``templates/``; ``static/`` holds
one stylesheet and one small script that refreshes the panels by fetching HTML fragments every
few seconds. There is no build step, and the page works without JavaScript (it just does not
refresh by itself). Secrets are never rendered: DSNs are shown redacted, log text and error
messages pass through :func:`replicator.log.redact`. Raw order payloads are shown as received
(customer data, but no credentials).

Routes (all non-public; GET unless noted)::

    /                          the whole page (query: q, page_<state>, service, level, since)
    /order?shop=S&e=E          one order: details, mapped rows, payload, timeline, actions
    /fragments/<panel>         orders | updates | logs | services | replication | summary |
                               timeline (the same query parameters): for live refresh
    /static/<file>             manage.css, manage.js
    POST /actions/<action>     accept | ignore | cancel (form: shop, e_number, csrf_token, force)

Wiring (see ``replicator/runtime.py``; after the server is built, before ``start()``)::

    from replicator.web import WebContext, mount

    mount(health, WebContext(
        config=cfg,
        staging_engine=store.engine,
        store=store,                          # replication_status, via the read model
        daemon_state=lambda: self.state,      # DaemonState, read only
        logstore=logstore,                    # or None: the page reads log_records itself
        importer=order_service.actions,       # OrderActions, or None: updates read-only
    ))
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
import structlog

from replicator import safejson
from replicator.config import Config, redact_url
from replicator.errors import FatalError
from replicator.log import redact
from replicator.logstore import LEVELS, LogStore
from replicator.ops.format import NO_VALUE
from replicator.ops.readmodel import order_counts, replication_rows, scale_out_lines
from replicator.staging import StagingStore
from replicator.state import DaemonState
from replicator.web import views
from replicator.web.csrf import FIELD, CsrfGuard
from replicator.web.server import HttpServer, Request, Response

if TYPE_CHECKING:  # typing only: Jinja2 itself loads with the first page (see ManageApp.env)
    import jinja2

log = structlog.get_logger(__name__, service="manage")

__all__ = ["ManageApp", "OrderActions", "WebContext", "mount"]

STATIC_FILES = ("manage.css", "manage.js", "favicon.svg")
ACTIONS = ("accept", "ignore", "cancel", "retry")
_DONE = {
    "retried": "Retried: the order was imported again (see its state and timeline).",
    "accepted": "Update accepted: the ERP order now has the shop's new version.",
    "ignored": "Update ignored: the ERP order keeps the imported version.",
    "cancelled": "The ERP order was marked cancelled.",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class OrderActions(Protocol):
    """What the updates queue needs: :class:`replicator.orders.actions.OrderActions`."""

    def accept(self, e: str, shop: str | None = None, force: bool = False) -> Any: ...

    def ignore(self, e: str, shop: str | None = None) -> None: ...

    def cancel(self, e: str, shop: str | None = None) -> str: ...

    def retry(self, e: str, shop: str | None = None) -> Any: ...


@dataclass(frozen=True)
class WebContext:
    """Everything the Manage page reads from (and the one thing it writes through).

    ``config``          the daemon's :class:`~replicator.config.Config` (schedules, shops, and
                        the DSNs — shown redacted only).
    ``staging_engine``  the staging store's engine: order ledger, log records, lag history,
                        ``replication_status``.
    ``daemon_state``    returns the live :class:`~replicator.state.DaemonState` (or None when
                        no loop runs); called on every request, never mutated.
    ``store``           the :class:`~replicator.staging.StagingStore`, whose engine the
                        ``replication_status`` view is read from (``staging_engine`` when None);
                        the page reads through the read model and never sets a store up.
    ``logstore``        the :class:`~replicator.logstore.LogStore`; when None ``log_records``
                        is read through the read model.
    ``importer``        the order import service (accept / ignore / cancel, as the CLI does, and
                        the dry-run mapping on the order page); None makes updates read-only.
    """

    config: Config
    staging_engine: sa.Engine
    daemon_state: Callable[[], DaemonState | None] = lambda: None
    store: StagingStore | None = None
    logstore: LogStore | None = None
    importer: OrderActions | None = None
    per_page: int = 20
    refresh_seconds: float = 5.0
    chart_hours: float = 6.0
    log_limit: int = 200


def _env() -> jinja2.Environment:
    import jinja2  # noqa: PLC0415 - ~0.1 s at every daemon start; only a page render needs it

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("replicator.web", "templates"),
        autoescape=jinja2.select_autoescape(("html", "svg"), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        fmt_time=views.fmt_time,
        fmt_local=views.fmt_local,
        ago=views.ago,
        human_bytes=views.human_bytes,
        human_seconds=views.human_seconds,
        log_fields=views.log_fields,
        levels=LEVELS,
        since_choices=views.SINCE_CHOICES,
        urlencode=lambda d: urlencode({k: v for k, v in d.items() if v not in (None, "")}),
    )
    return env


def _int(text: str | None, default: int = 1) -> int:
    try:
        return max(1, int(text or default))
    except ValueError:
        return default


class ManageApp:
    """Request handlers of the Manage page (one instance per daemon)."""

    def __init__(self, ctx: WebContext, csrf: CsrfGuard | None = None) -> None:
        self.ctx = ctx
        self.csrf = csrf or CsrfGuard()
        self._env: jinja2.Environment | None = None
        self._static = resources.files("replicator.web") / "static"

    @property
    def env(self) -> jinja2.Environment:
        """The template environment, made for the first page rendered (most daemons never
        render one: Jinja2 would only slow their start)."""
        if self._env is None:
            self._env = _env()
        return self._env

    # -- helpers --------------------------------------------------------------------------------

    def _html(
        self, template: str, status: int = 200, cookie: str | None = None, **data: Any
    ) -> Response:
        body = self.env.get_template(template).render(**data)
        headers = {"Content-Type": "text/html; charset=utf-8", **_SECURITY_HEADERS}
        if cookie:
            headers["Set-Cookie"] = cookie
        return Response(status, headers, body.encode("utf-8"))

    def _about(self) -> dict[str, Any]:
        cfg = self.ctx.config
        erp = getattr(cfg, "erp", None)
        return {
            "erp": redact_url(erp.url) if erp is not None else NO_VALUE,
            "staging": redact_url(str(getattr(cfg, "staging_url", ""))),
            "listen": getattr(getattr(cfg, "health", None), "listen", ""),
            "shops": [s.name for s in getattr(cfg, "shops", ())],
            "mode": getattr(getattr(cfg, "capture", None), "mode", ""),
        }

    def _state(self) -> Any:
        try:
            return self.ctx.daemon_state()
        except Exception:  # a broken callable must not take the page down
            return None

    def _replication_rows(self) -> list[dict[str, Any]]:
        store = self.ctx.store
        return replication_rows(store.engine if store is not None else self.ctx.staging_engine)

    # -- panels ---------------------------------------------------------------------------------

    def _panel(self, name: str, q: dict[str, str], token: str) -> dict[str, Any]:
        ctx = self.ctx
        if name == "orders":
            pages = {s: _int(q.get(f"page_{s}")) for s in (*views.ORDER_COLUMNS, "skipped")}
            return {
                "orders": views.orders_view(
                    ctx.staging_engine, pages, ctx.per_page, q.get("q", "")[:100]
                )
            }
        if name == "updates":
            available, rows = views.updates_view(ctx.staging_engine)
            return {
                "updates_available": available,
                "updates": rows,
                "writable": ctx.importer is not None,
                "csrf": token,
            }
        if name == "logs":
            query = ctx.logstore.query if ctx.logstore is not None else None
            return {
                "logs": views.logs_view(
                    ctx.staging_engine,
                    query,
                    service=q.get("service", "")[:100],
                    level=q.get("level", ""),
                    since=q.get("since", "24h"),
                    limit=ctx.log_limit,
                )
            }
        if name == "services":
            state = self._state()
            return {
                "services": views.services_view(self._schedules(), state),
                "state": state,
            }
        if name == "replication":
            return {
                "sources": views.replication_view(
                    ctx.staging_engine, self._replication_rows(), ctx.chart_hours
                ),
                "chart_hours": ctx.chart_hours,
                "scale_out": self._scale_out(),
            }
        if name == "summary":
            return self._summary()
        raise KeyError(name)

    def _scale_out(self) -> list[str]:
        """The stream sink's backlog and the HA roles (docs/scale-out.md), when configured."""
        try:
            return scale_out_lines(self.ctx.config)
        except Exception as exc:  # the panel shows the rest; this line says why it is missing
            return [f"stream / HA state unavailable: {str(exc).splitlines()[0]}"]

    def _empty_panel(self, name: str, q: dict[str, str], token: str) -> dict[str, Any]:
        """What a panel shows when reading its data failed (the banner says why)."""
        if name == "orders":
            return {"orders": views.OrdersView(available=False)}
        if name == "updates":
            return {"updates_available": False, "updates": [], "writable": False, "csrf": token}
        if name == "logs":
            empty = views.LogsView(False, [], [], "", "", "24h", self.ctx.log_limit)
            return {"logs": empty}
        if name == "services":
            return {"services": [], "state": None}
        if name == "replication":
            return {"sources": [], "chart_hours": self.ctx.chart_hours}
        return {"state": None, "counts": {}, "max_lag": None, "sources": 0, "breakers": []}

    def _schedules(self) -> dict[str, Any]:
        """The schedules of the services this config runs (no phantom invoices service)."""
        try:
            schedules = dict(self.ctx.config.schedules.all())
        except Exception:
            return {}
        reported = set(getattr(self._state(), "services", {}) or {})
        for name in views.unconfigured_services(self.ctx.config):
            if name not in reported:
                schedules.pop(name, None)
        return schedules

    def _summary(self) -> dict[str, Any]:
        state = self._state()
        counts = order_counts(self.ctx.staging_engine)
        rows = self._replication_rows()
        lags = [float(r["lag_seconds"]) for r in rows if r.get("lag_seconds") is not None]
        breakers = [
            s.name for s in (getattr(state, "services", {}) or {}).values() if s.breaker_open
        ]
        return {
            "state": state,
            "counts": counts,
            "max_lag": max(lags) if lags else None,
            "sources": len(rows),
            "breakers": breakers,
            "now": datetime.now(UTC),
        }

    # -- GET ------------------------------------------------------------------------------------

    def handle_get(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if path.startswith("/static/"):
            return self._static_file(path.removeprefix("/static/"))
        if path == "/favicon.ico":
            return self._static_file("favicon.svg")
        token, cookie = self.csrf.token_for(req.headers)
        q = req.query
        if path == "/":
            return self._index(q, token, cookie)
        if path == "/order":
            return self._order(q, token, cookie)
        if path.startswith("/fragments/"):
            name = path.removeprefix("/fragments/")
            if name == "timeline":
                detail = views.order_detail(
                    self.ctx.staging_engine, q.get("shop", ""), q.get("e", "")
                )
                if detail is None:
                    return self._html("error.html", 404, message="no such order")
                return self._html("_timeline.html", cookie=cookie, d=detail)
            if name not in ("orders", "updates", "logs", "services", "replication", "summary"):
                return self._html("error.html", 404, message="no such panel")
            try:
                panel = self._panel(name, q, token)
            except Exception as exc:  # the script shows "offline" and tries again
                reason = redact(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                log.error("manage_panel_failed", panel=name, error=reason)
                return Response.text(f"{name} unavailable: {reason}\n", 503)
            return self._html(f"_{name}.html", cookie=cookie, q=q, **panel)
        return self._html("error.html", 404, message=f"nothing at {req.path[:200]}")

    def _static_file(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return Response.text("not found\n", 404)
        data = (self._static / name).read_bytes()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith(("javascript", "svg+xml")):
            ctype += "; charset=utf-8"
        return Response(200, {"Content-Type": ctype, "X-Content-Type-Options": "nosniff"}, data)

    def _frag_src(self, name: str, q: dict[str, str], keys: tuple[str, ...]) -> str:
        params = {k: q[k] for k in keys if q.get(k)}
        return f"/fragments/{name}" + (f"?{urlencode(params)}" if params else "")

    def _index(self, q: dict[str, str], token: str, cookie: str | None) -> Response:
        order_keys = ("q", *(f"page_{s}" for s in (*views.ORDER_COLUMNS, "skipped")))
        log_keys = ("service", "level", "since")
        data: dict[str, Any] = {"q": q, "csrf": token, "about": self._about()}
        broken: dict[str, str] = {}
        for name in ("summary", "orders", "updates", "replication", "services", "logs"):
            try:
                data.update(self._panel(name, q, token))
            except Exception as exc:  # one broken panel must not blank the whole page
                reason = redact(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                log.error("manage_panel_failed", panel=name, error=reason)
                broken[name] = reason
                data.update(self._empty_panel(name, q, token))
        data["broken"] = broken
        data["src"] = {
            "summary": "/fragments/summary",
            "orders": self._frag_src("orders", q, order_keys),
            "updates": "/fragments/updates",
            "replication": "/fragments/replication",
            "services": "/fragments/services",
            "logs": self._frag_src("logs", q, log_keys),
        }
        data["refresh"] = self.ctx.refresh_seconds
        data["done"] = _DONE.get(q.get("done", ""))
        return self._html("index.html", cookie=cookie, **data)

    def _order(
        self,
        q: dict[str, str],
        token: str,
        cookie: str | None,
        status: int = 200,
        error: str | None = None,
    ) -> Response:
        shop, e = q.get("shop", ""), q.get("e", "")
        detail = views.order_detail(self.ctx.staging_engine, shop, e)
        if detail is None:
            return self._html(
                "error.html", 404, cookie=cookie, message=f"no order {e!r} of shop {shop!r}"
            )
        if self.ctx.importer is not None and hasattr(self.ctx.importer, "writer_for"):
            detail.mapped, detail.mapped_error = views.map_order_rows(
                self.ctx.importer, detail.entry
            )
        return self._html(
            "order.html",
            status,
            cookie=cookie,
            d=detail,
            csrf=token,
            writable=self.ctx.importer is not None,
            done=_DONE.get(q.get("done", "")),
            error=error,
            refresh=self.ctx.refresh_seconds,
            timeline_src="/fragments/timeline?" + urlencode({"shop": shop, "e": e}),
            about=self._about(),
        )

    # -- POST -----------------------------------------------------------------------------------

    def handle_post(self, req: Request) -> Response:
        action = req.path.removeprefix("/actions/").strip("/")
        if action not in ACTIONS:
            return self._html("error.html", 404, message="no such action")
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/x-www-form-urlencoded", ""):
            return self._html("error.html", 415, message="send a form (urlencoded)")
        try:
            form = dict(parse_qsl(req.body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return self._html("error.html", 400, message="the form is not UTF-8")
        bad = safejson.unstorable(form)
        if bad is not None:
            return self._html("error.html", 400, message=f"bad form field {bad}")
        refused = self.csrf.check(req.headers, form.get(FIELD))
        if refused is not None:
            log.warning("manage_post_refused", action=action, client=req.client, reason=refused)
            return self._html("error.html", 403, message=refused)
        shop, e = form.get("shop", ""), form.get("e_number", "")
        if not shop or not e:
            return self._html("error.html", 400, message="shop and e_number are required")
        token, cookie = self.csrf.token_for(req.headers)
        back = {"shop": shop, "e": e}
        if self.ctx.importer is None:
            return self._order(
                back,
                token,
                cookie,
                409,
                "updates are read-only here: this daemon runs no order import",
            )
        force = form.get("force") in ("1", "on", "true", "yes")
        # Only a daemon that imports orders gets here: the others do not load the order writer.
        from replicator.mappers.orders import OrderRejected  # noqa: PLC0415 - order import only
        from replicator.orders.writer import NotInErp, OrderPosted  # noqa: PLC0415 - order import only

        try:
            done = self._run_action(action, shop, e, force)
        except (FatalError, OrderRejected, OrderPosted, NotInErp) as exc:  # a person must act
            log.warning(
                "manage_action_refused",
                action=action,
                shop=shop,
                e_number=e,
                client=req.client,
                reason=str(exc),
            )
            return self._order(back, token, cookie, 409, redact(str(exc)))
        except Exception as exc:  # ERP unreachable and the like: say what, keep the page
            reason = redact(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            log.error(
                "manage_action_failed",
                action=action,
                shop=shop,
                e_number=e,
                client=req.client,
                error=reason,
            )
            return self._order(back, token, cookie, 503, f"{action} failed: {reason}")
        log.info(
            "manage_action", action=action, shop=shop, e_number=e, force=force, client=req.client
        )
        target = "/order?" + urlencode({**back, "done": done})
        if form.get("back") == "updates":
            target = "/?" + urlencode({"done": done}) + "#updates"
        return Response(303, {"Location": target, "Content-Type": "text/plain"}, b"")

    def _run_action(self, action: str, shop: str, e: str, force: bool) -> str:
        importer = self.ctx.importer
        assert importer is not None
        if action == "accept":
            importer.accept(e, shop, force=force)
            return "accepted"
        if action == "ignore":
            importer.ignore(e, shop)
            return "ignored"
        if action == "retry":
            importer.retry(e, shop)
            return "retried"
        importer.cancel(e, shop)
        return "cancelled"


def mount(server: HttpServer, ctx: WebContext) -> ManageApp:
    """Serve the Manage page from ``server`` (non-public routes: the token applies)."""
    app = ManageApp(ctx)
    # Exact routes (the server matches whole paths): anything else is the server's 404.
    for path in ("/", "/order", "/favicon.ico", "/fragments/{panel}", "/static/{file}"):
        server.add_route("GET", path, app.handle_get)
    server.add_route("POST", "/actions/{action}", app.handle_post, max_body=16 * 1024)
    return app
