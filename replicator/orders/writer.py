"""Write-once of one order into the ERP: header, lines and customer in ONE ERP transaction.

Invariant 2 of the design ("one ERP order per e-number, ever") lives here:

* inside the ERP transaction the e-number is looked up first (``FOR UPDATE``); when the ERP already
  has it — e.g. the daemon crashed after the ERP commit but before the ledger noted it — the
  existing ERP order number is returned and nothing is written;
* a unique index on the e-number column (:func:`ensure_e_number_index`) backs that check against a
  concurrent writer: the losing transaction gets a unique violation, rolls back, and reads the
  winner's order number;
* the ERP order number is taken from the ERP's number series inside the same transaction (a
  sequence, or the series row locked with ``SELECT ... FOR UPDATE``), so a rolled-back import
  leaves no hole and two importers never share a number.

Identifiers come from the validated mapping and are quoted with sqlglot for the ERP dialect; every
value is a bound parameter. Works on PostgreSQL and MariaDB through SQLAlchemy Core.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.errors import RetryableError
from replicator.errors_map import is_unique_violation
from replicator.mappers.orders import (
    Lookups,
    MappedOrder,
    OrderMapping,
    OrderRejected,
    SeriesSpec,
    is_posted_value,
    map_order,
    qident,
    qtable,
)

log = structlog.get_logger(__name__)


class ErpUnavailable(RetryableError):
    """The ERP could not be reached or asked us to retry (lock timeout, deadlock...)."""


class OrderPosted(Exception):
    """The ERP order was posted/invoiced; replacing it needs ``--force``."""


class NotInErp(Exception):
    """No ERP order carries this e-number."""


@dataclass(frozen=True)
class WriteResult:
    order_number: str
    created: bool
    lines: int = 0


_PLACEHOLDER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def pyformat(sql: str) -> str:
    # Identifiers are plain names (checked at load) and values never appear in the text, so a
    # literal % can only come from here; escape it anyway for the driver.
    return _PLACEHOLDER.sub(r"%(\1)s", sql.replace("%", "%%"))


def db_message(exc: BaseException) -> str:
    """The first line of a driver error, without SQL or parameters (they may hold personal data)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return text[:300]


