"""Faults between the daemon and the ERP: the ERP PostgreSQL stopped (fast, immediate) and started
again mid-stream, and the network cut, slowed and partitioned by a loopback TCP proxy — while
writers keep changing the ERP. Afterwards staging must equal the source, the daemon must still be
running (it reconnects by itself), memory bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from replicator.localpg import LocalCluster
from tests.faults.common import (
    RSS_LIMIT_MB,
    TABLES,
    RssSampler,
    Writer,
    check_staging_equals_source,
    daemon_errors,
    logged,
    seed_erp,
)
from tests.faults.conftest import Row
from tests.faults.proxy import TcpProxy
from tests.helpers import DaemonProcess, assert_staging_equals_source, base_config, wait_until

FULL = pytest.mark.faults_full


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=FULL)])
def staging(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite staging in the short run; PostgreSQL staging (shared test cluster) in the full one."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'staging.db'}"
        return
    pg = request.getfixturevalue("pg_server")
    name = pg.createdb("staging")
    try:
        yield pg.url(name)
    finally:
        pg.dropdb(name)


def _finish(
    d: DaemonProcess, erp: str, staging: str, row: Row, sampler: RssSampler, writer: Writer
) -> None:
    comp = check_staging_equals_source(erp, staging, TABLES, timeout=90)
    row.peak_rss_mb = sampler.peak_mb
    row.measured = (
        f"{writer.commits} ERP txns committed by writers ({writer.errors} failed "
        f"during the fault); {comp.summary()}"
    )
    assert d.alive(), (
        "the daemon must survive the fault and reconnect by itself:\n" + d.output()[-3000:]
    )
    assert not daemon_errors(d.output()), d.output()[-3000:]
    assert sampler.peak_mb < RSS_LIMIT_MB
    assert d.terminate() == 0


@pytest.mark.fault("erp-stop-fast")
@pytest.mark.parametrize("rounds", [1, pytest.param(3, marks=FULL)])
def test_erp_stopped_fast_and_restarted(
    own_cluster: LocalCluster,
    own_erp: str,
    staging: str,
    tmp_path: Path,
    fault_row: Row,
    seed: int,
    rounds: int,
) -> None:
    _erp_stop(own_cluster, own_erp, staging, tmp_path, fault_row, seed, "fast", rounds)


@pytest.mark.fault("erp-stop-immediate")
@pytest.mark.parametrize("rounds", [1, pytest.param(3, marks=FULL)])
def test_erp_stopped_immediate_and_restarted(
    own_cluster: LocalCluster,
    own_erp: str,
    staging: str,
    tmp_path: Path,
    fault_row: Row,
    seed: int,
    rounds: int,
) -> None:
    _erp_stop(own_cluster, own_erp, staging, tmp_path, fault_row, seed, "immediate", rounds)


def _erp_stop(
    cluster: LocalCluster,
    erp: str,
    staging: str,
    tmp_path: Path,
    row: Row,
    seed: int,
    mode: str,
    rounds: int,
) -> None:
    seed_erp(erp)
    cfg = base_config(tmp_path, erp, staging, TABLES)
    row.injected = (
        f"`pg_ctl stop -m {mode}` of the ERP cluster for 2 s, then start; writers keep going"
    )
    row.how_often = f"{rounds}x mid-stream, staging {staging.split(':')[0]}"
    row.checked = (
        "staging == source (rows, SHA-256 per table); daemon reconnects without restart; "
        "no traceback; exit 0 on SIGTERM; RSS"
    )
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        assert_staging_equals_source(erp, staging, TABLES, timeout=60)
        with Writer(erp, seed) as writer:
            for r in range(rounds):
                time.sleep(1.5)
                cluster.stop(mode)
                time.sleep(2)
                cluster.start()
                wait_until(
                    logged(d, "capture_started", times=r + 2), 60, what="capture reconnected"
                )
            time.sleep(2)
        interruptions = d.output().count("capture_interrupted")
        _finish(d, erp, staging, row, sampler, writer)
        row.measured += f"; {interruptions} capture interruptions logged and recovered"


@pytest.fixture
def proxied(erp_db: str) -> Iterator[tuple[str, str, TcpProxy]]:
    """(ERP URL, the same through the proxy, the proxy). The proxy never touches the server, so
    the shared test cluster will do."""
    seed_erp(erp_db)
    info = psycopg.conninfo.conninfo_to_dict(erp_db)
    with TcpProxy(str(info.get("host", "127.0.0.1")), int(str(info.get("port", 5432)))) as proxy:
        yield erp_db, proxy.dsn_for(erp_db), proxy


@pytest.mark.fault("net")
@pytest.mark.parametrize("cuts", [pytest.param(10, marks=FULL)])
def test_network_cut_and_restored(
    proxied: tuple[str, str, TcpProxy],
    staging: str,
    tmp_path: Path,
    fault_row: Row,
    seed: int,
    cuts: int,
) -> None:
    erp, via_proxy, proxy = proxied
    cfg = base_config(tmp_path, via_proxy, staging, TABLES)
    fault_row.injected = "proxy closes every daemon↔ERP connection and refuses new ones for 2 s"
    fault_row.how_often = f"{cuts}x while writers write, staging {staging.split(':')[0]}"
    fault_row.checked = "staging == source; daemon reconnects by itself; no traceback; RSS"
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        assert_staging_equals_source(erp, staging, TABLES, timeout=60)
        with Writer(erp, seed) as writer:
            for i in range(cuts):
                time.sleep(1.5)
                proxy.cut()
                time.sleep(2)
                proxy.restore()
                wait_until(
                    logged(d, "capture_started", times=i + 2),
                    60,
                    what="capture reconnected after the cut",
                )
            time.sleep(1)
        _finish(d, erp, staging, fault_row, sampler, writer)
        fault_row.measured += f"; {proxy.refused} connection attempts refused during cuts"


@pytest.mark.fault("net")
@FULL
def test_network_slowed_then_restored(
    proxied: tuple[str, str, TcpProxy], staging: str, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    erp, via_proxy, proxy = proxied
    cfg = base_config(tmp_path, via_proxy, staging, TABLES)
    fault_row.injected = "proxy delays every chunk by 200 ms in both directions for 4 s"
    fault_row.how_often = f"1x while writers write, staging {staging.split(':')[0]}"
    fault_row.checked = "staging == source; daemon keeps running; no traceback; RSS"
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        assert_staging_equals_source(erp, staging, TABLES, timeout=60)
        with Writer(erp, seed) as writer:
            proxy.slow(0.2)
            time.sleep(4)
            proxy.restore()
            time.sleep(1)
        _finish(d, erp, staging, fault_row, sampler, writer)


@pytest.mark.fault("net")
@FULL
def test_network_blackhole_then_restored(
    proxied: tuple[str, str, TcpProxy], staging: str, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    erp, via_proxy, proxy = proxied
    cfg = base_config(tmp_path, via_proxy, staging, TABLES)
    fault_row.injected = "proxy forwards nothing for 8 s (no RST, sockets stay open), then resumes"
    fault_row.how_often = f"1x while writers write, staging {staging.split(':')[0]}"
    fault_row.checked = "staging == source; daemon keeps running; no traceback; RSS"
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        assert_staging_equals_source(erp, staging, TABLES, timeout=60)
        with Writer(erp, seed) as writer:
            proxy.blackhole()
            time.sleep(8)
            proxy.restore()
            time.sleep(1)
        _finish(d, erp, staging, fault_row, sampler, writer)


@pytest.mark.fault("net")
def test_network_cut_slowed_partitioned_then_restored(
    proxied: tuple[str, str, TcpProxy], staging: str, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    """The short run's network fault: two cuts, a slow link, a partition, one daemon throughout."""
    erp, via_proxy, proxy = proxied
    cfg = base_config(tmp_path, via_proxy, staging, TABLES)
    fault_row.injected = (
        "proxy on erp.dsn: cut (close all, refuse new) 2 s; slowed 200 ms/chunk "
        "2 s; partitioned without RST 2 s; restored after each"
    )
    fault_row.how_often = f"2 cuts + 1 slow + 1 partition, staging {staging.split(':')[0]}"
    fault_row.checked = "staging == source; daemon reconnects by itself; no traceback; RSS"
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        assert_staging_equals_source(erp, staging, TABLES, timeout=60)
        with Writer(erp, seed) as writer:
            for i in range(2):
                time.sleep(1)
                proxy.cut()
                time.sleep(2)
                proxy.restore()
                wait_until(
                    logged(d, "capture_started", times=i + 2),
                    60,
                    what="capture reconnected after the cut",
                )
            proxy.slow(0.2)
            time.sleep(2)
            proxy.restore()
            proxy.blackhole()
            time.sleep(2)
            proxy.restore()
            time.sleep(1)
        _finish(d, erp, staging, fault_row, sampler, writer)
        fault_row.measured += f"; {proxy.refused} connection attempts refused during cuts"


