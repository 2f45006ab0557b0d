"""One step of one user (behaviour §9 "Processing one step"), on SQLite and on Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.email.sender import DryRunSender, RecordingSender
from dbb_orchestration.sequences.process import (
    StepConfigError,
    StepOutcome,
    StepSendFailed,
    build_outgoing_email,
    load_user_facts,
    process_step,
)
from dbb_orchestration.sequences.steps import SequenceStep
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.sequences.conftest import NOW, count_statements

FRONTEND = "https://app.example.test"


def state_row(engine: sa.Engine, state_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(t.email_sequence_states).where(t.email_sequence_states.c.id == state_id))
        return dict(row.one()._mapping)


def sends(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(t.email_sends).order_by(t.email_sends.c.id))]


def setup_state(
    engine: sa.Engine,
    sequence: str,
    *,
    user_id: str = "u1",
    step: int = 1,
    entered_at: datetime = NOW - timedelta(days=30),
    status: str = "active",
    verified: bool = True,
    name: str = "Ada Lovelace",
) -> SequenceStep:
    with engine.begin() as conn:
        f.user(conn, user_id, name=name, email_verified=verified)
        state_id = f.sequence_state(
            conn, user_id, sequence, current_step=step, status=status, entered_at=entered_at
        )
    return SequenceStep(state_id, user_id, sequence, step)


def run(engine: sa.Engine, ref: SequenceStep, sender: Any = None, **kwargs: Any) -> Any:
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("frontend_url", FRONTEND)
    return process_step(engine, ref, sender=sender if sender is not None else RecordingSender(), **kwargs)


def test_sends_records_and_advances(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome", entered_at=NOW - timedelta(hours=1))
    sender = RecordingSender()

    result = run(engine, ref, sender)

    assert result.outcome is StepOutcome.SENT
    assert (result.recorded, result.advanced, result.provider_id) == (True, True, "mem-1")
    [email] = sender.sent
    assert email.to == "u1@example.test"
    assert email.subject == "Welcome to Daily Brain Bits, Ada"
    assert email.idempotency_key == "sequence-welcome-u1-1"
    assert email.tags == {"email_type": "sequence", "sequence": "welcome", "step": "welcome-1"}
    assert f"{FRONTEND}/onboarding/choose-source" in email.html
    [row] = sends(engine)
    assert row["user_id"] == "u1"
    assert row["sequence_name"] == "welcome"
    assert row["email_name"] == "welcome-1"
    assert row["idempotency_key"] == "sequence-welcome-u1-1"
    assert (row["provider"], row["resend_id"]) == ("memory", "mem-1")
    assert row["payload_json"] == {"provider": "memory", "step": 1}
    assert row["sent_at"] == NOW
    state = state_row(engine, ref.state_id)
    assert (state["current_step"], state["status"], state["last_email_sent_at"]) == (2, "active", NOW)
    assert state["completed_at"] is None


def test_last_step_completes_the_sequence(engine: sa.Engine) -> None:
    ref = setup_state(engine, "upgrade", step=5, entered_at=NOW - timedelta(days=21))
    result = run(engine, ref)
    assert result.outcome is StepOutcome.SENT
    state = state_row(engine, ref.state_id)
    assert (state["current_step"], state["status"], state["completed_at"], state["last_email_sent_at"]) == (
        6,
        "completed",
        NOW,
        NOW,
    )
    assert [s["email_name"] for s in sends(engine)] == ["upgrade-5"]


def test_a_state_beyond_the_last_step_is_completed_without_email(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome", step=5)
    sender = RecordingSender()
    result = run(engine, ref, sender)
    assert (result.outcome, result.advanced) == (StepOutcome.COMPLETED, True)
    state = state_row(engine, ref.state_id)
    assert (state["status"], state["completed_at"], state["current_step"]) == ("completed", NOW, 5)
    assert sender.calls == 0 and sends(engine) == []


@pytest.mark.parametrize(("state_step", "status"), [(2, "active"), (1, "completed"), (1, "exited")])
def test_a_state_that_moved_on_is_left_alone(engine: sa.Engine, state_step: int, status: str) -> None:
    ref = setup_state(engine, "welcome", step=state_step, status=status)
    before = state_row(engine, ref.state_id)
    sender = RecordingSender()
    result = run(engine, SequenceStep(ref.state_id, "u1", "welcome", 1), sender)
    assert result.outcome is StepOutcome.STALE
    assert sender.calls == 0 and sends(engine) == []
    assert state_row(engine, ref.state_id) == before


def test_unverified_or_missing_email_is_skipped(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome", verified=False)
    with engine.begin() as conn:
        f.user(conn, "u2", email="")
        empty_id = f.sequence_state(conn, "u2", "welcome", entered_at=NOW - timedelta(days=1))
    before = state_row(engine, ref.state_id)
    sender = RecordingSender()
    assert run(engine, ref, sender).outcome is StepOutcome.UNVERIFIED
    assert run(engine, SequenceStep(empty_id, "u2", "welcome", 1), sender).outcome is StepOutcome.UNVERIFIED
    assert sender.calls == 0 and sends(engine) == []
    assert state_row(engine, ref.state_id) == before


@pytest.mark.parametrize("connection_status", ["active", "revoked"])
def test_welcome_exits_when_the_user_has_any_connection(engine: sa.Engine, connection_status: str) -> None:
    ref = setup_state(engine, "welcome", step=2)
    with engine.begin() as conn:
        f.connection(conn, "u1", status=connection_status)
    sender = RecordingSender()
    result = run(engine, ref, sender)
    assert (result.outcome, result.exit_reason, result.advanced) == (StepOutcome.EXITED, "connected", True)
    state = state_row(engine, ref.state_id)
    assert (state["status"], state["exit_reason"], state["completed_at"], state["current_step"]) == (
        "exited",
        "connected",
        NOW,
        2,
    )
    assert sender.calls == 0 and sends(engine) == []


@pytest.mark.parametrize("sequence", ["onboarding", "upgrade"])
@pytest.mark.parametrize("sub_status", ["active", "trialing"])
def test_pro_users_exit_onboarding_and_upgrade(engine: sa.Engine, sequence: str, sub_status: str) -> None:
    ref = setup_state(engine, sequence, step=2)
    with engine.begin() as conn:
        f.digest(conn, "u1", status="sent", sent_at=NOW - timedelta(days=20))
        f.subscription(conn, "u1", status=sub_status)
    sender = RecordingSender()
    result = run(engine, ref, sender)
    assert (result.outcome, result.exit_reason) == (StepOutcome.EXITED, "upgraded")
    state = state_row(engine, ref.state_id)
    assert (state["status"], state["exit_reason"], state["completed_at"]) == ("exited", "upgraded", NOW)
    assert sender.calls == 0


def test_a_lapsed_subscription_does_not_exit(engine: sa.Engine) -> None:
    ref = setup_state(engine, "upgrade", step=2)
    with engine.begin() as conn:
        f.subscription(conn, "u1", status="canceled")
    assert run(engine, ref).outcome is StepOutcome.SENT


def test_self_hosted_does_nothing(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome")
    sender = RecordingSender()
    result = run(engine, ref, sender, mode="self-hosted")
    assert result.outcome is StepOutcome.DISABLED
    assert sender.calls == 0 and state_row(engine, ref.state_id)["current_step"] == 1


def test_not_yet_due_and_blocked(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome", step=2, entered_at=NOW - timedelta(days=2) + timedelta(seconds=1))
    assert run(engine, ref).outcome is StepOutcome.NOT_DUE
    onboarding = setup_state(engine, "onboarding", user_id="u2", entered_at=NOW - timedelta(days=60))
    assert run(engine, onboarding).outcome is StepOutcome.BLOCKED
    with engine.begin() as conn:  # a failed or skipped digest is not a first digest
        f.digest(conn, "u2", status="failed", sent_at=NOW - timedelta(days=3))
        f.digest(conn, "u2", status="skipped")
    assert run(engine, onboarding).outcome is StepOutcome.BLOCKED
    with engine.begin() as conn:
        f.digest(conn, "u2", status="sent", sent_at=NOW - timedelta(hours=2) + timedelta(seconds=1))
    assert run(engine, onboarding).outcome is StepOutcome.NOT_DUE
    assert run(engine, onboarding, now=NOW + timedelta(seconds=1)).outcome is StepOutcome.SENT
    assert [s["email_name"] for s in sends(engine)] == ["onboarding-3"]


def test_provider_failure_changes_nothing_and_a_retry_succeeds(engine: sa.Engine) -> None:
    ref = setup_state(engine, "upgrade", step=3)
    before = state_row(engine, ref.state_id)
    sender = RecordingSender()
    sender.fail_next(status=422, message="The `to` field is invalid for someone@example.test")
    with pytest.raises(StepSendFailed) as caught:
        run(engine, ref, sender)
    assert "someone@example.test" not in str(caught.value)
    assert "status=422" in str(caught.value) and f"state {ref.state_id}" in str(caught.value)
    assert state_row(engine, ref.state_id) == before
    assert sends(engine) == []
    result = run(engine, ref, sender)
    assert (result.outcome, result.advanced) == (StepOutcome.SENT, True)
    assert state_row(engine, ref.state_id)["current_step"] == 4


def test_an_existing_email_sends_row_is_not_duplicated(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome", step=3)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(t.email_sends).values(
                user_id="u1",
                sequence_name="welcome",
                email_name="welcome-3",
                idempotency_key="sequence-welcome-u1-3",
                resend_id="earlier",
            )
        )
    result = run(engine, ref)
    assert (result.outcome, result.recorded, result.advanced) == (StepOutcome.SENT, False, True)
    assert [(s["idempotency_key"], s["resend_id"]) for s in sends(engine)] == [
        ("sequence-welcome-u1-3", "earlier")
    ]
    assert state_row(engine, ref.state_id)["current_step"] == 4


def test_dry_run_records_a_dry_run_id(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome", step=4)
    sender = DryRunSender()
    result = run(engine, ref, sender)
    assert result.outcome is StepOutcome.SENT
    assert [(s["provider"], s["resend_id"]) for s in sends(engine)] == [
        ("dry-run", "dry-run-sequence-welcome-u1-4")
    ]
    assert len(sender.sent) == 1
    assert state_row(engine, ref.state_id)["current_step"] == 5


def test_wrong_config_is_an_error_and_a_missing_state_is_not(engine: sa.Engine) -> None:
    ref = setup_state(engine, "welcome")
    with pytest.raises(StepConfigError, match="not the onboarding sequence"):
        run(engine, SequenceStep(ref.state_id, "u1", "onboarding", 1))
    with pytest.raises(StepConfigError, match="not the welcome sequence"):
        run(engine, SequenceStep(ref.state_id, "someone-else", "welcome", 1))
    with pytest.raises(StepConfigError, match="unknown email sequence"):
        run(engine, SequenceStep(ref.state_id, "u1", "newsletter", 1))
    assert run(engine, SequenceStep(ref.state_id + 100, "u1", "welcome", 1)).outcome is StepOutcome.NOT_FOUND


def _history(engine: sa.Engine, user_id: str, *, digests: int, items: int) -> None:
    with engine.begin() as conn:
        old = f.connection(
            conn, user_id, kind="notion", display_name="Old Notes", account_external_id="ws-old"
        )
        f.connection(
            conn,
            user_id,
            kind="obsidian",
            status="revoked",
            display_name="Gone",
            created_at=datetime(2026, 2, 1, tzinfo=UTC),
        )
        f.connection(
            conn,
            user_id,
            kind="notion",
            display_name="Study Notes",
            account_external_id="ws-new",
            created_at=datetime(2026, 1, 15, tzinfo=UTC),
        )
        docs = [f.document(conn, user_id, old, external_id=f"d{i}") for i in range(items)]
        for n in range(digests):
            f.digest(conn, user_id, status="sent", sent_at=NOW - timedelta(days=30 - n), document_ids=docs)
        f.digest(conn, user_id, status="failed", document_ids=docs)  # not received
        f.settings(conn, user_id, digest_interval_days=1, notes_per_digest=40)


def test_template_values_come_from_the_database(engine: sa.Engine) -> None:
    ref = setup_state(engine, "upgrade", name="  Grace Brewster Hopper ")
    _history(engine, "u1", digests=4, items=3)
    with engine.connect() as conn:
        facts = load_user_facts(conn, "u1")
    assert facts is not None
    assert (facts.digests_sent, facts.notes_received) == (4, 12)
    assert facts.first_digest_sent_at == NOW - timedelta(days=30)
    assert (facts.source_kind, facts.source_display_name) == ("notion", "Study Notes")
    assert (facts.requested_interval_days, facts.requested_notes_per_digest) == (1, 40)
    sender = RecordingSender()
    run(engine, ref, sender)
    [email] = sender.sent
    assert email.subject == "Your Brain Bits so far: 4 digests, 12 notes"
    assert "Hi Grace," in email.text


def test_free_plan_clamps_the_values_shown(engine: sa.Engine) -> None:
    ref = setup_state(engine, "onboarding", step=2)
    _history(engine, "u1", digests=2, items=2)
    sender = RecordingSender()
    run(engine, ref, sender)
    [email] = sender.sent
    # asked for 40 notes every day; the free plan gives 5 every 3 days
    assert "right now you get 5 notes every 3 days" in email.text


def test_upgrade_1_counts_the_notes_of_this_users_sent_digests(engine: sa.Engine) -> None:
    """Notes received = the items of the user's sent digests (12 = 4 × 3): failed digests and other
    users' digests do not count. (A sent digest without items, as the demo's seeded history has,
    counts as a digest and no notes.)"""
    ref = setup_state(engine, "upgrade")
    _history(engine, "u1", digests=4, items=3)
    with engine.begin() as conn:
        f.user(conn, "u2")
    _history(engine, "u2", digests=2, items=7)
    sender = RecordingSender()
    assert run(engine, ref, sender).outcome is StepOutcome.SENT
    [email] = sender.sent
    assert email.subject == "Your Brain Bits so far: 4 digests, 12 notes"
    assert "12 notes resurfaced" in email.text


def test_a_bounded_number_of_statements_whatever_the_history(engine: sa.Engine) -> None:
    ref = setup_state(engine, "upgrade", step=2)
    _history(engine, "u1", digests=12, items=6)
    with count_statements(engine) as counter:
        result = run(engine, ref)
    assert result.outcome is StepOutcome.SENT
    # state (claim) + user facts + email_sends insert + compare-and-set advance; on Postgres also the
    # advisory claim, its release and the record transaction's lock_timeout
    pg = engine.dialect.name == "postgresql"
    assert counter.count == 4 + 3 * pg, counter.statements


def test_through_the_real_sdk_and_fake_resend(engine: sa.Engine, fake_resend: FakeResend) -> None:
    ref = setup_state(engine, "onboarding", step=4, name="Ada")
    with engine.begin() as conn:
        f.digest(conn, "u1", status="sent", sent_at=NOW - timedelta(days=15))
    result = run(engine, ref, resend_sender(fake_resend))
    assert result.outcome is StepOutcome.SENT
    [delivery] = fake_resend.sent
    assert delivery.to == ["u1@example.test"]
    assert delivery.idempotency_key == "sequence-onboarding-u1-4"
    assert delivery.tags == {"email_type": "sequence", "sequence": "onboarding", "step": "onboarding-6"}
    assert delivery.subject == "Two weeks in: how is it going?"
    assert f"{FRONTEND}/feedback" in (delivery.text or "")
    assert [s["resend_id"] for s in sends(engine)] == [delivery.id]


def test_a_key_already_used_with_another_body_counts_as_sent(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """An earlier attempt was accepted by the provider, then the data changed before the retry: Resend
    answers 409 invalid_idempotent_request. The step is recorded (provider id unknown) and advanced."""
    ref = setup_state(engine, "welcome", step=2, name="Ada")
    sender = resend_sender(fake_resend)
    with engine.connect() as conn:
        facts = load_user_facts(conn, "u1")
    assert facts is not None
    # the earlier attempt: same key, rendered when the user was called "Ada"
    sender.send(build_outgoing_email(ref, facts, "cloud", FRONTEND))
    with engine.begin() as conn:
        conn.execute(sa.update(t.user).where(t.user.c.id == "u1").values(name="Augusta"))

    result = run(engine, ref, sender)

    assert (result.outcome, result.provider_id, result.advanced) == (StepOutcome.SENT, None, True)
    assert len(fake_resend.sent) == 1
    assert [(s["idempotency_key"], s["resend_id"]) for s in sends(engine)] == [
        ("sequence-welcome-u1-2", None)
    ]
    assert state_row(engine, ref.state_id)["current_step"] == 3
