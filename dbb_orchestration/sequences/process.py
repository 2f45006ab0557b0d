"""Processing one sequence step of one user (behaviour §9), exactly once.

:func:`process_step` is what ``email_sequence_step_job`` runs. In order:

1. the state must exist, belong to the given user and sequence (else :class:`StepConfigError`), be
   ``active`` and still at the given step (else nothing: ``stale``);
2. the user must have an email and ``email_verified`` (else nothing: ``unverified``);
3. exit checks: ``welcome`` exits ``connected`` when the user has any integration connection;
   ``onboarding`` and ``upgrade`` exit ``upgraded`` when billing is on and the user is Pro;
4. a step beyond the last → ``completed``;
5. not yet due → nothing (``not_due``, or ``blocked`` for onboarding without a first sent digest);
6. send with key ``sequence-<sequence>-<userId>-<step>``, record ``email_sends`` (a duplicate key is
   ignored) and advance with a compare-and-set update; past the last step also ``completed``.

On a provider failure nothing is written and :class:`StepSendFailed` is raised (the run fails; the
sensor tries again later, see ``due.py``).

**Why one email at most, even when two runs of the same step overlap.** Three layers, and no
transaction or row lock is ever held while the provider call is in flight (claim → commit → send →
record):

- *Claim (Postgres).* In one short transaction the step takes a session-level advisory lock on the
  state (``pg_try_advisory_lock``, never waiting) and reads the state row with ``SELECT … FOR UPDATE
  SKIP LOCKED``; if either is held by someone else (another run of this step, or the backend writing
  that row) it returns ``busy`` at once. It decides, renders and commits: the row lock ends there, the
  advisory lock stays with the session through the provider call and is released afterwards. A killed
  process's session ends and Postgres drops its lock; nothing was written.
- *Provider idempotency.* Every attempt of a step sends the same key, so a run that died after Resend
  accepted the email and before recording it is retried harmlessly: Resend answers with the first
  email's id. If the retry's body differs (the template values changed in between), Resend answers 409
  ``invalid_idempotent_request``; that too proves the key was used, so the step is recorded (provider
  id unknown) and advanced instead of failing forever.
- *Unique ``email_sends.idempotency_key``* with ``INSERT … ON CONFLICT DO NOTHING``, and the advance as
  ``UPDATE … WHERE id = :id AND current_step = :step AND status = 'active'`` in the record transaction
  (which waits at most 10 s for a row lock): two runs can never both record or both advance.

SQLite (local runs and tests) has no row or advisory locks: the same short transactions, and the last
two layers alone guarantee a single delivery (the provider de-duplicates by key).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

import sqlalchemy as sa

from dbb_orchestration.audience import (
    email_address,
    has_pro_subscription_sql,
    is_sendable,
    latest_active_source_id_sql,
    plan_for,
)
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import dialect_insert
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.email.sender import EmailSender, EmailSendError, OutgoingEmail
from dbb_orchestration.email.unsubscribe import list_unsubscribe_headers
from dbb_orchestration.plans import (
    DeploymentMode,
    billing_enabled,
    effective_interval_days,
    effective_notes_per_digest,
)
from dbb_orchestration.sequences.content import SequenceEmailValues, render_sequence_email
from dbb_orchestration.sequences.steps import (
    SequenceName,
    SequenceStep,
    email_id,
    email_tags,
    get_step,
    is_due,
    last_step,
    require_sequence,
)
from dbb_orchestration.timing import require_aware

__all__ = [
    "Decision",
    "StateRow",
    "StepConfigError",
    "StepOutcome",
    "StepResult",
    "StepSendFailed",
    "UserFacts",
    "build_outgoing_email",
    "decide",
    "email_values",
    "load_state",
    "load_user_facts",
    "process_step",
]


class StepOutcome(StrEnum):
    SENT = "sent"  # sent (or found already accepted by the provider), recorded, advanced by this run
    DUPLICATE = "duplicate"  # SQLite only: the provider de-duplicated and another run advanced the state
    EXITED = "exited"
    COMPLETED = "completed"
    NOT_DUE = "not_due"
    BLOCKED = "blocked"  # onboarding without a first sent digest
    UNVERIFIED = "unverified"  # no email or email not verified: skipped, state unchanged
    STALE = "stale"  # no longer active, or no longer at that step
    NOT_FOUND = "not_found"  # state (or user) deleted since the sensor saw it
    BUSY = "busy"  # Postgres: another run of this state holds the claim
    INVALID_STEP = "invalid_step"  # current step below 1: nothing to do
    DISABLED = "disabled"  # self-hosted deployment: sequences are off


class StepConfigError(ValueError):
    """The run config does not describe the state row (wrong user or sequence, unknown sequence)."""


class StepSendFailed(Exception):
    """The provider refused or failed; nothing was written. Carries ids only, never addresses."""

    def __init__(self, ref: SequenceStep, error: EmailSendError) -> None:
        self.ref = ref
        self.error = error
        super().__init__(
            f"sending {email_id(ref.sequence_name, ref.step)} for state {ref.state_id} failed: "
            f"status={error.status} error={error.name or type(error).__name__} attempts={error.attempts}"
        )


@dataclass(frozen=True)
class StateRow:
    id: int
    user_id: str
    sequence_name: str
    current_step: int
    status: str
    entered_at: datetime


@dataclass(frozen=True)
class UserFacts:
    """What the checks and the templates need about one user, loaded in one statement."""

    user_id: str
    name: str | None
    email: str | None
    email_verified: bool
    requested_interval_days: int | None  # None: no settings row
    requested_notes_per_digest: int | None
    first_digest_sent_at: datetime | None
    digests_sent: int
    notes_received: int
    has_connection: bool  # any integration connection, whatever its status
    has_pro_subscription: bool  # a subscription with status active or trialing
    source_kind: str | None  # most recently created active connection
    source_display_name: str | None


@dataclass(frozen=True)
class Decision:
    action: Literal["none", "exit", "complete", "send"]
    outcome: StepOutcome
    exit_reason: str | None = None


@dataclass(frozen=True)
class StepResult:
    outcome: StepOutcome
    ref: SequenceStep
    email_id: str | None = None
    provider: str | None = None
    provider_id: str | None = None
    recorded: bool = False  # an email_sends row was inserted by this run
    advanced: bool = False  # this run moved the state (advance, exit or completion)
    exit_reason: str | None = None

    def metadata(self) -> dict[str, Any]:
        """Ids and counts only (for run metadata and logs)."""
        return {
            "outcome": self.outcome.value,
            "state_id": self.ref.state_id,
            "sequence": self.ref.sequence_name,
            "step": self.ref.step,
            "email_id": self.email_id or "-",
            "provider": self.provider or "-",
            "provider_id": self.provider_id or "-",
            "recorded": self.recorded,
            "advanced": self.advanced,
            "exit_reason": self.exit_reason or "-",
        }


# ---------------------------------------------------------------------------------------------- pure


def decide(
    ref: SequenceStep, state: StateRow | None, facts: UserFacts | None, *, now: datetime, billing: bool
) -> Decision:
    """behaviour §9 checks 1–5 in order; the first that applies decides. Raises :class:`StepConfigError` when
    ``state`` belongs to another user or sequence than ``ref`` says. Naive ``now`` → ``ValueError``."""
    require_aware(now, "now")
    early = _row_check(ref, state, facts)
    if early is not None or state is None or facts is None:
        return early or Decision("none", StepOutcome.NOT_FOUND)
    sequence = require_sequence(state.sequence_name)
    return _exit_check(sequence, facts, billing) or _step_check(ref, sequence, state, facts, now)


def _row_check(ref: SequenceStep, state: StateRow | None, facts: UserFacts | None) -> Decision | None:
    """Checks 1–2: the row exists and is still at this step, the user exists and can be emailed."""
    if state is None:
        return Decision("none", StepOutcome.NOT_FOUND)
    if state.user_id != ref.user_id or state.sequence_name != ref.sequence_name:
        raise StepConfigError(
            f"state {ref.state_id} is not the {ref.sequence_name} sequence of the given user"
        )
    if state.status != "active" or state.current_step != ref.step:
        return Decision("none", StepOutcome.STALE)
    if facts is None:
        return Decision("none", StepOutcome.NOT_FOUND)
    if not is_sendable(facts.email, facts.email_verified):
        return Decision("none", StepOutcome.UNVERIFIED)
    return None


def _exit_check(sequence: str, facts: UserFacts, billing: bool) -> Decision | None:
    """Check 3: ``welcome`` exits once connected; ``onboarding``/``upgrade`` once Pro (billing on)."""
    if sequence == "welcome" and facts.has_connection:
        return Decision("exit", StepOutcome.EXITED, "connected")
    if sequence in ("onboarding", "upgrade") and billing and facts.has_pro_subscription:
        return Decision("exit", StepOutcome.EXITED, "upgraded")
    return None


def _step_check(
    ref: SequenceStep, sequence: SequenceName, state: StateRow, facts: UserFacts, now: datetime
) -> Decision:
    """Checks 4–5: past the last step → complete; otherwise send when the step is due."""
    if ref.step > last_step(sequence):
        return Decision("complete", StepOutcome.COMPLETED)
    if ref.step < 1:
        return Decision("none", StepOutcome.INVALID_STEP)
    first_sent = facts.first_digest_sent_at
    if is_due(sequence, ref.step, now=now, entered_at=state.entered_at, first_digest_sent_at=first_sent):
        return Decision("send", StepOutcome.SENT)
    blocked = sequence == "onboarding" and first_sent is None
    return Decision("none", StepOutcome.BLOCKED if blocked else StepOutcome.NOT_DUE)


def email_values(facts: UserFacts, mode: DeploymentMode | str) -> SequenceEmailValues:
    """Template values for ``facts``: Pro per :func:`plans.is_pro`, interval and notes per digest clamped
    to the user's plan."""
    pro, limits = plan_for(facts.has_pro_subscription, mode)
    return SequenceEmailValues(
        user_name=facts.name,
        is_pro=pro,
        interval_days=effective_interval_days(facts.requested_interval_days, limits),
        notes_per_digest=effective_notes_per_digest(facts.requested_notes_per_digest, limits),
        digests_received=facts.digests_sent,
        notes_received=facts.notes_received,
        source_kind=facts.source_kind,
        source_display_name=facts.source_display_name,
    )


