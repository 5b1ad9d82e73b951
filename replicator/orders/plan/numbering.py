"""The ERP's own numbering: the next document number of a series (``next_number`` in
expressions: a sequence, a counter row, or Tryton's ``ir_sequence`` row naming a sequence), and,
on PostgreSQL, the keys of a step's rows taken from their sequence beforehand so they go in one
INSERT.

Numbers are taken on the order's connection: a counter row stays locked until the order commits,
so concurrent importers never get the same number.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from replicator.mappers.orders import OrderRejected
from replicator.mappers.plan import NumberSpec, RowStep
from replicator.orders.plan.erp_sql import ErpSql
from replicator.orders.plan.lookups import ReadCache


class Numbering:
    """Takes numbers and keys from the ERP for one plan."""

    def __init__(self, sql: ErpSql, cache: ReadCache) -> None:
        self.sql = sql
        self.cache = cache

    def next_number(self, conn: sa.Connection, n: NumberSpec, now: datetime) -> str:
        """The next number of series ``n``, with its prefix (date placeholders filled) and width."""
        sql, d = self.sql, self.sql.d
        prefix, width = n.prefix, n.width
        if n.kind == "sequence":
            assert n.sequence
            if d == "postgresql":
                value = sql.run(conn, "SELECT nextval(:s)", {"s": sql.table(n.sequence)}).scalar()
            else:
                value = sql.run(conn, f"SELECT NEXTVAL({sql.table(n.sequence)})").scalar()
        elif n.kind == "row_sequence":
            assert n.table and n.key_column
            extra = [c for c in (n.prefix_column, n.width_column) if c]
            sel = ", ".join(sql.q(c) for c in [n.id_column, *extra])

            def load() -> Any:
                return sql.run(
                    conn,
                    f"SELECT {sel} FROM {sql.table(n.table or '')} "
                    f"WHERE {sql.q(n.key_column or '')} = :k",
                    {"k": n.series_key},
                ).first()

            row = self.cache.get(("number", n.key), load)
            if row is None:
                raise OrderRejected(f"{n.key}: no row {n.series_key!r} in {n.table}", "mapping")
            rest = list(row[1:])
            if n.prefix_column:
                prefix = rest.pop(0) or ""
            if n.width_column:
                width = int(rest.pop(0) or 0)
            value = sql.run(
                conn, "SELECT nextval(:s)", {"s": sql.q(f"{n.sequence_prefix}{row[0]}")}
            ).scalar()
        else:
            assert n.table and n.key_column and n.value_column
            t, kc, vc = sql.table(n.table), sql.q(n.key_column), sql.q(n.value_column)
            # The row lock serialises concurrent importers on this counter until commit.
            row = sql.run(
                conn, f"SELECT {vc} FROM {t} WHERE {kc} = :k FOR UPDATE", {"k": n.series_key}
            ).first()
            if row is None:
                raise OrderRejected(f"{n.key}: no row {n.series_key!r} in {n.table}", "mapping")
            value = row[0]
            sql.run(conn, f"UPDATE {t} SET {vc} = {vc} + 1 WHERE {kc} = :k", {"k": n.series_key})
        if value is None:
            raise OrderRejected(f"{n.key}: the ERP's numbering returned no value", "mapping")
        # Tryton-style date placeholders in a prefix.
        prefix = (
            str(prefix)
            .replace("${year}", f"{now:%Y}")
            .replace("${month}", f"{now:%m}")
            .replace("${day}", f"{now:%d}")
        )
        return f"{prefix}{str(int(value)).zfill(width)}"

    def take_keys(self, conn: sa.Connection, step: RowStep, n: int) -> list[Any] | None:
        """PostgreSQL: ``n`` keys from the sequence behind ``step``'s key column (serial or
        identity), so its rows go in one INSERT; None where that does not apply."""
        sql = self.sql
        if sql.d != "postgresql" or not step.returning or step.match or step.after:
            return None

        def load() -> Any:
            seq = sql.run(
                conn,
                "SELECT pg_get_serial_sequence(:t, :c)",
                {"t": sql.table(step.table), "c": step.returning},
            ).scalar()
            return seq or ""  # "" (no sequence) is cached too: it does not change

        seq = self.cache.get(("sequence", step.table, step.returning), load)
        if not seq:
            return None
        rows = sql.run(
            conn, "SELECT nextval(:s) FROM generate_series(1, :n)", {"s": seq, "n": n}
        ).all()
        return sorted(r[0] for r in rows)
