"""How the order import retries what failed for a passing reason.

One policy for the three places that retry in place — the shop download, the ERP write of one
order and the replacement of an updated order: ``orders.retry_attempts`` tries with exponential
backoff and jitter between ``orders.backoff_initial`` and ``orders.backoff_max`` seconds, never
sooner than a shop's Retry-After. What counts as passing is the caller's to say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from replicator.config.orders import OrdersSection
from replicator.errors_map import is_retryable
from replicator.orders.writer import WriteResult


class WaitRetryAfter(wait_base):
    """Exponential backoff with jitter, but never shorter than the shop's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.inner = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)

    def __call__(self, retry_state: Any) -> float:
        base = float(self.inner(retry_state))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        return max(base, float(hint)) if hint else base


class RetryPolicy:
    """Retries by the ``[orders]`` settings; ``sleep`` replaces the wait (tests record it)."""

    def __init__(self, ocfg: OrdersSection, sleep: Callable[[float], None] | None = None) -> None:
        self.ocfg = ocfg
        self.sleep = sleep

    def retrying(self, retry_on: Callable[[BaseException], bool]) -> Retrying:
        kwargs: dict[str, Any] = {}
        if self.sleep is not None:
            kwargs["sleep"] = self.sleep
        return Retrying(
            stop=stop_after_attempt(self.ocfg.retry_attempts),
            wait=WaitRetryAfter(self.ocfg.backoff_initial, self.ocfg.backoff_max),
            retry=retry_if_exception(retry_on),
            reraise=True,
            **kwargs,
        )

    def write(self, fn: Callable[..., WriteResult], *args: Any, **kwargs: Any) -> WriteResult:
        """Call the ERP write ``fn``; on a transient failure retry it with backoff and jitter."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # The common case (success) needs no retry machinery; only failures pay for it.
            if not is_retryable(exc) or self.ocfg.retry_attempts <= 1:
                raise
        # Retries take fresh connections from the pool: a caller's connection may be broken.
        kwargs.pop("conn", None)
        result: WriteResult = self.retrying(is_retryable)(fn, *args, **kwargs)
        return result
