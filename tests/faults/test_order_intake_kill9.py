"""kill -9 of the daemon at the acknowledgement point of every order intake path, into each ERP.

Orders arrive in bursts through one intake path per test — JSON files dropped into the inbox
folder, signed WooCommerce webhooks, the WooCommerce REST poll, the Magento REST poll — while the
daemon (a real ``sync-daemon run`` process) imports them into a PostgreSQL or MariaDB ERP. Each
incarnation is stopped at a seeded point:

* **at the acknowledgement point**: ``SYNC_DAEMON_FAILPOINT=orders.acknowledge@N`` freezes the
  process (SIGSTOP, every thread at once) right after the N-th order-inbox commit and before the
  source hears "done" (file moved, webhook answered); ``orders.receive@N`` just before that
  commit; ``orders.watermark@1`` (polls) before the watermark is saved. Frozen, the test checks
  that everything the source was told is done is in the order ledger, then sends SIGKILL;
* **at a seeded random moment** of the burst (plain SIGKILL, as the issue reproduced it).

After the last restart: orders that reached us (files dropped, webhooks answered 2xx, orders the
shop listed) = orders in the ERP, each exactly once.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa

from replicator.db import make_engine
from replicator.orders.sample import install_sample_erp
from tests import test_orders_support as support
from tests.emulators.magento import MagentoEmulator
from tests.emulators.orders import SampleOrder, generate_orders
from tests.emulators.woocommerce import WooCommerceEmulator
from tests.faults.common import (
    RSS_LIMIT_MB,
    RssSampler,
    daemon_errors,
    health_url,
    install_triggers,
    ledger_states,
    orders_config,
    wait_alive,
)
from tests.faults.conftest import Row
from tests.helpers import ROOT, DaemonProcess, wait_until

_pg_erp_template = support._pg_erp_template
FULL = pytest.mark.faults_full
SKUS = [f"SKU-X{i}" for i in range(1, 51)]
SECRET = "intake-secret"


# -- the ERPs -------------------------------------------------------------------------------------


@pytest.fixture
def erp(request: pytest.FixtureRequest, erp_kind: str) -> Iterator[str]:
    """A sample ERP on PostgreSQL (a copy of the session template) or MariaDB (its own database)."""
    if erp_kind == "postgresql":
        yield from support._pg_copy(
            request.getfixturevalue("pg_server"), request.getfixturevalue("_pg_erp_template")
        )
        return
    gen = support._mariadb_db(request.getfixturevalue("mariadb_url"))
    url = next(gen)
    install_sample_erp(url)
    yield url
    gen.close()


def erp_e_numbers(url: str) -> dict[str, int]:
    """e-number -> how many ERP orders carry it (PostgreSQL or MariaDB)."""
    engine = make_engine(url, "fault-check")
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT e_number, count(*) FROM order_header GROUP BY 1"))
            return {str(e): int(n) for e, n in rows}
    finally:
        engine.dispose()


def capture_for(erp_kind: str) -> str:
    # MariaDB has no logical replication: the daemon captures it with triggers.
    return 'mode = "triggers"\npoll_interval = 0.2\n' if erp_kind == "mariadb" else ""


# -- orders ---------------------------------------------------------------------------------------


def burst(n: int, seed: int, first: int) -> list[SampleOrder]:
    """``n`` orders that all meet the import criteria (paid, processing): every one must arrive."""
    # Placed just now (the last a few seconds ago), as a burst is: a polled shop lists them in
    # the window the daemon asks for next.
    start = datetime.now(UTC) - timedelta(seconds=n + 5)
    return [
        dataclasses.replace(
            o, status="processing", paid=o.created, modified=o.created + timedelta(seconds=1)
        )
        for o in generate_orders(
            n, seed=seed, start=start, spacing=timedelta(seconds=1), first_number=first, skus=SKUS
        )
    ]


def woo_json(o: SampleOrder) -> dict[str, Any]:
    """The order as WooCommerce renders it (REST, webhook body, dropped file)."""
    return WooCommerceEmulator(products=[(s, s, 100) for s in SKUS]).put_order(o)


# -- intake paths ---------------------------------------------------------------------------------


class Intake:
    """One way orders reach the daemon; ``reached()`` is what the source was told is done."""

    name = ""
    failpoints = ("orders.receive", "orders.acknowledge")

    def shop(self) -> dict[str, Any]:
        raise NotImplementedError

    def deliver(self, orders: list[SampleOrder]) -> None:
        raise NotImplementedError

    def delivered(self) -> set[str]:
        """Every e-number handed to the daemon so far."""
        raise NotImplementedError

    def acknowledged(self) -> set[str]:
        """E-numbers the daemon told the source it has (at this instant)."""
        raise NotImplementedError

    def reached(self) -> set[str]:
        """Orders that reached us, once the run is over."""
        return self.delivered()

    def settled(self) -> bool:
        return True

    def close(self) -> None:
        pass


class FolderIntake(Intake):
    name = "inbox"

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "inbox"
        self.dir.mkdir()
        self._dropped: set[str] = set()

    def shop(self) -> dict[str, Any]:
        return {"name": "files", "kind": "inbox", "inbox_dir": str(self.dir), "inbox_settle": 0}

    def deliver(self, orders: list[SampleOrder]) -> None:
        for o in orders:
            tmp = self.dir / f"order-{o.number}.json.tmp"
            tmp.write_text(json.dumps(woo_json(o)))
            os.rename(tmp, self.dir / f"order-{o.number}.json")
            self._dropped.add(str(o.number))

    def delivered(self) -> set[str]:
        return set(self._dropped)

    def acknowledged(self) -> set[str]:
        return {p.name.split("-")[1].split(".")[0] for p in (self.dir / "processed").glob("*")}

    def settled(self) -> bool:
        return not list(self.dir.glob("*.json"))


class WebhookIntake(Intake):
    """A WooCommerce that delivers each order by signed webhook and redelivers until it gets a
    2xx (as WooCommerce does), from 4 threads at once."""

    name = "webhook"

    def __init__(self, url: Callable[[], str | None]) -> None:
        self._url = url
        self._pending: list[tuple[str, bytes, str]] = []
        self._answered: set[str] = set()
        self._sent: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]
        for t in self._threads:
            t.start()

    def shop(self) -> dict[str, Any]:
        return {"name": "hooks", "kind": "webhook", "webhook_secret": SECRET}

    def deliver(self, orders: list[SampleOrder]) -> None:
        with self._lock:
            for o in orders:
                body = json.dumps(woo_json(o)).encode()
                self._pending.append((str(o.number), body, f"dlv-{o.number}"))
                self._sent.add(str(o.number))

    def _run(self) -> None:
        client = httpx.Client(timeout=10)
        while not self._stop.is_set():
            with self._lock:
                item = self._pending.pop(0) if self._pending else None
            url = self._url()
            if item is None or url is None:
                if item is not None:
                    with self._lock:
                        self._pending.append(item)
                self._stop.wait(0.05)
                continue
            e, body, dlv = item
            sig = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest())
            try:
                r = client.post(
                    url + "webhooks/shop/hooks",
                    content=body,
                    headers={
                        "X-WC-Webhook-Signature": sig.decode(),
                        "X-WC-Webhook-Delivery-ID": dlv,
                        "X-WC-Webhook-Topic": "order.created",
                        "Content-Type": "application/json",
                    },
                )
                ok = 200 <= r.status_code < 300
            except httpx.HTTPError:
                ok = False
            with self._lock:
                if ok:
                    self._answered.add(e)
                else:
                    self._pending.append(item)  # redelivered later, like WooCommerce
            if not ok:
                self._stop.wait(0.1)
        client.close()

    def delivered(self) -> set[str]:
        with self._lock:
            return set(self._sent)

    def acknowledged(self) -> set[str]:
        with self._lock:
            return set(self._answered)

    def reached(self) -> set[str]:
        return self.acknowledged()

    def settled(self) -> bool:
        with self._lock:
            return not self._pending and self._answered == self._sent

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


class PollIntake(Intake):
    """A shop polled over REST: the WooCommerce or Magento emulator lists the orders."""

    failpoints = ("orders.receive", "orders.acknowledge", "orders.watermark")

    def __init__(self, kind: str) -> None:
        self.name = kind
        self.emu: WooCommerceEmulator | MagentoEmulator
        if kind == "woocommerce":
            self.emu = WooCommerceEmulator(products=[(s, s, 100) for s in SKUS]).start()
        else:
            self.emu = MagentoEmulator().start()
        self._listed: set[str] = set()

    def shop(self) -> dict[str, Any]:
        if isinstance(self.emu, WooCommerceEmulator):
            return {
                "name": "woo",
                "kind": "woocommerce",
                "url": self.emu.url,
                "consumer_key": self.emu.consumer_key,
                "consumer_secret": self.emu.consumer_secret,
                "per_page": 25,
            }
        return {
            "name": "mage",
            "kind": "magento",
            "url": self.emu.url,
            "token": self.emu.token,
            "per_page": 25,
        }

    def e_number(self, o: SampleOrder) -> str:
        return str(o.number) if isinstance(self.emu, WooCommerceEmulator) else f"{o.number:09d}"

    def deliver(self, orders: list[SampleOrder]) -> None:
        self.emu.add_orders(orders)
        self._listed |= {self.e_number(o) for o in orders}

    def delivered(self) -> set[str]:
        return set(self._listed)

    def acknowledged(self) -> set[str]:
        return set()  # the watermark: checked as a whole after the run

    def close(self) -> None:
        self.emu.stop()


# -- the test -------------------------------------------------------------------------------------


def frozen(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


INTAKES = ["inbox", "webhook", "woocommerce", "magento"]


@pytest.mark.fault("kill9-order-intake")
@pytest.mark.parametrize(
    ("intake_kind", "erp_kind", "kills"),
    [
        ("inbox", "postgresql", 3),
        ("webhook", "postgresql", 3),
        ("woocommerce", "postgresql", 5),
        pytest.param("magento", "postgresql", 5, marks=FULL),
        pytest.param("inbox", "mariadb", 4, marks=FULL),
        pytest.param("webhook", "mariadb", 4, marks=FULL),
        pytest.param("woocommerce", "mariadb", 5, marks=FULL),
        pytest.param("magento", "mariadb", 5, marks=FULL),
        pytest.param("inbox", "postgresql", 8, marks=FULL),
        pytest.param("webhook", "postgresql", 8, marks=FULL),
    ],
)
def test_kill9_at_the_acknowledgement_point(
    erp: str,
    erp_kind: str,
    intake_kind: str,
    kills: int,
    tmp_path: Path,
    fault_row: Row,
    seed: int,
) -> None:
    rnd = random.Random(f"{seed}-{intake_kind}-{erp_kind}-{kills}")
    current: list[DaemonProcess] = []

    def url() -> str | None:
        d = current[0] if current else None
        return health_url(d.output()) if d is not None and d.alive() else None

    intake: Intake
    if intake_kind == "inbox":
        intake = FolderIntake(tmp_path)
    elif intake_kind == "webhook":
        intake = WebhookIntake(url)
    else:
        intake = PollIntake(intake_kind)
    shop = intake.shop()
    extra = ""
    if intake_kind == "magento":
        # The sample mapping reads WooCommerce JSON; Magento orders get the Magento mapping.
        extra = (
            'shop_mappings = { mage = "mappings/magento.toml" }\n'
            '[orders.criteria.mage]\npaid_field = "payment.amount_paid"\n'
        )
    cfg = orders_config(
        tmp_path,
        erp,
        [shop],
        extra_orders=extra,
        capture=capture_for(erp_kind),
        # Webhook orders must be imported by the wake-up after each delivery (and by the import
        # at start-up), not by a cycle that happens to run soon after.
        schedule="every 1h" if intake_kind == "webhook" else "every 1s",
    )
    if intake_kind == "magento":
        (tmp_path / "mappings" / "magento.toml").write_text(
            (ROOT / "config" / "mappings" / "magento.toml").read_text()
        )
    if erp_kind == "mariadb":
        install_triggers(cfg)
    per_burst = 40
    frozen_checks: list[str] = []
    doubled_at_kill: dict[str, int] = {}
    how: list[str] = []
    fault_row.injected = (
        f"{intake_kind} orders in bursts of {per_burst} into a {erp_kind} ERP; each daemon "
        "incarnation frozen (SIGSTOP) at a seeded pass of an acknowledgement failpoint "
        "(orders committed to the inbox, source not yet told), then SIGKILL; or SIGKILL at a "
        "seeded random moment of the burst"
    )
    fault_row.checked = (
        "frozen: everything acknowledged to the source is in the ledger; after the last "
        "restart: orders that reached us = orders in the ERP, each exactly once"
    )
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    try:
        with RssSampler(lambda: current[0].pid if current and current[0].alive() else None) as rss:
            for i in range(kills):
                orders = burst(per_burst, seed + i, first=100_000 * (i + 1))
                at_failpoint = i % 2 == 0
                env = {}
                if at_failpoint:
                    # Every failpoint in turn; which pass of it, seeded.
                    point = intake.failpoints[(i // 2) % len(intake.failpoints)]
                    nth = 1 if point == "orders.watermark" else rnd.randint(1, 3)
                    if intake_kind == "webhook":
                        nth = rnd.randint(1, per_burst // 2)
                    env["SYNC_DAEMON_FAILPOINT"] = f"{point}@{nth}"
                d = DaemonProcess(cfg, log=tmp_path / f"daemon-{i:02d}.log", env=env).start()
                current[:] = [d]
                wait_alive(d, lambda d=d: health_url(d.output()) is not None, 60, "started")
                # The burst lands in chunks while the daemon runs, so every chunk meets a cycle.
                for k in range(0, per_burst, 10):
                    chunk = orders[k : k + 10]
                    intake.deliver(chunk)
                    if at_failpoint and not isinstance(intake, PollIntake):
                        # One chunk, one acknowledgement at least: the drawn pass is reached.
                        es = {str(o.number) for o in chunk}
                        wait_until(
                            lambda d=d, es=es: frozen(d.pid) or es <= intake.acknowledged(),
                            60,
                            0.02,
                            "the chunk acknowledged",
                        )
                    else:
                        time.sleep(rnd.uniform(0.0, 0.15))
                if at_failpoint:
                    try:
                        wait_until(lambda d=d: frozen(d.pid), 60, 0.01, "the failpoint")
                    except AssertionError:
                        # Fewer passes than drawn (the burst went through in fewer pages):
                        # the plain kill below still lands during the run.
                        how.append("kill (failpoint not reached)")
                    else:
                        # Frozen: whatever the source was told is done must be in the ledger.
                        acked = intake.acknowledged()
                        ledger = {e for (_, e) in ledger_states(staging)}
                        lost = acked - ledger
                        assert not lost, f"acknowledged but not in the ledger: {sorted(lost)[:10]}"
                        frozen_checks.append(env["SYNC_DAEMON_FAILPOINT"])
                        how.append(f"frozen at {env['SYNC_DAEMON_FAILPOINT']}")
                else:
                    time.sleep(rnd.uniform(0.0, 1.5))
                    how.append("kill at a random moment")
                d.kill9()
                doubled_at_kill |= {e: n for e, n in erp_e_numbers(erp).items() if n > 1}
            d = DaemonProcess(cfg, log=tmp_path / "final.log").start()
            current[:] = [d]
            wait_alive(d, lambda: health_url(d.output()) is not None, 60, "started")

            def all_in() -> bool:
                if not intake.settled():
                    return False
                ledger = {e: st for (_, e), st in ledger_states(staging).items()}
                return all(ledger.get(e) == "delivered" for e in intake.reached())

            wait_alive(d, all_in, 240, "every order that reached us delivered", 0.5)
            in_erp = erp_e_numbers(erp)
            reached = intake.reached()
            assert reached == intake.delivered(), "a delivery never reached the daemon"
            assert not doubled_at_kill, doubled_at_kill
            doubled = {e: n for e, n in in_erp.items() if n != 1}
            assert not doubled, f"e-numbers in the ERP more than once: {doubled}"
            missing = reached - set(in_erp)
            assert not missing, f"reached us but not in the ERP: {sorted(missing)[:10]}"
            extra_in_erp = set(in_erp) - reached
            assert not extra_in_erp, sorted(extra_in_erp)[:10]
            assert not daemon_errors(d.output()), d.output()[-3000:]
            assert d.terminate() == 0
    finally:
        for p in current:
            p.kill9()
        intake.close()
    fault_row.how_often = f"{kills} kills: " + ", ".join(how)
    fault_row.peak_rss_mb = rss.peak_mb
    fault_row.measured = (
        f"reached us {len(reached)} = in the ERP {len(in_erp)}, 0 lost, 0 doubled; "
        f"{len(frozen_checks)} frozen checks passed"
    )
    assert frozen_checks, "no incarnation was frozen at an acknowledgement point"
    assert rss.peak_mb < RSS_LIMIT_MB
