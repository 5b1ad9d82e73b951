"""Config sections of the ERP-to-webshop pushers: ``[stock_push]`` and ``[invoice_push]``."""

from __future__ import annotations

from replicator.config.core import Section


class StockPushSection(Section):
    """``[stock_push]``: stock levels from captured changes to the shops."""

    table: str


class InvoicePushSection(Section):
    """``[invoice_push]``: booked invoices' PDFs to the shop orders."""

    table: str
