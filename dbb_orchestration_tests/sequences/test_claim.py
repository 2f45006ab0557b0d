"""Claim → commit → send → record: nothing of the step's database work is open while the provider call
is in flight, and whoever holds the state (another run, the backend) is skipped, never waited on."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.email.sender import EmailSender, OutgoingEmail, SendResult
from dbb_orchestration.sequences.process import StepOutcome, process_step
from dbb_orchestration.sequences.steps import SequenceStep
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.sequences.conftest import NOW

pytestmark = pytest.mark.postgres
FRONTEND = "https://app.example.test"


@pytest.fixture
def pg(postgres_url: str) -> Any:
    engine = create_db_engine(postgres_url)
    yield engine
    engine.dispose()


def _welcome(engine: sa.Engine) -> SequenceStep:
    with engine.begin() as conn:
        f.user(conn, "u1")
        state_id = f.sequence_state(conn, "u1", "welcome", entered_at=NOW - timedelta(days=1))
    return SequenceStep(state_id, "u1", "welcome", 1)


@dataclass
class Observing:
    """The real Resend sender, which first looks at the database from another connection."""

    inner: EmailSender
    engine: sa.Engine
    state_id: int
    seen: dict[str, Any] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return self.inner.provider

    def send(self, email: OutgoingEmail) -> SendResult:
        with self.engine.connect() as conn:
            own_pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            self.seen["idle_in_transaction"] = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%%' AND pid <> %s",
                (own_pid,),
            ).scalar_one()
            conn.rollback()
            with conn.begin():
                conn.exec_driver_sql("SET LOCAL lock_timeout = '1s'")
                locked = conn.execute(
                    sa.select(t.email_sequence_states.c.id)
                    .where(t.email_sequence_states.c.id == self.state_id)
                    .with_for_update(nowait=True)
                ).all()
                self.seen["row_lockable"] = len(locked) == 1
        return self.inner.send(email)


def test_no_transaction_or_row_lock_is_held_during_the_provider_call(
    pg: sa.Engine, fake_resend: FakeResend
) -> None:
    ref = _welcome(pg)
    sender = Observing(resend_sender(fake_resend), pg, ref.state_id)
    result = process_step(pg, ref, sender=sender, now=NOW, frontend_url=FRONTEND)
    assert result.outcome is StepOutcome.SENT and result.advanced
    assert sender.seen == {"idle_in_transaction": 0, "row_lockable": True}


def test_a_step_whose_row_the_backend_holds_is_skipped_not_waited_on(
    pg: sa.Engine, fake_resend: FakeResend
) -> None:
    ref = _welcome(pg)
    with pg.connect() as backend, backend.begin():
        backend.execute(
            sa.update(t.email_sequence_states)
            .where(t.email_sequence_states.c.id == ref.state_id)
            .values(exit_reason=None)
        )
        result = process_step(pg, ref, sender=resend_sender(fake_resend), now=NOW, frontend_url=FRONTEND)
    assert result.outcome is StepOutcome.BUSY
    assert fake_resend.requests == []


def test_a_step_claimed_by_another_run_is_skipped_and_the_claim_ends_with_its_session(
    pg: sa.Engine, postgres_url: str, fake_resend: FakeResend
) -> None:
    ref = _welcome(pg)
    other = create_db_engine(postgres_url, poolclass=sa.pool.NullPool)
    conn = other.connect()
    conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s, %s)", (0x5E0, ref.state_id))
    conn.commit()  # a session lock outlives its transaction, like a run in the middle of a send
    busy = process_step(pg, ref, sender=resend_sender(fake_resend), now=NOW, frontend_url=FRONTEND)
    assert busy.outcome is StepOutcome.BUSY and fake_resend.requests == []
    conn.close()  # the run's process dies: its session, and the claim, end
    other.dispose()
    sent = process_step(pg, ref, sender=resend_sender(fake_resend), now=NOW, frontend_url=FRONTEND)
    assert sent.outcome is StepOutcome.SENT and len(fake_resend.sent) == 1


def test_the_claim_is_released_after_every_outcome(pg: sa.Engine, fake_resend: FakeResend) -> None:
    ref = _welcome(pg)
    process_step(pg, ref, sender=resend_sender(fake_resend), now=NOW, frontend_url=FRONTEND)  # sent
    process_step(pg, ref, sender=resend_sender(fake_resend), now=NOW, frontend_url=FRONTEND)  # stale
    fake_resend.fail_next(422, name="validation_error", message="Invalid `to` field")
    with pytest.raises(Exception, match="failed"):
        process_step(
            pg,
            SequenceStep(ref.state_id, "u1", "welcome", 2),
            sender=resend_sender(fake_resend),
            now=NOW + timedelta(days=3),
            frontend_url=FRONTEND,
        )
    with pg.connect() as conn:
        # pg_locks lists the whole server (other tests run in parallel): count this database's locks only.
        held = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).scalar_one()
    assert held == 0
