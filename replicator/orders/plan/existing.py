"""What is done to an order already in the ERP, found through the link table: is it posted
(booked, invoiced: the ERP's posted column), replace it (header updated, the ERP's number kept;
lines and their child rows deleted for writing again), cancel it (the cancel column set).

Each runs on a connection whose transaction the caller holds, so a replace is one transaction
from the header's row lock to the last new line.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from replicator.mappers.orders import is_posted_value
from replicator.mappers.plan import PlanMapping, RowStep
from replicator.orders.plan.erp_sql import ErpSql
from replicator.orders.plan.expressions import Context, Functions, column_value
from replicator.orders.plan.link import LinkTable
from replicator.orders.writer import NotInErp, OrderPosted


class ExistingOrders:
    """The header and lines of ERP orders the plan wrote before."""

    def __init__(self, sql: ErpSql, plan: PlanMapping, link: LinkTable) -> None:
        self.sql = sql
        self.m = plan
        self.link = link

    def _header_where(self) -> str:
        assert self.m.header.returning
        return f"WHERE {self.sql.q(self.m.header.returning)} = :key"

    def is_posted(self, conn: sa.Connection, e_number: str, shop: str | None = None) -> bool | None:
        """None when the ERP has no order with this e-number."""
        found = self.link.find(conn, shop, e_number)
        if found is None:
            return None
        m = self.m
        if not m.posted_column:
            return False
        row = self.sql.run(
            conn,
            f"SELECT {self.sql.q(m.posted_column)} FROM {self.sql.table(m.header.table)} "
            f"{self._header_where()}",
            {"key": found[0]},
        ).first()
        if row is None:
            return None  # deleted in the ERP
        return is_posted_value(row[0], m.posted_values)

    def lock_for_replace(
        self, conn: sa.Connection, shop: str, e_number: str, force: bool
    ) -> tuple[str, str]:
        """The ERP order's (key, number), its header row locked until the transaction ends;
        :class:`NotInErp` when there is none, :class:`OrderPosted` when it is posted (unless
        ``force``)."""
        found = self.link.find(conn, shop, e_number)
        if found is None:
            raise NotInErp(f"no ERP order has e-number {e_number!r}")
        key, number = found
        # Lock the header row: the ERP user and a second importer wait for us.
        self.sql.run(
            conn,
            f"SELECT 1 FROM {self.sql.table(self.m.header.table)} {self._header_where()} FOR UPDATE",
            {"key": key},
        )
        if not force and self.is_posted(conn, e_number, shop):
            raise OrderPosted(f"ERP order {number} is posted; use --force to replace it anyway")
        return key, number

    def update_header(self, conn: sa.Connection, key: str, ctx: Context, fns: Functions) -> None:
        """Update the header row ``key`` from the order; the row is bound as ``header`` in
        ``ctx`` for the lines."""
        m, sql = self.m, self.sql
        # Columns numbered by the ERP keep the number they got at import; columns set after
        # the insert ([header.after], e.g. Dolibarr's "(PROV<rowid>)") are set from the key.
        after = {r.column for r in m.header.after}
        rules = [
            r
            for r in m.header.rules
            if r.column not in after and (r.expr is None or "next_number" not in r.expr.source)
        ]
        values = {r.column: column_value(m, r, m.header.table, ctx, fns) for r in rules}
        assert m.header.returning
        ctx["header"] = {**values, m.header.returning: typed_key(key, m, m.header)}
        values.update(
            {r.column: column_value(m, r, m.header.table, ctx, fns) for r in m.header.after}
        )
        sets = ", ".join(f"{sql.q(c)} = :p{i}" for i, c in enumerate(values))
        sql.run(
            conn,
            f"UPDATE {sql.table(m.header.table)} SET {sets} {self._header_where()}",
            {**{f"p{i}": v for i, v in enumerate(values.values())}, "key": key},
        )
        ctx["header"] = {**values, m.header.returning: typed_key(key, m, m.header)}

    def delete_lines(self, conn: sa.Connection, key: str) -> None:
        """Delete the lines of header ``key`` and their child rows (children first)."""
        m, li, sql, q = self.m, self.m.lines, self.sql, self.sql.q
        assert li.parent_column and m.header.returning
        lines_of = (
            f"SELECT {q(li.returning or li.parent_column)} FROM "
            f"{sql.table(li.table)} WHERE {q(li.parent_column)} = :key"
        )
        for kid in li.children:
            if kid.parent_column and li.returning:
                if sql.d == "mysql":
                    ids = [r[0] for r in sql.run(conn, lines_of, {"key": key}).all()]
                    for i in ids:
                        sql.run(
                            conn,
                            f"DELETE FROM {sql.table(kid.table)} WHERE {q(kid.parent_column)} = :i",
                            {"i": i},
                        )
                else:
                    sql.run(
                        conn,
                        f"DELETE FROM {sql.table(kid.table)} "
                        f"WHERE {q(kid.parent_column)} IN ({lines_of})",
                        {"key": key},
                    )
        sql.run(
            conn,
            f"DELETE FROM {sql.table(li.table)} WHERE {q(li.parent_column)} = :key",
            {"key": key},
        )

    def cancel(self, conn: sa.Connection, e_number: str, shop: str | None = None) -> str:
        """Set the cancel column of the ERP order with this e-number; its number."""
        m = self.m
        assert m.cancel_column
        found = self.link.find(conn, shop, e_number)
        if found is None:
            raise NotInErp(f"no ERP order has e-number {e_number!r}")
        self.sql.run(
            conn,
            f"UPDATE {self.sql.table(m.header.table)} SET {self.sql.q(m.cancel_column)} = :v "
            f"{self._header_where()}",
            {"v": m.cancel_value, "key": found[0]},
        )
        return found[1]


def typed_key(key: str, m: PlanMapping, step: RowStep) -> Any:
    """The link table keeps keys as text; give integer key columns their integer back."""
    info = m.schema.get(step.table, {}).get(step.returning or "")
    if info is not None and info.kind == "int":
        return int(key)
    return key
