"""Executes a plan mapping (:mod:`replicator.mappers.plan`): one order, one ERP transaction.

Invariant 2 ("one ERP order per e-number, ever") without touching the ERP's own tables: the
e-number is looked up in sync-daemon's link table (``sync_daemon_order_link`` by default,
primary key (shop, e-number)) inside the order's transaction, and the link row is the last row
the transaction writes. Two importers racing for one e-number both write, the second blocks on
the link key until the first commits, gets a unique violation, rolls everything back and reads
the winner's order. A unique violation anywhere else means a generated key or a unique ref was
taken meanwhile (an ERP user keyed in an order): the whole order is written again, up to
:data:`KEY_RETRIES` times.

Generated keys come back with ``RETURNING`` (PostgreSQL, SQLite) or the driver's last insert id
(MariaDB); rows written later refer to them through the step names (``header.id``). Lookups and
the ERP's numbering run on the order's connection, values are always bound, identifiers quoted
per dialect.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.errors_map import is_unique_violation
from replicator.mappers import expr as ex
from replicator.mappers.orders import (
    ColumnRule,
    OrderRejected,
    _coerce,
    _present,
    _short,
    is_posted_value,
    map_value,
    qident,
    qtable,
)
from replicator.mappers.plan import NumberSpec, PlanMapping, RowStep
from replicator.orders.writer import (
    ErpUnavailable,
    NotInErp,
    OrderPosted,
    WriteResult,
    _pyformat,
    multi_row_insert,
)

log = structlog.get_logger(__name__)

KEY_RETRIES = 3


def link_table_sql(plan: PlanMapping) -> str:
    """The statement creating sync-daemon's link table (also printed in docs/erp-profiles.md)."""
    t = qtable(plan.link_table, plan.dialect)
    ts = "timestamp" if plan.dialect != "mysql" else "datetime"
    return (
        f"CREATE TABLE IF NOT EXISTS {t} ("
        "shop varchar(100) NOT NULL, "
        "e_number varchar(200) NOT NULL, "
        "erp_key varchar(100) NOT NULL, "
        "erp_number varchar(100), "
        f"imported_at {ts} NOT NULL DEFAULT CURRENT_TIMESTAMP, "
        "PRIMARY KEY (shop, e_number))"
    )


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
        self.d = plan.dialect
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._mariadb_returning = False  # MariaDB 10.5+ has INSERT ... RETURNING (prepare())
        self._session_locks = threading.local()  # MariaDB: a named lock to release after commit
        lt = qtable(plan.link_table, self.d)
        self._link_find = f"SELECT erp_key, erp_number FROM {lt} WHERE shop = :s AND e_number = :e"
        self._link_any = f"SELECT erp_key, erp_number FROM {lt} WHERE e_number = :e"
        self._link_insert = (
            f"INSERT INTO {lt} (shop, e_number, erp_key, erp_number) VALUES (:s, :e, :k, :n)"
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _q(self, name: str) -> str:
        return qident(name, self.d)

    def _run(self, conn: sa.Connection, sql: str, params: Any = None) -> sa.CursorResult[Any]:
        if self.d == "sqlite":
            return conn.execute(sa.text(sql), params or {})
        return conn.exec_driver_sql(_pyformat(sql), params or {})

    def prepare(self) -> None:
        """Create the link table (sync-daemon's own) unless it exists; the ERP's tables are left
        alone unless the mapping asks for an index on its e-number column."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(link_table_sql(self.m))
        dialect = self.engine.dialect
        version = getattr(dialect, "server_version_info", None) or ()
        self._mariadb_returning = bool(getattr(dialect, "is_mariadb", False)) and tuple(
            version[:2]
        ) >= (10, 5)
        m = self.m
        if not (m.e_number_index and m.e_number_column):
            return
        schema, _, table = m.header.table.rpartition(".")
        index = f"sync_{table}_{m.e_number_column}"[:60]
        existing = {ix["name"] for ix in sa.inspect(self.engine).get_indexes(table, schema or None)}
        if index in existing:
            return
        # Not unique: the ERP's users may enter the same reference twice (the link table is
        # what keeps one order per e-number). Partial where the dialect allows.
        where = f" WHERE {self._q(m.e_number_column)} IS NOT NULL" if self.d != "mysql" else ""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE INDEX {self._q(index)} ON {qtable(m.header.table, self.d)} "
                f"({self._q(m.e_number_column)}){where}"
            )
        log.info("e_number_index_created", table=m.header.table, column=m.e_number_column)

    def _cached(self, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.m.lookup_cache_seconds:
            return hit[1]
        value = load()
        if value is not None:  # misses are not cached: master data may appear any moment
            self._cache[key] = (now, value)
        return value

    # -- functions bound per order --------------------------------------------------------------

    def _functions(self, conn: sa.Connection) -> dict[str, Callable[..., Any]]:
        m = self.m
        now = datetime.now(UTC).replace(tzinfo=None)

        def map_(table: Any, value: Any) -> str:
            return map_value(m.maps, m.path, table, value)

        def lookup(table: Any, column: Any, *pairs: Any) -> Any:
            return self._lookup(conn, str(table), str(column), pairs)

        def next_number(which: Any) -> str:
            return self._next_number(conn, m.numbers[str(which)], now)

        return {"map": map_, "now": lambda: now, "lookup": lookup, "next_number": next_number}

    def _lookup(self, conn: sa.Connection, table: str, column: str, pairs: tuple[Any, ...]) -> Any:
        cols = pairs[0::2]
        info = self.m.schema.get(table, {})
        values = tuple(
            _coerce(v, info.get(str(c)), f"lookup({table})", str(c))
            for c, v in zip(cols, pairs[1::2], strict=True)
        )
        where = " AND ".join(f"{self._q(str(c))} = :v{i}" for i, c in enumerate(cols))
        shown = " and ".join(f"{c} = {_short(v)}" for c, v in zip(cols, values, strict=True))

        def load() -> Any:
            rows = self._run(
                conn,
                f"SELECT {self._q(column)} FROM {qtable(table, self.d)} WHERE {where} LIMIT 2",
                {f"v{i}": v for i, v in enumerate(values)},
            ).all()
            if len(rows) > 1:
                raise ex.LookupFailed(f"lookup: several rows in {table} where {shown} (need one)")
            return rows[0][0] if rows else None

        found = self._cached(("lookup", table, column, *cols, *values), load)
        if found is None:
            raise ex.LookupFailed(f"lookup: no row in {table} where {shown}")
        return found

    def _next_number(self, conn: sa.Connection, n: NumberSpec, now: datetime) -> str:
        prefix, width = n.prefix, n.width
        if n.kind == "sequence":
            assert n.sequence
            if self.d == "postgresql":
                value = self._run(
                    conn, "SELECT nextval(:s)", {"s": qtable(n.sequence, self.d)}
                ).scalar()
            else:
                value = self._run(conn, f"SELECT NEXTVAL({qtable(n.sequence, self.d)})").scalar()
        elif n.kind == "row_sequence":
            assert n.table and n.key_column
            extra = [c for c in (n.prefix_column, n.width_column) if c]
            sel = ", ".join(self._q(c) for c in [n.id_column, *extra])

            def load() -> Any:
                return self._run(
                    conn,
                    f"SELECT {sel} FROM {qtable(n.table or '', self.d)} "
                    f"WHERE {self._q(n.key_column or '')} = :k",
                    {"k": n.series_key},
                ).first()

            row = self._cached(("number", n.key), load)
            if row is None:
                raise OrderRejected(f"{n.key}: no row {n.series_key!r} in {n.table}", "mapping")
            rest = list(row[1:])
            if n.prefix_column:
                prefix = rest.pop(0) or ""
            if n.width_column:
                width = int(rest.pop(0) or 0)
            value = self._run(
                conn, "SELECT nextval(:s)", {"s": self._q(f"{n.sequence_prefix}{row[0]}")}
            ).scalar()
        else:
            assert n.table and n.key_column and n.value_column
            t, kc, vc = qtable(n.table, self.d), self._q(n.key_column), self._q(n.value_column)
            # The row lock serialises concurrent importers on this counter until commit.
            row = self._run(
                conn, f"SELECT {vc} FROM {t} WHERE {kc} = :k FOR UPDATE", {"k": n.series_key}
            ).first()
            if row is None:
                raise OrderRejected(f"{n.key}: no row {n.series_key!r} in {n.table}", "mapping")
            value = row[0]
            self._run(conn, f"UPDATE {t} SET {vc} = {vc} + 1 WHERE {kc} = :k", {"k": n.series_key})
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

    # -- evaluating and writing rows ------------------------------------------------------------

    def _value(
        self, rule: ColumnRule, table: str, ctx: dict[str, Any], fns: dict[str, Callable[..., Any]]
    ) -> Any:
        try:
            v = rule.const if rule.expr is None else rule.expr.evaluate(ctx, fns)
        except ex.LookupFailed as e:
            raise OrderRejected(f"{rule.key}: {e}", "mapping") from None
        except ex.ExprError as e:
            raise OrderRejected(f"{rule.key}: {e}") from None
        return _coerce(v, self.m.schema.get(table, {}).get(rule.column), rule.key, rule.column)

    def _eval(
        self, key: str, e: ex.Expr, ctx: dict[str, Any], fns: dict[str, Callable[..., Any]]
    ) -> Any:
        try:
            return e.evaluate(ctx, fns)
        except ex.LookupFailed as exc:
            raise OrderRejected(f"{key}: {exc}", "mapping") from None
        except ex.ExprError as exc:
            raise OrderRejected(f"{key}: {exc}") from None

    def _insert(
        self, conn: sa.Connection, table: str, values: dict[str, Any], returning: str | None
    ) -> Any:
        cols = list(values)
        sql = (
            f"INSERT INTO {qtable(table, self.d)} ({', '.join(self._q(c) for c in cols)}) "
            f"VALUES ({', '.join(f':p{i}' for i in range(len(cols)))})"
        )
        params = {f"p{i}": values[c] for i, c in enumerate(cols)}
        if returning is None:
            self._run(conn, sql, params)
            return None
        if self.d == "mysql" and not self._mariadb_returning:
            # MySQL has no INSERT ... RETURNING: the AUTO_INCREMENT key (LAST_INSERT_ID()).
            return self._run(conn, sql, params).lastrowid
        return self._run(conn, f"{sql} RETURNING {self._q(returning)}", params).scalar()

    def _match(self, conn: sa.Connection, step: RowStep, values: dict[str, Any]) -> Any:
        same = {"mysql": "<=>", "postgresql": "IS NOT DISTINCT FROM", "sqlite": "IS"}[self.d]
        where = " AND ".join(f"{self._q(c)} {same} :m{i}" for i, c in enumerate(step.match))
        row = self._run(
            conn,
            f"SELECT {self._q(step.returning or step.match[0])} FROM {qtable(step.table, self.d)} "
            f"WHERE {where} LIMIT 1",
            {f"m{i}": values.get(c) for i, c in enumerate(step.match)},
        ).first()
        return None if row is None else row[0]

    def _row(
        self,
        conn: sa.Connection,
        step: RowStep,
        ctx: dict[str, Any],
        fns: dict[str, Callable[..., Any]],
        log_rows: dict[str, list[dict[str, Any]]] | None,
        defer: list[dict[str, Any]] | None = None,
        key: Any = None,
    ) -> dict[str, Any] | None:
        """Write (or match) one row of ``step``; the row, with its key, is bound in ``ctx``.
        ``defer``: a row nothing refers to, or whose key was taken beforehand (``key``), is
        collected there for one multi-row INSERT."""
        if step.when is not None and not self._eval(f"{step.key}.when", step.when, ctx, fns):
            return None
        values = {r.column: self._value(r, step.table, ctx, fns) for r in step.rules}
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
            found = self._match(conn, step, values)
            if found is not None:
                row = {**values, step.returning or step.match[0]: found}
                ctx[step.name] = row
                return row
        key = self._insert(conn, step.table, values, step.returning)
        row = dict(values)
        if step.returning:
            row[step.returning] = key
        ctx[step.name] = row
        if step.after and step.returning:
            upd = {r.column: self._value(r, step.table, ctx, fns) for r in step.after}
            sets = ", ".join(f"{self._q(c)} = :u{i}" for i, c in enumerate(upd))
            self._run(
                conn,
                f"UPDATE {qtable(step.table, self.d)} SET {sets} "
                f"WHERE {self._q(step.returning)} = :key",
                {**{f"u{i}": v for i, v in enumerate(upd.values())}, "key": key},
            )
            row.update(upd)
        if log_rows is not None:
            log_rows.setdefault(step.table, []).append(row)
        return row

    def _customer(
        self,
        conn: sa.Connection,
        ctx: dict[str, Any],
        fns: dict[str, Callable[..., Any]],
        log_rows: dict[str, list[dict[str, Any]]] | None,
    ) -> None:
        c = self.m.customer
        if c is None:
            return
        email = number = None
        if c.email is not None:
            email = ex.to_str(self._eval("customer.email", c.email, ctx, fns)) or None
        if c.number is not None:
            number = ex.to_str(self._eval("customer.number", c.number, ctx, fns)) or None
        if email is not None and ("@" not in email or len(email) > 254):
            raise OrderRejected(f"customer e-mail {_short(email)} is not an e-mail address")
        guest = email is None and number is None
        ctx["customer"] = {"email": email, "number": number, "id": None, "new": False}
        ctx["customer"]["guest"] = guest
        if guest:
            if c.guest is None:
                raise OrderRejected(
                    "order has no customer e-mail/number and no guest customer is configured"
                )
            ctx["customer"]["id"] = self._eval("customer.guest", c.guest, ctx, fns)
            return
        found = self._find_customer(conn, email, number, ctx, fns)
        if found is not None:
            ctx["customer"]["id"] = found
            return
        # Two orders of one new customer at once: the second waits here, then finds the
        # customer the first created (READ COMMITTED: each statement sees the latest commit).
        who = email or number
        lock_name = f"sync-customer:{who}"
        if self.d == "postgresql":
            self._run(conn, "SELECT pg_advisory_xact_lock(hashtext(:k))", {"k": lock_name})
        elif self.d == "mysql":
            # MariaDB's named locks belong to the session: write() releases it after the end
            # of the transaction. Names are limited to 64 characters.
            got = self._run(
                conn, "SELECT GET_LOCK(:k, 30)", {"k": hashlib.sha1(lock_name.encode()).hexdigest()}
            ).scalar()
            self._session_locks.held = True
            if got != 1:
                raise ErpUnavailable(f"waited 30 s for another import of customer {who!r}")
        found = self._find_customer(conn, email, number, ctx, fns)
        if found is not None:
            ctx["customer"]["id"] = found
            return
        if not c.create:
            raise OrderRejected(
                f"customer {who!r} is not in the ERP and customer.create is false", "mapping"
            )
        ctx["customer"]["new"] = True
        for step in c.rows:
            self._row(conn, step, ctx, fns, log_rows)
        assert c.key is not None
        ctx["customer"]["id"] = self._eval("customer.key", c.key, ctx, fns)

    def _find_customer(
        self,
        conn: sa.Connection,
        email: str | None,
        number: str | None,
        ctx: dict[str, Any],
        fns: dict[str, Callable[..., Any]],
    ) -> Any:
        """The customer's key: by the shop's customer number first, then by e-mail (compared
        case-insensitively), each with the match filters (entity, active...)."""
        c = self.m.customer
        assert c is not None
        if not (c.match_table and c.match_key_column):
            return None
        filters = {r.column: self._value(r, c.match_table, ctx, fns) for r in c.match_filters}
        tries = []
        if number is not None and c.match_number_column:
            tries.append((f"{self._q(c.match_number_column)} = :who", number))
        if email is not None and c.match_email_column:
            tries.append((f"lower({self._q(c.match_email_column)}) = :who", email.lower()))
        for cond, who in tries:
            where = " AND ".join(
                [cond, *(f"{self._q(col)} = :f{i}" for i, col in enumerate(filters))]
            )
            row = self._run(
                conn,
                f"SELECT {self._q(c.match_key_column)} FROM {qtable(c.match_table, self.d)} "
                f"WHERE {where} ORDER BY {self._q(c.match_key_column)} LIMIT 1",
                {"who": who, **{f"f{i}": v for i, v in enumerate(filters.values())}},
            ).first()
            if row is not None:
                return row[0]
        return None

    def _context(
        self, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise OrderRejected("order payload is not a JSON object")
        missing = [p for p in self.m.required if not _present(payload, p)]
        if missing:
            raise OrderRejected(f"missing required field(s): {', '.join(missing)}")
        return {
            "order": payload,
            "shop": shop,
            "e_number": self.m.e_number_prefix + e_number,
            "auto_invoice": auto_invoice,
        }

    def _lines(
        self,
        conn: sa.Connection,
        ctx: dict[str, Any],
        fns: dict[str, Callable[..., Any]],
        log_rows: dict[str, list[dict[str, Any]]] | None,
    ) -> int:
        li = self.m.lines
        assert li.source is not None
        source = self._eval("lines.source", li.source, ctx, fns)
        if not isinstance(source, list) or not source:
            raise OrderRejected(f"order has no lines ({li.source.source} is empty or missing)")
        # Child rows nothing refers to (taxes) go in one INSERT per child step, after the lines;
        # the lines too, when their keys can be taken from their sequence beforehand.
        pending: dict[str, list[dict[str, Any]]] = {kid.key: [] for kid in li.children}
        keys = self._take_keys(conn, li, len(source))
        line_rows: list[dict[str, Any]] = []
        for i, item in enumerate(source, start=1):
            if not isinstance(item, dict):
                raise OrderRejected(f"line {i} is not a JSON object")
            lctx = {**ctx, li.alias: item, f"{li.alias}_no": i, "line_no": i}
            try:
                if keys:
                    self._row(conn, li, lctx, fns, log_rows, line_rows, keys[i - 1])
                else:
                    self._row(conn, li, lctx, fns, log_rows)
                for kid in li.children:
                    assert kid.source is not None
                    elems = self._eval(f"{kid.key}.source", kid.source, lctx, fns)
                    for j, el in enumerate(elems or [], start=1):
                        kctx = {**lctx, kid.alias: el, f"{kid.alias}_no": j}
                        self._row(conn, kid, kctx, fns, log_rows, pending[kid.key])
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
                self._run(conn, *multi_row_insert(table, group, self.d))
        return len(source)

    def _take_keys(self, conn: sa.Connection, step: RowStep, n: int) -> list[Any] | None:
        """PostgreSQL: ``n`` keys from the sequence behind ``step``'s key column (serial or
        identity), so its rows go in one INSERT; None where that does not apply."""
        if self.d != "postgresql" or not step.returning or step.match or step.after:
            return None

        def load() -> Any:
            seq = self._run(
                conn,
                "SELECT pg_get_serial_sequence(:t, :c)",
                {"t": qtable(step.table, self.d), "c": step.returning},
            ).scalar()
            return seq or ""  # "" (no sequence) is cached too: it does not change

        seq = self._cached(("sequence", step.table, step.returning), load)
        if not seq:
            return None
        rows = self._run(
            conn, "SELECT nextval(:s) FROM generate_series(1, :n)", {"s": seq, "n": n}
        ).all()
        return sorted(r[0] for r in rows)

    # -- write once -----------------------------------------------------------------------------

    def _find(self, conn: sa.Connection, shop: str | None, e_number: str) -> tuple[str, str] | None:
        if shop is None:
            row = self._run(conn, self._link_any, {"e": e_number}).first()
        else:
            row = self._run(conn, self._link_find, {"s": shop, "e": e_number}).first()
        if row is None:
            return None
        key, number = tuple(row)[:2]
        return str(key), str(number if number is not None else key)

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
                    existing = self._find(c, shop, e_number)
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
            if getattr(self._session_locks, "held", False):
                self._session_locks.held = False
                with contextlib.suppress(sa.exc.DBAPIError):
                    conn.exec_driver_sql("DO RELEASE_ALL_LOCKS()")
                    conn.rollback()

    def _write(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> WriteResult:
        existing = self._find(conn, shop, e_number)
        if existing is not None:
            return WriteResult(existing[1], created=False)
        ctx, lines, _ = self._plan(conn, shop, e_number, payload, auto_invoice, None)
        key, number = self._key_and_number(ctx)
        self._run(conn, self._link_insert, {"s": shop, "e": e_number, "k": key, "n": number})
        return WriteResult(number, created=True, lines=lines)

    def _plan(
        self,
        conn: sa.Connection,
        shop: str,
        e_number: str,
        payload: Any,
        auto_invoice: bool,
        log_rows: dict[str, list[dict[str, Any]]] | None,
    ) -> tuple[dict[str, Any], int, dict[str, Callable[..., Any]]]:
        ctx = self._context(shop, e_number, payload, auto_invoice)
        fns = self._functions(conn)
        self._customer(conn, ctx, fns, log_rows)
        for step in self.m.rows:
            self._row(conn, step, ctx, fns, log_rows)
        self._row(conn, self.m.header, ctx, fns, log_rows)
        lines = self._lines(conn, ctx, fns, log_rows)
        return ctx, lines, fns

    def _key_and_number(self, ctx: dict[str, Any]) -> tuple[str, str]:
        fns: dict[str, Callable[..., Any]] = {}
        key = self._eval("order.key", self.m.order_key, ctx, fns)
        number = self._eval("order.number", self.m.order_number, ctx, fns)
        if key is None:
            raise OrderRejected("order.key gave no value", "mapping")
        return str(key), str(number if number is not None else key)

    def dry_run(
        self, conn: sa.Connection, shop: str, e_number: str, payload: Any, auto_invoice: bool
    ) -> dict[str, list[dict[str, Any]]]:
        """The rows the plan writes for this order, by table; written in a transaction that is
        rolled back (so generated keys and lookups are real, and nothing stays)."""
        rows: dict[str, list[dict[str, Any]]] = {}
        trans = conn.begin()
        try:
            self._plan(conn, shop, e_number, payload, auto_invoice, rows)
        finally:
            trans.rollback()
        return rows

    # -- after the import -----------------------------------------------------------------------

    def _header_where(self) -> str:
        assert self.m.header.returning
        return f"WHERE {self._q(self.m.header.returning)} = :key"

    def is_posted(self, conn: sa.Connection, e_number: str, shop: str | None = None) -> bool | None:
        """None when the ERP has no order with this e-number."""
        found = self._find(conn, shop, e_number)
        if found is None:
            return None
        m = self.m
        if not m.posted_column:
            return False
        row = self._run(
            conn,
            f"SELECT {self._q(m.posted_column)} FROM {qtable(m.header.table, self.d)} "
            f"{self._header_where()}",
            {"key": found[0]},
        ).first()
        if row is None:
            return None  # deleted in the ERP
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
        """Re-import a changed order over its ERP order: header updated (the ERP's number kept),
        lines and their child rows deleted and written again, in one transaction."""
        m, li = self.m, self.m.lines
        with self.engine.begin() as conn:
            found = self._find(conn, shop, e_number)
            if found is None:
                raise NotInErp(f"no ERP order has e-number {e_number!r}")
            key, number = found
            # Lock the header row: the ERP user and a second importer wait for us.
            self._run(
                conn,
                f"SELECT 1 FROM {qtable(m.header.table, self.d)} {self._header_where()} FOR UPDATE",
                {"key": key},
            )
            if not force and self.is_posted(conn, e_number, shop):
                raise OrderPosted(f"ERP order {number} is posted; use --force to replace it anyway")
            ctx = self._context(shop, e_number, payload, auto_invoice)
            fns = self._functions(conn)
            self._customer(conn, ctx, fns, None)
            for step in m.rows:
                self._row(conn, step, ctx, fns, None)
            # Columns numbered by the ERP keep the number they got at import; columns set after
            # the insert ([header.after], e.g. Dolibarr's "(PROV<rowid>)") are set from the key.
            after = {r.column for r in m.header.after}
            rules = [
                r
                for r in m.header.rules
                if r.column not in after and (r.expr is None or "next_number" not in r.expr.source)
            ]
            values = {r.column: self._value(r, m.header.table, ctx, fns) for r in rules}
            assert m.header.returning
            ctx["header"] = {**values, m.header.returning: _typed_key(key, m, m.header)}
            values.update(
                {r.column: self._value(r, m.header.table, ctx, fns) for r in m.header.after}
            )
            sets = ", ".join(f"{self._q(c)} = :p{i}" for i, c in enumerate(values))
            self._run(
                conn,
                f"UPDATE {qtable(m.header.table, self.d)} SET {sets} {self._header_where()}",
                {**{f"p{i}": v for i, v in enumerate(values.values())}, "key": key},
            )
            assert li.parent_column and m.header.returning
            lines_of = (
                f"SELECT {self._q(li.returning or li.parent_column)} FROM "
                f"{qtable(li.table, self.d)} WHERE {self._q(li.parent_column)} = :key"
            )
            for kid in li.children:
                if kid.parent_column and li.returning:
                    if self.d == "mysql":
                        ids = [r[0] for r in self._run(conn, lines_of, {"key": key}).all()]
                        for i in ids:
                            self._run(
                                conn,
                                f"DELETE FROM {qtable(kid.table, self.d)} "
                                f"WHERE {self._q(kid.parent_column)} = :i",
                                {"i": i},
                            )
                    else:
                        self._run(
                            conn,
                            f"DELETE FROM {qtable(kid.table, self.d)} "
                            f"WHERE {self._q(kid.parent_column)} IN ({lines_of})",
                            {"key": key},
                        )
            self._run(
                conn,
                f"DELETE FROM {qtable(li.table, self.d)} WHERE {self._q(li.parent_column)} = :key",
                {"key": key},
            )
            ctx["header"] = {**values, m.header.returning: _typed_key(key, m, m.header)}
            lines = self._lines(conn, ctx, fns, None)
            return WriteResult(number, created=False, lines=lines)

    def cancel(self, e_number: str, shop: str | None = None) -> str:
        m = self.m
        if not m.cancel_column:
            raise OrderRejected(f"{m.path}: order.cancel is not configured", "mapping")
        with self.engine.begin() as conn:
            found = self._find(conn, shop, e_number)
            if found is None:
                raise NotInErp(f"no ERP order has e-number {e_number!r}")
            self._run(
                conn,
                f"UPDATE {qtable(m.header.table, self.d)} SET {self._q(m.cancel_column)} = :v "
                f"{self._header_where()}",
                {"v": m.cancel_value, "key": found[0]},
            )
            return found[1]

    def erp_e_numbers(self, shop: str | None = None) -> set[str]:
        lt = qtable(self.m.link_table, self.d)
        with self.engine.connect() as conn:
            if shop is None:
                rows = self._run(conn, f"SELECT e_number FROM {lt}")
            else:
                rows = self._run(conn, f"SELECT e_number FROM {lt} WHERE shop = :s", {"s": shop})
            return {str(r[0]) for r in rows}


def _typed_key(key: str, m: PlanMapping, step: RowStep) -> Any:
    """The link table keeps keys as text; give integer key columns their integer back."""
    info = m.schema.get(step.table, {}).get(step.returning or "")
    if info is not None and info.kind == "int":
        return int(key)
    return key
