"""Config of the order import: ``[orders]`` (cycle, import criteria, retries, mapping files).

The section is parsed at the edge like every other one: frozen, typed, unknown keys rejected.
Criteria are given per shop name under ``[orders.criteria.<shop>]``; ``[orders.criteria.default]``
applies to every shop without its own entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from replicator.config.core import Section


class ImportCriteria(Section):
    """Which shop orders are imported; an order that does not qualify is skipped with the reason."""

    # Shop statuses that may be imported (compared case-insensitively).
    statuses: tuple[str, ...] = ("processing", "completed")
    # Where the status is in the order JSON: dotted paths, the first non-empty one wins (Shopify:
    # the financial status, "displayFinancialStatus" polled or "financial_status" by webhook;
    # Shopware: the payment's state, "transactions.0.stateMachineState.technicalName").
    status_fields: tuple[str, ...] = ("status",)
    # Optionally also the fulfilment/delivery state (empty: any); "" in the list admits orders
    # without one (Shopify's webhook sends null for "unfulfilled").
    fulfillment_statuses: tuple[str, ...] = ()
    fulfillment_fields: tuple[str, ...] = ()
    paid_only: bool = True
    # Dotted path in the order JSON that is set (non-empty, not false/0) once the order is paid.
    paid_field: str = "date_paid"
    # "immediate": import as soon as the criteria hold; "wait_for_invoice": also wait until the
    # shop has invoiced the order (``invoice_field`` set); "auto_invoice": import at once and let
    # the mapping see ``auto_invoice = true`` so the ERP invoices the order itself.
    mode: Literal["immediate", "wait_for_invoice", "auto_invoice"] = "immediate"
    invoice_field: str = "invoice_id"


class OrdersSection(Section):
    """``[orders]``: order import settings."""

    enabled: bool = False
    # Deprecated: when the import runs is ``[schedules] orders``. Set alone, it is read as
    # ``every Ns`` (see Config._one_orders_schedule); it also caps the retry backoff (x4).
    interval: float = Field(default=300.0, gt=0)
    # Each cycle asks for orders changed since the last successful cycle minus this many seconds,
    # so an order the shop committed late (clock skew, long transactions) is still seen.
    overlap: float = Field(default=600.0, ge=0)
    # The very first download of a shop looks back this many hours.
    first_lookback_hours: float = Field(default=24.0, gt=0)
    # Daily reconciliation sweep: re-read this many days of orders (safety net over webhooks).
    reconcile_days: float = Field(default=2.0, gt=0)
    reconcile_interval_hours: float = Field(default=24.0, gt=0)
    # The mapping file used for every shop, and optional per-shop overrides (paths resolve
    # against the config file's folder).
    mapping: str = "mappings/orders.toml"
    shop_mappings: dict[str, str] = Field(default_factory=dict)
    criteria: dict[str, ImportCriteria] = Field(default_factory=dict)
    # ERP writers working off one cycle's orders in parallel (each order is its own ERP
    # transaction; the number series row is locked only for the last statements of each).
    workers: int = Field(default=4, ge=1, le=32)
    # Transient failures (network, 5xx, 429, lock timeouts, lost ERP connection) are retried in
    # place with exponential backoff and jitter, then the order waits for the next cycle.
    retry_attempts: int = Field(default=4, ge=1, le=20)
    backoff_initial: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)
    # After this many consecutive failed cycles a shop's import stops ("cancelled: too many
    # consecutive errors") and is only probed every ``probe_interval_minutes``.
    max_consecutive_failures: int = Field(default=20, ge=1)
    probe_interval_minutes: float = Field(default=30.0, gt=0)
    # A changed order whose ERP order is not posted yet is re-imported automatically; otherwise
    # it waits in the updates queue for ``sync-daemon accept``.
    auto_apply_updates: bool = True
    # Payloads above this size are parked as failed (kept for inspection, never mapped).
    max_payload_bytes: int = Field(default=5_000_000, ge=1024)
    # Where a webhook payload keeps the e-number (first present field wins).
    e_number_fields: tuple[str, ...] = ("number", "increment_id", "id")
    # Create the unique index on the ERP e-number column at start-up when it is missing.
    create_e_number_index: bool = True

    @model_validator(mode="after")
    def _backoff_order(self) -> OrdersSection:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be >= backoff_initial")
        return self

    def criteria_for(self, shop: str) -> ImportCriteria:
        return self.criteria.get(shop) or self.criteria.get("default") or ImportCriteria()

    def mapping_for(self, shop: str) -> str:
        return self.shop_mappings.get(shop, self.mapping)
