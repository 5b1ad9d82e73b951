"""A token bucket per shop: keeps the pushers under the shop's request rate, and honours a
``429 Retry-After`` by pausing the bucket (every request to that shop waits, not just the one
that was refused).

Thread-safe: the daemon loop and the ERP webhook handler (a health-server thread) share one
bucket per shop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per request."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.clock = clock
        self.sleep = sleep
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent waiting for tokens (for figures and tests)

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def pause(self, seconds: float) -> None:
        """The shop said ``Retry-After: seconds``: no request before then."""
        with self._lock:
            now = self.clock()
            self._paused_until = max(self._paused_until, now + max(0.0, seconds))
            self._tokens = 0.0
            self._stamp = max(self._stamp, now)

    def paused_for(self) -> float:
        """Seconds until the pause ends (0 when not paused)."""
        with self._lock:
            return max(0.0, self._paused_until - self.clock())

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is available now)."""
        with self._lock:
            now = self.clock()
            self._refill(now)
            wait = max(0.0, self._paused_until - now)
            if self._tokens < 1:
                wait = max(wait, (1 - self._tokens) / self.rate)
            return wait

    def try_acquire(self) -> bool:
        """Take a token if one is available now."""
        with self._lock:
            now = self.clock()
            self._refill(now)
            if now < self._paused_until or self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def acquire(self, max_wait: float | None = None, stop: threading.Event | None = None) -> bool:
        """Wait for a token (at most ``max_wait`` seconds); False when it did not come in time."""
        deadline = None if max_wait is None else self.clock() + max_wait
        while True:
            if self.try_acquire():
                return True
            wait = self.delay()
            if deadline is not None and self.clock() + wait > deadline:
                return False
            wait = max(wait, 0.001)
            self.waited += wait
            if stop is not None:
                if stop.wait(wait):
                    return False
            else:
                self.sleep(wait)
