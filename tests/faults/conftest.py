"""Fixtures of the fault suite and the generator of ``docs/RELIABILITY.md``.

Run modes:
  pytest tests/faults                         the short seeded subset (part of the default run)
  SYNC_FAULTS_FULL=1 pytest tests/faults      everything, including ``faults_full`` tests
  pytest tests/faults -m faults_full          only the long variants
Add ``--reliability-report`` (only when ``tests/faults`` is named on the command line, as
pytest reads options from initial conftests only) or set ``SYNC_RELIABILITY_REPORT=1`` to (re)write
``docs/RELIABILITY.md`` from the rows the tests measured; ``--faults-seed N`` changes the seed of every random schedule (default below).

Each test takes the ``fault_row`` fixture, fills in what it injected, how often, what it checked
and what it measured; the outcome (pass / FAIL / xfail) is taken from the test's own result, so the
table never says more than the run proved.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from replicator.localpg import LocalCluster, find_bindir

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "RELIABILITY.md"
DEFAULT_SEED = 20261122

# Every fault the issue names, in report order; a fault without a measured row in this session is
# listed as "not run" (or with its TODO), so a gap is visible instead of silently missing.
PLANNED: dict[str, str] = {
    "kill9-random": "kill -9 of the daemon at seeded random points (snapshot, streaming, batch apply)",
    "erp-stop-fast": "ERP PostgreSQL stopped (fast) and restarted mid-stream",
    "erp-stop-immediate": "ERP PostgreSQL stopped (immediate) and restarted mid-stream",
    "net": "network daemon↔ERP cut (connections closed, new ones refused), slowed, partitioned",
    "staging-pg-down": "staging PostgreSQL unavailable (its own cluster stopped, then started)",
    "staging-sqlite-full": "staging SQLite file's disk full (4 MB tmpfs), then space freed",
    "slot-dropped": "replication slot dropped by a DBA while the daemon is stopped",
    "two-daemons": "a second daemon started on the same source",
    "least-privilege": "daemon runs with the least-privilege capture role only",
    "config-world-readable": "config holding a password readable by other users",
    "config-injection": "SQL metacharacters in watched table names and in order mapping files",
    "webhook-abuse": "webhook: bad/missing signatures, replays, oversized and slow bodies",
    "http-fuzz": "hypothesis fuzz of the daemon's HTTP endpoints (/healthz, /readyz, /metrics, ...)",
    "shop-faults": "webshop answering 500, 429 + Retry-After, timeouts, truncated and non-JSON bodies",
    "kill9-order-import": "kill -9 during an order import between the ERP commit and the ledger update",
    "kill9-order-intake": "kill -9 at the acknowledgement point of each intake path (inbox folder, "
    "webhook, WooCommerce poll, Magento poll) into each ERP (PostgreSQL, MariaDB)",
    "erp-restart-orders": "ERP PostgreSQL stopped and restarted in the middle of order transactions",
    "staging-down-at-start": "staging store unreachable when the daemon starts, orders waiting",
    "triggers-kill9": "kill -9 in trigger capture mode (PostgreSQL, MariaDB) with concurrent writers",
    "triggers-erp-restart": "ERP PostgreSQL restarted in trigger capture mode with writers",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "sync-daemon fault suite")
    group.addoption(
        "--reliability-report",
        action="store_true",
        default=False,
        help="write docs/RELIABILITY.md from the measured fault rows at session end",
    )
    group.addoption(
        "--faults-seed",
        type=int,
        default=int(os.environ.get("SYNC_FAULTS_SEED", DEFAULT_SEED)),
        help="seed of the random fault schedules",
    )


def _report_wanted(config: pytest.Config) -> bool:
    return bool(
        config.getoption("--reliability-report", False) or os.environ.get("SYNC_RELIABILITY_REPORT")
    )


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # The report is written from the rows this process measured; spread over pytest-xdist
    # workers (pyproject's `-n 2`) each would hold a part, so a report run stays in one process.
    if _report_wanted(config) and getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0
        config.option.dist = "no"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults_full: long fault-suite variants (SYNC_FAULTS_FULL=1 or -m faults_full)"
    )
    config.addinivalue_line("markers", "fault(name): the reliability row a fault test measures")


def _full_run(config: pytest.Config) -> bool:
    return bool(os.environ.get("SYNC_FAULTS_FULL")) or "faults_full" in (
        config.getoption("markexpr", "") or ""
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _full_run(config):
        return
    skip = pytest.mark.skip(reason="long fault variant: SYNC_FAULTS_FULL=1 or -m faults_full")
    for item in items:
        if "faults_full" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


@dataclass
class Row:
    """One line of the reliability table."""

    fault: str
    test: str
    injected: str = ""
    how_often: str = ""
    checked: str = ""
    measured: str = ""
    peak_rss_mb: float | None = None
    seconds: float = 0.0
    outcome: str = "not run"
    notes: list[str] = field(default_factory=list)


class Reliability:
    """Collects rows during the session; writes the Markdown table at the end when asked."""

    def __init__(self, seed: int, full: bool) -> None:
        self.seed = seed
        self.full = full
        self.rows: list[Row] = []
        self.started = time.monotonic()

    def markdown(self, command: str) -> str:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            "# Reliability: fault-injection results",
            "",
            "Generated by the fault suite itself — do not edit by hand. Regenerate with:",
            "",
            "```",
            command,
            "```",
            "",
            f"Last run: {now}, seed {self.seed}, "
            f"{'full suite' if self.full else 'default (short) subset'}, "
            f"Python {platform.python_version()}, PostgreSQL binaries {find_bindir()}, "
            f"{time.monotonic() - self.started:.0f} s in total.",
            "",
            "Every fault is injected into real processes (the daemon runs as `sync-daemon run`, "
            "PostgreSQL clusters are real, the network fault is a TCP proxy on loopback) while "
            "writers keep changing the ERP; after recovery the suite checks that staging equals "
            "the source row by row (counts and SHA-256 per table, both sides), and samples the "
            "daemon's RSS with psutil every 0.2 s (peak below; limit "
            "400 MB). The outcome column is the test's own result.",
            "",
            "| Fault | Injected | How often | Checked | Measured | Peak RSS | Time | Outcome |",
            "|---|---|---|---|---|---|---|---|",
        ]
        seen = {r.fault for r in self.rows}
        rows = list(self.rows)
        for fault, what in PLANNED.items():
            if fault not in seen:
                rows.append(Row(fault, "", injected=what, outcome="not run in this session"))
        order = list(PLANNED)
        rows.sort(key=lambda r: (order.index(r.fault) if r.fault in order else 99, r.test))

        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        for r in rows:
            rss = f"{r.peak_rss_mb:.0f} MB" if r.peak_rss_mb else "-"
            secs = f"{r.seconds:.0f} s" if r.seconds else "-"
            name = f"{r.fault}<br>`{r.test}`" if r.test else r.fault
            lines.append(
                f"| {cell(name)} | {cell(r.injected)} | {cell(r.how_often)} | {cell(r.checked)} "
                f"| {cell(r.measured)} | {rss} | {secs} | {cell(r.outcome)} |"
            )
        notes = [f"- **{r.fault}** (`{r.test}`): {n}" for r in rows for n in r.notes]
        if notes:
            lines += ["", "## Notes", "", *notes]
        return "\n".join(lines) + "\n"


_RELIABILITY: Reliability | None = None


@pytest.fixture(scope="session")
def reliability(request: pytest.FixtureRequest) -> Iterator[Reliability]:
    global _RELIABILITY
    rel = Reliability(
        request.config.getoption("--faults-seed", DEFAULT_SEED), _full_run(request.config)
    )
    _RELIABILITY = rel
    yield rel


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A pytest-xdist worker holds only its share of the rows: never write a partial table.
    if not _report_wanted(session.config) or _RELIABILITY is None:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    command = ("SYNC_FAULTS_FULL=1 " if _RELIABILITY.full else "") + (
        ".venv/bin/pytest tests/faults --reliability-report"
    )
    REPORT.write_text(_RELIABILITY.markdown(command))


@pytest.fixture
def fault_row(request: pytest.FixtureRequest, reliability: Reliability) -> Iterator[Row]:
    """The reliability row of this test; its outcome comes from the test result."""
    marker = request.node.get_closest_marker("fault")
    fault = marker.args[0] if marker else request.node.name
    row = Row(fault=fault, test=request.node.name)
    t0 = time.monotonic()
    yield row
    row.seconds = time.monotonic() - t0
    rep = getattr(request.node, "rep_call", None)
    if rep is None:
        row.outcome = "error (setup)"
    elif hasattr(rep, "wasxfail"):
        row.outcome = "XFAIL: known product bug (see notes)"
        row.notes.append(str(rep.wasxfail).removeprefix("reason: "))
    elif rep.passed:
        row.outcome = "pass"
    elif rep.skipped:
        row.outcome = "skipped"
    else:
        row.outcome = "**FAIL**"
        msg = str(rep.longrepr).strip().splitlines()
        row.notes.append("failure: " + (msg[-1][:300] if msg else "?"))
    reliability.rows.append(row)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--faults-seed", DEFAULT_SEED))


@pytest.fixture(scope="session")
def _initdb_template() -> Iterator[LocalCluster]:
    """One initialised, never started cluster whose data folder every dedicated cluster copies:
    ``initdb`` takes one to two seconds, a copy of its result a tenth of that."""
    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries")
    template = LocalCluster().init()
    try:
        yield template
    finally:
        template.destroy()


def _cluster_from(template: LocalCluster) -> LocalCluster:
    """A new cluster (own folder, port and socket directory) from ``template``'s data folder."""
    cluster = LocalCluster()
    # cp -a keeps the owner (the postgres user when run as root) and the 0700 of the data folder.
    subprocess.run(["cp", "-a", str(template.datadir), str(cluster.datadir)], check=True)
    cluster.root.chmod(0o755)
    if os.geteuid() == 0:
        st = template.root.stat()
        os.chown(cluster.root, st.st_uid, st.st_gid)
    # The template's port and socket directory are in its postgresql.conf; the last value wins.
    with (cluster.datadir / "postgresql.conf").open("a") as f:
        for k, v in cluster.settings.items():
            f.write(f"{k} = {v}\n")
    return cluster


@pytest.fixture
def own_cluster(_initdb_template: LocalCluster) -> Iterator[LocalCluster]:
    """A dedicated PostgreSQL cluster for this test only (it may be stopped and restarted)."""
    cluster = _cluster_from(_initdb_template)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def own_erp(own_cluster: LocalCluster) -> str:
    """A database ``erp`` on the dedicated cluster; yields its URL."""
    return own_cluster.createdb("erp")


def pg_alive(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False
