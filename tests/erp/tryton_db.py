"""A real Tryton database for the order-import tests, built once per Tryton version and reused.

``trytond-admin`` creates the database and activates the ``sale`` module on the shared PostgreSQL;
proteus (Tryton's own client library) then sets up what a shop selling through Tryton has: a
company (EUR), a chart of accounts, a fiscal year with invoice sequences, taxes of 19 % and 7 %,
a payment term, products whose codes are the shop's SKUs, a shipping service product, a guest
party (code ``GUEST``) and one known customer. The result is kept as a template database named
after the Tryton version (:data:`TEMPLATE`); each test gets a copy (``CREATE DATABASE ... TEMPLATE``
takes a second) so tests never share state.

Run ``python -m tests.erp.tryton_db`` to build the template by hand.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg

ADMIN_DSN = os.environ.get("SYNC_TEST_TRYTON_PG", "host=127.0.0.1 port=5432 user=postgres")
# Bump the suffix when the set-up below changes: the cached template is then rebuilt.
SETUP_VERSION = "4"
SKUS = {f"X-{n}": Decimal(str(n % 40 + 5)) for n in range(1, 21)}  # sample_order's SKUs
REDUCED_SKUS = {"BOOK-1": Decimal("12.50")}
KNOWN_EMAIL = "known@example.com"


def tryton_version() -> str:
    from importlib.metadata import version

    return version("trytond")


TEMPLATE = f"sync_tryton_{tryton_version().replace('.', '_')}_s{SETUP_VERSION}"


def _uri() -> str:
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    return f"postgresql://{info.get('user', 'postgres')}@{info.get('host')}:{info.get('port')}/"


def config_file(directory: Path | None = None) -> Path:
    """A trytond configuration pointing at the test PostgreSQL."""
    directory = directory or Path("/tmp")
    path = directory / f"sync-tryton-{os.getuid()}.conf"
    text = f"[database]\nuri = {_uri()}\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def database_exists(name: str) -> bool:
    with psycopg.connect(ADMIN_DSN, dbname="postgres", autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )


def ensure_template() -> str:
    """The template database, built now unless a previous run left it."""
    if database_exists(TEMPLATE):
        return TEMPLATE
    with open(f"/tmp/sync-tryton-build-{os.getuid()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database_exists(TEMPLATE):
            _build()
    return TEMPLATE


def _build(skip_admin: bool = False) -> None:
    building = f"{TEMPLATE}_building"
    with psycopg.connect(ADMIN_DSN, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
        conn.execute(f"CREATE DATABASE \"{building}\" ENCODING 'UTF8' TEMPLATE template0")
    conf = config_file()
    admin = Path(sys.executable).with_name("trytond-admin")
    env = {**os.environ, "TRYTONPASSFILE": str(_passfile())}
    subprocess.run(
        [str(admin), "-c", str(conf), "-d", building, "--all", "--email", "admin@example.com"],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [str(admin), "-c", str(conf), "-d", building, "-u", "sale", "--activate-dependencies"],
        check=True,
        env=env,
        capture_output=True,
    )
    # proteus runs in a child process: trytond keeps per-process state we do not want in pytest.
    subprocess.run(
        [sys.executable, "-m", "tests.erp.tryton_db", "--setup", building],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    with psycopg.connect(ADMIN_DSN, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{building}" RENAME TO "{TEMPLATE}"')


def _passfile() -> Path:
    p = Path(f"/tmp/sync-tryton-pass-{os.getuid()}")
    p.write_text("admin\n")
    return p


def clone(prefix: str = "tryton") -> str:
    """A fresh copy of the template for one test; drop it with :func:`drop`."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{ensure_template()}"')
    return name


def drop(name: str) -> None:
    with psycopg.connect(ADMIN_DSN, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def url(name: str) -> str:
    return _uri() + name


def setup_business(database: str) -> None:
    """What a shop has in Tryton before orders arrive (runs in its own process)."""
    from proteus import Model, config

    # Before anything imports trytond.backend: it picks the database backend at import time.
    config.set_trytond(database=database, config_file=str(config_file()))
    from trytond.modules.account.tests.tools import (
        create_chart,
        create_fiscalyear,
        create_tax,
        get_accounts,
    )
    from trytond.modules.account_invoice.tests.tools import (
        create_payment_term,
        set_fiscalyear_invoice_sequences,
    )
    from trytond.modules.company.tests.tools import create_company

    Currency = Model.get("currency.currency")
    if not Currency.find([("code", "=", "EUR")]):
        Currency(name="Euro", code="EUR", symbol="€", rounding=Decimal("0.01")).save()
    Party = Model.get("party.party")
    company_party = Party(name="Sample Shop GmbH")
    company_party.save()
    create_company(party=company_party, currency="EUR")
    create_chart()
    fiscalyear = set_fiscalyear_invoice_sequences(create_fiscalyear())
    fiscalyear.click("create_period")
    accounts = get_accounts()
    standard = create_tax(Decimal("0.19"))
    standard.name = standard.description = "VAT 19%"
    standard.save()
    reduced = create_tax(Decimal("0.07"))
    reduced.name = reduced.description = "VAT 7%"
    reduced.save()
    Category = Model.get("product.category")
    category = Category(name="Shop goods", accounting=True)
    category.account_expense = accounts["expense"]
    category.account_revenue = accounts["revenue"]
    category.customer_taxes.append(Model.get("account.tax")(standard.id))
    category.save()
    Uom = Model.get("product.uom")
    (unit,) = Uom.find([("name", "=", "Unit")])
    Template = Model.get("product.template")
    for skus, ptype in ((SKUS, "goods"), (REDUCED_SKUS, "goods"), ({"SHIPPING": 0}, "service")):
        for sku, price in skus.items():
            t = Template(name=f"Item {sku}", default_uom=unit, type=ptype, salable=True)
            t.list_price = Decimal(price)
            t.account_category = category
            t.save()
            (product,) = t.products
            product.suffix_code = sku
            product.save()
    term = create_payment_term()
    term.save()
    Country = Model.get("country.country")
    for code, name in (("DE", "Germany"), ("AT", "Austria"), ("DK", "Denmark")):
        Country(name=name, code=code).save()
    Party(name="Guest customer (web shop)", code="GUEST").save()
    known = Party(name="Known Customer", code="KNOWN")
    known.contact_mechanisms.new(type="email", value=KNOWN_EMAIL)
    known.save()
    # WooCommerce rounds tax per line by default; Tryton's totals match it with "line" rounding.
    AccountConfig = Model.get("account.configuration")
    ac = AccountConfig(1)
    ac.tax_rounding = "line"
    ac.save()
    SaleConfig = Model.get("sale.configuration")
    sc = SaleConfig(1)
    sc.sale_invoice_method = "order"
    sc.sale_shipment_method = "order"
    sc.save()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--setup":
        setup_business(sys.argv[2])
    else:
        print(ensure_template())
