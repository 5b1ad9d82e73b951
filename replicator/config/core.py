"""Core configuration sections: ERP connection, capture, staging store, health server, daemon, logs.

Each section is a frozen pydantic model; unknown keys are errors (a typo must not be silently
ignored). Defaults are what a DBA would pick for a small ERP; every key is documented in
``config/example.toml``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class Section(BaseModel):
    """Base of every config section: frozen, typed, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def read_secret(password_env: str | None, password_file: str | None) -> str | None:
    """Resolve a secret from an environment variable or a file (systemd ``LoadCredential``).

    A relative ``password_file`` is looked up in ``$CREDENTIALS_DIRECTORY`` when systemd set it.
    """
    if password_env:
        value = os.environ.get(password_env)
        if value is None:
            raise ValueError(f"environment variable {password_env!r} is not set")
        return value
    if password_file:
        path = Path(password_file)
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and creds:
            path = Path(creds) / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read password file {str(path)!r}: {exc.strerror}") from None
    return None


def _with_password(url: str, secret: str) -> str:
    """``url`` with its password set to ``secret`` (user, host and port kept)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(parts.username or '', safe='')}:{quote(secret, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class DatabaseSection(Section):
    """A database connection whose password may live outside the config file."""

    dsn: SecretStr
    password_env: str | None = None
    password_file: str | None = None
    connect_timeout: float = Field(default=10.0, gt=0)

    @field_validator("dsn")
    @classmethod
    def _dsn_has_scheme(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if "://" not in raw:
            raise ValueError("must be a URL such as postgresql://user@host:5432/dbname")
        return v

    @model_validator(mode="after")
    def _resolve_password(self) -> DatabaseSection:
        secret = read_secret(self.password_env, self.password_file)
        if secret is not None:
            object.__setattr__(
                self, "dsn", SecretStr(_with_password(self.dsn.get_secret_value(), secret))
            )
        return self

    @property
    def url(self) -> str:
        return self.dsn.get_secret_value()

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.split("+")[0]

    @property
    def redacted(self) -> str:
        """The DSN with the password replaced, safe for logs and status output."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """Replace the password of a URL/DSN with ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class ErpSection(DatabaseSection):
    """``[erp]``: the ERP database that is captured and that orders are written into.

    ``dsn`` is the capture role (REPLICATION + SELECT on the watched tables). Orders are written
    with ``writer_dsn`` when given — a role with only the rights the order mapping needs — so
    neither role holds more than its job (see docs/security.md).
    """

    writer_dsn: SecretStr | None = None
    writer_password_env: str | None = None
    writer_password_file: str | None = None

    @model_validator(mode="after")
    def _resolve_writer_password(self) -> ErpSection:
        if self.writer_dsn is None:
            return self
        secret = read_secret(self.writer_password_env, self.writer_password_file)
        if secret is not None:
            object.__setattr__(
                self,
                "writer_dsn",
                SecretStr(_with_password(self.writer_dsn.get_secret_value(), secret)),
            )
        return self

    @property
    def writer_url(self) -> str:
        """The DSN order import writes with (the capture DSN when no writer_dsn is set)."""
        return self.writer_dsn.get_secret_value() if self.writer_dsn is not None else self.url

    @field_validator("dsn")
    @classmethod
    def _known_dialect(cls, v: SecretStr) -> SecretStr:
        scheme = v.get_secret_value().split("://", 1)[0].split("+")[0]
        if scheme not in ("postgresql", "postgres", "mysql", "mariadb", "sqlite"):
            raise ValueError(
                f"unsupported database {scheme!r}; use postgresql://, mysql:// (MariaDB) or sqlite://"
            )
        return v

    @property
    def dialect(self) -> Literal["postgresql", "mysql", "sqlite"]:
        s = self.scheme
        if s in ("postgresql", "postgres"):
            return "postgresql"
        if s in ("mysql", "mariadb"):
            return "mysql"
        return "sqlite"


def filter_columns(table: str, condition: str) -> list[str]:
    """The columns a row filter reads; ValueError when it is not one plain condition.

    PostgreSQL checks a publication's row filter itself (no subqueries, no user functions); this
    refuses early, with the key named, what is certainly not a condition: several statements, a
    subquery, an empty text.
    """
    # sqlglot costs 60-180 ms to import; only configs with row filters need it, so every other
    # daemon start (and every CLI command) does without.
    import sqlglot  # noqa: PLC0415 - start-up cost
    from sqlglot import exp  # noqa: PLC0415 - start-up cost

    try:
        tree = sqlglot.parse_one(f"SELECT 1 WHERE {condition}", read="postgres")
    except sqlglot.errors.ParseError:
        raise ValueError(f"filters.{table}: {condition!r} is not a SQL condition") from None
    where = tree.args.get("where")
    if not condition.strip() or where is None or ";" in condition:
        raise ValueError(f"filters.{table}: {condition!r} is not one SQL condition")
    if any(isinstance(n, (exp.Select, exp.Subquery)) for n in where.find_all(exp.Expression)):
        raise ValueError(f"filters.{table}: a row filter cannot hold a subquery")
    return sorted({c.name for c in where.find_all(exp.Column)})


