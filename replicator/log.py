"""Logging: structlog for our own events, the standard library (psycopg, SQLAlchemy) routed through
the same renderer.

JSON lines when stdout is not a terminal (journald keeps them as they are), readable key=value
console output on a terminal. Every record carries ``service``: the one the code that logs bound,
else the service whose run is on the stack (bound by the service runner), else the module's
(:func:`service_of`), so ``sync-daemon logs --service orders`` finds every order record. Secrets are scrubbed by
:func:`redact_secrets` whatever the caller passed. Extra sinks (the staging store's log table)
register with :func:`add_sink`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
from sqlalchemy.exc import SAWarning

from replicator.config.core import LoggingSection

Sink = Callable[[MutableMapping[str, Any]], None]
_sinks: list[Sink] = []

# user:password@ in URLs/DSNs, password=... in key/value DSNs, and common secret-ish keys.
_URL_PW = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_KV_PW = re.compile(r"(?P<pre>\b(?:password|passwd|pwd|secret|token)\s*=\s*)('[^']*'|\S+)", re.I)
_SECRET_KEYS = {
    "password",
    "passwd",
    "secret",
    "token",
    "dsn_password",
    "consumer_secret",
    "api_key",
    "authorization",
}


def redact(text: str) -> str:
    """Remove passwords from URLs and key=value strings."""
    text = _URL_PW.sub(lambda m: f"{m.group('pre')}***@", text)
    return _KV_PW.sub(lambda m: f"{m.group('pre')}***", text)


def redact_secrets(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for k, v in list(event_dict.items()):
        if k.lower() in _SECRET_KEYS:
            event_dict[k] = "***"
        elif isinstance(v, str):
            event_dict[k] = redact(v)
        elif isinstance(v, BaseException):
            event_dict[k] = redact(f"{type(v).__name__}: {v}")
    return event_dict


# The service a module's records belong to when the code that logs bound none (longest prefix
# wins). Code running inside a service (ServiceRunner) binds the service's own name instead.
_SERVICE_BY_MODULE = {
    "replicator.cdc": "capture",
    "replicator.staging": "capture",
    "replicator.staging.lag": "web",  # the lag chart's history (was replicator.web.lag)
    "replicator.orders": "orders",
    "replicator.connectors": "orders",
    "replicator.mappers": "orders",
    "replicator.push.stock": "stock_push",
    "replicator.push.levels": "stock_push",
    "replicator.push.invoices": "invoices",
    "replicator.push.invoice_docs": "invoices",
    "replicator.push": "push",
    "replicator.web": "web",
    "replicator.notify": "notify",
}


def service_of(logger_name: str | None) -> str:
    name = logger_name or ""
    best = max(
        (p for p in _SERVICE_BY_MODULE if name == p or name.startswith(p + ".")),
        key=len,
        default=None,
    )
    return _SERVICE_BY_MODULE[best] if best else "daemon"


def add_service(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every record carries ``service`` (``sync-daemon logs --service X`` filters on it)."""
    if not event_dict.get("service"):
        event_dict["service"] = service_of(event_dict.get("logger"))
    return event_dict


def add_sink(sink: Sink) -> None:
    """Also hand every (redacted) record to ``sink`` — e.g. the staging store's log table."""
    if sink not in _sinks:
        _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def _to_sinks(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for sink in list(_sinks):
        with contextlib.suppress(Exception):  # a sink must never break logging
            sink(event_dict)
    return event_dict


def setup_logging(
    cfg: LoggingSection | None = None, *, quiet: bool = False, stream: Any = None
) -> None:
    """Configure structlog and the stdlib root logger.

    ``quiet`` (CLI commands): only warnings and errors reach stderr, so command output stays clean.
    """
    cfg = cfg or LoggingSection()
    out = stream or (sys.stderr if quiet else sys.stdout)
    level = logging.WARNING if quiet else getattr(logging, cfg.level.upper())
    use_json = cfg.format == "json" or (cfg.format == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_service,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            *shared[:1],
            structlog.stdlib.filter_by_level,
            *shared[1:],
            _to_sinks,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _to_sinks],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Reflecting an ERP table with a type SQLAlchemy does not know (PostGIS ``point``, ...)
    # warns once per column on every command that validates a mapping; such columns are
    # typed "other" there, which is all the validation needs.
    warnings.filterwarnings("ignore", message="Did not recognize type", category=SAWarning)
    # Driver chatter stays at warning unless we debug.
    for noisy in ("psycopg", "sqlalchemy", "watchdog", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(
            logging.DEBUG if cfg.level == "debug" else logging.WARNING
        )
