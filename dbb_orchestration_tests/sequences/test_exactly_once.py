"""Exactly once, by construction: concurrent runs, a run killed mid-step, and users
whose situation changes between two sensor ticks. Postgres is the production database; the concurrency
test also runs on SQLite, where the provider's idempotency (not a row lock) prevents a second email."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.sequences.due import evaluate_tick
from dbb_orchestration.sequences.process import StepOutcome, StepSendFailed, process_step
from dbb_orchestration.sequences.steps import SequenceStep
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.sequences.conftest import FROM, NOW

FRONTEND = "https://app.example.test"
THREADS = 20


def _state(engine: sa.Engine, state_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(t.email_sequence_states).where(t.email_sequence_states.c.id == state_id)
        ).one()


def _sends(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(t.email_sends).order_by(t.email_sends.c.id)).all())


def _welcome(engine: sa.Engine, *, step: int = 1) -> SequenceStep:
    with engine.begin() as conn:
        f.user(conn, "u1", name="Ada Lovelace")
        state_id = f.sequence_state(
            conn, "u1", "welcome", current_step=step, entered_at=NOW - timedelta(days=3)
        )
    return SequenceStep(state_id, "u1", "welcome", step)


def test_twenty_concurrent_runs_of_one_step_send_once(db_url: str, fake_resend: FakeResend) -> None:
    setup = create_db_engine(db_url)
    ref = _welcome(setup)
    fake_resend.set_delay(0.3)  # keep the provider call open while the other runs arrive
    sender = resend_sender(fake_resend)
    postgres = setup.dialect.name == "postgresql"
    barrier = threading.Barrier(THREADS)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        engine = create_db_engine(db_url, poolclass=sa.pool.NullPool)  # its own connection
        try:
            barrier.wait()
            try:
                outcome = process_step(
                    engine, ref, sender=sender, now=NOW, frontend_url=FRONTEND
                ).outcome.value
            except StepSendFailed as exc:  # SQLite only: Resend's 409 for a key still in flight
                outcome = f"failed:{exc.error.name}"
            with lock:
                outcomes.append(outcome)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(outcomes) == THREADS
    assert outcomes.count("sent") == 1, outcomes
    assert len(fake_resend.sent) == 1
    assert len(_sends(setup)) == 1
    state = _state(setup, ref.state_id)
    assert (state.current_step, state.status) == (2, "active")
    if postgres:
        # the row lock is the claim: nobody else even called the provider
        assert fake_resend.requests_count == 1
        assert set(outcomes) <= {"sent", "busy", "stale"}
    else:
        assert set(outcomes) <= {"sent", "stale", "duplicate", "failed:concurrent_idempotent_requests"}
    setup.dispose()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from datetime import datetime
    from dbb_orchestration.db import create_db_engine
    from dbb_orchestration.email.sender import ResendSender
    from dbb_orchestration.sequences.process import process_step
    from dbb_orchestration.sequences.steps import SequenceStep

    url, api_url, state_id, now, from_address = sys.argv[1:6]

    class DieAfterProviderAccepted:
        provider = "resend"

        def __init__(self, inner):
            self.inner = inner

        def send(self, email):
            self.inner.send(email)
            os._exit(137)  # killed: the provider has the email, the database has nothing

    inner = ResendSender(api_key="re_test", api_url=api_url, from_address=from_address)
    process_step(
        create_db_engine(url),
        SequenceStep(int(state_id), "u1", "welcome", 2),
        sender=DieAfterProviderAccepted(inner),
        now=datetime.fromisoformat(now),
        frontend_url="https://app.example.test",
    )
    """
)