# ---------------------------------------------------------------------------------------------- reads

_states = t.email_sequence_states


def load_state(conn: sa.Connection, state_id: int, *, lock: bool = False) -> StateRow | None:
    """The state row, or ``None``. ``lock`` (Postgres only): ``FOR UPDATE SKIP LOCKED``, so ``None`` also
    means "locked by another transaction" (tell them apart with a second, unlocked call)."""
    query = sa.select(
        _states.c.id,
        _states.c.user_id,
        _states.c.sequence_name,
        _states.c.current_step,
        _states.c.status,
        _states.c.entered_at,
    ).where(_states.c.id == state_id)
    if lock:
        query = query.with_for_update(skip_locked=True)
    row = conn.execute(query).first()
    return None if row is None else StateRow(*row)


def _facts_query(user_id: str) -> sa.Select[Any]:
    u, s, d, i = t.user, t.user_settings, t.note_digests, t.note_digest_items
    c = t.integration_connections
    sent = sa.and_(d.c.user_id == u.c.id, d.c.status == "sent")
    latest_source = latest_active_source_id_sql(u.c.id)
    source = c.alias("source")
    return (
        sa.select(
            u.c.id,
            u.c.name,
            u.c.email,
            u.c.email_verified,
            s.c.digest_interval_days,
            s.c.notes_per_digest,
            sa.select(sa.func.min(d.c.sent_at)).where(sent).scalar_subquery(),
            sa.select(sa.func.count()).select_from(d).where(sent).scalar_subquery(),
            sa.select(sa.func.count())
            .select_from(i.join(d, d.c.id == i.c.note_digest_id))
            .where(sent)
            .scalar_subquery(),
            sa.exists().where(c.c.user_id == u.c.id),
            has_pro_subscription_sql(u.c.id),
            source.c.kind,
            source.c.display_name,
        )
        .select_from(u.outerjoin(s, s.c.user_id == u.c.id).outerjoin(source, source.c.id == latest_source))
        .where(u.c.id == user_id)
    )


