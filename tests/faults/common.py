"""Shared pieces of the fault suite: the ERP schema, a writer that keeps writing through faults,
an RSS sampler for the daemon process, and the end-of-test checks (staging == source, counted and
checksummed per table).
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from tests.helpers import assert_staging_equals_source, source_rows, staging_rows

SCHEMA = """
CREATE TABLE items (
    id bigint PRIMARY KEY, sku varchar(40) NOT NULL, qty integer, price numeric(14,4),
    active boolean, at timestamptz, attrs jsonb, note text
);
CREATE TABLE stock (sku text, warehouse int, qty int NOT NULL, PRIMARY KEY (sku, warehouse));
"""
TABLES = ["public.items", "public.stock"]

# Memory bound the daemon must stay under in every fault test (RSS of the daemon process).
RSS_LIMIT_MB = 400.0


def erp_connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5, **kw)


def seed_erp(url: str, items: int = 300, bulk: int = 0) -> None:
    """Create the schema and fill it; ``bulk`` extra stock rows make the snapshot take a while."""
    with erp_connect(url) as c:
        c.execute(SCHEMA)
        c.execute(
            "INSERT INTO items SELECT g, 'SKU-' || g, g, g * 1.5, g %% 2 = 0, now(), "
            "jsonb_build_object('g', g), repeat('x', CASE WHEN g %% 100 = 0 THEN 5000 ELSE 10 END) "
            "FROM generate_series(1, %s) g",
            (items,),
        )
        c.execute(
            "INSERT INTO stock SELECT 'SKU-' || g, w, g * w FROM generate_series(1, 100) g, "
            "generate_series(1, 3) w"
        )
        if bulk:
            c.execute(
                "INSERT INTO stock SELECT 'BULK-' || g, 9, g FROM generate_series(1, %s) g", (bulk,)
            )


class Writer:
    """Seeded writer threads that keep writing to the ERP through every fault.

    Each thread reconnects after a lost connection; a transaction whose COMMIT was in flight when
    the connection died may or may not have committed, which is why the check compares the final
    state of both sides rather than counting changes.
    """

    def __init__(self, url: str, seed: int, threads: int = 3, big_every: int = 0) -> None:
        self.url = url
        self.seed = seed
        self.stop = threading.Event()
        self.commits = 0
        self.errors = 0
        self.big_txns = 0
        self.big_every = big_every
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 100 + i,), daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Writer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            if t.ident is not None:
                t.join(30)

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        conn: psycopg.Connection[Any] | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, connect_timeout=3)
                n += 1
                if self.big_every and n % self.big_every == 0:
                    # A large source transaction: the daemon applies it in chunks.
                    conn.execute(
                        "UPDATE stock SET qty = qty + 1 WHERE sku LIKE 'BULK-%%' AND qty %% 7 = %s",
                        (rnd.randint(0, 6),),
                    )
                    conn.commit()
                    with self._lock:
                        self.big_txns += 1
                        self.commits += 1
                    continue
                for _ in range(rnd.randint(1, 8)):
                    op = rnd.random()
                    sku, w = f"SKU-{rnd.randint(1, 150)}", rnd.randint(1, 4)
                    if op < 0.5:
                        conn.execute(
                            "INSERT INTO stock VALUES (%s, %s, %s) ON CONFLICT (sku, warehouse) "
                            "DO UPDATE SET qty = stock.qty + excluded.qty",
                            (sku, w, rnd.randint(1, 9)),
                        )
                    elif op < 0.7:
                        conn.execute(
                            "DELETE FROM stock WHERE sku = %s AND warehouse = %s", (sku, w)
                        )
                    elif op < 0.9:
                        conn.execute(
                            "UPDATE items SET qty = %s, at = now(), attrs = %s WHERE id = %s",
                            (rnd.randint(0, 999), f'{{"n": {n}}}', rnd.randint(1, 300)),
                        )
                    else:
                        conn.execute(
                            "INSERT INTO items (id, sku, qty, note) VALUES (%s, %s, 1, 'new') "
                            "ON CONFLICT (id) DO UPDATE SET note = 'again'",
                            (rnd.randint(1000, 5000), f"N-{n}"),
                        )
                conn.commit()
                with self._lock:
                    self.commits += 1
                time.sleep(rnd.uniform(0, 0.02))
            except psycopg.errors.DeadlockDetected:
                if conn is not None:
                    conn.rollback()
            except psycopg.Error:
                with self._lock:
                    self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.stop.wait(0.2)
        if conn is not None:
            conn.close()


class RssSampler:
    """Sample the RSS of whichever daemon process ``pid()`` names; remember the peak."""

    def __init__(self, pid: Callable[[], int | None], interval: float = 0.2) -> None:
        self._pid = pid
        self.interval = interval
        self.peak_mb = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self._pid()
            if pid:
                try:
                    rss = psutil.Process(pid).memory_info().rss / 1e6
                    self.peak_mb = max(self.peak_mb, rss)
                    self.samples += 1
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)


def _digest(rows: Sequence[str]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()[:12]


@dataclass
class Comparison:
    """Row counts and checksums of every table on both sides."""

    tables: dict[str, tuple[int, str, int, str]] = field(default_factory=dict)

    def summary(self) -> str:
        return ", ".join(
            f"{t.split('.')[-1]} {n} rows sha {d}" for t, (n, d, _, _) in self.tables.items()
        )


def check_staging_equals_source(
    erp_url: str, staging_url: str, tables: Sequence[str] = TABLES, timeout: float = 90
) -> Comparison:
    """Wait until staging equals the source row by row, then count and checksum both sides."""
    assert_staging_equals_source(erp_url, staging_url, tables, timeout=timeout)
    out = Comparison()
    for t in tables:
        st, cols, key = staging_rows(staging_url, t)
        src = source_rows(erp_url, t, cols, key)
        out.tables[t] = (len(src), _digest(src), len(st), _digest(st))
        assert (len(src), _digest(src)) == (len(st), _digest(st)), t
    return out


def daemon_errors(log_text: str) -> list[str]:
    """Tracebacks in a daemon log (a crash the daemon did not classify)."""
    return re.findall(r"Traceback \(most recent call last\)", log_text)


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def orders_config(
    tmp: Path,
    erp_url: str,
    shops: Sequence[dict[str, Any]],
    *,
    workers: int = 4,
    max_body: int = 65536,
    extra_orders: str = "",
    writer_url: str | None = None,
    capture: str = "",
    schedule: str = "every 1s",
    staging_url: str | None = None,
) -> Path:
    """A daemon config that captures ``order_header`` and imports orders continuously from
    ``shops`` (dicts of ``[[shops]]`` keys), with the sample mapping."""
    import shutil

    from replicator.orders.sample import SAMPLE_MAPPING
    from tests.helpers import toml_value

    (tmp / "mappings").mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE_MAPPING, tmp / "mappings" / "orders.toml")
    default_staging = f"sqlite:///{tmp / 'staging.db'}"
    text = (
        f'[erp]\ndsn = "{erp_url}"\n'
        + (f'writer_dsn = "{writer_url}"\n' if writer_url else "")
        + "\n"
        '[capture]\ntables = ["public.order_header"]\nbatch_ms = 50\nheartbeat_interval = 1\n'
        f"{capture}\n"
        f'[staging]\nurl = "{staging_url or default_staging}"\n\n'
        '[health]\nlisten = "127.0.0.1:0"\n\n'
        f'[daemon]\nstate_dir = "{tmp / "state"}"\n\n[logging]\nformat = "json"\n\n'
        f"[orders]\nenabled = true\nbackoff_initial = 0.2\nbackoff_max = 1.0\nretry_attempts = 3\n"
        f"workers = {workers}\nfirst_lookback_hours = 48\n{extra_orders}\n"
        f'[schedules]\norders = "{schedule}"\n\n'
    )
    for shop in shops:
        text += "[[shops]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in shop.items())
        text += f"max_body = {max_body}\n\n" if shop.get("kind") == "webhook" else "\n"
    path = tmp / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def install_triggers(cfg: Path) -> None:
    """``sync-daemon triggers install`` for ``cfg`` (trigger capture mode), as an operator runs it."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    res = subprocess.run(
        [sys.executable, str(ROOT / "sync_daemon.py"), "triggers", "install", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def health_url(log_text: str) -> str | None:
    m = re.search(r'"url": "(http://127\.0\.0\.1:\d+/)"', log_text)
    return m.group(1) if m else None


def erp_e_numbers(erp_url: str) -> dict[str, int]:
    """e-number -> how many ERP orders carry it."""
    with erp_connect(erp_url) as c:
        return {
            str(e): int(n)
            for e, n in c.execute(
                "SELECT e_number, count(*) FROM order_header GROUP BY e_number"
            ).fetchall()
        }


def ledger_states(staging_url: str) -> dict[tuple[str, str], str]:
    """(shop, e-number) -> ledger state."""
    import sqlalchemy as sa

    eng = sa.create_engine(staging_url)
    try:
        with eng.connect() as c:
            return {
                (s, e): st
                for s, e, st in c.exec_driver_sql("SELECT shop, e_number, state FROM order_ledger")
            }
    except sa.exc.OperationalError:
        return {}
    finally:
        eng.dispose()


def logged(d: Any, *events: str, times: int = 1) -> Callable[[], bool]:
    """A predicate: one of ``events`` appears at least ``times`` times in the daemon's log."""
    return lambda: any(d.output().count(e) >= times for e in events)


def wait_alive(
    d: Any, pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    """``wait_until`` that fails at once, with the log tail, when the daemon process has exited."""
    deadline = time.monotonic() + timeout
    pause = min(interval, 0.05)  # quick first polls, as in wait_until
    while time.monotonic() < deadline:
        if pred():
            return
        if not d.alive():
            raise AssertionError(
                f"the daemon exited while waiting for {what}:\n" + d.output()[-3000:]
            )
        time.sleep(pause)
        pause = min(interval, pause * 2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
