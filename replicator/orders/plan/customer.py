"""The order's customer: the guest customer, an existing one found by the shop's customer number
or e-mail, or a new one created from the plan's customer rows; its key is bound as
``customer.id`` for the order's rows.

Two orders of one new customer at once must not create it twice: the second waits on a lock
named after the customer (PostgreSQL: a transaction advisory lock; MariaDB: a session named lock
released by :meth:`Customers.release_session_lock` after the transaction) and then finds the
customer the first created.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import sqlalchemy as sa

from replicator.mappers import expr as ex
from replicator.mappers.expr import short_repr
from replicator.mappers.orders import OrderRejected
from replicator.mappers.plan import PlanMapping
from replicator.orders.plan.erp_sql import ErpSql
from replicator.orders.plan.expressions import Context, Functions, column_value, evaluate
from replicator.orders.plan.rows import RowLog, RowWriter
from replicator.orders.writer import ErpUnavailable

# conn.info mark: this MariaDB session holds a customer's named lock (see release_session_lock)
_SESSION_LOCK = "sync_customer_lock"


class Customers:
    """Finds or creates the customer of an order with the plan's ``[customer]`` section."""

    def __init__(self, sql: ErpSql, plan: PlanMapping, rows: RowWriter) -> None:
        self.sql = sql
        self.m = plan
        self.rows = rows

    def resolve(
        self, conn: sa.Connection, ctx: Context, fns: Functions, log_rows: RowLog | None
    ) -> None:
        """Bind ``customer`` (email, number, id, new, guest) in ``ctx``, creating the customer
        when the plan allows it; rejects the order when it names no customer and there is no
        guest, or when the customer is unknown and may not be created."""
        c = self.m.customer
        if c is None:
            return
        email = number = None
        if c.email is not None:
            email = ex.to_str(evaluate("customer.email", c.email, ctx, fns)) or None
        if c.number is not None:
            number = ex.to_str(evaluate("customer.number", c.number, ctx, fns)) or None
        if email is not None and ("@" not in email or len(email) > 254):
            raise OrderRejected(f"customer e-mail {short_repr(email)} is not an e-mail address")
        guest = email is None and number is None
        ctx["customer"] = {"email": email, "number": number, "id": None, "new": False}
        ctx["customer"]["guest"] = guest
        if guest:
            if c.guest is None:
                raise OrderRejected(
                    "order has no customer e-mail/number and no guest customer is configured"
                )
            ctx["customer"]["id"] = evaluate("customer.guest", c.guest, ctx, fns)
            return
        found = self.find(conn, email, number, ctx, fns)
        if found is not None:
            ctx["customer"]["id"] = found
            return
        # Two orders of one new customer at once: the second waits here, then finds the
        # customer the first created (READ COMMITTED: each statement sees the latest commit).
        who = email or number
        lock_name = f"sync-customer:{who}"
        if self.sql.d == "postgresql":
            self.sql.run(conn, "SELECT pg_advisory_xact_lock(hashtext(:k))", {"k": lock_name})
        elif self.sql.d == "mysql":
            # MariaDB's named locks belong to the session: write() releases it after the end
            # of the transaction. Names are limited to 64 characters.
            got = self.sql.run(
                conn, "SELECT GET_LOCK(:k, 30)", {"k": hashlib.sha1(lock_name.encode()).hexdigest()}
            ).scalar()
            conn.info[_SESSION_LOCK] = True
            if got != 1:
                raise ErpUnavailable(f"waited 30 s for another import of customer {who!r}")
        found = self.find(conn, email, number, ctx, fns)
        if found is not None:
            ctx["customer"]["id"] = found
            return
        if not c.create:
            raise OrderRejected(
                f"customer {who!r} is not in the ERP and customer.create is false", "mapping"
            )
        ctx["customer"]["new"] = True
        for step in c.rows:
            self.rows.row(conn, step, ctx, fns, log_rows)
        assert c.key is not None
        ctx["customer"]["id"] = evaluate("customer.key", c.key, ctx, fns)

    def find(
        self,
        conn: sa.Connection,
        email: str | None,
        number: str | None,
        ctx: Context,
        fns: Functions,
    ) -> Any:
        """The customer's key: by the shop's customer number first, then by e-mail (compared
        case-insensitively), each with the match filters (entity, active...)."""
        sql, q = self.sql, self.sql.q
        c = self.m.customer
        assert c is not None
        if not (c.match_table and c.match_key_column):
            return None
        filters = {
            r.column: column_value(self.m, r, c.match_table, ctx, fns) for r in c.match_filters
        }
        tries = []
        if number is not None and c.match_number_column:
            tries.append((f"{q(c.match_number_column)} = :who", number))
        if email is not None and c.match_email_column:
            tries.append((f"lower({q(c.match_email_column)}) = :who", email.lower()))
        for cond, who in tries:
            where = " AND ".join([cond, *(f"{q(col)} = :f{i}" for i, col in enumerate(filters))])
            row = sql.run(
                conn,
                f"SELECT {q(c.match_key_column)} FROM {sql.table(c.match_table)} "
                f"WHERE {where} ORDER BY {q(c.match_key_column)} LIMIT 1",
                {"who": who, **{f"f{i}": v for i, v in enumerate(filters.values())}},
            ).first()
            if row is not None:
                return row[0]
        return None

    def release_session_lock(self, conn: sa.Connection) -> None:
        """MariaDB: release the customer's named lock taken on ``conn``, after the order's
        transaction ended (a session lock outlives the transaction). Every way of writing an
        order calls it (write, replace, dry run): a lock left on a pooled connection would make
        the next import of that customer on another connection wait 30 s and fail. The mark is
        kept with the database connection (``conn.info``), like the lock itself."""
        if conn.info.pop(_SESSION_LOCK, False):
            with contextlib.suppress(sa.exc.DBAPIError):
                conn.exec_driver_sql("DO RELEASE_ALL_LOCKS()")
                conn.rollback()
