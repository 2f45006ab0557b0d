"""What ``email_sequence_sensor`` launches each tick: one set-based query, then pure planning.

**The query** (:func:`find_due_steps`, ONE statement) reads every ``active`` state, attaches the
user's first sent digest to onboarding rows only (a correlated ``min(sent_at)`` per onboarding row, so
digests of users outside onboarding are never touched), keeps the states whose current step is due
(the cut-offs ``now - offset`` of :mod:`steps` are bound as parameters, so the rule is the same
``anchor + offset <= now`` as :func:`steps.is_due`; a step beyond the last is due at once), drops users
without a verified email (an address of blanks only counts as none, as in the step; the step job
would skip them, and counting them instead keeps them from being launched every minute forever), and returns at most ``limit`` due steps, oldest anchor first, together
with three counts: due (verified), unverified, and onboarding rows blocked for want of a first digest.

**Retries.** Dagster never forgets a run key, and a run that failed blocks its key for good. So the
sensor keeps, in its cursor, ``{idempotency key: [attempts, last launch (epoch s), state id, step]}``
for the steps it launched (:class:`CursorEntry`). A step that is still due on a later tick:

- not in the cursor → launched with ``run_key`` = its idempotency key (attempt 1);
- in the cursor, fewer than ``max_attempts`` launches, and the back-off after its last launch has
  passed (10 min, 30 min, 2 h, then every 6 h: :func:`backoff_seconds`), and no run of its last run key
  is still queued or running (asked of the Dagster instance, one query for all such keys) → launched
  again with run key ``<key>:attempt-<n>``: a new run, visible in the UI, whose provider call reuses
  the same idempotency key, so Resend still de-duplicates;
- otherwise it waits (``waiting`` / ``running``), or, after ``max_attempts`` launches, stays put
  (``exhausted``) until an operator acts (fix the cause and re-execute the last failed run from the
  UI, or mark the state ``exited``).

Entries whose state has left that step (advanced, exited, completed, deleted) are pruned with one
query on the cursor's state ids (:func:`load_positions`). The due query fetches ``cap + len(cursor)``
rows so that held-back steps can never crowd out launchable ones. Per tick: at most 3 SQL statements
on the application database (prune, ``SET LOCAL jit = off`` on Postgres, the due query; the prune is
chunked beyond 10,000 cursor entries) and at most one Dagster run-storage query. Run requests per tick
are capped (``SEQUENCE_MAX_REQUESTS_PER_TICK``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.sequences.steps import STEPS, idempotency_key
from dbb_orchestration.timing import require_aware

__all__ = [
    "BACKOFF_SECONDS",
    "CursorEntry",
    "DueScan",
    "DueStep",
    "Launch",
    "TickPlan",
    "TickResult",
    "backoff_seconds",
    "describe_tick",
    "dump_cursor",
    "evaluate_tick",
    "find_due_steps",
    "load_positions",
    "parse_cursor",
    "plan_tick",
    "prune_cursor",
    "relaunch_candidates",
    "run_key_for",
]

BACKOFF_SECONDS: Final[tuple[int, ...]] = (600, 1800, 7200, 21600)
PRUNE_CHUNK: Final = 10_000
JIT_OFF: Final = "SET LOCAL jit = off"
CURSOR_VERSION: Final = 1
_BLANKS: Final = (" ", "\t", "\n", "\r")


@dataclass(frozen=True)
class DueStep:
    state_id: int
    user_id: str
    sequence_name: str
    step: int

    @property
    def key(self) -> str:
        """The step's provider idempotency key, also its first run key."""
        return idempotency_key(self.sequence_name, self.user_id, self.step)


@dataclass(frozen=True)
class DueScan:
    steps: list[DueStep]  # at most ``limit``, oldest anchor first
    due: int  # due steps of verified users (all of them, not only the returned ones)
    unverified: int  # due steps whose user has no email or an unverified one (not returned)
    blocked: int  # active onboarding states without a first sent digest


# ---------------------------------------------------------------------------------------------- SQL


