from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

from dbb_orchestration.db.engine import create_db_engine
from dbb_orchestration.ratelimit import PostgresPacer, RateLimiter, advisory_key, shared_rate_limiter
from dbb_orchestration.testing.fake_resend import FakeResend


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


# ------------------------------------------------------------------------ team-wide pacing on Postgres

_WORKER = r"""
import sys
from dbb_orchestration.db.engine import create_db_engine
from dbb_orchestration.email.sender import EmailSendError, OutgoingEmail, ResendSender
from dbb_orchestration.ratelimit import PostgresPacer, RateLimiter

api_url, db_url, name, count, rate, mode = sys.argv[1:7]
engine = create_db_engine(db_url)
pacer = PostgresPacer(engine, "re_team_key", float(rate)) if mode == "shared" else RateLimiter(float(rate))
sender = ResendSender(
    api_key="re_team_key", api_url=api_url, from_address="digest@dbb.test", rate_limiter=pacer, max_retries=0
)
print("ready", flush=True)
sys.stdin.readline()  # both processes start sending together
for n in range(int(count)):
    email = OutgoingEmail(f"{name}-{n}@example.test", "s", "<p>h</p>", "t", f"{name}-{n}")
    try:
        sender.send_batch([email], f"batch-{name}-{n}")
    except EmailSendError as exc:
        print(exc.status, flush=True)
"""


def _two_processes(api_url: str, db_url: str, mode: str, count: int, rate: float) -> None:
    """Two worker processes, released together once both have started (imports and connections done)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, api_url, db_url, name, str(count), str(rate), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0


@pytest.mark.postgres
def test_two_processes_sharing_a_key_stay_under_the_team_limit(postgres_url: str) -> None:
    """The fake enforces 5 requests/s with no burst (two requests closer than 0.2 s → 429); each
    process paces at 4/s through the shared Postgres pacer, so together they never exceed it."""
    with FakeResend(rate_limit_per_second=5, rate_limit_burst=1) as fake:
        _two_processes(fake.base_url, postgres_url, "shared", count=6, rate=4)
        assert fake.rate_limited == 0
        assert [r.status for r in fake.requests] == [200] * 12 and len(fake.sent) == 12


@pytest.mark.postgres
def test_without_the_shared_pacer_the_same_two_processes_hit_429s(postgres_url: str) -> None:
    """The control: each process with its own in-process limiter at the same rate doubles the team's
    rate, and the fake refuses requests (so the test above can fail)."""
    with FakeResend(rate_limit_per_second=5, rate_limit_burst=1) as fake:
        _two_processes(fake.base_url, postgres_url, "local", count=6, rate=4)
        assert fake.rate_limited > 0


@pytest.mark.postgres
def test_postgres_pacer_spaces_request_starts(postgres_url: str) -> None:
    engine = create_db_engine(postgres_url)
    slept: list[float] = []
    try:
        pacer = PostgresPacer(engine, "re_x", 4, sleep=slept.append)
        for _ in range(3):
            pacer.acquire()
        assert slept == [0.25, 0.25, 0.25]  # the lock is held one interval per request start
        with engine.connect() as conn:  # and released afterwards
            held = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar()
        assert held == 0
        assert PostgresPacer(engine, "re_x", 0).acquire() == 0.0
        pacer.close()
    finally:
        engine.dispose()


def test_shared_rate_limiter_is_one_per_key_and_rate() -> None:
    assert shared_rate_limiter("k", 2) is shared_rate_limiter("k", 2)
    assert shared_rate_limiter("k", 2) is not shared_rate_limiter("other", 2)
    assert advisory_key("a") == advisory_key("a") != advisory_key("b")
