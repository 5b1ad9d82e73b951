"""kill -9 during a burst of orders into a real ERP (Tryton, Dolibarr-shaped MariaDB).

``python -m tests.erp.burst ERP_URL MAPPING WORKDIR N`` imports N orders (20 % new customers,
some guests, the rest one known customer) with the order service, 4 ERP writers, prints
``cycle`` when it starts; the test kills it with SIGKILL at random moments, restarts it, and
checks that every e-number ends up in the ERP exactly once and delivered in the ledger.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.erp.orders import taxed_order

FIRST = 20_000


def burst_orders(n: int, known_email: str) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        number = FIRST + i
        if i % 5 == 0:
            email = f"new{number}@example.com"  # 20 % new customers
        elif i % 7 == 0:
            email = ""  # a guest
        else:
            email = known_email
        out.append(taxed_order(number, lines=2, email=email))
    return out


def main(url: str, mapping: str, workdir: str, n: int, known_email: str) -> None:
    from replicator.orders.coordinator import OrderImportService
    from replicator.orders.sample import ListShop
    from tests.test_orders_support import make_config

    tmp = Path(workdir)
    (tmp / "mappings").mkdir(parents=True, exist_ok=True)
    shutil.copy(mapping, tmp / "mappings" / "orders.toml")
    shop = ListShop("shop")
    for order in burst_orders(n, known_email):
        shop.put(order)
    svc = OrderImportService(make_config(tmp, url, workers=4), {"shop": shop})
    print("cycle", flush=True)
    svc.run_cycle()
    print("done", flush=True)
    svc.close()


def run_with_kills(
    url: str,
    mapping: Path,
    workdir: Path,
    n: int,
    known_email: str,
    imported: Any,
    kills: int = 3,
    seed: int = 12,
) -> list[int]:
    """Start the worker, SIGKILL it once some orders are in, ``kills`` times; then let it end.
    Returns how many orders were in the ERP at each kill."""
    at_kill: list[int] = []
    rnd = random.Random(seed)
    args = [sys.executable, "-m", "tests.erp.burst", url, str(mapping), str(workdir), str(n)]
    args.append(known_email)
    root = Path(__file__).resolve().parents[2]
    for _ in range(kills):
        before = imported()
        proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            # Wait for progress (not a fixed time), then kill at a random moment after it.
            while imported() <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rnd.uniform(0.0, 0.3))
        finally:
            proc.kill()
            proc.wait()
        at_kill.append(imported())
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert "done" in done.stdout, done.stderr[-2000:]
    return at_kill


def at_once(calls: list[Callable[[], Any]]) -> list[BaseException]:
    """Run the calls on threads released together; the exceptions they raised."""
    start = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], Any]) -> None:
        start.wait()
        try:
            call()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