class CaptureSection(Section):
    """``[capture]``: what to watch and how."""

    mode: Literal["logical", "triggers"] = "logical"
    tables: tuple[str, ...] = Field(min_length=1)
    # Key columns for tables without a primary key, e.g. {"public.stock" = ["sku", "warehouse"]}.
    keys: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # Per table: only these columns reach staging (logical mode: a PostgreSQL 15 publication
    # column list; trigger mode: the triggers log only these), the key among them, e.g.
    # {"public.customers" = ["id", "name"]}.
    columns: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # Per table: only rows matching this condition reach staging (logical mode: a publication
    # row filter; trigger mode: evaluated in the triggers, with the publication's rules),
    # e.g. {"public.orders" = "status <> 'draft'"}.
    filters: dict[str, str] = Field(default_factory=dict)
    slot: str = "sync_daemon"
    publication: str = "sync_daemon"
    # Changes applied to staging per batch, and the longest a batch waits before it commits.
    batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    batch_ms: int = Field(default=200, ge=0, le=60_000)
    heartbeat_interval: float = Field(default=10.0, gt=0)
    # Standby status update interval (also the keepalive answer cadence).
    status_interval: float = Field(default=5.0, gt=0)
    # Trigger mode: changelog table, poll interval, LISTEN/NOTIFY doorbell (PostgreSQL only).
    changelog_table: str = "sync_changelog"
    poll_interval: float = Field(default=1.0, gt=0)
    notify: bool = True
    # Trigger mode: applied changelog rows are deleted in batches of this size.
    cleanup_batch: int = Field(default=10_000, ge=1)

    @field_validator("tables")
    @classmethod
    def _table_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for name in v:
            parts = name.split(".")
            if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
                raise ValueError(f"{name!r} is not a table name of the form schema.table")
            out.append(name if len(parts) == 2 else f"public.{name}")
        if len(set(out)) != len(out):
            raise ValueError("a table is listed twice")
        return tuple(out)

    @field_validator("slot", "publication", "changelog_table")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_]{0,62}$", v):
            raise ValueError(f"{v!r} must be lower-case letters, digits and _ (at most 63)")
        return v

    @model_validator(mode="after")
    def _keys_for_known_tables(self) -> CaptureSection:
        for table, cols in self.keys.items():
            qualified = table if "." in table else f"public.{table}"
            if qualified not in self.tables:
                raise ValueError(f"keys: {table!r} is not in capture.tables")
            if not cols:
                raise ValueError(f"keys: {table!r} needs at least one column")
        return self

    @field_validator("columns", "filters", mode="before")
    @classmethod
    def _qualified_keys(cls, v: object) -> object:
        if isinstance(v, dict):
            return {(k if "." in k else f"public.{k}"): x for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _columns_and_filters(self) -> CaptureSection:
        for what, per_table in (("columns", self.columns), ("filters", self.filters)):
            for table in per_table:
                if table not in self.tables:
                    raise ValueError(f"{what}: {table!r} is not in capture.tables")
        for table, cols in self.columns.items():
            if not cols:
                raise ValueError(f"columns: {table!r} needs at least one column")
            for c in cols:
                if not _IDENT.match(c):
                    raise ValueError(f"columns.{table}: {c!r} is not a column name")
        for table, cond in self.filters.items():
            filter_columns(table, cond)  # raises ValueError naming what is wrong
        return self

    def column_list(self, table: str) -> tuple[str, ...] | None:
        return self.columns.get(table)

    def row_filter(self, table: str) -> str | None:
        return self.filters.get(table)

    def key_columns(self, table: str) -> tuple[str, ...] | None:
        for name, cols in self.keys.items():
            if (name if "." in name else f"public.{name}") == table:
                return cols
        return None


class StagingSection(Section):
    """``[staging]``: the SQLAlchemy URL of the staging store (SQLite by default)."""

    url: SecretStr | None = None
    password_env: str | None = None
    password_file: str | None = None

    @model_validator(mode="after")
    def _resolve_password(self) -> StagingSection:
        secret = read_secret(self.password_env, self.password_file)
        if secret is not None and self.url is not None:
            object.__setattr__(
                self, "url", SecretStr(_with_password(self.url.get_secret_value(), secret))
            )
        return self


class HealthSection(Section):
    """``[health]``: the HTTP server for /healthz, /readyz, /metrics and the Manage page."""

    listen: str = "127.0.0.1:8787"
    enabled: bool = True
    # The main loop is overdue (liveness fails) after this many seconds without a cycle.
    loop_overdue: float = Field(default=60.0, gt=0)
    max_lag_seconds: float = Field(default=300.0, gt=0)
    max_heartbeat_age: float = Field(default=120.0, gt=0)
    # Seconds between refreshes of the gauges /metrics reads from the databases (retained slot
    # WAL, orders by state): each refresh queries the ERP and staging, so not on every scrape.
    metrics_interval: int = Field(default=15, ge=1, le=3600)
    # Required when listen is not a loopback address (token or user:password for basic auth).
    token: SecretStr | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(
                f"{v!r} must be host:port, e.g. 127.0.0.1:8787 (port 0 picks a free one)"
            )
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class DaemonSection(Section):
    """``[daemon]``: identity and state directory of this daemon."""

    name: str = "sync-daemon"
    state_dir: str = "/var/lib/sync-daemon"
    # Seconds a clean shutdown may take before in-flight work is abandoned (rolled back).
    shutdown_timeout: float = Field(default=8.0, gt=0, le=60)


class LoggingSection(Section):
    """``[logging]``: level, renderer and how long log records stay in the staging store."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    retention_days: float = Field(default=14.0, gt=0)
