"""The live state of one daemon process: what the loop and the service runners last did.

The main loop and the service threads write it; the HTTP server (readiness, the Manage page)
and the metrics refresher only read it. ``sync-daemon status`` runs in another process and reads
the copy the daemon saves in the staging store instead.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

__all__ = ["DaemonState", "ServiceState"]


@dataclass
class ServiceState:
    """What status and the Manage page show for one service."""

    name: str
    last_run_at: dt.datetime | None = None
    last_result: str = "not run yet"
    last_ok: bool | None = None
    next_run_at: dt.datetime | None = None
    breaker_open: bool = False
    progress: str = ""
    failures: int = 0


@dataclass
class DaemonState:
    """Shared between the loop and the health server (read-only there)."""

    started_at: float = field(default_factory=time.monotonic)
    last_tick: float = field(default_factory=time.monotonic)
    capture_connected: bool = False
    last_error: str = ""
    services: dict[str, ServiceState] = field(default_factory=dict)

    def service(self, name: str) -> ServiceState:
        s = self.services.get(name)
        if s is None:
            s = self.services[name] = ServiceState(name)
        return s