def load_user_facts(conn: sa.Connection, user_id: str) -> UserFacts | None:
    """Everything the checks and templates need about one user, in ONE statement; ``None`` when the
    user does not exist."""
    row = conn.execute(_facts_query(user_id)).first()
    if row is None:
        return None
    return UserFacts(
        user_id=row[0],
        name=row[1],
        email=row[2],
        email_verified=bool(row[3]),
        requested_interval_days=row[4],
        requested_notes_per_digest=row[5],
        first_digest_sent_at=row[6],
        digests_sent=int(row[7] or 0),
        notes_received=int(row[8] or 0),
        has_connection=bool(row[9]),
        has_pro_subscription=bool(row[10]),
        source_kind=row[11],
        source_display_name=row[12],
    )


# --------------------------------------------------------------------------------------------- writes


def _cas(ref: SequenceStep) -> sa.ColumnElement[bool]:
    return sa.and_(
        _states.c.id == ref.state_id, _states.c.current_step == ref.step, _states.c.status == "active"
    )


def _transition(conn: sa.Connection, ref: SequenceStep, decision: Decision, now: datetime) -> bool:
    values: dict[str, Any] = {"completed_at": now}
    if decision.action == "exit":
        values.update(status="exited", exit_reason=decision.exit_reason)
    else:
        values.update(status="completed")
    return conn.execute(sa.update(_states).where(_cas(ref)).values(**values)).rowcount == 1


