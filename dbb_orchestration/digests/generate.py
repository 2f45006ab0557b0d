"""Digest generation, the first half of every hourly run (SPEC §5).

Shape: per batch of users (``Settings.digest_batch_size``, keyset pagination by user id) a fixed set of
statements — advisory lock, users + settings + Pro flag, latest digest per user, candidate documents
with review states (only for users who need a digest), hashes of the selected documents, one insert of
the digests, one insert of the items — around pure decisions (:func:`user_plan`,
:func:`needs_digest`, :func:`plan_digest`). Each batch is its own transaction.

Idempotent: a user whose most recent digest already stands for the logical time's local day gets
nothing, so running the same hour twice creates nothing new. Two generations running at once are
serialised batch by batch by a Postgres advisory lock (see ``queries.DIGEST_LOCK_KEY``), so the second
sees the first one's digests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db import tables as t
from dbb_orchestration.digests.queries import (
    DigestRow,
    UserRow,
    advisory_xact_lock,
    insert_many,
    load_candidates,
    load_content_hashes,
    load_latest_digests,
    load_user_batch,
)
from dbb_orchestration.digests.selection import Candidate, daily_seed, select_notes
from dbb_orchestration.plans import (
    DEFAULT_INTERVAL_DAYS,
    DeploymentMode,
    PlanLimits,
    effective_interval_days,
    effective_notes_per_digest,
    is_pro,
    plan_limits,
)
from dbb_orchestration.timing import (
    ResolvedTimezone,
    as_utc,
    local_date,
    resolve_timezone,
    start_of_local_day,
)

__all__ = [
    "DAILY_SOURCE",
    "DEFAULT_SEND_HOUR",
    "GenerateReport",
    "PlannedDigest",
    "UserPlan",
    "generate_digests",
    "needs_digest",
    "plan_digest",
    "user_plan",
]

DAILY_SOURCE = "daily_job"
DEFAULT_SEND_HOUR = 8


# ----------------------------------------------------------------------------------------- pure rules


@dataclass(frozen=True)
class UserPlan:
    """What the rules need to know about one user, defaults and plan clamps applied."""

    user_id: str
    tz: ResolvedTimezone
    is_pro: bool
    limits: PlanLimits
    interval_days: int  # effective (clamped) interval
    notes_per_digest: int  # effective (clamped) count
    send_hour: int  # the stored value (validated by timing.due_decision), default 8

    @property
    def issues(self) -> list[str]:
        """Data problems worth counting (never fatal)."""
        return ["invalid_timezone"] if self.tz.error else []


def user_plan(row: UserRow, mode: DeploymentMode | str) -> UserPlan:
    """Settings with SPEC §3–4 defaults for a user without a settings row (interval 7, 5 notes, UTC,
    8:00), clamped to the plan (self-hosted: everyone Pro). An invalid timezone falls back to UTC (see
    ``tz.error``); an invalid send hour is kept as is and later makes the user never due."""
    pro = is_pro(["active"] if row.has_pro_subscription else [], mode)
    limits = plan_limits(pro, mode)
    if row.has_settings:
        interval = effective_interval_days(row.digest_interval_days, limits)
        notes = effective_notes_per_digest(row.notes_per_digest, limits)
        tz = resolve_timezone(row.timezone)
        hour = DEFAULT_SEND_HOUR if row.preferred_send_hour is None else row.preferred_send_hour
    else:
        interval = effective_interval_days(DEFAULT_INTERVAL_DAYS, limits)
        notes = effective_notes_per_digest(None, limits)
        tz = resolve_timezone(None)
        hour = DEFAULT_SEND_HOUR
    return UserPlan(row.id, tz, pro, limits, interval, notes, hour)


def needs_digest(plan: UserPlan, latest: DigestRow | None, now: datetime) -> bool:
    """False when the user's most recent digest (by ``created_at``) has ``scheduled_for`` — or
    ``created_at`` when that is null — on the same local day as ``now``; True otherwise (also without
    any digest)."""
    if latest is None:
        return True
    stamp = latest.scheduled_for or latest.created_at
    return local_date(stamp, plan.tz.tz) != local_date(now, plan.tz.tz)


@dataclass(frozen=True)
class PlannedDigest:
    """A digest to insert: ``scheduled`` with ``document_ids`` in position order, or ``skipped`` with
    ``reason`` ``no_documents`` / ``empty_selection`` and no items."""

    user_id: str
    scheduled_for: datetime
    status: Literal["scheduled", "skipped"]
    document_ids: tuple[int, ...] = ()
    reason: str | None = None
    notes_skipped: tuple[tuple[int, str], ...] = ()


def plan_digest(plan: UserPlan, candidates: Sequence[Candidate], now: datetime) -> PlannedDigest:
    """The user's digest for the local day of ``now``: ``scheduled_for`` = start of that local day; the
    selection of ``notes_per_digest`` notes seeded with ``daily_seed(user_id, scheduled_for)``. No
    candidates → skipped ``no_documents``; an empty selection → skipped ``empty_selection``."""
    scheduled_for = start_of_local_day(local_date(now, plan.tz.tz), plan.tz.tz)
    if not candidates:
        return PlannedDigest(plan.user_id, scheduled_for, "skipped", reason="no_documents")
    selection = select_notes(
        list(candidates), plan.notes_per_digest, now, seed=daily_seed(plan.user_id, scheduled_for)
    )
    skipped = tuple(selection.skipped)
    if not selection.items:
        return PlannedDigest(
            plan.user_id, scheduled_for, "skipped", reason="empty_selection", notes_skipped=skipped
        )
    ids = tuple(item.document_id for item in selection.items)
    return PlannedDigest(plan.user_id, scheduled_for, "scheduled", ids, notes_skipped=skipped)


# ------------------------------------------------------------------------------------------- the run


@dataclass
class GenerateReport:
    """Counts of one generation run (ids and counts only: safe for event logs)."""

    logical_time: datetime
    users_considered: int = 0
    already_generated: int = 0
    digests_created: int = 0  # scheduled digests with items
    skipped: Counter[str] = field(default_factory=Counter)  # skipped digests stored, by reason
    notes_selected: int = 0
    notes_excluded: Counter[str] = field(default_factory=Counter)  # suspended / deprioritized candidates
    data_issues: Counter[str] = field(default_factory=Counter)  # invalid_timezone, user_error:<Type>
    batches: int = 0

    def metadata(self) -> dict[str, Any]:
        return {
            "logical_time": self.logical_time.isoformat(),
            "users_considered": self.users_considered,
            "already_generated": self.already_generated,
            "digests_created": self.digests_created,
            "skipped_digests": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "notes_selected": self.notes_selected,
            "notes_excluded_by_reason": dict(sorted(self.notes_excluded.items())),
            "data_issues": dict(sorted(self.data_issues.items())),
            "batches": self.batches,
        }


def generate_digests(
    engine: sa.Engine,
    now: datetime,
    settings: Settings,
    *,
    clock: Callable[[], datetime] | None = None,
) -> GenerateReport:
    """Create today's digest for every user who has none for the local day of ``now`` (the logical
    time: the partition's hour for the hourly job). ``created_at``/``updated_at`` come from ``clock``
    (default ``settings.now``: the real time). One user's bad data (an invalid timezone falls back to
    UTC; anything unexpected in one user's selection) is counted in ``data_issues`` and never stops the
    others. A database error aborts the run; batches already committed stay (a rerun continues)."""
    now = as_utc(now, "now")
    real_clock = clock or settings.now
    report = GenerateReport(logical_time=now)
    after: str | None = None
    while True:
        with engine.begin() as conn:
            advisory_xact_lock(conn)
            users = load_user_batch(conn, after=after, limit=settings.digest_batch_size)
            if not users:
                break
            after = users[-1].id
            report.batches += 1
            _generate_batch(conn, users, now, settings.deployment_mode, real_clock, report)
        if len(users) < settings.digest_batch_size:
            break
    return report


def _generate_batch(
    conn: sa.Connection,
    users: Sequence[UserRow],
    now: datetime,
    mode: DeploymentMode,
    clock: Callable[[], datetime],
    report: GenerateReport,
) -> None:
    report.users_considered += len(users)
    plans = {row.id: user_plan(row, mode) for row in users}
    for plan in plans.values():
        report.data_issues.update(plan.issues)
    latest = load_latest_digests(conn, list(plans))
    needy = [uid for uid, plan in plans.items() if needs_digest(plan, latest.get(uid), now)]
    report.already_generated += len(plans) - len(needy)
    if not needy:
        return
    by_user = load_candidates(conn, needy)

    planned: list[PlannedDigest] = []
    for uid in needy:
        try:
            planned.append(plan_digest(plans[uid], by_user[uid], now))
        except Exception as exc:  # one user's odd data never stops the batch
            report.data_issues[f"user_error:{type(exc).__name__}"] += 1
    hashes = load_content_hashes(conn, [doc for p in planned for doc in p.document_ids])

    stamp = as_utc(clock(), "clock()")
    digest_rows: list[dict[str, Any]] = []
    kept: dict[str, tuple[int, ...]] = {}
    for p in planned:
        report.notes_excluded.update(why for _doc_id, why in p.notes_skipped)
        docs = tuple(doc for doc in p.document_ids if doc in hashes)  # a document deleted meanwhile
        status: str = p.status
        reason: str | None = p.reason
        if status == "scheduled" and not docs:
            status, reason = "skipped", "empty_selection"
        payload: dict[str, Any] = {"source": DAILY_SOURCE, "logical_time": now.isoformat()}
        if status == "skipped":
            payload["reason"] = reason
            report.skipped[reason or "unknown"] += 1
        else:
            payload["note_count"] = len(docs)
            kept[p.user_id] = docs
            report.digests_created += 1
            report.notes_selected += len(docs)
        digest_rows.append(
            {
                "user_id": p.user_id,
                "scheduled_for": p.scheduled_for,
                "status": status,
                "payload_json": payload,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
    inserted = insert_many(
        conn, t.note_digests, digest_rows, returning=(t.note_digests.c.id, t.note_digests.c.user_id)
    )
    ids = {row.user_id: int(row.id) for row in inserted}
    item_rows = [
        {
            "note_digest_id": ids[uid],
            "document_id": doc_id,
            "position": position,
            "content_hash_at_send": hashes[doc_id],
            "created_at": stamp,
        }
        for uid, docs in kept.items()
        for position, doc_id in enumerate(docs, start=1)
    ]
    insert_many(conn, t.note_digest_items, item_rows)
