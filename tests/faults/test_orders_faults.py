"""Order import under faults, through the real daemon process: the WooCommerce emulator answering
500, 429 with Retry-After, too slowly (timeout), with truncated and with non-JSON bodies; and
kill -9 of the daemon while it imports — including the window between the ERP commit and the
ledger update. Afterwards every e-number is in the ERP exactly once, and every downloaded order is
in the ledger in a final (delivered, failed, skipped) or retryable (awaiting, update-pending) state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from replicator.localpg import LocalCluster
from replicator.orders.sample import install_sample_erp
from tests import test_orders_support as support
from tests.emulators.magento import MagentoEmulator
from tests.emulators.orders import generate_orders
from tests.emulators.woocommerce import WooCommerceEmulator
from tests.faults.common import (
    RSS_LIMIT_MB,
    RssSampler,
    daemon_errors,
    erp_e_numbers,
    ledger_states,
    orders_config,
    wait_alive,
)
from tests.faults.conftest import Row
from tests.helpers import ROOT, DaemonProcess

_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url

FULL = pytest.mark.faults_full
FINAL = {"delivered", "failed", "skipped"}
RETRYABLE = {"awaiting", "update-pending"}
SKUS = [f"SKU-X{i}" for i in range(1, 51)]


def _shop(n: int, seed: int, first: int = 1001, kind: str = "woocommerce") -> Any:
    emu: WooCommerceEmulator | MagentoEmulator
    if kind == "magento":
        emu = MagentoEmulator(products=[(s, f"Item {s}", 100) for s in SKUS])
    else:
        emu = WooCommerceEmulator(products=[(s, f"Item {s}", 100) for s in SKUS])
    # Spread over the last two hours, all modified in the past (a shop lists nothing ahead).
    start = datetime.now(UTC) - timedelta(hours=2)
    spacing = timedelta(seconds=min(20.0, 5400 / max(n, 1)))
    emu.add_orders(
        generate_orders(n, seed=seed, start=start, spacing=spacing, first_number=first, skus=SKUS)
    )
    return emu


def _shop_e_numbers(emu: WooCommerceEmulator | MagentoEmulator) -> set[str]:
    """The e-numbers the shop lists (WooCommerce: the order number; Magento: increment_id)."""
    if isinstance(emu, MagentoEmulator):
        return {str(o["increment_id"]) for o in emu.orders.values()}
    return {str(k) for k in emu.orders}


def _shop_section(emu: WooCommerceEmulator | MagentoEmulator, **extra: Any) -> dict[str, Any]:
    if isinstance(emu, MagentoEmulator):
        return {"name": "web", "kind": "magento", "url": emu.url, "token": emu.token, **extra}
    return {
        "name": "web",
        "kind": "woocommerce",
        "url": emu.url,
        "consumer_key": emu.consumer_key,
        "consumer_secret": emu.consumer_secret,
        **extra,
    }


# The sample mapping reads WooCommerce JSON; a Magento shop gets the Magento mapping and reads
# "paid" from the payment's paid amount.
MAGENTO_ORDERS = (
    'shop_mappings = { web = "mappings/magento.toml" }\n'
    '[orders.criteria.web]\npaid_field = "payment.amount_paid"\n'
)


def _orders_config(tmp: Path, erp: str, emu: Any, **shop: Any) -> Path:
    magento = isinstance(emu, MagentoEmulator)
    cfg = orders_config(
        tmp, erp, [_shop_section(emu, **shop)], extra_orders=MAGENTO_ORDERS if magento else ""
    )
    if magento:
        (tmp / "mappings" / "magento.toml").write_text(
            (ROOT / "config" / "mappings" / "magento.toml").read_text()
        )
    return cfg


def _check_exactly_once(erp: str, staging: str, emu: Any, shop: str) -> str:
    """Every e-number at most once in the ERP; every shop order in the ledger, final/retryable;
    every delivered ledger entry in the ERP."""
    in_erp = erp_e_numbers(erp)
    doubled = {e: n for e, n in in_erp.items() if n != 1}
    assert not doubled, f"e-numbers in the ERP more than once: {doubled}"
    ledger = {e: st for (s, e), st in ledger_states(staging).items() if s == shop}
    shop_numbers = _shop_e_numbers(emu)
    missing = shop_numbers - set(ledger)
    assert not missing, f"downloaded orders missing from the ledger: {sorted(missing)[:10]}"
    bad = {e: st for e, st in ledger.items() if st not in FINAL | RETRYABLE}
    assert not bad, bad
    delivered = {e for e, st in ledger.items() if st == "delivered"}
    assert delivered <= set(in_erp), sorted(delivered - set(in_erp))[:10]
    assert {e for e in in_erp if e in shop_numbers} == delivered
    states: dict[str, int] = {}
    for st in ledger.values():
        states[st] = states.get(st, 0) + 1
    return f"{len(in_erp)} ERP orders, 0 doubled; ledger {states}"


def _all_settled(staging: str, emu: Any, shop: str) -> bool:
    ledger = {e: st for (s, e), st in ledger_states(staging).items() if s == shop}
    return _shop_e_numbers(emu) <= set(ledger) and all(st in FINAL for st in ledger.values())


def _found_in_erp(staging: str) -> set[str]:
    import sqlalchemy as sa

    eng = sa.create_engine(staging)
    try:
        with eng.connect() as c:
            return {
                e
                for (e,) in c.exec_driver_sql(
                    "SELECT DISTINCT e_number FROM order_events WHERE event = 'found in ERP'"
                )
            }
    finally:
        eng.dispose()


@pytest.mark.fault("shop-faults")
@pytest.mark.parametrize("kind", ["woocommerce", "magento"])
def test_shop_errors_during_order_import(
    pg_erp_url: str, tmp_path: Path, fault_row: Row, seed: int, kind: str
) -> None:
    erp = pg_erp_url
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    with _shop(40, seed, kind=kind) as emu:
        # Queued faults are consumed one per request, in this order.
        emu.fail_next(2, status=500)
        emu.throttle_next(1, retry_after=1)
        emu.delay_next(1, seconds=4)
        emu.truncate_next(1)
        emu.garbage_next(1)
        emu.fail_next(1, status=503)
        cfg = _orders_config(tmp_path, erp, emu, timeout=2)
        fault_row.injected = (
            f"{'Magento' if kind == 'magento' else 'WooCommerce'} emulator: 2x500, 429 Retry-After 1, 4 s delay (client "
            "timeout 2 s), truncated body, HTML instead of JSON, 503"
        )
        fault_row.how_often = "7 faulty answers, then healthy; 40 orders"
        fault_row.checked = (
            "every e-number in the ERP exactly once; every shop order in the ledger "
            "in a final/retryable state; daemon alive, no traceback; RSS"
        )
        with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
            wait_alive(d, lambda: "health_server_listening" in d.output(), 30, "started")
            wait_alive(
                d,
                lambda: _all_settled(staging, emu, "web"),
                120,
                "all orders settled in the ledger",
                0.5,
            )
            summary = _check_exactly_once(erp, staging, emu, "web")
            assert d.alive() and not daemon_errors(d.output()), d.output()[-3000:]
            assert d.terminate() == 0
        statuses = [r.status for r in emu.requests]
    faulty = sum(1 for st in statuses if st >= 400)
    fault_row.peak_rss_mb = sampler.peak_mb
    fault_row.measured = (
        f"{len(statuses)} shop requests, {faulty} answered with an error status "
        f"(+ delay/truncate/garbage as 200); {summary}"
    )
    assert faulty >= 4, statuses
    assert sampler.peak_mb < RSS_LIMIT_MB


@pytest.mark.fault("kill9-order-import")
@pytest.mark.parametrize("kills", [5, pytest.param(20, marks=FULL)])
def test_kill9_during_order_import(
    pg_erp_url: str, tmp_path: Path, fault_row: Row, seed: int, kills: int
) -> None:
    erp = pg_erp_url
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    rnd = random.Random(seed)
    wave = 150
    with _shop(0, seed) as emu:
        cfg = orders_config(
            tmp_path,
            erp,
            [
                {
                    "name": "web",
                    "kind": "woocommerce",
                    "url": emu.url,
                    "consumer_key": emu.consumer_key,
                    "consumer_secret": emu.consumer_secret,
                }
            ],
        )
        fault_row.injected = (
            f"SIGKILL of the daemon at seeded random moments while it imports "
            f"a wave of {wave} new orders (4 ERP writers); window orders = in the "
            "ERP but not delivered in the ledger at the kill"
        )
        fault_row.checked = (
            "every e-number in the ERP exactly once; window orders repaired on "
            "restart ('found in ERP'); every shop order in the ledger, final"
        )
        windows: set[str] = set()
        current: list[DaemonProcess] = []

        def more_than(before: int) -> Callable[[], bool]:
            return lambda: len(erp_e_numbers(erp)) > before

        with RssSampler(lambda: current[0].pid if current and current[0].alive() else None) as s:
            try:
                for i in range(kills):
                    emu.add_orders(
                        generate_orders(
                            wave,
                            seed=seed + i,
                            start=datetime.now(UTC) - timedelta(minutes=5),
                            spacing=timedelta(seconds=1),
                            first_number=10_000 * (i + 1),
                            skus=SKUS,
                        )
                    )
                    before = len(erp_e_numbers(erp))
                    d = DaemonProcess(cfg, log=tmp_path / f"daemon-{i:02d}.log").start()
                    current[:] = [d]
                    # Orders reach the ERP one transaction each while the ledger records a whole
                    # batch after them: kill once the ERP has new orders, inside that window.
                    wait_alive(d, more_than(before), 60, "import running", 0.01)
                    time.sleep(rnd.uniform(0.0, 0.05))
                    d.kill9()
                    in_erp = erp_e_numbers(erp)
                    ledger = {e: st for (_, e), st in ledger_states(staging).items()}
                    windows |= {e for e in in_erp if ledger.get(e) != "delivered"}
                d = DaemonProcess(cfg, log=tmp_path / "final.log").start()
                current[:] = [d]
                wait_alive(d, lambda: "health_server_listening" in d.output(), 30, "started")
                wait_alive(d, lambda: _all_settled(staging, emu, "web"), 180, "all settled", 0.5)
                summary = _check_exactly_once(erp, staging, emu, "web")
                assert d.terminate() == 0
            finally:
                for p in current:
                    p.kill9()
        repaired = _found_in_erp(staging)
    fault_row.how_often = f"{kills} kills during the import"
    fault_row.peak_rss_mb = s.peak_mb
    fault_row.measured = (
        f"{len(windows)} orders caught between ERP commit and ledger update, "
        f"{len(repaired)} 'found in ERP' repairs in the ledger; {summary}"
    )
    assert windows, "no kill landed between an ERP commit and its ledger update"
    assert repaired, "no 'found in ERP' repair was recorded"
    assert s.peak_mb < RSS_LIMIT_MB


@pytest.mark.fault("erp-restart-orders")
@pytest.mark.parametrize(
    ("mode", "rounds"), [("immediate", 1), pytest.param("fast", 3, marks=FULL)]
)
def test_erp_restarted_in_the_middle_of_order_transactions(
    own_cluster: LocalCluster,
    own_erp: str,
    tmp_path: Path,
    fault_row: Row,
    seed: int,
    mode: str,
    rounds: int,
) -> None:
    """The ERP PostgreSQL is stopped while 4 workers write orders (each order one ERP
    transaction), then started again: the transactions in flight are lost with the server, their
    orders stay awaiting and are written once the ERP is back — each exactly once."""
    erp = own_erp
    install_sample_erp(erp)
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    wave = 200
    with _shop(wave * rounds, seed) as emu:
        cfg = _orders_config(tmp_path, erp, emu)
        fault_row.injected = (
            f"`pg_ctl stop -m {mode}` of the ERP cluster for 2 s while the daemon writes "
            f"{wave * rounds} shop orders (4 ERP writers), then start"
        )
        fault_row.how_often = f"{rounds}x during the import"
        fault_row.checked = (
            "orders the shop listed = orders in the ERP (of those meeting the criteria), each "
            "exactly once; every shop order in the ledger, final; daemon alive, no traceback"
        )

        def written() -> int:
            # ERP orders, not ledger entries: the ledger notes a whole batch after its ERP writes.
            try:
                return len(erp_e_numbers(erp))
            except Exception:
                return -1

        with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as s:
            for _ in range(rounds):
                before = written()
                wait_alive(d, lambda b=before: written() > b, 120, "ERP writes running", 0.02)
                own_cluster.stop(mode)
                time.sleep(2)
                own_cluster.start()
            wait_alive(d, lambda: _all_settled(staging, emu, "web"), 240, "all settled", 0.5)
            summary = _check_exactly_once(erp, staging, emu, "web")
            retried = d.output().count('"order_retry_later"') + d.output().count(
                '"order_cycle_failed"'
            )
            assert d.alive() and not daemon_errors(d.output()), d.output()[-3000:]
            assert d.terminate() == 0
    fault_row.peak_rss_mb = s.peak_mb
    fault_row.measured = (
        f"{retried} order writes/cycles met the stopped ERP and were retried; {summary}"
    )
    assert retried, "the stop did not meet an order transaction"
    assert s.peak_mb < RSS_LIMIT_MB
