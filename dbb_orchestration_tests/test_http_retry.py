"""The one retry implementation of HTTP providers: bounded, counted, Retry-After honoured, sleep injected."""

from __future__ import annotations

import pytest

from dbb_orchestration.email.sender import EmailSendError
from dbb_orchestration.http_retry import (
    RETRYABLE_STATUSES,
    RetryPolicy,
    call_with_retries,
    is_retryable_status,
)

POLICY = RetryPolicy(max_retries=3, initial=1.0, cap=5.0, max_retry_after=60.0)


class Refused(Exception):
    def __init__(self, status: int | None, retry_after: float | None = None) -> None:
        super().__init__(f"refused {status}")
        self.status = status
        self.retry_after = retry_after


def _run(
    failures: list[Refused], policy: RetryPolicy = POLICY
) -> tuple[str, list[int], list[float], list[float]]:
    attempts: list[int] = []
    sleeps: list[float] = []
    told: list[float] = []

    def attempt(number: int) -> str:
        attempts.append(number)
        if failures:
            raise failures.pop(0)
        return "ok"

    result = call_with_retries(
        attempt,
        policy=policy,
        retryable=lambda exc: isinstance(exc, Refused) and is_retryable_status(exc.status),
        retry_after=lambda exc: getattr(exc, "retry_after", None),
        sleep=sleeps.append,
        on_retry=told.append,
    )
    return result, attempts, sleeps, told


def test_retryable_statuses_are_one_set() -> None:
    assert frozenset({429, 500, 502, 503, 504}) == RETRYABLE_STATUSES
    assert is_retryable_status(None) and is_retryable_status(0) and is_retryable_status(503)
    assert not is_retryable_status(400) and not is_retryable_status(404) and not is_retryable_status(409)


def test_backoff_doubles_and_is_capped() -> None:
    result, attempts, sleeps, told = _run([Refused(503), Refused(None), Refused(500)])
    assert result == "ok"
    assert attempts == [1, 2, 3, 4]
    assert sleeps == told == [1.0, 2.0, 4.0]
    assert [POLICY.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_retries_are_bounded_and_the_last_error_is_raised_as_is() -> None:
    failures = [Refused(503) for _ in range(10)]
    with pytest.raises(Refused) as raised:
        _run(failures)
    assert len(failures) == 10 - 4  # 1 attempt + 3 retries
    assert raised.value.__context__ is None


def test_a_refusal_that_is_not_retryable_stops_at_once() -> None:
    failures = [Refused(400), Refused(503)]
    with pytest.raises(Refused, match="refused 400"):
        _run(failures)
    assert len(failures) == 1


def test_retry_after_is_honoured_within_its_bound() -> None:
    _result, _attempts, sleeps, _told = _run([Refused(429, 30.0), Refused(429, 600.0), Refused(429, 0.0)])
    assert sleeps == [30.0, 60.0]  # the zero wait is not slept
    floor = RetryPolicy(max_retries=2, initial=1.0, cap=30.0, max_retry_after=30.0, retry_after_floor=True)
    assert floor.delay(2, 0.5) == 4.0  # a short Retry-After never shortens the back-off
    assert floor.delay(0, 7.0) == 7.0
    assert floor.delay(0, 90.0) == 30.0


def test_duplicate_key_refusal_reads_as_already_sent() -> None:
    assert EmailSendError("used", status=409, name="invalid_idempotent_request").already_sent_under_key
    assert not EmailSendError(
        "busy", status=409, name="concurrent_idempotent_requests"
    ).already_sent_under_key
    assert not EmailSendError("bad", status=422, name="invalid_idempotent_request").already_sent_under_key
