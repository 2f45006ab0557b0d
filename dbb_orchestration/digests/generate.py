"""Digest generation, the first half of every hourly run (docs/behaviour.md §5).

**Which digests.** A user has at most one digest per local day: the local date of the run's logical
time ``now`` (the partition's hour), ``scheduled_for`` = the start of that day. A run creates a user's
digest only where it is needed (:func:`generation_decision`):

- ``due`` — the user can be emailed (verified, non-blank address) and is due at ``now`` by the very
  rule the send half applies (:func:`dbb_orchestration.digests.send.due_check`, catch-up included):
  the digest is made in the run that sends it;
- ``never_sent`` — the user has never been sent a digest: one digest per local day (``skipped``
  ``no_documents`` / ``empty_selection`` included) so the dashboard has something to show, made for
  the current local day of the location's clock only (a backfill of a past day makes none);
- otherwise nothing (counted in ``not_needed`` by reason).

A user who already has a digest whose ``scheduled_for`` (or ``created_at`` when null) is on that local
day gets nothing, whatever its status and whenever it was made: rerunning or backfilling any hour
creates nothing that exists.

**Catch-up window.** A partition whose hour ended more than ``Settings.digest_catch_up_hours`` before
the location's clock creates nothing (``outside_catch_up_window``); see :func:`outside_catch_up_window`.

**Shape.** Per batch of users (``Settings.digest_batch_size``, keyset pagination by user id) a fixed set
of statements — users + settings + Pro flag with a lock per user, the users' last sends and digests near
the logical time (one ``UNION ALL``), candidate documents with review states (only for users who need a
digest), and one insert of the digests with their items (one statement on Postgres) — around pure
decisions. Each batch is its own transaction.

**Concurrency.** On Postgres the first statement of a batch also takes a transaction-scoped advisory
lock per user of the batch (``queries.load_and_lock_user_batch``, namespace
``queries.GENERATION_LOCK_NAMESPACE``), in key order, before the digests are read; the seed digest
(``seed.py``) takes the same lock for its user. So two generations over the same users (two hours, the
same hour twice, a first-digest seed) never interleave their "already has a digest on that day?" read
and their insert for one user: the second waits for the first one's commit and then sees its digests.
Generations over different users (the batch steps of one run, whose ranges are disjoint) hold
different locks and never wait on each other. A batch holds up to ``digest_batch_size`` locks until it
commits (docs/deployment.md: Postgres's lock table).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from dbb_orchestration.audience import is_sendable, plan_for
from dbb_orchestration.config import Settings
from dbb_orchestration.digests.queries import (
    GenerationFacts,
    NewDigest,
    UserRow,
    insert_digests_with_items,
    load_and_lock_user_batch,
    load_candidates,
    load_generation_facts,
)
from dbb_orchestration.digests.selection import Candidate, daily_seed, select_notes
from dbb_orchestration.plans import (
    DEFAULT_INTERVAL_DAYS,
    DeploymentMode,
    PlanLimits,
    effective_interval_days,
    effective_notes_per_digest,
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
    "generation_decision",
    "has_digest_on_day",
    "outside_catch_up_window",
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
    """Settings with behaviour §3–4 defaults for a user without a settings row (interval 7, 5 notes, UTC,
    8:00), clamped to the plan (self-hosted: everyone Pro). An invalid timezone falls back to UTC (see
    ``tz.error``); an invalid send hour is kept as is and later makes the user never due."""
    pro, limits = plan_for(row.has_pro_subscription, mode)
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


def outside_catch_up_window(now: datetime, wall: datetime, catch_up_hours: int) -> bool:
    """Whether the hourly partition starting at ``now`` ended (``now`` + 1 h) more than
    ``catch_up_hours`` before ``wall``, the location's clock. The hour in progress is always inside;
    with 24, yesterday's 08:00 hour is inside until 09:00 today. Naive datetimes → ``ValueError``."""
    end = as_utc(now, "now") + timedelta(hours=1)
    return as_utc(wall, "wall") - end > timedelta(hours=catch_up_hours)