class LoopBlocked(Exception):
    """The daemon's main loop stopped ticking during the partition (liveness 503)."""


@pytest.mark.fault("net")
@FULL
def test_silent_partition_is_noticed(
    proxied: tuple[str, str, TcpProxy], tmp_path: Path, fault_row: Row
) -> None:
    """A partition that drops packets without RST, kept for 25 s: the daemon must notice on its
    own (readiness 503 or a reconnect) while its main loop stays live (/healthz 200)."""
    from tests.faults.common import health_url

    erp, via_proxy, proxy = proxied
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    cfg = base_config(tmp_path, via_proxy, staging, TABLES)
    cfg.write_text(cfg.read_text().replace("[health]\n", "[health]\nloop_overdue = 10\n"))
    fault_row.injected = (
        "proxy stops forwarding for 25 s without closing anything (no RST, no FIN): a silent "
        "network partition; health.loop_overdue = 10 s"
    )
    fault_row.how_often = "1x while streaming"
    fault_row.checked = (
        "/healthz stays 200 (main loop not blocked); the daemon notices (readiness 503 or "
        "reconnect) within 25 s; staging == source after restore"
    )
    import httpx

    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp, staging, TABLES, timeout=60)
        url = health_url(d.output())
        assert url is not None
        proxy.blackhole()
        live: list[int] = []
        ready: list[int] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 25:
            try:
                live.append(httpx.get(url + "healthz", timeout=3).status_code)
                ready.append(httpx.get(url + "readyz", timeout=5).status_code)
            except httpx.HTTPError:
                live.append(0)
            time.sleep(1)
        proxy.restore()
        comp = check_staging_equals_source(erp, staging, TABLES, timeout=120)
        noticed = 503 in ready or "capture_interrupted" in d.output()
        fault_row.measured = (
            f"/healthz during the partition: {sorted(set(live))}; /readyz: {sorted(set(ready))}; "
            f"noticed: {noticed}; after restore {comp.summary()}"
        )
        assert noticed
        assert d.terminate() == 0
        if set(live) != {200}:
            raise LoopBlocked(f"/healthz answered {live}")
