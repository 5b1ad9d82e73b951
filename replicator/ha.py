"""High availability: one active and one standby daemon sharing a lease in the staging store.

The lease is one row of ``sync_ha_lease`` in the shared PostgreSQL staging store (its SQL is in
:mod:`replicator.staging.lease`): the holder's node name, an **epoch** (the fencing token, raised
by every takeover) and an expiry on the database's clock. The active daemon renews it every ``ha.renew_seconds``; a standby takes it
over only once it has expired, raising the epoch.

Why a lease alone is not enough, and what fencing adds
------------------------------------------------------
A partitioned or paused active daemon may not know yet that its lease is gone while it still
holds an open transaction. Therefore every commit on the staging store of an active daemon
first runs, *inside that same transaction*, a check that the lease row still carries its epoch
and has not expired (``SELECT … FOR SHARE``). The share lock makes a takeover (an ``UPDATE``
of that row) wait until the transaction is over, so a commit is either before the takeover or
fails: capture batches with their checkpoint, order-ledger writes, push cursors — nothing of a
deposed daemon reaches staging. The ERP side needs no fence: the order import is idempotent on
the e-number (link table with a unique key in the ERP transaction) and capture confirms a slot
position only after its staging commit.

The active daemon also demotes itself when it could not renew for ``lease_seconds -
renew_seconds`` on its own clock (before the standby may take over): it stops capture and the
services (which closes its replication connection, so the new active can use the slot) and
goes back to standby. A daemon stuck in a network call that does not stop within
``daemon.shutdown_timeout`` exits with code 4; its supervisor (systemd) starts it again, as
standby.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import make_url

from replicator import metrics, sdnotify
from replicator.config import Config
from replicator.db import make_engine
from replicator.errors import FatalError
from replicator.staging import shared_engine
from replicator.staging.lease import LeaseTable
from replicator.web.server import HttpServer

log = structlog.get_logger(__name__, service="ha")

EXIT_LEASE_LOST = 4
LEASE = "sync-daemon"

# Engines that read and write the lease itself: never fenced (they are what fences).
_LEASE_ENGINES: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


class LeaseLost(FatalError):
    """This daemon's lease epoch moved or expired: it must not commit anything more."""


