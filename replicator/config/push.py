"""Config sections of the ERP-to-webshop pushers: ``[stock_push]`` and ``[invoice_push]``.

Both sections are optional; a pusher runs only when its section is present (and ``enabled``).
Table names are source tables as in ``capture.tables`` (``stock`` means ``public.stock``); the
tables must be captured, because the pushers read the change journal and the mirror tables.
Every key is documented in ``docs/push.md``.

The ERP-side webhook (``/webhooks/erp``) takes its shared secret from ``webhook_secret`` (or
``webhook_secret_env`` / ``webhook_secret_file``) of ``[stock_push]``, else of ``[invoice_push]``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from replicator.config.core import Section, read_secret
from replicator.schedules import Schedule

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def qualify(table: str) -> str:
    """``stock`` → ``public.stock``; ``erp.stock`` stays as it is."""
    return table if "." in table else f"public.{table}"


def _check_table(v: str) -> str:
    parts = v.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError("must be a table name such as 'stock' or 'public.stock'")
    return qualify(v)


def _check_column(v: str | None) -> str | None:
    if v is not None and not _IDENT.match(v):
        raise ValueError("must be a plain column name")
    return v


class _WebhookSecret(Section):
    """The shared secret of the ERP-side webhook (``/webhooks/erp``)."""

    webhook_secret: SecretStr | None = None
    webhook_secret_env: str | None = None
    webhook_secret_file: str | None = None

    @model_validator(mode="after")
    def _resolve_webhook_secret(self) -> Any:
        if self.webhook_secret is not None and (
            self.webhook_secret_env or self.webhook_secret_file
        ):
            raise ValueError("webhook_secret: written in the file and also named by _env/_file")
        try:
            secret = read_secret(self.webhook_secret_env, self.webhook_secret_file)
        except ValueError as exc:
            raise ValueError(f"webhook_secret: {exc}") from None
        if secret is not None:
            if not secret:
                raise ValueError("webhook_secret: the secret from _env/_file is empty")
            object.__setattr__(self, "webhook_secret", SecretStr(secret))
        return self


class StockPushSection(_WebhookSecret):
    """``[stock_push]``: stock levels from captured changes to the shops.

    Published quantity per SKU = sum over the SKU's rows (all configured tables, the listed
    warehouses) of ``on_hand_column`` - ``reserved_column`` - quantities on webshop orders not
    yet imported (``subtract_unimported_orders``) - ``safety_buffer``, never below 0::

        [stock_push]
        tables = ["public.stock"]
        sku_column = "sku"
        on_hand_column = "on_hand"
        reserved_column = "reserved"
        warehouse_column = "warehouse"
        warehouses = ["1", "2"]
        safety_buffer = 2
        exclude_skus = ["GIFT-*", "SAMPLE"]
        coalesce_seconds = 60
        rate_limit = 5
        reconcile_schedule = "@hourly"
    """

    enabled: bool = True
    table: str | None = None  # shorthand for tables = [table]
    tables: tuple[str, ...] = ()
    sku_column: str = "sku"
    on_hand_column: str = "qty"
    reserved_column: str | None = None
    warehouse_column: str | None = None
    warehouses: tuple[str, ...] = ()  # empty: every warehouse counts
    subtract_unimported_orders: bool = False
    safety_buffer: int = Field(default=0, ge=0)
    exclude_skus: tuple[str, ...] = ()  # exact SKUs or shell patterns (GIFT-*)
    shops: tuple[str, ...] = ()  # empty: every shop with REST access
    coalesce_seconds: float = Field(default=60.0, ge=0, le=86400)
    rate_limit: float = Field(default=5.0, gt=0, le=10_000)  # requests per second per shop
    burst: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=100, ge=1, le=100)
    reconcile_schedule: str = "@hourly"
    max_backoff: float = Field(default=300.0, gt=0, le=86400)
    progress_log_seconds: float = Field(default=10.0, gt=0)
    journal_batch: int = Field(default=5000, ge=1, le=1_000_000)

    @field_validator("sku_column", "on_hand_column", "reserved_column", "warehouse_column")
    @classmethod
    def _columns(cls, v: str | None) -> str | None:
        return _check_column(v)

    @field_validator("reconcile_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        try:
            sched = Schedule.from_text(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if sched.kind == "continuous":
            raise ValueError('a full reconcile cannot run continuously; use e.g. "@hourly"')
        return v

    @model_validator(mode="after")
    def _tables(self) -> StockPushSection:
        tables = list(self.tables)
        if self.table is not None:
            tables.insert(0, self.table)
        if not tables:
            raise ValueError('tables: name the stock table(s), e.g. tables = ["public.stock"]')
        try:
            checked = tuple(dict.fromkeys(_check_table(t) for t in tables))
        except ValueError as exc:
            raise ValueError(f"tables: {exc}") from None
        object.__setattr__(self, "tables", checked)
        object.__setattr__(self, "table", checked[0])
        return self


class InvoicePushSection(_WebhookSecret):
    """``[invoice_push]``: booked invoices' PDFs to the shop orders.

    An invoice row whose ``state_column`` equals ``booked_value`` gets its PDF attached once to
    the shop order with its e-number: from ``e_number_column`` of the invoice row, or via the ERP
    order (``order_column`` of the invoice → ``order_table``.``order_key_column``, whose
    ``order_e_number_column`` holds the e-number). The PDF comes from a file path
    (``pdf_source = "path"``, ``pdf_path`` a template over the row's columns), a URL
    (``pdf_source = "url"``, ``pdf_url``) or a bytea/blob column (``pdf_source = "column"``,
    ``pdf_column``)::

        [invoice_push]
        table = "public.invoices"
        number_column = "invoice_no"
        state_column = "status"
        booked_value = "booked"
        e_number_column = "e_number"
        pdf_source = "path"
        pdf_path = "/srv/erp/pdf/{invoice_no}.pdf"
        filename = "invoice-{invoice_no}.pdf"
    """

    enabled: bool = True
    table: str
    number_column: str = "invoice_no"
    state_column: str = "status"
    booked_value: str = "booked"
    e_number_column: str | None = None
    order_column: str | None = None
    order_table: str | None = None
    order_key_column: str = "id"
    order_e_number_column: str = "e_number"
    shop: str | None = None  # default: the only shop with REST access
    pdf_source: Literal["path", "url", "column"] = "path"
    pdf_path: str | None = None
    pdf_url: str | None = None
    pdf_column: str | None = None
    filename: str = "invoice-{number}.pdf"
    http_timeout: float = Field(default=30.0, gt=0, le=600)
    max_attempts: int = Field(default=10, ge=1, le=1000)
    retry_seconds: float = Field(default=300.0, ge=0, le=86400)
    rate_limit: float = Field(default=2.0, gt=0, le=10_000)
    burst: int = Field(default=5, ge=1, le=10_000)
    journal_batch: int = Field(default=1000, ge=1, le=1_000_000)

    @field_validator("table", "order_table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else _check_table(v)

    @field_validator(
        "number_column",
        "state_column",
        "e_number_column",
        "order_column",
        "order_key_column",
        "order_e_number_column",
        "pdf_column",
    )
    @classmethod
    def _columns(cls, v: str | None) -> str | None:
        return _check_column(v)

    @model_validator(mode="after")
    def _consistent(self) -> InvoicePushSection:
        if self.e_number_column is None and (self.order_column is None or self.order_table is None):
            raise ValueError(
                "say where the e-number is: e_number_column (a column of the invoice row), or "
                "order_column + order_table (+ order_key_column, order_e_number_column)"
            )
        need = {"path": "pdf_path", "url": "pdf_url", "column": "pdf_column"}[self.pdf_source]
        if getattr(self, need) is None:
            raise ValueError(f"{need}: required when pdf_source = {self.pdf_source!r}")
        return self
