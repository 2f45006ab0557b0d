"""Digest sending, the second half of every hourly run (SPEC §6), and the first-digest send (§7).

Per batch of verified users (keyset pagination by user id, ``Settings.digest_batch_size``), in ONE
transaction and a fixed number of statements:

1. users + settings + Pro flag; last send per user — then the pure due check (:func:`due_check`);
2. **claim**: every pending digest of the due users, ``SELECT … FOR UPDATE`` (Postgres) — then the pure
   choice of the newest one and the older ``scheduled`` ones it supersedes (:func:`choose_pending`);
3. the chosen digests' items with title, stored content and source; for first digests the user's
   active source and note count;
4. rendering and provider calls on a thread pool (``email_max_concurrency`` workers, the sender's own
   rate limiter), idempotency key ``note-digest-<id>``;
5. one multi-row upsert of the review states of every sent item and one multi-row update of every
   digest touched (sent / failed / skipped ``empty_snapshot`` / skipped superseded), guarded by
   ``status IN ('scheduled', 'failed')``; commit.

**Exactly once.** (a) *Claim*: the row locks of step 2 are held until the batch commits, so a second
run of the same hour (or a first-digest run for the same user) blocks on them and, once the first
commits, re-reads them as ``sent``/``skipped`` and sends nothing — it never even calls the provider.
(b) *Provider idempotency*: every attempt for a digest uses the same key, so when a process dies after
Resend accepted an email and before the commit (the whole batch's writes then roll back and the locks
are released), the rerun's call returns the first email's id and nothing is delivered twice; if the
rerun's body differs (a title changed meanwhile), Resend answers 409 ``invalid_idempotent_request``,
which equally proves the email went out, so the digest is recorded ``sent`` without a provider id.
(c) The final update's status guard makes sure only one run records a digest. SQLite has no row locks
(local runs and tests only): there (b) and (c) alone keep a digest to one delivery.

**Isolation.** A user's bad data never stops the others: an invalid timezone falls back to UTC, an
invalid send hour makes the user never due, an undecodable note shows as empty content, a render or
provider error marks that digest ``failed`` (with ``error_json``) for a later run to retry; each is
counted in the report. Only database errors (and a process kill) abort the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.content import ContentKeyring, decode_content
from dbb_orchestration.db import tables as t
from dbb_orchestration.digests.generate import UserPlan, user_plan
from dbb_orchestration.digests.queries import (
    PENDING_STATUSES,
    DigestRow,
    ItemRow,
    UserRow,
    insert_many,
    load_active_sources,
    load_document_counts,
    load_items,
    load_last_sends,
    load_review_states,
    load_user_batch,
    lock_pending_digests,
    update_many,
)
from dbb_orchestration.digests.render import (
    DigestEmailContext,
    DigestNote,
    first_source_label,
    render_digest_email,
)
from dbb_orchestration.email.sender import EmailSender, EmailSendError, OutgoingEmail
from dbb_orchestration.email.unsubscribe import list_unsubscribe_headers
from dbb_orchestration.plans import digest_timing_phrase
from dbb_orchestration.timing import as_utc, due_decision, local_date

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
DUPLICATE_KEY_ERROR = "invalid_idempotent_request"
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
    """SPEC §4 *Due* for ``plan``'s timezone, send hour and effective interval. With
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
        to=(job.user.email or "").strip(),
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
    batches: int = 0

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
        }


# ------------------------------------------------------------------------------------------- the run


@dataclass
class _Delivery:
    job: SendJob
    outcome: Literal["sent", "duplicate", "failed"]
    provider: str | None = None
    provider_id: str | None = None
    attempts: int = 0
    accepted_at: datetime | None = None
    error: dict[str, Any] | None = None
    error_kind: str | None = None
    issues: Counter[str] = field(default_factory=Counter)


def _deliver(
    job: SendJob,
    sender: EmailSender,
    settings: Settings,
    clock: Callable[[], datetime],
) -> _Delivery:
    """Render and send one digest; provider and render errors become a ``failed`` delivery. Anything
    that is not an ``Exception`` (a kill, KeyboardInterrupt) propagates and aborts the batch."""
    try:
        email, issues = build_email(
            job,
            settings.keyring,
            settings.frontend_url,
            settings.resend_reply_to,
            settings.unsubscribe_secret,
        )
    except Exception as exc:
        return _Delivery(
            job,
            "failed",
            error={"stage": "render", "error": type(exc).__name__, "message": "rendering failed"},
            error_kind="render",
        )
    try:
        result = sender.send(email)
    except EmailSendError as exc:
        if exc.status == 409 and exc.name == DUPLICATE_KEY_ERROR:
            return _Delivery(
                job, "duplicate", provider=sender.provider, attempts=exc.attempts, accepted_at=clock()
            )
        return _Delivery(
            job,
            "failed",
            attempts=exc.attempts,
            error={"stage": "provider", **exc.as_json()},
            error_kind=str(exc.status) if exc.status is not None else "network",
            issues=issues,
        )
    except Exception as exc:
        return _Delivery(
            job,
            "failed",
            error={"stage": "provider", "error": type(exc).__name__, "message": "sender raised"},
            error_kind="sender_error",
            issues=issues,
        )
    return _Delivery(
        job,
        "sent",
        provider=result.provider,
        provider_id=result.provider_id,
        attempts=result.attempts,
        accepted_at=clock(),
        issues=issues,
    )