class Lease:
    """The lease row, on an engine of its own (never fenced: it is what fences)."""

    def __init__(self, cfg: Config) -> None:
        self.node = cfg.ha.node
        self.seconds = cfg.ha.lease_seconds
        self.engine = _lease_engine(cfg.staging_url, cfg.ha.renew_seconds)
        self.table = LeaseTable(self.engine, LEASE)
        self.epoch = 0
        self.health_url = ""

    def setup(self) -> None:
        self.table.create()

    def try_acquire(self) -> int | None:
        """Take the lease when nobody holds it or it expired: the new epoch, else None."""
        epoch = self.table.try_acquire(self.node, self.seconds)
        if epoch is None:
            return None
        self.epoch = epoch
        return self.epoch

    def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours (epoch moved or expired)."""
        return self.table.renew(self.node, self.epoch, self.seconds)

    def release(self) -> None:
        """Clean shutdown: let the standby take over at once."""
        self.table.release(self.node, self.epoch)

    def announce(self, role: str) -> None:
        """Record this node and its role, so the peer (and ``status``) can name it."""
        self.table.announce(self.node, role, socket.gethostname(), os.getpid(), self.health_url)

    def holder(self) -> dict[str, Any] | None:
        return self.table.state()

    def peers(self) -> list[dict[str, Any]]:
        return [n for n in self.table.nodes(self.seconds * 3) if n["node"] != self.node]

    def fence_check(self, dbapi_conn: Any) -> None:
        """Inside a staging transaction: fail unless our epoch still holds the lease."""
        if not self.table.holds(dbapi_conn, self.node, self.epoch):
            # Roll back here: SQLAlchemy does not roll back a commit its own hook refused.
            dbapi_conn.rollback()
            raise LeaseLost(
                f"HA lease epoch {self.epoch} of node {self.node!r} is no longer valid "
                "(taken over or expired): this commit is refused"
            )

    def dispose(self) -> None:
        self.engine.dispose()


def _lease_engine(url: str, renew_seconds: float) -> sa.Engine:
    # Short timeouts: a renewal that cannot finish in time counts as failed, not as pending.
    ms = int(max(1.0, renew_seconds) * 1000)
    eng = make_engine(url, "ha", pool_size=1, max_overflow=1)
    _LEASE_ENGINES.add(eng)

    @event.listens_for(eng, "connect")
    def _timeouts(dbapi_conn: Any, _rec: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"SET statement_timeout = {ms}")
        cur.execute(f"SET lock_timeout = {ms}")
        cur.close()
        dbapi_conn.commit()

    return eng


class Fence:
    """Every commit on the staging database, from any engine of this process, checks the lease
    first (SQLAlchemy ``commit`` event, run before COMMIT is sent, inside the transaction)."""

    def __init__(self, lease: Lease, staging_url: str) -> None:
        self.lease = lease
        u = make_url(staging_url)
        self.target = (u.host or "", u.port or 5432, u.database or "")
        self.installed = False

    def _on_commit(self, conn: sa.Connection) -> None:
        eng = conn.engine
        if eng in _LEASE_ENGINES:
            return
        u = eng.url
        if (u.host or "", u.port or 5432, u.database or "") != self.target:
            return  # the ERP, or another database
        self.lease.fence_check(conn.connection.dbapi_connection)

    def install(self) -> None:
        event.listen(sa.engine.Engine, "commit", self._on_commit)
        self.installed = True

    def remove(self) -> None:
        if self.installed:
            event.remove(sa.engine.Engine, "commit", self._on_commit)
            self.installed = False


class Renewer:
    """Renews the lease from a thread of its own; demotes the daemon when it cannot."""

    def __init__(self, lease: Lease, renew_seconds: float, on_lost: Callable[[str], None]) -> None:
        self.lease = lease
        self.interval = renew_seconds
        self.on_lost = on_lost
        self.last_ok = time.monotonic()
        self.lost = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name="ha-lease", daemon=True),
            threading.Thread(target=self._watch, name="ha-lease-watch", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sent = time.monotonic()
            try:
                if self.lease.renew():
                    self.last_ok = sent
                    self.lease.announce("active")
                else:
                    self._lose("the lease was taken over or expired")
                    return
            except Exception as exc:  # staging unreachable: retry until the budget is spent
                log.warning("ha_lease_renew_failed", error=str(exc).splitlines()[0])

    def _watch(self) -> None:
        # The lease expires lease_seconds after the last renewal was *sent* (our clock, before
        # the database's). Giving up renew_seconds earlier leaves that much margin before the
        # standby may take over. A thread of its own: a renewal may hang on a dead network.
        budget = self.lease.seconds - self.interval
        while not self._stop.wait(0.2):
            if time.monotonic() - self.last_ok >= budget:
                self._lose(f"could not renew the lease for {budget:g} s")
                return

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost:
                return
            self.lost = why
        metrics.HA_ACTIVE.labels(self.lease.node).set(0)
        log.error("ha_lease_lost", node=self.lease.node, epoch=self.lease.epoch, reason=why)
        self.on_lost(why)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(1)


def _standby_health(cfg: Config, lease: Lease) -> Any:
    """While standby: /healthz answers, /readyz says standby and names the active node."""
    if not cfg.health.enabled:
        return None

    def check() -> tuple[bool, str]:
        st = lease.holder()
        if st is None or not st["valid"]:
            return False, f"standby ({lease.node}); no active daemon holds the lease: taking over"
        return False, f"standby ({lease.node}); active: {st['holder']} (epoch {st['epoch']})"

    health = HttpServer(cfg.health)
    health.add_check("ha", check)
    health.start()
    lease.health_url = health.url
    log.info("standby_health_listening", url=health.url + "/")
    return health


def run_with_lease(config_path: str, cfg: Config) -> int:
    """``sync-daemon run`` with ``[ha] enabled``: standby until the lease is ours, then the
    daemon as usual, fenced; back to standby when the lease is lost."""

    terminate = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminate.set())
    signal.signal(signal.SIGINT, lambda *_: terminate.set())
    lease = Lease(cfg)
    try:
        while not terminate.is_set():
            epoch = _standby(cfg, lease, terminate)
            if epoch is None:
                return 0
            code = _active(config_path, cfg, lease, terminate)
            if code is not None:
                return code
        return 0
    finally:
        lease.dispose()


def _standby(cfg: Config, lease: Lease, terminate: threading.Event) -> int | None:
    health = _standby_health(cfg, lease)
    metrics.HA_ACTIVE.labels(lease.node).set(0)
    log.info("ha_standby", node=lease.node)
    # systemd (Type=notify, WatchdogSec): a standby is up and its loop alive, not stuck.
    sdnotify.ready(f"standby ({lease.node}), waiting for the lease")
    try:
        while not terminate.is_set():
            sdnotify.watchdog_ping()
            if health is not None:
                health.tick()
            try:
                lease.setup()
                lease.announce("standby")
                epoch = lease.try_acquire()
            except Exception as exc:  # staging unreachable: stay standby, try again
                log.warning("ha_standby_check_failed", error=str(exc).splitlines()[0])
                epoch = None
            if epoch is not None:
                log.info("ha_lease_acquired", node=lease.node, epoch=epoch)
                metrics.HA_ACTIVE.labels(lease.node).set(1)
                return epoch
            terminate.wait(min(1.0, cfg.ha.renew_seconds))
        return None
    finally:
        if health is not None:
            health.stop()


def _active(config_path: str, cfg: Config, lease: Lease, terminate: threading.Event) -> int | None:
    """Run the daemon while the lease is ours: its exit code, or None to go back to standby."""
    from replicator.daemon import Daemon  # noqa: PLC0415 - cycle: the daemon starts run_with_lease

    daemon = Daemon(config_path, cfg)
    fence = Fence(lease, cfg.staging_url)
    fence.install()

    def lost(_why: str) -> None:
        daemon.stop.set()

        def overdue() -> None:
            # Stuck in a network call (a partition without RST): leave the slot and the rest
            # to the new active by exiting; the supervisor starts this node again as standby.
            if not finished.wait(cfg.daemon.shutdown_timeout + 2):
                log.error("ha_exit_stuck_after_lease_lost", exit_code=EXIT_LEASE_LOST)
                os._exit(EXIT_LEASE_LOST)

        threading.Thread(target=overdue, name="ha-overdue", daemon=True).start()

    finished = threading.Event()
    renewer = Renewer(lease, cfg.ha.renew_seconds, lost)
    daemon.install_signal_handlers()
    prev = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        terminate.set()
        if callable(prev):
            prev(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    daemon.hooks.append(_ha_check_hook(lease, renewer))
    lease.announce("active")
    renewer.start()
    try:
        code = daemon.run()
    finally:
        finished.set()
        renewer.stop()
        fence.remove()
    error = daemon.state.last_error
    fenced = "HA lease epoch" in error  # a commit refused by the fence
    # DaemonAlreadyRunning right after a takeover: the deposed node's replication connection
    # still holds the slot; it lets go when that node demotes itself (or exits, code 4).
    # Give the lease back and try again, instead of stopping as a single daemon would.
    slot_busy = "only one" in error and "a slot" in error
    if slot_busy and not renewer.lost and not terminate.is_set():
        log.warning("ha_slot_still_held", node=lease.node, error=error)
        try:
            lease.release()
        except Exception as exc:  # expiry frees it instead
            log.warning("ha_lease_not_released", error=str(exc).splitlines()[0])
        terminate.wait(1)
        return None
    if (renewer.lost or fenced) and not terminate.is_set():
        log.warning(
            "ha_rejoining_as_standby", node=lease.node, reason=renewer.lost or "commit fenced"
        )
        return None
    try:
        lease.release()
    except Exception as exc:  # the standby takes over at expiry instead
        log.warning("ha_lease_not_released", error=str(exc).splitlines()[0])
    return code


def _ha_check_hook(lease: Lease, renewer: Renewer) -> Callable[[Any], None]:
    """A per-cycle hook that adds the ``ha`` readiness check once the HTTP server is up."""
    done = [False]

    def check() -> tuple[bool, str]:
        if renewer.lost:
            return False, f"lease lost: {renewer.lost}"
        peers = lease.peers()
        standby = ", ".join(f"{p['node']} ({p['role']}, seen {p['age']:.0f} s ago)" for p in peers)
        return True, f"active: {lease.node} (epoch {lease.epoch}); standby: {standby or 'none'}"

    def hook(daemon: Any) -> None:
        if not done[0] and daemon.health is not None:
            daemon.health.add_check("ha", check)
            lease.health_url = daemon.health.url
            done[0] = True

    return hook


def describe(cfg: Config) -> list[str]:
    """Lines for ``sync-daemon status``: who holds the lease, who is standby."""
    eng = shared_engine(cfg.staging_url, "status")
    try:
        table = LeaseTable(eng, LEASE)
        st = table.state()
        nodes = table.nodes(cfg.ha.lease_seconds * 3)
    except sa.exc.ProgrammingError:
        return ["ha: no lease yet (no daemon with [ha] has started)"]
    finally:
        eng.dispose()
    out = []
    if st is None:
        out.append("ha: no lease yet")
    else:
        until = st["expires_at"]
        when = until.astimezone(dt.UTC).strftime("%H:%M:%S") if until else "?"
        out.append(
            f"ha: active {st['holder']} (epoch {st['epoch']}, lease "
            f"{'valid until' if st['valid'] else 'EXPIRED at'} {when} UTC)"
        )
    for n in nodes:
        out.append(
            f"ha: node {n['node']} {n['role']} on {n['host']} pid {n['pid']}, seen {n['age']:.0f} s ago"
        )
    return out
