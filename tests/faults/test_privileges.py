"""Least privilege, tested: the daemon captures with a role that has only REPLICATION, CONNECT,
USAGE on the schema and SELECT on the watched tables, the publication having been created
beforehand by the DBA (the GRANTs are those of ``docs/security.md``). Heartbeats must work with
these rights alone (``pg_logical_emit_message`` is executable by PUBLIC on PostgreSQL 15; the
test asserts it rather than assuming it). A role without REPLICATION, and a missing publication
that the role may not create, must produce errors a DBA can act on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from replicator.staging import StagingStore
from tests import test_orders_support as support
from tests.faults.common import (
    RSS_LIMIT_MB,
    TABLES,
    RssSampler,
    Writer,
    check_staging_equals_source,
    daemon_errors,
    erp_connect,
    seed_erp,
)
from tests.faults.conftest import Row
from tests.helpers import DaemonProcess, base_config, wait_until

# The exact statements of docs/security.md ("capture role"), {role}/{db} filled in.
CAPTURE_GRANTS = """
CREATE ROLE {role} LOGIN REPLICATION;
GRANT CONNECT ON DATABASE {db} TO {role};
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT ON public.items, public.stock TO {role};
"""
_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url

DBA_PUBLICATION = "CREATE PUBLICATION sync_daemon FOR TABLE public.items, public.stock"


def _url_as(url: str, role: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"postgresql://{role}@{info['host']}:{info['port']}/{info['dbname']}"


@pytest.fixture
def roles(erp_db: str) -> Iterator[list[str]]:
    """Role names to create for this test; dropped afterwards (roles are cluster-wide)."""
    made: list[str] = []
    yield made
    with erp_connect(erp_db) as c:
        for r in made:
            c.execute(f'DROP OWNED BY "{r}"')
            c.execute(f'DROP ROLE IF EXISTS "{r}"')


@pytest.mark.fault("least-privilege")
def test_capture_with_least_privilege_role(
    erp_db: str, roles: list[str], tmp_path: Path, fault_row: Row, seed: int
) -> None:
    seed_erp(erp_db)
    role = f"sync_capture_{uuid.uuid4().hex[:6]}"
    roles.append(role)
    db = psycopg.conninfo.conninfo_to_dict(erp_db)["dbname"]
    with erp_connect(erp_db) as c:
        for stmt in CAPTURE_GRANTS.format(role=role, db=db).strip().split(";\n"):
            c.execute(stmt.strip().rstrip(";"))
        c.execute(DBA_PUBLICATION)
        attrs = c.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication FROM pg_roles "
            "WHERE rolname = %s",
            (role,),
        ).fetchone()
        emit_ok = c.execute(
            "SELECT has_function_privilege(%s, "
            "'pg_logical_emit_message(boolean,text,text)', 'EXECUTE')",
            (role,),
        ).fetchone()
    assert attrs == (False, False, False, True)
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    cfg = base_config(tmp_path, _url_as(erp_db, role), staging, TABLES)
    fault_row.injected = (
        "`sync-daemon run` with a role holding only LOGIN REPLICATION, CONNECT, "
        "USAGE on public, SELECT on the 2 watched tables; publication pre-created"
    )
    fault_row.how_often = "1 run: snapshot + stream + heartbeats"
    fault_row.checked = (
        "staging == source; heartbeat through the slot recorded; no permission "
        "warning; no write privilege on the ERP tables; no traceback"
    )
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        with Writer(erp_db, seed, threads=2):
            wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")

        def heartbeat_seen() -> bool:
            store = StagingStore(staging)
            try:
                rows = store.replication_status()
            finally:
                store.dispose()
            return bool(rows) and rows[0]["heartbeat_at"] is not None

        comp = check_staging_equals_source(erp_db, staging, TABLES)
        wait_until(heartbeat_seen, 30, what="a heartbeat through the slot")
        out = d.output()
        assert "heartbeat_not_permitted" not in out
        assert "permission denied" not in out.lower()
        assert not daemon_errors(out)
        assert d.terminate() == 0
    with erp_connect(erp_db) as c:
        writable = c.execute(
            "SELECT bool_or(has_table_privilege(%s, t, 'INSERT,UPDATE,DELETE,TRUNCATE')) "
            "FROM unnest(%s::text[]) t",
            (role, TABLES),
        ).fetchone()
    assert writable == (False,)
    assert sampler.peak_mb < RSS_LIMIT_MB
    fault_row.peak_rss_mb = sampler.peak_mb
    fault_row.measured = (
        f"{comp.summary()}; pg_logical_emit_message executable by PUBLIC: "
        f"{bool(emit_ok and emit_ok[0])} (no GRANT needed on PostgreSQL 15)"
    )


@pytest.mark.fault("least-privilege")
def test_missing_publication_without_create_right_is_a_clear_error(
    erp_db: str, roles: list[str], tmp_path: Path, fault_row: Row
) -> None:
    seed_erp(erp_db)
    role = f"sync_capture_{uuid.uuid4().hex[:6]}"
    roles.append(role)
    db = psycopg.conninfo.conninfo_to_dict(erp_db)["dbname"]
    with erp_connect(erp_db) as c:
        for stmt in CAPTURE_GRANTS.format(role=role, db=db).strip().split(";\n"):
            c.execute(stmt.strip().rstrip(";"))
    cfg = base_config(tmp_path, _url_as(erp_db, role), f"sqlite:///{tmp_path / 's.db'}", TABLES)
    fault_row.injected = "least-privilege role, but the DBA did not create the publication"
    fault_row.how_often = "1 start"
    fault_row.checked = "exit code 3 (no restart loop) and the CREATE PUBLICATION the DBA must run"
    with DaemonProcess(cfg) as d:
        code = d.wait(60)
        out = d.output()
    assert code == 3, out[-2000:]
    assert "CREATE PUBLICATION sync_daemon FOR TABLE" in out
    fault_row.measured = "exit 3 with the DBA's statement in the log"


class KeptRetrying(Exception):
    """The daemon kept retrying a permanent error instead of stopping with exit code 4."""


@pytest.mark.fault("least-privilege")
def test_role_without_replication_is_a_clear_error(
    erp_db: str, roles: list[str], tmp_path: Path, fault_row: Row
) -> None:
    seed_erp(erp_db)
    role = f"sync_norepl_{uuid.uuid4().hex[:6]}"
    roles.append(role)
    db = psycopg.conninfo.conninfo_to_dict(erp_db)["dbname"]
    with erp_connect(erp_db) as c:
        for stmt in CAPTURE_GRANTS.format(role=role, db=db).strip().split(";\n"):
            c.execute(stmt.strip().rstrip(";").replace(" REPLICATION", ""))
        c.execute(DBA_PUBLICATION)
    cfg = base_config(tmp_path, _url_as(erp_db, role), f"sqlite:///{tmp_path / 's.db'}", TABLES)
    fault_row.injected = "capture role without the REPLICATION attribute"
    fault_row.how_often = "1 start"
    fault_row.checked = (
        "the error names the missing right; the daemon stops with exit 4 (access refused, "
        "not restarted by systemd) instead of retrying for ever"
    )
    with DaemonProcess(cfg) as d:
        wait_until(lambda: "replication role" in d.output(), 30, what="the permission error")
        fault_row.measured = "log: 'must be superuser or replication role to start walsender'"
        try:
            code = d.wait(5)
        except Exception:
            code = None
            fault_row.measured += "; still retrying after 5 s (capture_interrupted, backoff)"
    if code != 4:
        raise KeptRetrying(f"exit code {code}")


# The exact statements of docs/security.md ("ERP writer role", sample mapping). The capture role
# (erp.dsn) and the writer role (erp.writer_dsn) are separate: neither holds the other's rights.
WRITER_GRANTS = """
GRANT SELECT, INSERT, UPDATE ON public.order_header TO {role};
GRANT SELECT, INSERT, DELETE ON public.order_line TO {role};
GRANT SELECT, INSERT, UPDATE (customer_no) ON public.customers TO {role};
GRANT SELECT, UPDATE ON public.number_series TO {role};
GRANT SELECT ON public.items TO {role};
"""


@pytest.mark.fault("least-privilege")
def test_order_import_with_least_privilege_writer_role(
    pg_erp_url: str, tmp_path: Path, fault_row: Row
) -> None:
    from tests.emulators.orders import generate_orders
    from tests.emulators.woocommerce import WooCommerceEmulator
    from tests.faults.common import erp_e_numbers, ledger_states, orders_config

    erp = pg_erp_url
    role = f"sync_writer_{uuid.uuid4().hex[:6]}"
    capture = f"sync_capture_{uuid.uuid4().hex[:6]}"
    db = psycopg.conninfo.conninfo_to_dict(erp)["dbname"]
    with erp_connect(erp) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")  # writes orders; no REPLICATION
        c.execute(f"CREATE ROLE {capture} LOGIN REPLICATION")  # reads; writes nothing
        for r in (role, capture):
            c.execute(f'GRANT CONNECT ON DATABASE "{db}" TO {r}')
            c.execute(f"GRANT USAGE ON SCHEMA public TO {r}")
        c.execute(f"GRANT SELECT ON public.order_header TO {capture}")
        for stmt in WRITER_GRANTS.format(role=role).strip().split(";\n"):
            c.execute(stmt.strip().rstrip(";"))
        c.execute("CREATE PUBLICATION sync_daemon FOR TABLE public.order_header")
    skus = [f"SKU-X{i}" for i in range(1, 51)]
    try:
        with WooCommerceEmulator(products=[(s, s, 100) for s in skus]) as emu:
            emu.add_orders(
                generate_orders(
                    30,
                    seed=5,
                    start=datetime.now(UTC) - timedelta(hours=1),
                    spacing=timedelta(seconds=30),
                    skus=skus,
                )
            )
            cfg = orders_config(
                tmp_path,
                _url_as(erp, capture),
                writer_url=_url_as(erp, role),
                shops=[
                    {
                        "name": "web",
                        "kind": "woocommerce",
                        "url": emu.url,
                        "consumer_key": emu.consumer_key,
                        "consumer_secret": emu.consumer_secret,
                    }
                ],
            )
            staging = f"sqlite:///{tmp_path / 'staging.db'}"
            fault_row.injected = (
                "capture of order_header with a REPLICATION + SELECT role (erp.dsn) and order "
                "import with a writer role holding only the table rights the sample mapping "
                "writes (erp.writer_dsn)"
            )
            fault_row.how_often = "1 run, 30 shop orders"
            fault_row.checked = (
                "every qualifying order in the ERP once, ledger final; no permission error"
            )
            with DaemonProcess(cfg) as d:

                def settled() -> bool:
                    states = ledger_states(staging)
                    return len(states) == 30 and all(
                        s in ("delivered", "skipped", "failed") for s in states.values()
                    )

                wait_until(settled, 90, 0.5, "orders settled")
                out = d.output()
                assert d.terminate() == 0
            states = ledger_states(staging)
            in_erp = erp_e_numbers(erp)
            delivered = {e for (_, e), s in states.items() if s == "delivered"}
            assert delivered and delivered == set(in_erp)
            assert all(n == 1 for n in in_erp.values())
            assert "failed" not in states.values(), states
            assert "permission denied" not in out.lower(), out[-3000:]
            fault_row.measured = f"{len(delivered)} delivered once, no permission error"
    finally:
        with erp_connect(erp) as c:
            for r in (role, capture):
                c.execute(f"DROP OWNED BY {r}")
                c.execute(f"DROP ROLE IF EXISTS {r}")