def has_digest_on_day(plan: UserPlan, stamps: Sequence[datetime], now: datetime) -> bool:
    """Whether any of the user's digest day stamps (``scheduled_for``, or ``created_at`` when null) is on
    the local day of ``now``."""
    day = local_date(now, plan.tz.tz)
    return any(local_date(stamp, plan.tz.tz) == day for stamp in stamps)


def can_be_emailed(row: UserRow) -> bool:
    """The send half's candidates: verified, with a non-blank address."""
    return is_sendable(row.email, row.email_verified)


def generation_decision(
    plan: UserPlan,
    *,
    emailable: bool,
    facts: GenerationFacts,
    now: datetime,
    wall: datetime,
) -> tuple[bool, str]:
    """``(create, reason)`` for one user at logical time ``now`` with the location's clock ``wall``:

    - ``(False, "already_generated")`` — a digest exists on the local day of ``now``;
    - ``(True, "due")`` — emailable and due at ``now`` (``send.due_check`` with ``wall``);
    - ``(True, "never_sent")`` — never sent a digest, and the local day of ``now`` is not older than
      the local day of ``wall`` (one digest per day for the dashboard, not for past days);
    - ``(False, <why>)`` otherwise: the due check's reason (``not_send_hour``, ``already_sent_today``,
      ``interval_not_elapsed``, ``later_send_hour_passed``, ``invalid_send_hour``), ``not_emailable``,
      or ``past_day`` for a never-sent user on a past day.
    """
    from dbb_orchestration.digests.send import due_check  # send.py builds on this module

    if has_digest_on_day(plan, facts.near_stamps, now):
        return False, "already_generated"
    reason = "not_emailable"
    if emailable:
        check = due_check(plan, facts.last_sent_at, now, wall=wall)
        if check.due:
            return True, "due"
        reason = check.reason
    if facts.last_sent_at is None:
        if local_date(now, plan.tz.tz) >= local_date(wall, plan.tz.tz):
            return True, "never_sent"
        return False, "past_day"
    return False, reason


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
    outside_catch_up_window: bool = False
    users_considered: int = 0
    already_generated: int = 0
    created_for: Counter[str] = field(default_factory=Counter)  # digests made, by why: due / never_sent
    not_needed: Counter[str] = field(default_factory=Counter)  # users given nothing, by reason
    digests_created: int = 0  # scheduled digests with items
    skipped: Counter[str] = field(default_factory=Counter)  # skipped digests stored, by reason
    items_created: int = 0
    notes_excluded: Counter[str] = field(default_factory=Counter)  # suspended / deprioritized candidates
    data_issues: Counter[str] = field(default_factory=Counter)  # invalid_timezone, user_error:<Type>
    batches: int = 0

    @property
    def rows_created(self) -> int:
        """``note_digests`` rows inserted by this run (scheduled + skipped)."""
        return self.digests_created + sum(self.skipped.values())

    @property
    def notes_selected(self) -> int:
        return self.items_created

    def metadata(self) -> dict[str, Any]:
        return {
            "logical_time": self.logical_time.isoformat(),
            "outside_catch_up_window": self.outside_catch_up_window,
            "users_considered": self.users_considered,
            "already_generated": self.already_generated,
            "rows_created": self.rows_created,
            "created_for": dict(sorted(self.created_for.items())),
            "digests_created": self.digests_created,
            "skipped_digests": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "items_created": self.items_created,
            "not_needed_by_reason": dict(sorted(self.not_needed.items())),
            "notes_excluded_by_reason": dict(sorted(self.notes_excluded.items())),
            "data_issues": dict(sorted(self.data_issues.items())),
            "batches": self.batches,
        }

    def summary(self) -> str:
        """One log line (counts only)."""
        if self.outside_catch_up_window:
            return "outside_catch_up_window: nothing created"
        return (
            f"users={self.users_considered} rows_created={self.rows_created} "
            f"created_for={dict(self.created_for)} skipped={dict(self.skipped)} "
            f"already={self.already_generated} not_needed={dict(self.not_needed)} "
            f"issues={dict(self.data_issues)}"
        )


# A local day containing an instant lies within 26 hours of it on either side (UTC offsets span
# -12…+14 h; a DST day is at most 25 h long): digests outside that range are never on its day.
_NEAR = timedelta(hours=26)


