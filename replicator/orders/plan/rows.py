"""The rows a plan writes for one order: each step's row evaluated, then inserted (its generated
key read back and bound for later steps), matched to an existing row, or collected for one
multi-row INSERT; and the order's lines with their child rows (taxes, discounts).

Generated keys come back with ``RETURNING`` (PostgreSQL, SQLite, MariaDB 10.5+) or the driver's
last insert id (MySQL); rows written later refer to them through the step names
(``header.id``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from replicator.mappers.orders import OrderRejected
from replicator.mappers.plan import PlanMapping, RowStep
from replicator.orders.plan.erp_sql import ErpSql
from replicator.orders.plan.expressions import Context, Functions, column_value, evaluate
from replicator.orders.plan.numbering import Numbering
from replicator.orders.writer import multi_row_insert

RowLog = dict[str, list[dict[str, Any]]]
"""The rows written, by table (what ``dry_run`` shows)."""


class RowWriter:
    """Writes the rows of a plan's steps on the order's connection."""

    def __init__(self, sql: ErpSql, plan: PlanMapping, numbering: Numbering) -> None:
        self.sql = sql
        self.m = plan
        self.numbering = numbering
        # MariaDB 10.5+ has INSERT ... RETURNING; set by PlanWriter.prepare() from the server.
        self.mariadb_returning = False

    def insert(
        self, conn: sa.Connection, table: str, values: dict[str, Any], returning: str | None
    ) -> Any:
        """Insert one row; its ``returning`` column's generated value, or None."""
        sql, q = self.sql, self.sql.q
        cols = list(values)
        stmt = (
            f"INSERT INTO {sql.table(table)} ({', '.join(q(c) for c in cols)}) "
            f"VALUES ({', '.join(f':p{i}' for i in range(len(cols)))})"
        )
        params = {f"p{i}": values[c] for i, c in enumerate(cols)}
        if returning is None:
            sql.run(conn, stmt, params)
            return None
        if sql.d == "mysql" and not self.mariadb_returning:
            # MySQL has no INSERT ... RETURNING: the AUTO_INCREMENT key (LAST_INSERT_ID()).
            return sql.run(conn, stmt, params).lastrowid
        return sql.run(conn, f"{stmt} RETURNING {q(returning)}", params).scalar()

    def match(self, conn: sa.Connection, step: RowStep, values: dict[str, Any]) -> Any:
        """The key of an existing row equal to ``values`` in ``step.match``'s columns, or None."""
        sql, q = self.sql, self.sql.q
        same = {"mysql": "<=>", "postgresql": "IS NOT DISTINCT FROM", "sqlite": "IS"}[sql.d]
        where = " AND ".join(f"{q(c)} {same} :m{i}" for i, c in enumerate(step.match))
        row = sql.run(
            conn,
            f"SELECT {q(step.returning or step.match[0])} FROM {sql.table(step.table)} "
            f"WHERE {where} LIMIT 1",
            {f"m{i}": values.get(c) for i, c in enumerate(step.match)},
        ).first()
        return None if row is None else row[0]

    def row(
        self,
        conn: sa.Connection,
        step: RowStep,
        ctx: Context,
        fns: Functions,
        log_rows: RowLog | None,
        defer: list[dict[str, Any]] | None = None,
        key: Any = None,
    ) -> dict[str, Any] | None:
        """Write (or match) one row of ``step``; the row, with its key, is bound in ``ctx``.
        ``defer``: a row nothing refers to, or whose key was taken beforehand (``key``), is
        collected there for one multi-row INSERT."""
        sql, q = self.sql, self.sql.q
        if step.when is not None and not evaluate(f"{step.key}.when", step.when, ctx, fns):
            return None
        values = {r.column: column_value(self.m, r, step.table, ctx, fns) for r in step.rules}
        if key is not None and step.returning:
            values[step.returning] = key
        if (
            defer is not None
            and not (step.match or step.after)
            and (not step.returning or key is not None)
        ):
            defer.append(values)
            ctx[step.name] = values
            if log_rows is not None:
                log_rows.setdefault(step.table, []).append(values)
            return values
        if step.match:
            found = self.match(conn, step, values)
            if found is not None:
                row = {**values, step.returning or step.match[0]: found}
                ctx[step.name] = row
                return row
        key = self.insert(conn, step.table, values, step.returning)
        row = dict(values)
        if step.returning:
            row[step.returning] = key
        ctx[step.name] = row
        if step.after and step.returning:
            upd = {r.column: column_value(self.m, r, step.table, ctx, fns) for r in step.after}
            sets = ", ".join(f"{q(c)} = :u{i}" for i, c in enumerate(upd))
            sql.run(
                conn,
                f"UPDATE {sql.table(step.table)} SET {sets} WHERE {q(step.returning)} = :key",
                {**{f"u{i}": v for i, v in enumerate(upd.values())}, "key": key},
            )
            row.update(upd)
        if log_rows is not None:
            log_rows.setdefault(step.table, []).append(row)
        return row

    def lines(
        self, conn: sa.Connection, ctx: Context, fns: Functions, log_rows: RowLog | None
    ) -> int:
        """Write the order's lines and their child rows; how many lines. Rejects an order
        without lines, naming the line that failed."""
        li = self.m.lines
        assert li.source is not None
        source = evaluate("lines.source", li.source, ctx, fns)
        if not isinstance(source, list) or not source:
            raise OrderRejected(f"order has no lines ({li.source.source} is empty or missing)")
        # Child rows nothing refers to (taxes) go in one INSERT per child step, after the lines;
        # the lines too, when their keys can be taken from their sequence beforehand.
        pending: dict[str, list[dict[str, Any]]] = {kid.key: [] for kid in li.children}
        keys = self.numbering.take_keys(conn, li, len(source))
        line_rows: list[dict[str, Any]] = []
        for i, item in enumerate(source, start=1):
            if not isinstance(item, dict):
                raise OrderRejected(f"line {i} is not a JSON object")
            lctx = {**ctx, li.alias: item, f"{li.alias}_no": i, "line_no": i}
            try:
                if keys:
                    self.row(conn, li, lctx, fns, log_rows, line_rows, keys[i - 1])
                else:
                    self.row(conn, li, lctx, fns, log_rows)
                for kid in li.children:
                    assert kid.source is not None
                    elems = evaluate(f"{kid.key}.source", kid.source, lctx, fns)
                    for j, el in enumerate(elems or [], start=1):
                        kctx = {**lctx, kid.alias: el, f"{kid.alias}_no": j}
                        self.row(conn, kid, kctx, fns, log_rows, pending[kid.key])
            except OrderRejected as e:
                raise OrderRejected(f"line {i}: {e.reason}", e.kind) from None
        for table, rows in [(li.table, line_rows)] + [
            (k.table, pending[k.key]) for k in li.children
        ]:
            # One statement per column set (a `when` may leave columns out of some rows).
            by_cols: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for r in rows:
                by_cols.setdefault(tuple(r), []).append(r)
            for group in by_cols.values():
                self.sql.run(conn, *multi_row_insert(table, group, self.sql.d))
        return len(source)
