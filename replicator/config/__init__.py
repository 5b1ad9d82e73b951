"""Configuration: TOML parsed and validated at the edge into frozen, typed objects.

``load_config(path)`` is the only way the rest of the daemon sees configuration. Errors raise
:class:`replicator.errors.ConfigError` naming the file, the key and the bad value, e.g.::

    /etc/sync-daemon/config.toml: capture.mode = 'logicl': must be one of 'logical', 'triggers'

Feature areas own their section models in sibling modules (``shops``, ``ops``, ``push``); this
module only assembles them.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from pydantic import Field, ValidationError, model_validator

from replicator.config.core import (
    CaptureSection,
    DaemonSection,
    ErpSection,
    HealthSection,
    LoggingSection,
    Section,
    StagingSection,
    redact_url,
)
from replicator.config.ops import NotifySection, SchedulesSection
from replicator.config.orders import OrdersSection
from replicator.config.push import InvoicePushSection, StockPushSection
from replicator.config.shops import ShopSection
from replicator.errors import ConfigError

__all__ = [
    "CaptureSection",
    "Config",
    "ConfigError",
    "DaemonSection",
    "ErpSection",
    "HealthSection",
    "LoggingSection",
    "StagingSection",
    "load_config",
    "redact_url",
]

log = structlog.get_logger(__name__)


class Config(Section):
    """The whole configuration of one daemon."""

    erp: ErpSection
    capture: CaptureSection
    staging: StagingSection = Field(default_factory=StagingSection)
    health: HealthSection = Field(default_factory=HealthSection)
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    shops: tuple[ShopSection, ...] = ()
    orders: OrdersSection = Field(default_factory=OrdersSection)
    stock_push: StockPushSection | None = None
    invoice_push: InvoicePushSection | None = None
    notify: NotifySection = Field(default_factory=NotifySection)
    schedules: SchedulesSection = Field(default_factory=SchedulesSection)

    # Where the config came from; relative paths in the config resolve against its folder.
    source_path: str = ""

    @model_validator(mode="after")
    def _one_orders_schedule(self) -> Config:
        """``[schedules] orders`` is the one knob for the import cycle. ``orders.interval`` (the
        old knob, documented as the interval while the schedule decided) still works alone, as
        ``every Ns``; with both set the schedule wins and a warning says so."""
        if "interval" not in self.orders.model_fields_set:
            return self
        if "orders" in self.schedules.model_fields_set:
            log.warning(
                "config_orders_interval_ignored",
                interval=self.orders.interval,
                schedule=self.schedules.orders,
                hint="[schedules] orders decides when orders are imported; remove orders.interval",
            )
            return self
        every = f"every {max(1, round(self.orders.interval))}s"
        log.warning(
            "config_orders_interval_deprecated",
            interval=self.orders.interval,
            hint=f'use [schedules] orders = "{every}" instead of orders.interval',
        )
        object.__setattr__(self, "schedules", self.schedules.model_copy(update={"orders": every}))
        return self

    @property
    def staging_url(self) -> str:
        if self.staging.url is not None:
            return self.staging.url.get_secret_value()
        return f"sqlite:///{Path(self.daemon.state_dir) / 'staging.db'}"

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        if path.is_absolute() or not self.source_path:
            return path
        return Path(self.source_path).parent / path


def _format_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _secret_key(loc: tuple[Any, ...]) -> bool:
    """Errors on secret keys, or on a whole section that holds secrets, never echo the value."""
    if not loc:
        return True
    last = str(loc[-1]).lower()
    if last in ("erp", "staging", "notify", "smtp", "shops", "health") or isinstance(loc[-1], int):
        return True  # the input is a whole section: it may contain a DSN or a password
    return last in ("dsn", "url", "token", "key") or any(
        s in last for s in ("password", "secret", "token", "_url", "_key", "credential")
    )


def format_validation_error(path: str, exc: ValidationError) -> str:
    """One line per problem: ``file: key.path = value: message``; secrets never echoed."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{path}: {key}: required key is missing")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{path}: {key}: unknown key")
        elif _secret_key(loc):
            lines.append(f"{path}: {key}: {msg}")
        else:
            lines.append(f"{path}: {key} = {_format_value(err.get('input'))}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], path: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    try:
        return Config.model_validate({**data, "source_path": path})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a TOML config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    if "source_path" in data:
        raise ConfigError(f"{p}: source_path: unknown key")
    return parse_config(data, str(p.resolve()))


_SECRET_WORDS = ("password", "secret", "token", "consumer_key", "client_id")


def _inline_secrets(data: Any, prefix: str = "") -> list[str]:
    """Keys of a parsed config that hold a secret written in the file itself (not ``*_env`` /
    ``*_file`` references): secret-named keys, and URLs with a password."""
    found: list[str] = []
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else ()
    )
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            found += _inline_secrets(v, f"{key}.")
        elif isinstance(v, str) and v:
            name = str(k).lower()
            named = any(w in name for w in _SECRET_WORDS) and not name.endswith(("_env", "_file"))
            if named or ("://" in v and urlsplit(v).password):
                found.append(key)
    return found


def warn_if_world_readable(path: str | os.PathLike[str]) -> bool:
    """Warn when a config file that holds secrets can be read by other users.

    Returns True when a warning was logged. The warning names the keys, never their values.
    """
    try:
        mode = os.stat(path).st_mode
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = _inline_secrets(data)
    if keys and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "config_readable_by_others",
            path=str(path),
            mode=oct(mode & 0o777),
            keys=keys,
            hint="the file holds secrets: chmod 600, or use *_env / *_file for them",
        )
        return True
    return False