def generate_digests(
    engine: sa.Engine,
    now: datetime,
    settings: Settings,
    *,
    clock: Callable[[], datetime] | None = None,
    user_range: tuple[str | None, str | None] = (None, None),
    on_page: Callable[[str], None] | None = None,
) -> GenerateReport:
    """Create the digests needed at the logical time ``now`` (the partition's hour for the hourly job):
    see the module docstring. ``clock`` (default ``settings.now``) is the location's clock: read once at
    the start for the catch-up rules, and per batch for ``created_at``/``updated_at``. One user's bad
    data (an invalid timezone falls back to UTC; anything unexpected in one user's selection) is
    counted in ``data_issues`` and never stops the others. A database error aborts the run; batches
    already committed stay (a rerun continues). ``user_range`` ``(after, upto)`` limits the run to users
    with ``after < id <= upto`` (``None`` = unbounded): one batch step of the hourly job. ``on_page``, if
    given, is called with the last user id of every batch once it has committed (see ``pipeline.py``)."""
    now = as_utc(now, "now")
    real_clock = clock or settings.now
    wall = as_utc(real_clock(), "clock()")
    report = GenerateReport(logical_time=now)
    if outside_catch_up_window(now, wall, settings.digest_catch_up_hours):
        report.outside_catch_up_window = True
        return report
    after, upto = user_range
    while True:
        with engine.begin() as conn:
            users = load_and_lock_user_batch(conn, after=after, upto=upto, limit=settings.digest_batch_size)
            if not users:
                break
            after = users[-1].id
            report.batches += 1
            _generate_batch(conn, users, now, wall, settings.deployment_mode, real_clock, report)
        if on_page is not None:
            on_page(after)
        if len(users) < settings.digest_batch_size:
            break
    return report


def _generate_batch(
    conn: sa.Connection,
    users: Sequence[UserRow],
    now: datetime,
    wall: datetime,
    mode: DeploymentMode,
    clock: Callable[[], datetime],
    report: GenerateReport,
) -> None:
    report.users_considered += len(users)
    rows = {row.id: row for row in users}
    plans = {row.id: user_plan(row, mode) for row in users}
    for plan in plans.values():
        report.data_issues.update(plan.issues)
    facts = load_generation_facts(conn, list(plans), now - _NEAR, now + _NEAR)
    needy = _needy_users(plans, rows, facts, now, wall, report)
    if not needy:
        return
    by_user = load_candidates(conn, needy, Candidate)

    new: list[NewDigest] = []
    for uid in needy:
        try:
            p = plan_digest(plans[uid], by_user[uid], now)
        except Exception as exc:  # one user's odd data never stops the batch
            report.data_issues[f"user_error:{type(exc).__name__}"] += 1
            continue
        new.append(_new_digest(p, now, report))
    insert_digests_with_items(conn, new, as_utc(clock(), "clock()"))


def _needy_users(
    plans: dict[str, UserPlan],
    rows: dict[str, UserRow],
    facts: dict[str, GenerationFacts],
    now: datetime,
    wall: datetime,
    report: GenerateReport,
) -> list[str]:
    """The users who get a digest in this run (:func:`generation_decision`), each decision counted."""
    needy: list[str] = []
    empty = GenerationFacts()
    for uid, plan in plans.items():
        create, reason = generation_decision(
            plan, emailable=can_be_emailed(rows[uid]), facts=facts.get(uid, empty), now=now, wall=wall
        )
        if create:
            needy.append(uid)
            report.created_for[reason] += 1
        elif reason == "already_generated":
            report.already_generated += 1
        else:
            report.not_needed[reason] += 1
    return needy


def _new_digest(p: PlannedDigest, now: datetime, report: GenerateReport) -> NewDigest:
    """The row to insert for a planned digest, its notes and outcome counted."""
    report.notes_excluded.update(why for _doc_id, why in p.notes_skipped)
    payload: dict[str, Any] = {"source": DAILY_SOURCE, "logical_time": now.isoformat()}
    if p.status == "skipped":
        payload["reason"] = p.reason
        report.skipped[p.reason or "unknown"] += 1
    else:
        payload["note_count"] = len(p.document_ids)
        report.digests_created += 1
        report.items_created += len(p.document_ids)
    return NewDigest(p.user_id, p.scheduled_for, p.status, payload, p.document_ids)