def _advance(conn: sa.Connection, ref: SequenceStep, now: datetime) -> bool:
    values: dict[str, Any] = {"current_step": ref.step + 1, "last_email_sent_at": now}
    if ref.step >= last_step(ref.sequence_name):
        values.update(status="completed", completed_at=now)
    return conn.execute(sa.update(_states).where(_cas(ref)).values(**values)).rowcount == 1


def _record_send(
    conn: sa.Connection, ref: SequenceStep, *, provider: str, provider_id: str | None, now: datetime
) -> bool:
    """``INSERT … ON CONFLICT (idempotency_key) DO NOTHING``; ``True`` when a row was inserted."""
    values = {
        "user_id": ref.user_id,
        "sequence_name": ref.sequence_name,
        "email_name": email_id(ref.sequence_name, ref.step),
        "idempotency_key": ref.key,
        "provider": provider,
        "resend_id": provider_id,
        "sent_at": now,
        "payload_json": {"provider": provider, "step": ref.step},
    }
    insert = dialect_insert(conn)
    statement = (
        insert(t.email_sends)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .execution_options(preserve_rowcount=True)  # INSERT rowcount is only kept on request
    )
    return conn.execute(statement).rowcount == 1


# ---------------------------------------------------------------------------------------------- claim

CLAIM_NAMESPACE = 0x5E0  # first key of the two-key advisory lock: "sequence step"
RECORD_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '10s'"


def _try_claim(conn: sa.Connection, state_id: int) -> bool:
    """Postgres: a session-level advisory lock on the state, without waiting. It outlives the claim
    transaction (so no transaction is open during the provider call) and ends with the session, so a
    killed process never leaves it behind."""
    query = sa.select(sa.func.pg_try_advisory_lock(CLAIM_NAMESPACE, state_id))
    return bool(conn.execute(query).scalar_one())


def _release_claim(conn: sa.Connection, state_id: int) -> None:
    """Unlock; if that fails, close the connection instead (ending the session ends the lock), so a
    pooled connection never carries a claim to its next user."""
    try:
        if conn.in_transaction():
            conn.rollback()
        conn.execute(sa.select(sa.func.pg_advisory_unlock(CLAIM_NAMESPACE, state_id)))
        conn.commit()
    except sa.exc.SQLAlchemyError:
        conn.invalidate()


# ---------------------------------------------------------------------------------------------- run


def process_step(
    engine: sa.Engine,
    ref: SequenceStep,
    *,
    sender: EmailSender,
    now: datetime,
    frontend_url: str,
    mode: DeploymentMode | str = DeploymentMode.CLOUD,
    unsubscribe_secret: str | None = None,
) -> StepResult:
    """Run one step (see the module docstring). ``now`` is the wall clock used for the due check and
    every timestamp written. Raises :class:`StepSendFailed` on a provider failure (nothing written),
    :class:`StepConfigError` when ``ref`` does not match the state row, ``ValueError`` on a naive ``now``
    or an unknown sequence name. Database errors propagate (nothing is half-written: one transaction
    per write set)."""
    require_aware(now, "now")
    try:
        require_sequence(ref.sequence_name)
    except ValueError as exc:
        raise StepConfigError(str(exc)) from None
    if not billing_enabled(mode):
        return StepResult(StepOutcome.DISABLED, ref)
    with engine.connect() as conn:
        claim = _Claim()
        try:
            # 1. claim and decide, in one short transaction
            planned = _claim_and_decide(conn, ref, claim, now, mode, frontend_url, unsubscribe_secret)
            if isinstance(planned, StepResult):
                return planned
            # 2. send: no transaction open, no row locked (Postgres: only the session's claim is held)
            provider_id = _send(sender, planned, ref)
            # 3. record, in another short transaction
            return _record(conn, ref, provider=sender.provider, provider_id=provider_id, now=now)
        finally:
            if claim.held:
                _release_claim(conn, ref.state_id)


