"""The systemd notify protocol (``sd_notify(3)``) without a dependency.

The unit runs with ``Type=notify`` and ``WatchdogSec=``: systemd considers the daemon started only
after :func:`ready`, restarts it when :func:`watchdog_ping` stops arriving within the watchdog
interval, and shows :func:`status` lines in ``systemctl status``. Outside systemd
(``$NOTIFY_SOCKET`` unset) every function is a no-op returning ``False``, so the daemon calls them
unconditionally. Sending never raises: a notification that cannot be delivered is logged.

Wiring (for ``replicator/daemon.py``)::

    from replicator import sdnotify

    interval = sdnotify.watchdog_interval()    # seconds or None; ping at half of it
    ... start sources, health server ...
    sdnotify.ready()
    while running:
        if reload_requested:
            sdnotify.reloading()               # RELOADING=1 + MONOTONIC_USEC
            reload()
            sdnotify.ready()
        run_one_cycle()
        sdnotify.watchdog_ping()               # only when the loop really made progress
        sdnotify.status("streaming, lag 0.4s, 3 orders awaiting")
    sdnotify.stopping()

Ping the watchdog from the main loop, not from a helper thread: a thread would keep pinging
while the loop is stuck, which defeats the watchdog.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger(__name__)

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]


def _address(raw: str) -> str | bytes:
    # "@name" is an abstract-namespace socket: the leading @ stands for a NUL byte.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``.

    Returns True when sent, False when there is no socket or sending failed.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    if not (raw.startswith("/") or raw.startswith("@")):
        log.warning("sd_notify_unsupported_socket", socket=raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # a full socket buffer must not stall the main loop
            sock.connect(_address(raw))
            sock.sendall(state.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", state=state.split("\n", 1)[0], error=str(exc))
        return False


def ready(status_line: str | None = None) -> bool:
    """Tell systemd that start-up (or a reload) finished."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_line)}" if status_line else ""))


def status(line: str) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(line)}")


def watchdog_ping() -> bool:
    """Reset the watchdog timer (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """Tell systemd that a clean shutdown began."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Tell systemd that a configuration reload began; follow with :func:`ready` when done.

    ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` and harmless for ``Type=notify``.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """The watchdog interval in seconds when systemd expects pings from this process, else None.

    ``WATCHDOG_PID`` (when set) must name this process: a child that inherited the environment
    must not ping on behalf of its parent.
    """
    raw = os.environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("sd_watchdog_usec_invalid", value=raw)
        return None
    return usec / 1_000_000 if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())
