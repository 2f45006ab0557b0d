from __future__ import annotations

import pytest

from dbb_orchestration.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_spaces_calls_by_the_interval() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, clock=clock, sleep=clock.sleep)
    for _ in range(4):
        limiter.acquire()
    assert clock.slept == [pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3)]


def test_idle_time_is_not_banked() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    clock.now += 10
    assert limiter.acquire() == 0
    assert limiter.acquire() == pytest.approx(0.5)


@pytest.mark.parametrize("rate", [None, 0])
def test_disabled(rate: float | None) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        assert limiter.acquire() == 0
    assert clock.slept == []


def test_negative_rate_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_second"):
        RateLimiter(-1)