def _due_query(now: datetime, limit: int) -> sa.Select[Any]:
    s, d, u = t.email_sequence_states, t.note_digests, t.user
    first_sent = (
        sa.select(sa.func.min(d.c.sent_at))
        .where(d.c.user_id == s.c.user_id, d.c.status == "sent")
        .scalar_subquery()
    )
    # anchor: entered_at, or the first sent digest for onboarding (NULL: blocked)
    active = (
        sa.select(
            s.c.id,
            s.c.user_id,
            s.c.sequence_name,
            s.c.current_step,
            sa.case((s.c.sequence_name == "onboarding", first_sent), else_=s.c.entered_at).label("anchor"),
        )
        .where(s.c.status == "active")
        .cte("active")
        # Postgres would inline the CTE and copy the first-digest subquery into every reference;
        # materialized, it runs once per active onboarding row.
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    # per row, the latest anchor that makes its current step due: now - offset (bound parameters)
    cutoff = sa.case(
        *[
            (sa.and_(active.c.sequence_name == name, active.c.current_step == step.number), now - step.offset)
            for name, steps in STEPS.items()
            for step in steps
        ],
        else_=sa.null(),
    )
    last = sa.case(
        *[(active.c.sequence_name == name, len(steps)) for name, steps in STEPS.items()], else_=None
    )
    is_due = sa.or_(active.c.current_step > last, active.c.anchor <= cutoff)
    # looked up by primary key for due rows only (a join would hash the whole user table)
    # the step strips the address before sending; an address of blanks only is not sendable
    stripped = u.c.email
    for blank in _BLANKS:
        stripped = sa.func.replace(stripped, blank, "")
    sendable = (
        sa.select(sa.case((sa.and_(u.c.email_verified.is_(sa.true()), stripped != ""), 1), else_=0))
        .where(u.c.id == active.c.user_id)
        .scalar_subquery()
    )
    due = (
        sa.select(
            active.c.id,
            active.c.user_id,
            active.c.sequence_name,
            active.c.current_step,
            active.c.anchor,
            sa.func.coalesce(sendable, 0).label("sendable"),
        )
        .where(is_due)
        .cte("due")
    )

    def count(source: Any, *where: Any) -> Any:
        return sa.select(sa.func.count()).select_from(source).where(*where).scalar_subquery()

    counts = sa.select(
        count(due, due.c.sendable == 1).label("n_due"),
        count(due, due.c.sendable == 0).label("n_unverified"),
        count(active, active.c.sequence_name == "onboarding", active.c.anchor.is_(None)).label("n_blocked"),
    ).subquery("counts")
    picked = (
        sa.select(due.c.id, due.c.user_id, due.c.sequence_name, due.c.current_step, due.c.anchor)
        .where(due.c.sendable == 1)
        .order_by(due.c.anchor, due.c.id)
        .limit(limit)
        .subquery("picked")
    )
    return (
        sa.select(
            counts.c.n_due,
            counts.c.n_unverified,
            counts.c.n_blocked,
            picked.c.id,
            picked.c.user_id,
            picked.c.sequence_name,
            picked.c.current_step,
        )
        .select_from(counts.outerjoin(picked, sa.true()))
        .order_by(picked.c.anchor, picked.c.id)
    )


def find_due_steps(conn: sa.Connection, *, now: datetime, limit: int) -> DueScan:
    """ONE query: due steps (at most ``limit``, oldest first) and the counts of :class:`DueScan`.

    On Postgres it is preceded by ``SET LOCAL jit = off`` (for the current transaction only): the
    query's cost estimate grows with the number of active states and crosses ``jit_above_cost`` long
    before it is slow, and JIT compilation then costs about a second per tick for nothing.

    ``limit`` < 0 is treated as 0 (counts only). Naive ``now`` → ``ValueError``.
    """
    require_aware(now, "now")
    if is_postgres(conn):
        conn.exec_driver_sql(JIT_OFF)
    rows = conn.execute(_due_query(now, max(0, limit))).all()
    if not rows:  # the counts row always exists; defensive only
        return DueScan([], 0, 0, 0)
    first = rows[0]
    steps = [
        DueStep(int(row.id), str(row.user_id), str(row.sequence_name), int(row.current_step))
        for row in rows
        if row.id is not None
    ]
    return DueScan(steps, int(first.n_due or 0), int(first.n_unverified or 0), int(first.n_blocked or 0))


def load_positions(conn: sa.Connection, state_ids: Collection[int]) -> dict[int, tuple[str, int]]:
    """``{state id: (status, current_step)}`` for the given ids that still exist (one statement per
    10,000 ids; none for an empty collection)."""
    s = t.email_sequence_states
    ids = sorted(set(state_ids))
    positions: dict[int, tuple[str, int]] = {}
    for start in range(0, len(ids), PRUNE_CHUNK):
        chunk = ids[start : start + PRUNE_CHUNK]
        query = sa.select(s.c.id, s.c.status, s.c.current_step).where(s.c.id.in_(chunk))
        for state_id, status, step in conn.execute(query):
            positions[int(state_id)] = (str(status), int(step))
    return positions


# ------------------------------------------------------------------------------------------- cursor


@dataclass(frozen=True)
class CursorEntry:
    attempts: int  # launches so far (≥ 1)
    last_launch: int  # epoch seconds of the last launch
    state_id: int
    step: int


def parse_cursor(raw: str | None) -> dict[str, CursorEntry]:
    """The sensor cursor as ``{key: entry}``. ``None``, empty, unparsable JSON, another version or
    malformed entries are dropped (an empty or partial cursor): the worst outcome is a step requested
    again under its attempt-1 run key, which Dagster ignores when that run key already exists."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if (
        not isinstance(data, dict)
        or data.get("v") != CURSOR_VERSION
        or not isinstance(data.get("keys"), dict)
    ):
        return {}
    entries: dict[str, CursorEntry] = {}
    for key, value in data["keys"].items():
        if (
            isinstance(key, str)
            and isinstance(value, list)
            and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            entries[key] = CursorEntry(*value)
    return entries


def dump_cursor(entries: Mapping[str, CursorEntry]) -> str:
    """Compact, key-sorted JSON (stable across ticks)."""
    keys = {k: [e.attempts, e.last_launch, e.state_id, e.step] for k, e in sorted(entries.items())}
    return json.dumps({"v": CURSOR_VERSION, "keys": keys}, separators=(",", ":"))


def prune_cursor(
    entries: Mapping[str, CursorEntry], positions: Mapping[int, tuple[str, int]]
) -> dict[str, CursorEntry]:
    """Keep the entries whose state still exists, is ``active`` and is still at the entry's step."""
    return {k: e for k, e in entries.items() if positions.get(e.state_id) == ("active", e.step)}


def backoff_seconds(attempts: int) -> int:
    """Wait after the ``attempts``-th launch before the next: 10 min, 30 min, 2 h, then 6 h each time.
    ``attempts`` ≤ 0 → 0."""
    if attempts <= 0:
        return 0
    return BACKOFF_SECONDS[min(attempts, len(BACKOFF_SECONDS)) - 1]


def run_key_for(key: str, attempt: int) -> str:
    """Attempt 1 → the idempotency key itself; attempt n ≥ 2 → ``<key>:attempt-<n>``."""
    return key if attempt <= 1 else f"{key}:attempt-{attempt}"


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Launch:
    step: DueStep
    attempt: int

    @property
    def run_key(self) -> str:
        return run_key_for(self.step.key, self.attempt)


@dataclass(frozen=True)
class TickPlan:
    launches: list[Launch]
    cursor: dict[str, CursorEntry]
    waiting: int = 0  # back-off not over yet
    running: int = 0  # back-off over but the last run is still queued or running
    exhausted: int = 0  # max attempts reached
    capped: int = 0  # launchable but over the per-tick cap
    retries: int = 0  # launches with attempt ≥ 2
    pruned: int = 0


def relaunch_candidates(
    steps: Iterable[DueStep], entries: Mapping[str, CursorEntry], *, now_epoch: int, max_attempts: int
) -> list[str]:
    """Run keys (of the last attempt) of due steps whose back-off is over and attempts remain: the only
    ones worth asking the Dagster instance about."""
    keys = []
    for step in steps:
        entry = entries.get(step.key)
        if (
            entry is not None
            and entry.attempts < max_attempts
            and now_epoch - entry.last_launch >= backoff_seconds(entry.attempts)
        ):
            keys.append(run_key_for(step.key, entry.attempts))
    return keys


def plan_tick(
    steps: Sequence[DueStep],
    entries: Mapping[str, CursorEntry],
    *,
    now_epoch: int,
    max_attempts: int,
    cap: int,
    in_flight_run_keys: Collection[str] = (),
    pruned: int = 0,
) -> TickPlan:
    """Decide which due steps to launch (see the module docstring); ``entries`` must already be pruned.

    ``max_attempts`` < 1 acts as 1; ``cap`` < 0 as 0. Duplicate steps in ``steps`` are launched once.
    The returned cursor holds the kept entries plus one updated entry per launch.
    """
    max_attempts = max(1, max_attempts)
    cap = max(0, cap)
    cursor = dict(entries)
    launches: list[Launch] = []
    waiting = running = exhausted = capped = 0
    seen: set[str] = set()
    for step in steps:
        key = step.key
        if key in seen:
            continue
        seen.add(key)
        entry = entries.get(key)
        if entry is None:
            attempt = 1
        elif entry.attempts >= max_attempts:
            exhausted += 1
            continue
        elif now_epoch - entry.last_launch < backoff_seconds(entry.attempts):
            waiting += 1
            continue
        elif run_key_for(key, entry.attempts) in in_flight_run_keys:
            running += 1
            continue
        else:
            attempt = entry.attempts + 1
        if len(launches) >= cap:
            capped += 1
            continue
        launches.append(Launch(step, attempt))
        cursor[key] = CursorEntry(attempt, now_epoch, step.state_id, step.step)
    return TickPlan(
        launches=launches,
        cursor=cursor,
        waiting=waiting,
        running=running,
        exhausted=exhausted,
        capped=capped,
        retries=sum(1 for launch in launches if launch.attempt > 1),
        pruned=pruned,
    )


def describe_tick(scan: DueScan, plan: TickPlan) -> str:
    """One line for the SkipReason / tick log: counts only, no ids or addresses."""
    not_fetched = max(0, scan.due - len(scan.steps))
    return (
        f"{scan.due} due, {len(plan.launches)} launched ({plan.retries} retries), "
        f"{plan.capped + not_fetched} capped (max per tick), {plan.waiting} waiting to retry, "
        f"{plan.running} still running, {plan.exhausted} out of attempts, "
        f"{scan.blocked} blocked (onboarding without a first digest), {scan.unverified} unverified email"
    )


@dataclass(frozen=True)
class TickResult:
    scan: DueScan
    plan: TickPlan
    cursor: str


def evaluate_tick(
    engine: sa.Engine,
    raw_cursor: str | None,
    *,
    now: datetime,
    cap: int,
    max_attempts: int,
    in_flight: Callable[[Sequence[str]], Collection[str]],
) -> TickResult:
    """One sensor tick without Dagster: prune the cursor, find due steps, plan launches.

    ``in_flight(run_keys)`` returns those of ``run_keys`` whose run is still queued or running; it is
    called at most once, and only with relaunch candidates. Naive ``now`` → ``ValueError``.
    """
    require_aware(now, "now")
    now_epoch = int(now.timestamp())
    entries = parse_cursor(raw_cursor)
    with engine.connect() as conn:
        positions = load_positions(conn, [e.state_id for e in entries.values()]) if entries else {}
        kept = prune_cursor(entries, positions)
        scan = find_due_steps(conn, now=now, limit=max(0, cap) + len(kept))
    candidates = relaunch_candidates(scan.steps, kept, now_epoch=now_epoch, max_attempts=max_attempts)
    running = set(in_flight(candidates)) if candidates else set()
    plan = plan_tick(
        scan.steps,
        kept,
        now_epoch=now_epoch,
        max_attempts=max_attempts,
        cap=cap,
        in_flight_run_keys=running,
        pruned=len(entries) - len(kept),
    )
    return TickResult(scan, plan, dump_cursor(plan.cursor))
