"""Executes a plan mapping (:mod:`replicator.mappers.plan`): one order, one ERP transaction.

Invariant 2 ("one ERP order per e-number, ever") without touching the ERP's own tables: the
e-number is looked up in sync-daemon's link table (``sync_daemon_order_link`` by default,
primary key (shop, e-number)) inside the order's transaction, and the link row is the last row
the transaction writes. Two importers racing for one e-number both write, the second blocks on
the link key until the first commits, gets a unique violation, rolls everything back and reads
the winner's order. A unique violation anywhere else means a generated key or a unique ref was
taken meanwhile (an ERP user keyed in an order): the whole order is written again, up to
:data:`KEY_RETRIES` times.

:class:`PlanWriter` owns the engine, the transactions and that retry, and runs the parts in
order; each part owns one thing (:mod:`replicator.orders.plan`): the dialect's SQL, look-ups and
their cache, the ERP's numbering, expressions, rows and lines, the customer, the link table,
and the operations on an order already in the ERP. Lookups and the ERP's numbering run on the
order's connection, values are always bound, identifiers quoted per dialect.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import structlog

from replicator.errors_map import is_unique_violation
from replicator.mappers.orders import OrderRejected
from replicator.mappers.plan import PlanMapping
from replicator.orders.plan.customer import Customers
from replicator.orders.plan.erp_sql import ErpSql
from replicator.orders.plan.existing import ExistingOrders
from replicator.orders.plan.expressions import (
    Context,
    Functions,
    evaluate,
    order_context,
    order_functions,
)
from replicator.orders.plan.link import LinkTable
from replicator.orders.plan.lookups import ErpLookups, ReadCache
from replicator.orders.plan.numbering import Numbering
from replicator.orders.plan.rows import RowLog, RowWriter
from replicator.orders.writer import WriteResult

log = structlog.get_logger(__name__)

KEY_RETRIES = 3


class PlanWriter:
    """Writes orders with one plan mapping into one ERP; same contract as ``ErpWriter``."""

    def __init__(self, engine: sa.Engine, plan: PlanMapping) -> None:
        # READ COMMITTED on MariaDB too (PostgreSQL's default): after waiting for another
        # import of the same new customer, the next read must see the customer it created.
        self.engine = (
            engine.execution_options(isolation_level="READ COMMITTED")
            if plan.dialect == "mysql"
            else engine
        )
        self.m = plan
        self.sql = ErpSql(plan.dialect)
        cache = ReadCache(plan)
        self.lookups = ErpLookups(self.sql, plan, cache)
        self.numbering = Numbering(self.sql, cache)
        self.rows = RowWriter(self.sql, plan, self.numbering)
        self.customers = Customers(self.sql, plan, self.rows)
        self.link = LinkTable(self.sql, plan)
        self.existing = ExistingOrders(self.sql, plan, self.link)

    def prepare(self) -> None:
        """Create the link table (sync-daemon's own) unless it exists; the ERP's tables are left
        alone unless the mapping asks for an index on its e-number column."""
        with self.engine.begin() as conn:
            self.link.create(conn)
        dialect = self.engine.dialect
        version = getattr(dialect, "server_version_info", None) or ()
        self.rows.mariadb_returning = bool(getattr(dialect, "is_mariadb", False)) and tuple(
            version[:2]
        ) >= (10, 5)
        m, q = self.m, self.sql.q
        if not (m.e_number_index and m.e_number_column):
            return
        schema, _, table = m.header.table.rpartition(".")
        index = f"sync_{table}_{m.e_number_column}"[:60]
        existing = {ix["name"] for ix in sa.inspect(self.engine).get_indexes(table, schema or None)}
        if index in existing:
            return
        # Not unique: the ERP's users may enter the same reference twice (the link table is
        # what keeps one order per e-number). Partial where the dialect allows.
        where = f" WHERE {q(m.e_number_column)} IS NOT NULL" if self.sql.d != "mysql" else ""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE INDEX {q(index)} ON {self.sql.table(m.header.table)} "
                f"({q(m.e_number_column)}){where}"
            )
        log.info("e_number_index_created", table=m.header.table, column=m.e_number_column)

    # -- write once -----------------------------------------------------------------------------

    def write(
        self,
        shop: str,
        e_number: str,
        payload: Any,
        *,
        auto_invoice: bool = False,
        conn: sa.Connection | None = None,
    ) -> WriteResult:
        """Import one order once. Raises OrderRejected (nothing written) or a DB error."""
        for attempt in range(1, KEY_RETRIES + 1):
            try:
                if conn is None:
                    with self.engine.connect() as c:
                        return self._write_once(c, shop, e_number, payload, auto_invoice)
                return self._write_once(conn, shop, e_number, payload, auto_invoice)
            except sa.exc.IntegrityError as exc:
                if not is_unique_violation(exc):
                    raise
                with self.engine.connect() as c:
                    existing = self.link.find(c, shop, e_number)
                if existing is not None:
                    # A concurrent importer (or a second daemon) won the race for this e-number.
                    log.info("order_already_in_erp", e_number=e_number, order_number=existing[1])
                    return WriteResult(existing[1], created=False)
                if attempt == KEY_RETRIES:
                    raise
                # A generated key or unique ref was taken meanwhile (an ERP user keyed in an
                # order): the whole order is written again with fresh keys.
                log.warning("order_key_taken_retrying", e_number=e_number, attempt=attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _write_once(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> WriteResult:
        try:
            with conn.begin():
                return self._write(conn, shop, e_number, payload, auto_invoice)
        finally:
            self.customers.release_session_lock(conn)

    def _write(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> WriteResult:
        existing = self.link.find(conn, shop, e_number)
        if existing is not None:
            return WriteResult(existing[1], created=False)
        ctx, fns = self._start_order(conn, shop, e_number, payload, auto_invoice, None)
        lines = self._header_and_lines(conn, ctx, fns, None)
        key, number = self._key_and_number(ctx)
        self.link.insert(conn, shop, e_number, key, number)
        return WriteResult(number, created=True, lines=lines)

    def _start_order(
        self,
        conn: sa.Connection,
        shop: str,
        e_number: str,
        payload: Any,
        auto_invoice: bool,
        log_rows: RowLog | None,
    ) -> tuple[Context, Functions]:
        """The order's context and functions, with its customer and the plan's rows before the
        header written."""
        ctx = order_context(self.m, shop, e_number, payload, auto_invoice)
        fns = order_functions(self.m, self.lookups, self.numbering, conn)
        self.customers.resolve(conn, ctx, fns, log_rows)
        for step in self.m.rows:
            self.rows.row(conn, step, ctx, fns, log_rows)
        return ctx, fns

    def _header_and_lines(
        self, conn: sa.Connection, ctx: Context, fns: Functions, log_rows: RowLog | None
    ) -> int:
        """Write the order's header, then its lines; how many lines."""
        self.rows.row(conn, self.m.header, ctx, fns, log_rows)
        return self.rows.lines(conn, ctx, fns, log_rows)

    def _key_and_number(self, ctx: Context) -> tuple[str, str]:
        fns: Functions = {}
        key = evaluate("order.key", self.m.order_key, ctx, fns)
        number = evaluate("order.number", self.m.order_number, ctx, fns)
        if key is None:
            raise OrderRejected("order.key gave no value", "mapping")
        return str(key), str(number if number is not None else key)

    def dry_run(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> RowLog:
        """The rows the plan writes for this order, by table; written in a transaction that is
        rolled back (so generated keys and lookups are real, and nothing stays)."""
        rows: RowLog = {}
        trans = conn.begin()
        try:
            ctx, fns = self._start_order(conn, shop, e_number, payload, auto_invoice, rows)
            self._header_and_lines(conn, ctx, fns, rows)
        finally:
            trans.rollback()
            self.customers.release_session_lock(conn)
        return rows

    # -- after the import -----------------------------------------------------------------------

    def is_posted(self, conn: sa.Connection, e_number: str, shop: str | None = None) -> bool | None:
        """None when the ERP has no order with this e-number."""
        return self.existing.is_posted(conn, e_number, shop)

    def replace(
        self,
        shop: str,
        e_number: str,
        payload: Any,
        *,
        force: bool = False,
        auto_invoice: bool = False,
    ) -> WriteResult:
        """Re-import a changed order over its ERP order: header updated (the ERP's number kept),
        lines and their child rows deleted and written again, in one transaction."""
        with self.engine.connect() as conn:
            try:
                with conn.begin():
                    key, number = self.existing.lock_for_replace(conn, shop, e_number, force)
                    ctx, fns = self._start_order(conn, shop, e_number, payload, auto_invoice, None)
                    self.existing.update_header(conn, key, ctx, fns)
                    self.existing.delete_lines(conn, key)
                    lines = self.rows.lines(conn, ctx, fns, None)
            finally:
                self.customers.release_session_lock(conn)
        return WriteResult(number, created=False, lines=lines)

    def cancel(self, e_number: str, shop: str | None = None) -> str:
        """Cancel the ERP order with this e-number (the plan's ``order.cancel``); its number."""
        if not self.m.cancel_column:
            raise OrderRejected(f"{self.m.path}: order.cancel is not configured", "mapping")
        with self.engine.begin() as conn:
            return self.existing.cancel(conn, e_number, shop)

    def erp_e_numbers(self, shop: str | None = None) -> set[str]:
        """Every e-number in the link table (for one shop, or for all)."""
        with self.engine.connect() as conn:
            return self.link.e_numbers(conn, shop)
