"""Digest sending, the second half of every hourly run (docs/behaviour.md §6), and the first-digest
send (§7): the pure rules and the email of one digest.

This module holds what is decided per user — :func:`due_check`, :func:`choose_pending`,
:func:`review_interval`, :func:`build_email` (the email and its key ``note-digest-<id>`` and tags) —
and :func:`send_due_digests`, the entry point of the hourly and first-digest ops. The engine that runs
them — per-user claims, no transaction or row lock across a provider call, Resend batches under
recorded keys, bounded time, exactly-once recording — is :mod:`dbb_orchestration.digests.delivery`,
whose docstring explains the claims and the crash cases.

**Isolation.** A user's bad data never stops the others: an invalid timezone falls back to UTC, an
invalid send hour makes the user never due, an undecodable note shows as empty content, a render or
provider error marks that digest ``failed`` (with a scrubbed ``error_json``) for a later run to
retry; each is counted in the report. Only database errors, an unavailable provider (after recording)
and a process kill abort the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dbb_orchestration.audience import email_address
from dbb_orchestration.config import Settings
from dbb_orchestration.content import ContentKeyring, decode_content
from dbb_orchestration.digests.generate import UserPlan
from dbb_orchestration.digests.queries import (
    DigestRow,
    ItemRow,
    UserRow,
)
from dbb_orchestration.digests.render import (
    DigestEmailContext,
    DigestNote,
    render_digest_email,
)
from dbb_orchestration.email.formatting import first_source_label
from dbb_orchestration.email.sender import EmailSender, OutgoingEmail
from dbb_orchestration.email.unsubscribe import list_unsubscribe_headers
from dbb_orchestration.plans import digest_timing_phrase
from dbb_orchestration.timing import due_decision, local_date

if TYPE_CHECKING:
    from dbb_orchestration.digests.delivery import ReadyGate

__all__ = [
    "DEFAULT_EASE_FACTOR",
    "EMPTY_SNAPSHOT",
    "SUPERSEDED",
    "DueCheck",
    "SendJob",
    "SendReport",
    "build_email",
    "choose_pending",
    "digest_tags",
    "due_check",
    "idempotency_key",
    "merge_payload",
    "review_interval",
    "send_due_digests",
]

SUPERSEDED = "superseded_by_newer_pending_digest"
EMPTY_SNAPSHOT = "empty_snapshot"
NO_PENDING = "no_pending_digest"
DEFAULT_EASE_FACTOR = 2.5
MIN_REVIEW_INTERVAL = 4
MAX_REVIEW_INTERVAL = 30
_FAILED_IDS_SHOWN = 20


# ----------------------------------------------------------------------------------------- pure rules


def idempotency_key(digest_id: int) -> str:
    return f"note-digest-{digest_id}"


def digest_tags(interval_days: int) -> dict[str, str]:
    return {"category": "note_digest", "interval_days": str(interval_days)}


LATER_SEND_HOUR = "later_send_hour_passed"


@dataclass(frozen=True)
class DueCheck:
    due: bool
    reason: str  # "due", "first_digest", "later_send_hour_passed", or a timing.DueReason
    first: bool  # never sent a digest


def later_send_hour_passed(plan: UserPlan, now: datetime, wall: datetime) -> bool:
    """Whether, by ``wall`` (the location's clock), the user's local send hour has begun on a local day
    later than that of ``now`` (the logical time): their send hour has come again since, so a run for
    ``now`` is a stale catch-up for them. Local days without that hour (a DST gap) do not count.
    ``wall`` at or before ``now`` → False. Naive datetimes → ``ValueError``."""
    tz, send_hour = plan.tz.tz, plan.send_hour
    day, wall_day = local_date(now, tz), local_date(wall, tz)
    candidate_day = wall_day
    while candidate_day > day:
        # fold=0: the first of a repeated hour; an hour in a DST gap does not round-trip
        wall_clock = datetime(
            candidate_day.year, candidate_day.month, candidate_day.day, send_hour, tzinfo=tz
        )
        start = wall_clock.astimezone(wall.tzinfo)
        local = start.astimezone(tz)
        if local.date() == candidate_day and local.hour == send_hour and start <= wall:
            return True
        candidate_day -= timedelta(days=1)
    return False


def due_check(
    plan: UserPlan,
    last_sent_at: datetime | None,
    now: datetime,
    *,
    first_digest_bypass: bool = False,
    wall: datetime | None = None,
) -> DueCheck:
    """behaviour §4 *Due* for ``plan``'s timezone, send hour and effective interval. With
    ``first_digest_bypass`` a user who has never been sent a digest is due at any hour (reason
    ``first_digest``); a user who has been sent one is checked normally.

    Catch-up (docs/behaviour.md §5–6): given ``wall``, the location's clock, a user due at ``now`` whose
    send hour has begun again on a later local day by ``wall`` is not due (reason
    ``later_send_hour_passed``): a backfill of missed hours serves each user at their newest missed send
    hour only, never at an older one. A last send on a later local day than ``now`` already makes the
    user not due (``interval_not_elapsed``), so an older day is never sent after a newer one."""
    first = last_sent_at is None
    if first_digest_bypass and first:
        return DueCheck(True, "first_digest", True)
    decision = due_decision(now, plan.tz.tz, plan.send_hour, last_sent_at, plan.interval_days)
    if decision.due and wall is not None and later_send_hour_passed(plan, now, wall):
        return DueCheck(False, LATER_SEND_HOUR, first)
    return DueCheck(decision.due, decision.reason, first)


def _pending_order(d: DigestRow) -> tuple[datetime, datetime, int]:
    assert d.scheduled_for is not None  # pending digests are loaded with scheduled_for <= now
    return (d.scheduled_for, d.created_at, d.id)


def choose_pending(pending: Sequence[DigestRow]) -> tuple[DigestRow | None, list[DigestRow]]:
    """The digest to send — newest ``scheduled_for``, then newest ``created_at`` (then highest id) — and
    the other still-``scheduled`` ones (older by that order) it supersedes once sent. ``failed`` older
    ones are left alone. Nothing pending → ``(None, [])``."""
    candidates = [d for d in pending if d.scheduled_for is not None]
    if not candidates:
        return None, []
    newest = max(candidates, key=_pending_order)
    older = [d for d in candidates if d.id != newest.id and d.status == "scheduled"]
    return newest, sorted(older, key=lambda d: d.id)


def review_interval(existing: int | None, effective_interval: int) -> int:
    """min(30, max(existing ``interval_days`` or 0, the effective digest interval, 4))."""
    return min(MAX_REVIEW_INTERVAL, max(existing or 0, effective_interval, MIN_REVIEW_INTERVAL))


def merge_payload(existing: Any, **extra: Any) -> dict[str, Any]:
    """``existing`` payload (a JSON object; anything else is kept under ``previous_payload``) with
    ``extra`` on top."""
    if isinstance(existing, dict):
        base = dict(existing)
    elif existing is None:
        base = {}
    else:
        base = {"previous_payload": existing}
    return {**base, **extra}


# Keys a skip leaves on a digest's payload (ours or the backend's, which reuses a skipped digest as a
# seed digest without touching its payload). A digest that is then sent must not keep them.
SKIP_PAYLOAD_KEYS = ("reason", "superseded_by")


def sent_payload(existing: Any, **extra: Any) -> dict[str, Any]:
    """The payload of a digest being recorded ``sent``: :func:`merge_payload` without the skip keys."""
    payload = merge_payload(existing, **extra)
    for key in SKIP_PAYLOAD_KEYS:
        payload.pop(key, None)
    return payload


@dataclass(frozen=True)
class SendJob:
    """Everything needed to email one digest (no database access past this point)."""

    user: UserRow
    plan: UserPlan
    digest: DigestRow
    items: tuple[ItemRow, ...]
    first: bool
    source: tuple[str, str | None] | None = None  # first digest: the most recent active connection
    total_notes: int = 0  # first digest: non-deleted documents


def build_email(
    job: SendJob,
    keyring: ContentKeyring,
    frontend_url: str,
    reply_to: str | None,
    unsubscribe_secret: str | None = None,
) -> tuple[OutgoingEmail, Counter[str]]:
    """Decode every note (a failure → empty content, counted as ``content_<reason>``), render the digest
    email and wrap it for the provider. Render errors (a template bug) raise."""
    issues: Counter[str] = Counter()
    notes = []
    for item in job.items:
        decoded = decode_content(
            item.content_ciphertext, item.content_iv, item.content_alg, item.content_key_version, keyring
        )
        if decoded.error:
            issues[f"content_{decoded.error.split(':', 1)[0]}"] += 1
        notes.append(DigestNote(item.title, decoded.text, item.source_kind, item.source_name))
    tz = job.plan.tz.tz
    stamp = job.digest.scheduled_for or job.digest.created_at
    ctx = DigestEmailContext(
        user_name=job.user.name,
        digest_date=local_date(stamp, tz),
        interval_days=job.plan.interval_days,
        is_first=job.first,
        is_pro=job.plan.is_pro,
        notes=tuple(notes),
        total_synced_notes=job.total_notes,
        first_source_label=first_source_label(*job.source) if job.source else None,
        next_digest_phrase=digest_timing_phrase(job.plan.interval_days),
        reply_to=reply_to,
    )
    rendered = render_digest_email(ctx, frontend_url)
    email = OutgoingEmail(
        to=email_address(job.user.email),
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        idempotency_key=idempotency_key(job.digest.id),
        tags=digest_tags(job.plan.interval_days),
        reply_to=reply_to,
        headers=list_unsubscribe_headers(frontend_url, job.user.id, unsubscribe_secret),
    )
    return email, issues


# ------------------------------------------------------------------------------------------- report


@dataclass
class SendReport:
    """Counts of one send run (ids and counts only: safe for event logs)."""

    logical_time: datetime
    dry_run: bool = False
    users_considered: int = 0
    due: int = 0
    not_due: Counter[str] = field(default_factory=Counter)  # by timing reason
    sent: int = 0
    first_digests: int = 0
    failed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # no_pending_digest, empty_snapshot, …
    superseded: int = 0
    provider_duplicates: int = 0  # recorded sent after a 409 invalid_idempotent_request
    provider_errors: Counter[str] = field(default_factory=Counter)  # by HTTP status ("network", "render")
    data_issues: Counter[str] = field(default_factory=Counter)
    failed_digest_ids: list[int] = field(default_factory=list)
    batches: int = 0  # pages of users
    requests: int = 0  # provider requests, retries included (a batch holds up to EMAIL_BATCH_SIZE digests)
    provider_unavailable: int = 0  # recorded failed because the circuit breaker was open

    def metadata(self) -> dict[str, Any]:
        return {
            "logical_time": self.logical_time.isoformat(),
            "dry_run": self.dry_run,
            "users_considered": self.users_considered,
            "due": self.due,
            "not_due": sum(self.not_due.values()),
            "not_due_by_reason": dict(sorted(self.not_due.items())),
            "sent": self.sent,
            "first_digests": self.first_digests,
            "failed": self.failed,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "superseded": self.superseded,
            "provider_duplicates": self.provider_duplicates,
            "provider_errors": dict(sorted(self.provider_errors.items())),
            "data_issues": dict(sorted(self.data_issues.items())),
            "failed_digest_ids": self.failed_digest_ids[:_FAILED_IDS_SHOWN],
            "batches": self.batches,
            "provider_requests": self.requests,
            "provider_unavailable": self.provider_unavailable,
        }


# ------------------------------------------------------------------------------------------- the run


def send_due_digests(
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime] | None = None,
    only_user_id: str | None = None,
    first_digest_bypass: bool = False,
    user_range: tuple[str | None, str | None] = (None, None),
    ready: ReadyGate | None = None,
) -> SendReport:
    """Send every due user's newest pending digest (behaviour §6) as of the logical time ``now`` (the
    partition's hour for the hourly job). ``sent_at``, ``updated_at`` and the review scheduling of the
    sent items come from ``clock`` (default ``settings.now``: the real time) as read when the provider
    accepted the email; ``now`` decides who is due and which digests are pending.

    ``only_user_id`` restricts the run to one user; ``first_digest_bypass`` makes a user who has never
    been sent a digest due whatever the hour (the first-digest job passes both); ``user_range``
    ``(after, upto)`` limits the run to users with ``after < id <= upto`` (``None`` = unbounded: one
    batch step of the hourly job); ``ready`` bounds each page by what generation has committed so far
    (``delivery.ReadyGate``, used by ``pipeline.py``). Which sender (Resend,
    dry run) is the caller's choice. The engine — claims, batches, bounded time, recording — is
    :mod:`dbb_orchestration.digests.delivery`; it raises
    :class:`~dbb_orchestration.digests.delivery.ProviderUnavailableError` (after recording every claimed
    digest) when the provider is down.
    """
    from dbb_orchestration.digests.delivery import deliver_due_digests  # the engine imports these rules

    return deliver_due_digests(
        engine,
        sender,
        settings,
        now,
        clock=clock,
        only_user_id=only_user_id,
        first_digest_bypass=first_digest_bypass,
        user_range=user_range,
        ready=ready,
    )