def test_a_run_killed_after_the_provider_accepted_is_retried_without_a_second_email(
    db_url: str, fake_resend: FakeResend
) -> None:
    engine = create_db_engine(db_url)
    ref = _welcome(engine, step=2)
    before = _state(engine, ref.state_id)

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            db_url,
            fake_resend.base_url,
            str(ref.state_id),
            NOW.isoformat(),
            FROM,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert killed.returncode == 137, killed.stderr
    [delivery] = fake_resend.sent
    assert delivery.idempotency_key == "sequence-welcome-u1-2"
    assert _state(engine, ref.state_id) == before  # rolled back (and, on Postgres, the lock released)
    assert _sends(engine) == []

    retry = process_step(engine, ref, sender=resend_sender(fake_resend), now=NOW, frontend_url=FRONTEND)

    assert (retry.outcome, retry.provider_id, retry.advanced) == (StepOutcome.SENT, delivery.id, True)
    assert len(fake_resend.sent) == 1  # the provider de-duplicated by key
    assert [(s.idempotency_key, s.resend_id) for s in _sends(engine)] == [
        ("sequence-welcome-u1-2", delivery.id)
    ]
    assert _state(engine, ref.state_id).current_step == 3
    engine.dispose()


def _tick(engine: sa.Engine, cursor: str | None, now: Any) -> Any:
    return evaluate_tick(engine, cursor, now=now, cap=500, max_attempts=5, unfinished=lambda keys: set())


def test_a_user_who_connects_between_two_ticks_exits_welcome(db_url: str, fake_resend: FakeResend) -> None:
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        f.user(conn, "u1", name="Ada")
        state_id = f.sequence_state(conn, "u1", "welcome", entered_at=NOW)
    sender = resend_sender(fake_resend)

    first = _tick(engine, None, NOW + timedelta(hours=1))
    [launch] = first.plan.launches
    assert (launch.step.state_id, launch.step.step, launch.attempt_key) == (
        state_id,
        1,
        "sequence-welcome-u1-1",
    )
    step = launch.step
    ref = SequenceStep(step.state_id, step.user_id, step.sequence_name, step.step)
    process_step(engine, ref, sender=sender, now=NOW + timedelta(hours=1), frontend_url=FRONTEND)

    with engine.begin() as conn:  # the backend records the connection (and may not exit welcome itself)
        f.connection(conn, "u1", kind="notion", display_name="Notes")

    second = _tick(engine, first.cursor, NOW + timedelta(days=2))
    [launch2] = second.plan.launches
    assert (launch2.step.step, launch2.attempt_key) == (2, "sequence-welcome-u1-2")
    assert second.plan.pruned == 1  # step 1 left the cursor: the state moved on
    step2 = launch2.step
    result = process_step(
        engine,
        SequenceStep(step2.state_id, step2.user_id, step2.sequence_name, step2.step),
        sender=sender,
        now=NOW + timedelta(days=2),
        frontend_url=FRONTEND,
    )

    assert (result.outcome, result.exit_reason) == (StepOutcome.EXITED, "connected")
    assert [d.tags["step"] for d in fake_resend.sent] == ["welcome-1"]
    state = _state(engine, state_id)
    assert (state.status, state.exit_reason, state.current_step) == ("exited", "connected", 2)
    assert _tick(engine, second.cursor, NOW + timedelta(days=30)).plan.launches == []
    engine.dispose()


@pytest.mark.parametrize("sequence", ["onboarding", "upgrade"])
def test_a_user_who_upgrades_between_two_ticks_exits(
    db_url: str, sequence: str, fake_resend: FakeResend
) -> None:
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        f.user(conn, "u1")
        for n in range(4):
            f.digest(conn, "u1", status="sent", sent_at=NOW - timedelta(days=10 - n))
        state_id = f.sequence_state(conn, "u1", sequence, entered_at=NOW - timedelta(days=1))
    sender = resend_sender(fake_resend)
    ref1 = SequenceStep(state_id, "u1", sequence, 1)
    assert (
        process_step(engine, ref1, sender=sender, now=NOW, frontend_url=FRONTEND).outcome is StepOutcome.SENT
    )

    with engine.begin() as conn:
        f.subscription(conn, "u1", status="active")

    later = NOW + timedelta(days=20)
    [launch] = _tick(engine, None, later).plan.launches
    assert launch.step.step == 2
    result = process_step(
        engine, SequenceStep(state_id, "u1", sequence, 2), sender=sender, now=later, frontend_url=FRONTEND
    )

    assert (result.outcome, result.exit_reason) == (StepOutcome.EXITED, "upgraded")
    assert len(fake_resend.sent) == 1
    state = _state(engine, state_id)
    assert (state.status, state.exit_reason, state.completed_at) == ("exited", "upgraded", later)
    engine.dispose()
