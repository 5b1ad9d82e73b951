"""sync-daemon's link table in the ERP database (``sync_daemon_order_link`` by default): one row
per imported order, primary key (shop, e-number), holding the ERP order's key and number.

It is sync-daemon's own table, not the ERP's: the e-number is looked up here inside the order's
transaction, and the link row is the last row that transaction writes, so its primary key is
what keeps one ERP order per e-number (invariant 2).
"""

from __future__ import annotations

import sqlalchemy as sa

from replicator.mappers.orders import qtable
from replicator.mappers.plan import PlanMapping
from replicator.orders.plan.erp_sql import ErpSql


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


class LinkTable:
    """Reads and writes the link table of one plan."""

    def __init__(self, sql: ErpSql, plan: PlanMapping) -> None:
        self.sql = sql
        self.m = plan
        lt = sql.table(plan.link_table)
        self._table = lt
        self._find = f"SELECT erp_key, erp_number FROM {lt} WHERE shop = :s AND e_number = :e"
        self._any = f"SELECT erp_key, erp_number FROM {lt} WHERE e_number = :e"
        self._insert = (
            f"INSERT INTO {lt} (shop, e_number, erp_key, erp_number) VALUES (:s, :e, :k, :n)"
        )

    def create(self, conn: sa.Connection) -> None:
        """Create the link table unless it exists."""
        conn.exec_driver_sql(link_table_sql(self.m))

    def find(self, conn: sa.Connection, shop: str | None, e_number: str) -> tuple[str, str] | None:
        """The ERP order's (key, number) for this e-number (of any shop when ``shop`` is None),
        or None when it was never imported."""
        if shop is None:
            row = self.sql.run(conn, self._any, {"e": e_number}).first()
        else:
            row = self.sql.run(conn, self._find, {"s": shop, "e": e_number}).first()
        if row is None:
            return None
        key, number = tuple(row)[:2]
        return str(key), str(number if number is not None else key)

    def insert(self, conn: sa.Connection, shop: str, e_number: str, key: str, number: str) -> None:
        """Link an e-number to its ERP order: a unique violation when another import did first."""
        self.sql.run(conn, self._insert, {"s": shop, "e": e_number, "k": key, "n": number})

    def e_numbers(self, conn: sa.Connection, shop: str | None = None) -> set[str]:
        """Every e-number imported (for one shop, or for all)."""
        if shop is None:
            rows = self.sql.run(conn, f"SELECT e_number FROM {self._table}")
        else:
            rows = self.sql.run(
                conn, f"SELECT e_number FROM {self._table} WHERE shop = :s", {"s": shop}
            )
        return {str(r[0]) for r in rows}
