"""Orders into a Dolibarr-shaped MariaDB schema (tests/erp/dolibarr_schema.sql, written from
Dolibarr's documentation) with the shipped profile ``config/mappings/dolibarr.toml``: generated
rowids handed back to the lines, provisional refs "(PROV<rowid>)", every lookup filtered by
entity, orders keyed in by an ERP user between imports, a taken key retried."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pymysql
import pytest
from structlog.testing import capture_logs

from replicator.db import make_engine
from replicator.mappers.orders import OrderRejected
from replicator.orders.mappings import load_checked, make_writer
from replicator.orders.plan_writer import PlanWriter
from replicator.orders.sample import ROOT
from tests import test_orders_support as support
from tests.erp.orders import taxed_order
from tests.test_orders_support import erp_rows

pytestmark = pytest.mark.mariadb
service_factory = support.service_factory
DOLIBARR_MAPPING = ROOT / "config" / "mappings" / "dolibarr.toml"
SCHEMA = Path(__file__).parent / "erp" / "dolibarr_schema.sql"


def _exec(conn: pymysql.connections.Connection, sql: str) -> None:
    body = "\n".join(ln for ln in sql.splitlines() if not ln.lstrip().startswith("--"))
    with conn.cursor() as cur:
        for stmt in (s.strip() for s in body.split(";")):
            if stmt:
                cur.execute(stmt)


@pytest.fixture
def dolibarr(mariadb_url: str) -> Iterator[str]:
    name = f"doli_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    try:
        conn.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.select_db(name)
        _exec(conn, SCHEMA.read_text())
        # Two companies (entities) with the same product refs and the same customer e-mail.
        seed = []
        for entity in (2, 1):
            for n in range(1, 21):
                seed.append(
                    f"INSERT INTO llx_product (ref, entity, label, price) "
                    f"VALUES ('X-{n}', {entity}, 'Item {n}', 10)"
                )
            seed += [
                f"INSERT INTO llx_product (ref, entity, label) VALUES ('BOOK-1', {entity}, 'Book')",
                f"INSERT INTO llx_product (ref, entity, label, fk_product_type) "
                f"VALUES ('SHIPPING', {entity}, 'Shipping', 1)",
                f"INSERT INTO llx_societe (nom, entity, client, email) "
                f"VALUES ('Known {entity}', {entity}, 1, 'known@example.com')",
                f"INSERT INTO llx_societe (nom, entity, client) "
                f"VALUES ('Web shop guest', {entity}, 1)",
            ]
        _exec(conn, ";".join(seed))
        yield f"{mariadb_url.rstrip('/')}/{name}"
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def writer(dolibarr: str) -> Iterator[PlanWriter]:
    engine = make_engine(dolibarr, "test")
    w = make_writer(engine, load_checked(DOLIBARR_MAPPING, "mysql", engine), create_index=False)
    assert isinstance(w, PlanWriter)
    yield w
    engine.dispose()


def erp_user_keys_in_an_order(url: str) -> int:
    """What Dolibarr does for a new draft: insert with ref "(PROV)", then set "(PROV<rowid>)"."""
    engine = make_engine(url, "erp-user")
    try:
        with engine.begin() as conn:
            rowid = conn.exec_driver_sql(
                "INSERT INTO llx_commande (ref, entity, fk_soc) VALUES ('(PROV)', 1, 1)"
            ).lastrowid
            conn.exec_driver_sql(
                "UPDATE llx_commande SET ref = %s WHERE rowid = %s", (f"(PROV{rowid})", rowid)
            )
            conn.exec_driver_sql(
                "INSERT INTO llx_commandedet (fk_commande, label, qty) VALUES (%s, 'phone', 1)",
                (rowid,),
            )
        return int(rowid)
    finally:
        engine.dispose()


def test_orders_link_lines_by_rowid_with_prov_refs_between_erp_users_orders(dolibarr, writer):
    first = writer.write("woo", "101", taxed_order(101, lines=2, reduced=True))
    manual = erp_user_keys_in_an_order(dolibarr)
    second = writer.write("woo", "102", taxed_order(102, lines=3))
    manual2 = erp_user_keys_in_an_order(dolibarr)
    third = writer.write("woo", "103", taxed_order(103, lines=1, email=""))
    rows = erp_rows(
        dolibarr,
        "SELECT rowid, ref, ref_client, entity, total_ttc FROM llx_commande ORDER BY rowid",
    )
    assert [r[1] for r in rows] == [f"(PROV{r[0]})" for r in rows]
    assert [r[2] for r in rows] == ["101", None, "102", None, "103"]
    assert [first.order_number, second.order_number, third.order_number] == [
        rows[0][1],
        rows[2][1],
        rows[4][1],
    ]
    assert manual == rows[1][0] and manual2 == rows[3][0]
    # Lines point at their order's rowid and add up to the shop's total.
    for rowid, _, e, _, total in rows:
        if e is None:
            continue
        (lines_total,) = erp_rows(
            dolibarr,
            "SELECT sum(total_ttc) FROM llx_commandedet WHERE fk_commande = :r",
            r=rowid,
        )[0]
        assert Decimal(lines_total) == Decimal(total)
    # Every lookup honoured the entity: entity 1's products, customer and guest.
    assert erp_rows(
        dolibarr,
        "SELECT DISTINCT p.entity FROM llx_commandedet d JOIN llx_product p "
        "ON p.rowid = d.fk_product JOIN llx_commande c ON c.rowid = d.fk_commande "
        "WHERE c.ref_client IS NOT NULL",
    ) == [(1,)]
    assert erp_rows(
        dolibarr,
        "SELECT s.nom FROM llx_commande c JOIN llx_societe s ON s.rowid = c.fk_soc "
        "WHERE c.ref_client = '103'",
    ) == [("Web shop guest",)]
    # The reduced-rate line carries Dolibarr's 7 %.
    assert erp_rows(
        dolibarr,
        "SELECT d.tva_tx FROM llx_commandedet d JOIN llx_product p ON p.rowid = d.fk_product "
        "WHERE p.ref = 'BOOK-1'",
    ) == [(Decimal("7.0000"),)]


def test_known_customer_of_the_entity_and_new_customer_with_contact(dolibarr, writer):
    writer.write("woo", "201", taxed_order(201, email="KNOWN@example.com"))
    writer.write("woo", "202", taxed_order(202, email="neu@example.com"))
    writer.write("woo", "203", taxed_order(203, email="neu@example.com"))
    got = erp_rows(
        dolibarr,
        "SELECT c.ref_client, s.nom, s.entity FROM llx_commande c "
        "JOIN llx_societe s ON s.rowid = c.fk_soc ORDER BY c.ref_client",
    )
    assert got == [
        ("201", "Known 1", 1),
        ("202", "Anna Kunde202", 1),
        ("203", "Anna Kunde202", 1),
    ]
    assert erp_rows(
        dolibarr,
        "SELECT p.email FROM llx_socpeople p JOIN llx_societe s ON s.rowid = p.fk_soc "
        "WHERE s.email = 'neu@example.com'",
    ) == [("neu@example.com",)]


def test_a_taken_ref_is_retried_with_a_fresh_rowid(dolibarr, writer):
    # An ERP user's order (rowid n) already holds the ref our import's rowid n+1 gets: the
    # provisional ref collides on (ref, entity); the order is written again with rowid n+2.
    (n,) = erp_rows(
        dolibarr,
        "SELECT AUTO_INCREMENT FROM information_schema.TABLES "
        "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'llx_commande'",
    )[0]
    n = int(n)
    engine = make_engine(dolibarr, "erp-user")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO llx_commande (rowid, ref, entity, fk_soc) VALUES (%s, %s, 1, 1)",
            (n, f"(PROV{n + 1})"),
        )
    engine.dispose()
    with capture_logs() as logs:
        res = writer.write("woo", "301", taxed_order(301))
    assert res.created and res.order_number == f"(PROV{n + 2})"
    assert [e["attempt"] for e in logs if e["event"] == "order_key_taken_retrying"] == [1]
    assert erp_rows(dolibarr, "SELECT count(*) FROM llx_commande WHERE ref_client = '301'") == [
        (1,)
    ]
    assert erp_rows(dolibarr, "SELECT count(*) FROM llx_commandedet") == [(4,)]


def test_unknown_product_of_the_entity_parks_with_table_and_value(dolibarr, writer):
    order = taxed_order(401, lines=1)
    order["line_items"][0]["sku"] = "ONLY-IN-2"
    with pytest.raises(OrderRejected) as exc:
        writer.write("woo", "401", order)
    assert exc.value.kind == "mapping"
    assert "llx_product where ref = 'ONLY-IN-2' and entity = 1" in exc.value.reason
    assert erp_rows(dolibarr, "SELECT count(*) FROM llx_commande") == [(0,)]


def test_same_order_through_two_intake_paths_is_one_dolibarr_order(
    dolibarr, tmp_path: Path, service_factory
):
    (tmp_path / "mappings").mkdir()
    shutil.copy(DOLIBARR_MAPPING, tmp_path / "mappings" / "orders.toml")
    svc, shop = service_factory(dolibarr)
    shop.put(taxed_order(501))
    assert svc.ingest_webhook_payload("shop", shop.orders["501"][1], "d-1") is True
    svc.run_cycle()
    assert erp_rows(dolibarr, "SELECT count(*) FROM llx_commande WHERE ref_client = '501'") == [
        (1,)
    ]
    entry = svc.ledger.get("shop", "501")
    assert entry is not None and entry.erp_order_no and entry.erp_order_no.startswith("(PROV")


def test_kill9_during_a_burst_of_200_orders_each_e_number_exactly_once(
    dolibarr, writer, tmp_path: Path
):
    from tests.erp.burst import FIRST, run_with_kills

    def imported() -> int:
        return int(erp_rows(dolibarr, "SELECT count(*) FROM sync_daemon_order_link")[0][0])

    def erp_user() -> int:
        erp_user_keys_in_an_order(dolibarr)  # the ERP user keeps working meanwhile
        return imported()

    at_kill = run_with_kills(
        dolibarr, DOLIBARR_MAPPING, tmp_path, 200, "known@example.com", erp_user
    )
    assert any(0 < n < 200 for n in at_kill), at_kill
    refs = erp_rows(
        dolibarr,
        "SELECT ref_client, count(*) FROM llx_commande WHERE ref_client IS NOT NULL "
        "GROUP BY ref_client",
    )
    assert {r for r, _ in refs} == {str(FIRST + i) for i in range(200)}
    assert all(n == 1 for _, n in refs)
    # Every order, ours and the ERP user's, carries its own provisional ref.
    # (the restarted worker saw changed payloads and replaced those orders: refs stay.)
    assert erp_rows(
        dolibarr, "SELECT count(*) FROM llx_commande WHERE ref <> CONCAT('(PROV', rowid, ')')"
    ) == [(0,)]


def test_two_orders_of_one_new_customer_at_once_create_one_customer(dolibarr, writer):
    from tests.erp.burst import at_once

    errors = at_once(
        [
            lambda n=n: writer.write("woo", str(n), taxed_order(n, email="twice@example.com"))
            for n in range(600, 604)
        ]
    )
    assert not errors
    assert erp_rows(
        dolibarr, "SELECT count(*) FROM llx_societe WHERE email = 'twice@example.com'"
    ) == [(1,)]
    assert erp_rows(dolibarr, "SELECT count(DISTINCT fk_soc), count(*) FROM llx_commande") == [
        (1, 4)
    ]


def test_dry_run_and_replace_leave_no_customer_lock_behind(dolibarr, writer):
    """A dry run (the Manage page's preview) or a replace that meets a new customer takes
    MariaDB's named lock for that customer; it must be released with the transaction. Held on
    the idle pooled connection, it made the import of that customer's order on any other
    connection wait 30 s and fail as "ERP unavailable"."""
    with writer.engine.connect() as conn:
        rows = writer.dry_run(conn, "woo", "720", taxed_order(720, email="new@example.com"), False)
    assert rows  # the preview wrote (and rolled back) the customer and the order
    writer.write("woo", "721", taxed_order(721, lines=1))
    writer.replace("woo", "721", taxed_order(721, lines=1, email="other@example.com"))

    engine = make_engine(dolibarr, "second-worker")  # another import worker's connection
    try:
        with engine.connect() as conn:
            for email in ("new@example.com", "other@example.com"):
                name = hashlib.sha1(f"sync-customer:{email}".encode()).hexdigest()
                held_by = conn.exec_driver_sql("SELECT IS_USED_LOCK(%s)", (name,)).scalar()
                assert held_by is None, f"the lock of customer {email} is still held"
        other = make_writer(
            engine, load_checked(DOLIBARR_MAPPING, "mysql", engine), create_index=False
        )
        other.write("woo", "720", taxed_order(720, email="new@example.com"))
    finally:
        engine.dispose()
    assert erp_rows(
        dolibarr, "SELECT count(*) FROM llx_societe WHERE email = 'new@example.com'"
    ) == [(1,)]
    assert erp_rows(dolibarr, "SELECT count(*) FROM llx_commande WHERE ref_client = '720'") == [
        (1,)
    ]


def test_order_changed_after_import_keeps_rowid_and_prov_ref(dolibarr, writer):
    first = writer.write("woo", "701", taxed_order(701, lines=1))
    changed = taxed_order(701, lines=3, reduced=True)
    res = writer.replace("woo", "701", changed)
    assert res.order_number == first.order_number and res.lines == 5
    ((rowid, ref, total),) = erp_rows(
        dolibarr, "SELECT rowid, ref, total_ttc FROM llx_commande WHERE ref_client = '701'"
    )
    assert ref == f"(PROV{rowid})" == first.order_number
    assert Decimal(total) == Decimal(changed["total"])
    assert erp_rows(
        dolibarr,
        "SELECT count(*), sum(total_ttc) FROM llx_commandedet WHERE fk_commande = :r",
        r=rowid,
    ) == [(5, Decimal(total))]


def test_customer_matched_by_the_shops_customer_number_first(dolibarr, tmp_path: Path):
    text = DOLIBARR_MAPPING.read_text()
    text = text.replace(
        "[customer.match]",
        '[customer.match]\nnumber_column = "code_client"',
    ).replace(
        'key = "societe.rowid"',
        'key = "societe.rowid"\nnumber = "concat(\'WC-\', order.customer_id) if order.customer_id else None"',
    )
    path = tmp_path / "dolibarr.toml"
    path.write_text(text)
    engine = make_engine(dolibarr, "test")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO llx_societe (nom, entity, client, code_client, email) "
                "VALUES ('Customer 77', 1, 1, 'WC-77', 'old@example.com')"
            )
        w = make_writer(engine, load_checked(path, "mysql", engine), create_index=False)
        w.write("woo", "801", taxed_order(801, email="changed@example.com", customer_id=77))
        w.write("woo", "802", taxed_order(802, email="", customer_id=0))  # guest
    finally:
        engine.dispose()
    assert erp_rows(
        dolibarr,
        "SELECT c.ref_client, s.nom FROM llx_commande c JOIN llx_societe s ON s.rowid = c.fk_soc "
        "ORDER BY c.ref_client",
    ) == [("801", "Customer 77"), ("802", "Web shop guest")]