def send_due_digests(
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime] | None = None,
    only_user_id: str | None = None,
    first_digest_bypass: bool = False,
) -> SendReport:
    """Send every due user's newest pending digest (SPEC §6) as of the logical time ``now`` (the
    partition's hour for the hourly job). ``sent_at``/``updated_at`` and each attempt's timestamps come
    from ``clock`` (default ``settings.now``: the real time); review scheduling uses ``now``.

    ``only_user_id`` restricts the run to one user; ``first_digest_bypass`` makes a user who has never
    been sent a digest due whatever the hour (the first-digest job passes both). Which sender (Resend,
    dry run) is the caller's choice. See the module docstring for claims and isolation.
    """
    now = as_utc(now, "now")
    real_clock = clock or settings.now
    report = SendReport(logical_time=now, dry_run=sender.provider == "dry-run")
    after: str | None = None
    with ThreadPoolExecutor(max_workers=max(1, settings.email_max_concurrency)) as pool:
        while True:
            with engine.begin() as conn:
                users = load_user_batch(
                    conn,
                    after=after,
                    limit=settings.digest_batch_size,
                    verified_only=True,
                    only_user_id=only_user_id,
                )
                if not users:
                    break
                after = users[-1].id
                report.batches += 1
                claim = _claim_batch(
                    conn, users, now, settings, first_digest_bypass, report, wall=real_clock()
                )
                deliveries = list(
                    pool.map(lambda job: _deliver(job, sender, settings, real_clock), claim.jobs)
                )
                _record_batch(conn, deliveries, claim, now, real_clock, report)
            if len(users) < settings.digest_batch_size:
                break
    return report


@dataclass
class _Claim:
    jobs: list[SendJob]
    updates: list[dict[str, Any]]  # digest updates already decided (empty snapshots)
    older: dict[str, list[DigestRow]]  # per user: the scheduled digests superseded once the newest is sent


def _claim_batch(
    conn: sa.Connection,
    users: Sequence[UserRow],
    now: datetime,
    settings: Settings,
    first_digest_bypass: bool,
    report: SendReport,
    wall: datetime | None = None,
) -> _Claim:
    """Decide who is due, lock and choose their digests, load what the emails show."""
    report.users_considered += len(users)
    plans = {row.id: user_plan(row, settings.deployment_mode) for row in users}
    rows = {row.id: row for row in users}
    last_sends = load_last_sends(conn, list(plans))
    checks: dict[str, DueCheck] = {}
    for uid, plan in plans.items():
        report.data_issues.update(plan.issues)
        check = due_check(plan, last_sends.get(uid), now, first_digest_bypass=first_digest_bypass, wall=wall)
        if check.reason == "invalid_send_hour":
            report.data_issues["invalid_send_hour"] += 1
        if check.due:
            checks[uid] = check
        else:
            report.not_due[check.reason] += 1
    report.due += len(checks)

    by_user: dict[str, list[DigestRow]] = {}
    for digest in lock_pending_digests(conn, list(checks), now):
        by_user.setdefault(digest.user_id, []).append(digest)
    chosen: dict[str, tuple[DigestRow, list[DigestRow]]] = {}
    for uid in checks:
        newest, older = choose_pending(by_user.get(uid, []))
        if newest is None:
            report.skipped[NO_PENDING] += 1
        else:
            chosen[uid] = (newest, older)

    items = load_items(conn, [newest.id for newest, _ in chosen.values()])
    updates: list[dict[str, Any]] = []
    ready: dict[str, tuple[DigestRow, list[DigestRow]]] = {}
    for uid, (newest, older) in chosen.items():
        if items.get(newest.id):
            ready[uid] = (newest, older)
            continue
        report.skipped[EMPTY_SNAPSHOT] += 1
        updates.append(
            _digest_update(newest, "skipped", merge_payload(newest.payload_json, reason=EMPTY_SNAPSHOT))
        )
    first_ids = [uid for uid in ready if checks[uid].first]
    sources = load_active_sources(conn, first_ids)
    counts = load_document_counts(conn, first_ids)
    jobs = [
        SendJob(
            user=rows[uid],
            plan=plans[uid],
            digest=newest,
            items=tuple(items[newest.id]),
            first=checks[uid].first,
            source=sources.get(uid),
            total_notes=counts.get(uid, 0),
        )
        for uid, (newest, _older) in ready.items()
    ]
    return _Claim(jobs, updates, {uid: older for uid, (_newest, older) in ready.items()})


