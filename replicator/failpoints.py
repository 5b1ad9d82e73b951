"""Named fault-injection points, so the fault suite can freeze the real daemon process exactly
where it tells a source "done" and kill it there with kill -9.

``SYNC_DAEMON_FAILPOINT=NAME@N`` makes the N-th pass through :func:`failpoint` ``NAME`` (counted
over the whole process, all threads) stop the process with SIGSTOP: every thread halts at once, the
test reads the ledger, the ERP and the inbox folder as they are at that instant, then sends SIGKILL.
Without the variable (every production run) a failpoint is one attribute test.

The points (each is an acknowledgement point of design invariant 6):

``orders.receive``      orders are read from their source, not yet committed to the order inbox;
``orders.acknowledge``  orders are committed to the order inbox; the source is not yet told
                        (inbox file still in the folder, webhook not yet answered);
``orders.watermark``    a poll cycle's orders are committed; the shop's watermark not yet saved;
``invoices.attach``     the shop accepted an invoice; our push ledger does not know it yet;
``triggers.copy_chunk`` trigger capture committed a chunk of an online table copy and the copy's
                        progress; the reader has confirmed the batch (a restart must go on
                        after this chunk, not begin the table again).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import structlog

log = structlog.get_logger(__name__)

_ENV = "SYNC_DAEMON_FAILPOINT"


class _Armed:
    def __init__(self, spec: str) -> None:
        name, _, nth = spec.partition("@")
        self.name = name.strip()
        self.nth = int(nth) if nth.strip().isdigit() else 1
        self.hits = 0
        self.lock = threading.Lock()


_armed: _Armed | None = _Armed(os.environ[_ENV]) if os.environ.get(_ENV) else None


def failpoint(name: str) -> None:
    """Freeze the process here when the fault suite armed ``name`` for this pass; else nothing."""
    armed = _armed
    if armed is None or armed.name != name:
        return
    with armed.lock:
        armed.hits += 1
        if armed.hits != armed.nth:
            return
        log.warning("failpoint_reached", failpoint=name, hit=armed.hits)
        sys.stdout.flush()  # the SIGKILL that follows would drop buffered log lines
        # SIGSTOP cannot be caught: all threads stop while the lock is held, so no other thread
        # passes the point after this one.
        os.kill(os.getpid(), signal.SIGSTOP)