@dataclass
class _Claim:
    held: bool = False  # this session holds the step's advisory claim (release it, whatever happens)


def _claim_and_decide(
    conn: sa.Connection,
    ref: SequenceStep,
    claim: _Claim,
    now: datetime,
    mode: DeploymentMode | str,
    frontend_url: str,
    unsubscribe_secret: str | None,
) -> StepResult | OutgoingEmail:
    """The step's outcome when nothing is to be sent (an exit or completion is written here), else the
    email to send. Postgres: claims the step first and reads the row ``SKIP LOCKED`` (held → ``busy``)."""
    postgres = is_postgres(conn)
    with conn.begin():
        if postgres:
            claim.held = _try_claim(conn, ref.state_id)
            if not claim.held:
                return StepResult(StepOutcome.BUSY, ref)
        state = load_state(conn, ref.state_id, lock=postgres)
        if state is None and postgres and load_state(conn, ref.state_id) is not None:
            return StepResult(StepOutcome.BUSY, ref)  # the row is locked (say by the backend)
        facts = load_user_facts(conn, ref.user_id) if state is not None else None
        decision = decide(ref, state, facts, now=now, billing=billing_enabled(mode))
        if decision.action in ("exit", "complete"):
            moved = _transition(conn, ref, decision, now)
            return StepResult(decision.outcome, ref, advanced=moved, exit_reason=decision.exit_reason)
        if decision.action == "none":
            return StepResult(decision.outcome, ref)
        assert facts is not None and facts.email is not None
        return build_outgoing_email(ref, facts, mode, frontend_url, unsubscribe_secret)


def _record(
    conn: sa.Connection, ref: SequenceStep, *, provider: str, provider_id: str | None, now: datetime
) -> StepResult:
    """Record the accepted email and advance the state, in one short transaction."""
    with conn.begin():
        if is_postgres(conn):
            conn.exec_driver_sql(RECORD_LOCK_TIMEOUT)
        recorded = _record_send(conn, ref, provider=provider, provider_id=provider_id, now=now)
        advanced = _advance(conn, ref, now)
    return StepResult(
        StepOutcome.SENT if advanced else StepOutcome.DUPLICATE,
        ref,
        email_id=email_id(ref.sequence_name, ref.step),
        provider=provider,
        provider_id=provider_id,
        recorded=recorded,
        advanced=advanced,
    )


def build_outgoing_email(
    ref: SequenceStep,
    facts: UserFacts,
    mode: DeploymentMode | str,
    frontend_url: str,
    unsubscribe_secret: str | None = None,
) -> OutgoingEmail:
    """Render the step's email for ``facts`` (``ref.step`` must be a real step) with key and tags."""
    step = get_step(ref.sequence_name, ref.step)
    assert step is not None
    rendered = render_sequence_email(step.template, email_values(facts, mode), frontend_url)
    return OutgoingEmail(
        to=email_address(facts.email),
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        idempotency_key=ref.key,
        tags=email_tags(ref.sequence_name, ref.step),
        headers=list_unsubscribe_headers(frontend_url, facts.user_id, unsubscribe_secret),
    )


def _send(sender: EmailSender, email: OutgoingEmail, ref: SequenceStep) -> str | None:
    """The provider id; ``None`` when the provider reports the key as already used with another body
    (an earlier attempt of this very step was accepted). Other failures → :class:`StepSendFailed`."""
    try:
        return sender.send(email).provider_id
    except EmailSendError as exc:
        if exc.already_sent_under_key:
            return None
        raise StepSendFailed(ref, exc) from exc