class ErpWriter:
    """Writes orders with one mapping into one ERP (engine from ``replicator.db.make_engine``)."""

    def __init__(self, engine: sa.Engine, mapping: OrderMapping) -> None:
        self.engine = engine
        self.m = mapping
        self.d = mapping.dialect
        self.lock = " FOR UPDATE" if self.d in ("postgresql", "mysql") else ""
        q, t = self._q, qtable(mapping.header_table, self.d)
        self._find_sql = (
            f"SELECT {q(mapping.order_number_column)} FROM {t} "
            f"WHERE {q(mapping.e_number_column)} = :e{self.lock}"
        )
        self._find_plain_sql = (
            f"SELECT {q(mapping.order_number_column)} FROM {t} "
            f"WHERE {q(mapping.e_number_column)} = :e"
        )
        self.item_cache: dict[str, Any] = {}
        self.unique_e_number = has_unique_index(engine, mapping)

    def _q(self, name: str) -> str:
        return qident(name, self.d)

    def _run(self, conn: sa.Connection, sql: str, params: Any = None) -> sa.CursorResult[Any]:
        """Execute ``sql`` (``:name`` placeholders, values always bound).

        psycopg and PyMySQL both take ``%(name)s``; going straight to the driver skips
        SQLAlchemy's per-statement compile, which is most of the CPU of an import.
        """
        if self.d == "sqlite":
            return conn.execute(sa.text(sql), params or {})
        return conn.exec_driver_sql(pyformat(sql), params or {})

    # -- lookups --------------------------------------------------------------------------------

    def find_order(self, conn: sa.Connection, e_number: str, lock: bool = True) -> str | None:
        """The ERP order number of an e-number; ``lock`` also locks that header row."""
        sql = self._find_sql if lock else self._find_plain_sql
        row = self._run(conn, sql, {"e": self.m.e_number_prefix + e_number}).first()
        return None if row is None else str(row[0])

    def lock_series(self, conn: sa.Connection, s: SeriesSpec) -> None:
        """Lock a number-series row until the transaction ends (no-op for sequences)."""
        if s.sequence or not (s.table and s.key_column and s.value_column) or not self.lock:
            return
        self._run(
            conn,
            f"SELECT {self._q(s.value_column)} FROM {qtable(s.table, self.d)} "
            f"WHERE {self._q(s.key_column)} = :k{self.lock}",
            {"k": s.series_key},
        )

    def lookups(self, conn: sa.Connection) -> Lookups:
        m = self.m

        def find_item(sku: str) -> Any:
            if sku in self.item_cache:
                return self.item_cache[sku]
            if not (m.items_table and m.sku_column and m.item_column):
                return None
            row = self._run(
                conn,
                f"SELECT {self._q(m.item_column)} FROM {qtable(m.items_table, self.d)} "
                f"WHERE {self._q(m.sku_column)} = :s",
                {"s": sku},
            ).first()
            # The ERP's own value and type: an integer item key stays an integer.
            found = None if row is None else row[0]
            # Only hits are cached across orders: a missing item may be created any moment.
            if found is not None:
                self.item_cache[sku] = found
            return found

        return Lookups(m, find_item)

    def next_number(self, conn: sa.Connection, s: SeriesSpec) -> str:
        """Take the next number of a series inside the caller's transaction."""
        if s.sequence:
            if self.d == "postgresql":
                value = self._run(
                    conn, "SELECT nextval(:s)", {"s": qtable(s.sequence, self.d)}
                ).scalar()
            else:
                value = self._run(conn, f"SELECT NEXTVAL({qtable(s.sequence, self.d)})").scalar()
            prefix = s.prefix
        else:
            assert s.table and s.key_column and s.value_column
            t, kc, vc = qtable(s.table, self.d), self._q(s.key_column), self._q(s.value_column)
            pc = f", {self._q(s.prefix_column)}" if s.prefix_column else ""
            # The row lock serialises concurrent importers on this series until commit/rollback.
            if self.d == "postgresql":
                # One round trip: UPDATE takes the row lock and RETURNING hands out the number.
                row = self._run(
                    conn,
                    f"UPDATE {t} SET {vc} = {vc} + 1 WHERE {kc} = :k RETURNING {vc} - 1{pc}",
                    {"k": s.series_key},
                ).first()
            else:
                row = self._run(
                    conn,
                    f"SELECT {vc}{pc} FROM {t} WHERE {kc} = :k{self.lock}",
                    {"k": s.series_key},
                ).first()
            if row is None:
                raise OrderRejected(
                    f"number series {s.series_key!r} is missing in {s.table}", "mapping"
                )
            values = tuple(row)
            value = values[0]
            prefix = (values[1] or "") if s.prefix_column else s.prefix
            if self.d != "postgresql":
                self._run(
                    conn, f"UPDATE {t} SET {vc} = {vc} + 1 WHERE {kc} = :k", {"k": s.series_key}
                )
        if value is None:
            raise OrderRejected(f"number series {s.key} returned no value", "mapping")
        return f"{prefix}{str(int(value)).zfill(s.width)}"

    def _insert(self, conn: sa.Connection, table: str, rows: list[dict[str, Any]]) -> None:
        """One multi-row INSERT (one round trip for all lines of an order)."""
        if rows:
            self._run(conn, *multi_row_insert(table, rows, self.d))

    def _match_customer(self, conn: sa.Connection, mapped: MappedOrder, lock: bool) -> str | None:
        ref, c = mapped.customer, self.m.customer
        assert ref is not None and c is not None
        t, nc = qtable(c.table, self.d), self._q(c.number_column)
        suffix = self.lock if lock else ""
        for how in c.match:
            row = None
            if how == "number" and ref.number:
                row = self._run(
                    conn, f"SELECT {nc} FROM {t} WHERE {nc} = :n{suffix}", {"n": ref.number}
                ).first()
            elif how == "email" and ref.email and c.email_column:
                ec = self._q(c.email_column)
                # MariaDB's default collation already compares case-insensitively (and can use
                # the index); PostgreSQL needs lower() (the sample schema indexes lower(email)).
                cond = f"lower({ec}) = :e" if self.d != "mysql" else f"{ec} = :e"
                row = self._run(
                    conn,
                    f"SELECT {nc} FROM {t} WHERE {cond} ORDER BY {nc}{suffix}",
                    {"e": ref.email.lower()},
                ).first()
            if row is not None:
                return str(row[0])
        return None

    def _resolve_customer(self, conn: sa.Connection, mapped: MappedOrder) -> str | None:
        ref, c = mapped.customer, self.m.customer
        if ref is None or c is None:
            return None
        if ref.guest:
            return c.guest
        found = self._match_customer(conn, mapped, lock=False)
        if found is not None:
            return found
        if not c.create:
            who = ref.email or ref.number
            raise OrderRejected(
                f"customer {who!r} is not in the ERP and customer.create is false", "mapping"
            )
        if c.series is not None:
            # Two orders of one new customer may be imported at once: whoever holds the customer
            # series row looks again (a locking read sees the latest commit), so only one
            # creates the customer.
            self.lock_series(conn, c.series)
            found = self._match_customer(conn, mapped, lock=True)
            if found is not None:
                return found
        if "number" in c.match and ref.number:
            number = ref.number
        else:
            assert c.series is not None
            number = self.next_number(conn, c.series)
        row_values = dict(ref.columns)
        row_values[c.number_column] = number
        if c.email_column and ref.email:
            row_values[c.email_column] = ref.email
        self._insert(conn, c.table, [row_values])
        return number

    # -- write once -----------------------------------------------------------------------------

    def map(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> MappedOrder:
        return map_order(
            self.m,
            payload,
            shop=shop,
            e_number=e_number,
            lookups=self.lookups(conn),
            auto_invoice=auto_invoice,
        )

    def write(
        self,
        shop: str,
        e_number: str,
        payload: Any,
        *,
        auto_invoice: bool = False,
        conn: sa.Connection | None = None,
    ) -> WriteResult:
        """Import one order once. Raises OrderRejected (nothing written) or a DB error.

        ``conn``: a connection the caller keeps across orders (a worker's), saving a pool
        checkout per order; each order is still its own transaction on it.
        """
        try:
            if conn is None:
                with self.engine.begin() as c:
                    return self._write(c, shop, e_number, payload, auto_invoice)
            with conn.begin():
                return self._write(conn, shop, e_number, payload, auto_invoice)
        except sa.exc.IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            # A concurrent importer (or a second daemon) won the race for this e-number.
            with self.engine.connect() as c:
                existing = self.find_order(c, e_number, lock=False)
            if existing is None:
                raise
            log.info("order_already_in_erp", e_number=e_number, order_number=existing)
            return WriteResult(existing, created=False)

    def _write(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> WriteResult:
        # Without a unique index on the e-number, lock the number series row first:
        # importers serialise there, so the check below sees every order committed
        # before us. With the index, the series row is locked only for the last few
        # statements (more throughput) and the index settles a race. The check itself
        # is a plain read: on InnoDB a locking read of a missing key takes a gap lock,
        # and two such gap locks deadlock on insert.
        if not self.unique_e_number:
            self.lock_series(conn, self.m.order_series)
        existing = self.find_order(conn, e_number, lock=False)
        if existing is not None:
            return WriteResult(existing, created=False)
        mapped = self.map(conn, shop, e_number, payload, auto_invoice)
        header = dict(mapped.header)
        customer = self._resolve_customer(conn, mapped)
        if self.m.customer_column and customer is not None:
            header[self.m.customer_column] = customer
        # The order series row is locked last (with the index) or first (without):
        # either way the lock order never varies, so importers cannot deadlock on it.
        order_no = self.next_number(conn, self.m.order_series)
        header[self.m.order_number_column] = order_no
        self._insert(conn, self.m.header_table, [header])
        lines = [{**ln, self.m.lines_order_column: order_no} for ln in mapped.lines]
        self._insert(conn, self.m.lines_table, lines)
        return WriteResult(order_no, created=True, lines=len(lines))

    def is_posted(self, conn: sa.Connection, e_number: str) -> bool | None:
        """None when the ERP has no order with this e-number."""
        m = self.m
        t = qtable(m.header_table, self.d)
        if not m.posted_column:
            row = self._run(
                conn,
                f"SELECT 1 FROM {t} WHERE {self._q(m.e_number_column)} = :e",
                {"e": m.e_number_prefix + e_number},
            ).first()
            return None if row is None else False
        row = self._run(
            conn,
            f"SELECT {self._q(m.posted_column)} FROM {t} WHERE {self._q(m.e_number_column)} = :e",
            {"e": m.e_number_prefix + e_number},
        ).first()
        if row is None:
            return None
        return is_posted_value(row[0], m.posted_values)

    def replace(
        self,
        shop: str,
        e_number: str,
        payload: Any,
        *,
        force: bool = False,
        auto_invoice: bool = False,
    ) -> WriteResult:
        """Re-import a changed order over its ERP order: same number, header updated, lines
        deleted and reinserted, all in one transaction. Refuses a posted order unless ``force``."""
        m = self.m
        with self.engine.begin() as conn:
            order_no = self.find_order(conn, e_number)  # locks the header row
            if order_no is None:
                raise NotInErp(f"no ERP order has e-number {e_number!r}")
            if not force and self.is_posted(conn, e_number):
                raise OrderPosted(
                    f"ERP order {order_no} is posted; use --force to replace it anyway"
                )
            mapped = self.map(conn, shop, e_number, payload, auto_invoice)
            header = dict(mapped.header)
            customer = self._resolve_customer(conn, mapped)
            if m.customer_column and customer is not None:
                header[m.customer_column] = customer
            header.pop(m.e_number_column, None)
            cols = list(header)
            if cols:
                sets = ", ".join(f"{self._q(c)} = :p{i}" for i, c in enumerate(cols))
                params = {f"p{i}": header[c] for i, c in enumerate(cols)}
                self._run(
                    conn,
                    f"UPDATE {qtable(m.header_table, self.d)} SET {sets} "
                    f"WHERE {self._q(m.order_number_column)} = :order_no",
                    {**params, "order_no": order_no},
                )
            self._run(
                conn,
                f"DELETE FROM {qtable(m.lines_table, self.d)} "
                f"WHERE {self._q(m.lines_order_column)} = :o",
                {"o": order_no},
            )
            lines = [{**ln, m.lines_order_column: order_no} for ln in mapped.lines]
            self._insert(conn, m.lines_table, lines)
            return WriteResult(order_no, created=False, lines=len(lines))

    def cancel(self, e_number: str) -> str:
        """Mark the ERP order cancelled as the mapping says (``header.cancel``)."""
        m = self.m
        if not m.cancel_column:
            raise OrderRejected(f"{m.path}: header.cancel is not configured", "mapping")
        with self.engine.begin() as conn:
            order_no = self.find_order(conn, e_number)
            if order_no is None:
                raise NotInErp(f"no ERP order has e-number {e_number!r}")
            self._run(
                conn,
                f"UPDATE {qtable(m.header_table, self.d)} SET {self._q(m.cancel_column)} = :v "
                f"WHERE {self._q(m.order_number_column)} = :o",
                {"v": m.cancel_value, "o": order_no},
            )
            return order_no

    def erp_e_numbers(self) -> set[str]:
        m = self.m
        with self.engine.connect() as conn:
            rows = self._run(
                conn,
                f"SELECT {self._q(m.e_number_column)} FROM {qtable(m.header_table, self.d)} "
                f"WHERE {self._q(m.e_number_column)} IS NOT NULL",
            )
            p = m.e_number_prefix
            # Only this shop's orders when e-numbers carry a per-shop prefix.
            return {str(r[0])[len(p) :] for r in rows if str(r[0]).startswith(p)}


def multi_row_insert(
    table: str, rows: list[dict[str, Any]], dialect: str
) -> tuple[str, dict[str, Any]]:
    """One INSERT for rows with the same columns: the statement (``:name`` placeholders) and
    its bound values."""
    cols = list(rows[0])
    values = ", ".join(
        "(" + ", ".join(f":p{r}_{i}" for i in range(len(cols))) + ")" for r in range(len(rows))
    )
    sql = (
        f"INSERT INTO {qtable(table, dialect)} ({', '.join(qident(c, dialect) for c in cols)}) "
        f"VALUES {values}"
    )
    params = {f"p{r}_{i}": row[c] for r, row in enumerate(rows) for i, c in enumerate(cols)}
    return sql, params


def has_unique_index(engine: sa.Engine, mapping: OrderMapping) -> bool:
    """Whether the ERP enforces one header row per e-number."""
    insp = sa.inspect(engine)
    schema, _, table = mapping.header_table.rpartition(".")
    col = mapping.e_number_column
    for ix in insp.get_indexes(table, schema=schema or None):
        if ix.get("unique") and list(ix["column_names"]) == [col]:
            return True
    for uc in insp.get_unique_constraints(table, schema=schema or None):
        if list(uc["column_names"]) == [col]:
            return True
    return False


def ensure_e_number_index(engine: sa.Engine, mapping: OrderMapping) -> bool:
    """Create a unique index on the e-number column unless one exists. True when created."""
    if has_unique_index(engine, mapping):
        return False
    table = mapping.header_table.rpartition(".")[2]
    col = mapping.e_number_column
    name = qident(f"sync_{table}_{col}"[:60], mapping.dialect)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE UNIQUE INDEX {name} ON {qtable(mapping.header_table, mapping.dialect)} "
                f"({qident(col, mapping.dialect)})"
            )
    except sa.exc.IntegrityError as exc:
        # Existing duplicates (or no rights): import still works, serialised on the number
        # series row instead; a person should look at the duplicates.
        log.error(
            "e_number_index_not_created",
            table=mapping.header_table,
            column=col,
            error=db_message(exc),
            hint="the ERP already has duplicate e-numbers",
        )
        return False
    except sa.exc.DBAPIError as exc:
        log.error(
            "e_number_index_not_created",
            table=mapping.header_table,
            column=col,
            error=db_message(exc),
        )
        return False
    log.info("e_number_index_created", table=mapping.header_table, column=col)
    return True