def _digest_update(
    digest: DigestRow,
    status: str,
    payload: dict[str, Any],
    *,
    sent_at: datetime | None = None,
    error_json: Any = None,
    keep_error: bool = True,
) -> dict[str, Any]:
    return {
        "id": digest.id,
        "status": status,
        "sent_at": sent_at,
        "payload_json": payload,
        "error_json": digest.error_json if keep_error and error_json is None else error_json,
    }


def _record_batch(
    conn: sa.Connection,
    deliveries: Sequence[_Delivery],
    claim: _Claim,
    now: datetime,
    clock: Callable[[], datetime],
    report: SendReport,
) -> None:
    """Write the outcome of a batch: review states of sent items (one upsert) and every digest status
    (one multi-row update guarded by the pending status)."""
    updates, older_by_user = claim.updates, claim.older
    delivered = [d for d in deliveries if d.outcome in ("sent", "duplicate")]
    existing = load_review_states(conn, [item.document_id for d in delivered for item in d.job.items])
    stamp = as_utc(clock(), "clock()")
    review_rows: dict[int, dict[str, Any]] = {}
    for d in deliveries:
        report.data_issues.update(d.issues)
        digest, key = d.job.digest, idempotency_key(d.job.digest.id)
        if d.outcome == "failed":
            report.failed += 1
            report.failed_digest_ids.append(digest.id)
            report.provider_errors[d.error_kind or "unknown"] += 1
            payload = merge_payload(
                digest.payload_json, idempotency_key=key, last_attempt_at=stamp.isoformat()
            )
            updates.append(_digest_update(digest, "failed", payload, error_json=d.error, keep_error=False))
            continue
        report.sent += 1
        report.first_digests += int(d.job.first)
        report.provider_duplicates += int(d.outcome == "duplicate")
        payload = merge_payload(
            digest.payload_json,
            provider=d.provider,
            provider_id=d.provider_id,
            idempotency_key=key,
            first_digest=d.job.first,
            interval_days=d.job.plan.interval_days,
        )
        if d.outcome == "duplicate":
            payload["provider_duplicate_key"] = True
        updates.append(
            _digest_update(digest, "sent", payload, sent_at=d.accepted_at or stamp, keep_error=False)
        )
        for older in older_by_user.get(d.job.user.id, []):
            report.superseded += 1
            updates.append(
                _digest_update(
                    older,
                    "skipped",
                    merge_payload(older.payload_json, reason=SUPERSEDED, superseded_by=digest.id),
                )
            )
        for item in d.job.items:
            interval = review_interval(
                existing[item.document_id].interval_days if item.document_id in existing else None,
                d.job.plan.interval_days,
            )
            review_rows[item.document_id] = {
                "document_id": item.document_id,
                "user_id": d.job.user.id,
                "status": "new",
                "interval_days": interval,
                "last_sent_at": now,
                "next_due_at": now + timedelta(days=interval),
                "ease_factor": DEFAULT_EASE_FACTOR,
                "repetitions": 0,
                "updated_at": stamp,
            }

    rs = t.review_states

    def upsert(stmt: Any) -> Any:
        excluded = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[rs.c.document_id],
            set_={
                "interval_days": excluded.interval_days,
                "last_sent_at": excluded.last_sent_at,
                "next_due_at": excluded.next_due_at,
                "ease_factor": sa.func.coalesce(rs.c.ease_factor, excluded.ease_factor),
                "repetitions": sa.func.coalesce(rs.c.repetitions, excluded.repetitions),
                "updated_at": excluded.updated_at,
            },
        )

    insert_many(conn, rs, list(review_rows.values()), on_conflict=upsert)
    for row in updates:
        row["updated_at"] = stamp
    written = update_many(
        conn,
        t.note_digests,
        updates,
        where=t.note_digests.c.status.in_(PENDING_STATUSES),
        returning=(t.note_digests.c.id,),
    )
    missed = len(updates) - len(written)
    if missed:
        report.skipped["already_recorded_elsewhere"] += missed
