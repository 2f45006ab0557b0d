"""How a call to an HTTP provider (Resend, Notion) is retried: one policy, one implementation.

- Retryable: no answer at all (a network error or a timeout: status ``None`` or 0) or a status in
  :data:`RETRYABLE_STATUSES`; the caller may widen that (Resend's concurrent use of a key) but never
  with its own list.
- Bounded: at most ``max_retries`` retries (``max_retries + 1`` attempts), each attempt counted.
- Back-off: ``initial`` seconds doubling, each wait capped at ``cap``.
- ``Retry-After``: when the provider sent one it is honoured, bounded by ``max_retry_after``; with
  ``retry_after_floor`` it only lengthens the back-off (never shortens it).
- The sleep is injected (tests record the waits instead of sleeping); a zero wait does not sleep.

The loop itself is ``tenacity``'s; this module only says what to retry and how long to wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import tenacity

__all__ = ["RETRYABLE_STATUSES", "RetryPolicy", "call_with_retries", "is_retryable_status"]

T = TypeVar("T")

RETRYABLE_STATUSES: Final[frozenset[int]] = frozenset({429, 500, 502, 503, 504})


def is_retryable_status(status: int | None) -> bool:
    """``None``/0 (no answer: network error, timeout) or a status in :data:`RETRYABLE_STATUSES`."""
    return not status or status in RETRYABLE_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_retries`` retries; the back-off waits ``initial`` seconds doubling, capped at
    ``cap``; a ``Retry-After`` is waited as sent, bounded by ``max_retry_after`` (with
    ``retry_after_floor``: at least the back-off)."""

    max_retries: int
    initial: float
    cap: float
    max_retry_after: float
    retry_after_floor: bool = False

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``retry + 1`` (``retry`` counts from 0; negative → 0)."""
        backoff = min(self.initial * (2 ** max(0, retry)), self.cap)
        if retry_after is None:
            return backoff
        wait = max(backoff, retry_after) if self.retry_after_floor else retry_after
        return min(wait, max(0.0, self.max_retry_after))


def call_with_retries(
    attempt: Callable[[int], T],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None] = lambda _exc: None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[float], None] | None = None,
) -> T:
    """``attempt(n)`` for n = 1, 2, … until it returns, raises what ``retryable`` refuses, or the policy's
    retries are used up (then its last exception is raised as is, without a wrapper). ``on_retry`` is
    told each wait before it is slept."""

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return policy.delay(state.attempt_number - 1, retry_after(exc) if exc is not None else None)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(state.upcoming_sleep)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(0, policy.max_retries) + 1),
        wait=wait,
        retry=tenacity.retry_if_exception(retryable),
        sleep=lambda seconds: sleep(seconds) if seconds > 0 else None,
        before_sleep=before_sleep,
        reraise=True,
    )
    for attempt_manager in retrying:
        with attempt_manager:
            return attempt(attempt_manager.retry_state.attempt_number)
    raise AssertionError("unreachable: tenacity either returns a result or raises")  # pragma: no cover
