"""What the invoice pusher reads about one invoice: its row (from the mirror, else straight from
the ERP), whether it is booked, the e-number of the order it belongs to, and its PDF (a file, a
URL, or a bytea/blob column). Problems a person must fix raise :class:`InvoiceFailure`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from replicator.config.push import InvoicePushSection
from replicator.errors import RetryableError
from replicator.staging import StagingStore, to_json


class InvoiceFailure(Exception):
    """An invoice that cannot be attached for a reason a person must fix (no PDF, no order)."""


def fmt(template: str, row: Mapping[str, Any]) -> str:
    """``template`` filled from ``row`` (None as empty)."""
    return template.format_map({k: "" if v is None else v for k, v in row.items()})


class InvoiceDocuments:
    """Invoice rows, e-numbers and PDFs for one invoice pusher."""

    def __init__(
        self,
        cfg: InvoicePushSection,
        store: StagingStore,
        erp: Callable[[], sa.Engine],
        base_dir: Path | None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._erp = erp
        self.base_dir = base_dir
        self._http: httpx.Client | None = None

    def mirror_row(self, table: str, where: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.store.mirror_rows.select(table, where)

    def erp_row(self, table: str, column: str, value: Any) -> dict[str, Any] | None:
        """One row straight from the ERP (all columns)."""
        schema, _, name = table.rpartition(".")
        t = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=self._erp())
        with self._erp().connect() as conn:
            row = conn.execute(sa.select(t).where(t.c[column] == value).limit(1)).fetchone()
        return dict(row._mapping) if row is not None else None

    def key_of(self, row: Mapping[str, Any]) -> str:
        info = self.store.catalog.find(self.cfg.table)
        keycols = list(info.schema.key) if info is not None else [self.cfg.number_column]
        return to_json([row[k] for k in keycols])

    def booked(self, row: Mapping[str, Any]) -> bool:
        v = row.get(self.cfg.state_column)
        if isinstance(v, bool):
            v = "true" if v else "false"
        return v is not None and str(v) == self.cfg.booked_value

    def invoice_row(self, key: str, number: str | None) -> dict[str, Any] | None:
        info = self.store.catalog.find(self.cfg.table)
        if info is not None:
            values = json.loads(key)
            row = self.mirror_row(self.cfg.table, dict(zip(info.schema.key, values, strict=True)))
            if row is not None:
                return row
        if number is not None:
            return self.erp_row(self.cfg.table, self.cfg.number_column, number)
        return None

    def e_number(self, row: Mapping[str, Any]) -> str:
        c = self.cfg
        if c.e_number_column is not None:
            v = row.get(c.e_number_column)
            if v not in (None, ""):
                return str(v)
            if c.order_column is None:
                raise InvoiceFailure(f"the invoice has no e-number ({c.e_number_column} is empty)")
        assert c.order_column is not None and c.order_table is not None
        order_id = row.get(c.order_column)
        if order_id in (None, ""):
            raise InvoiceFailure(f"the invoice names no ERP order ({c.order_column} is empty)")
        order = self.mirror_row(c.order_table, {c.order_key_column: order_id})
        if order is None:
            order = self.erp_row(c.order_table, c.order_key_column, order_id)
        if order is None:
            raise InvoiceFailure(f"ERP order {order_id} ({c.order_table}) not found")
        e = order.get(c.order_e_number_column)
        if e in (None, ""):
            raise InvoiceFailure(
                f"ERP order {order_id} has no e-number ({c.order_e_number_column} is empty): "
                "not a webshop order?"
            )
        return str(e)

    def pdf(self, row: Mapping[str, Any]) -> bytes:
        c = self.cfg
        if c.pdf_source == "column":
            assert c.pdf_column is not None
            data = row.get(c.pdf_column)
            if isinstance(data, memoryview):
                data = data.tobytes()
            if isinstance(data, str) and data.startswith("\\x"):
                data = bytes.fromhex(data[2:])
            if not data:
                raise InvoiceFailure(f"the invoice has no PDF ({c.pdf_column} is empty)")
            return bytes(data)
        if c.pdf_source == "path":
            assert c.pdf_path is not None
            path = Path(fmt(c.pdf_path, row))
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise InvoiceFailure(f"PDF not found: {path}") from None
            except OSError as exc:
                raise InvoiceFailure(f"cannot read PDF {path}: {exc.strerror}") from None
            if not data:
                raise InvoiceFailure(f"PDF is empty: {path}")
            return data
        assert c.pdf_url is not None
        url = fmt(c.pdf_url, row)
        if self._http is None:
            self._http = httpx.Client(timeout=c.http_timeout, follow_redirects=True)
        try:
            resp = self._http.get(url)
        except httpx.HTTPError as exc:
            raise RetryableError(f"cannot fetch PDF from {url}: {type(exc).__name__}") from None
        if resp.status_code == 404:
            raise InvoiceFailure(f"PDF not found: {url} answered 404")
        if resp.status_code >= 500:
            raise RetryableError(f"PDF server answered {resp.status_code} for {url}")
        if resp.status_code != 200 or not resp.content:
            raise InvoiceFailure(f"cannot fetch PDF: {url} answered {resp.status_code}")
        return resp.content

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
