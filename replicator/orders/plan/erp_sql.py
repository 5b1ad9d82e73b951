"""Statements on one ERP's dialect: identifiers quoted per dialect, values always bound.

Every part of the plan writer sends its SQL through here, so quoting and the driver's
placeholder style are decided once.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from replicator.mappers.orders import qident, qtable
from replicator.orders.writer import pyformat


class ErpSql:
    """Quotes names and runs statements (``:name`` placeholders) for one ERP dialect."""

    def __init__(self, dialect: str) -> None:
        self.d = dialect

    def q(self, name: str) -> str:
        """A column or index name, quoted."""
        return qident(name, self.d)

    def table(self, name: str) -> str:
        """A table name (``schema.table`` allowed), quoted."""
        return qtable(name, self.d)

    def run(self, conn: sa.Connection, sql: str, params: Any = None) -> sa.CursorResult[Any]:
        """Run ``sql`` with its values bound."""
        if self.d == "sqlite":
            return conn.execute(sa.text(sql), params or {})
        return conn.exec_driver_sql(pyformat(sql), params or {})
