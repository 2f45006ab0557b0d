"""What ``email_sequence_sensor`` launches each tick: one set-based query, then pure planning.

**The query** (:func:`find_due_steps`, ONE statement) reads every ``active`` state, attaches the
user's first sent digest to onboarding rows only (a correlated ``min(sent_at)`` per onboarding row, so
digests of users outside onboarding are never touched), keeps the states whose current step is due
(the cut-offs ``now - offset`` of :mod:`steps` are bound as parameters, so the rule is the same
``anchor + offset <= now`` as :func:`steps.is_due`; a step beyond the last is due at once), drops users
without a verified email (an address of blanks only counts as none, as in the step; the step job
would skip them, and counting them instead keeps them from being launched every minute forever), and returns at most ``limit`` due steps, oldest anchor first, together
with three counts: due (verified), unverified, and onboarding rows blocked for want of a first digest.

**Runs.** The launchable steps of a tick are grouped into runs of at most ``per_run``
(``SEQUENCE_STEPS_PER_RUN``) steps (:func:`group_runs`). In a run each step is a dynamic step whose
mapping key is its idempotency key (:func:`mapping_key`), so it is visible, logged and re-executable on
its own; the run key is derived from the set of step attempts it carries (:func:`batch_run_key`), so
an evaluation repeated after a crash requests the same run key and Dagster launches nothing twice.

**Retries.** The sensor keeps, in its cursor, per idempotency key: attempts, last launch, state id,
step, the run it was last launched in, and when the sensor first saw that run finished
(:class:`CursorEntry`). On each tick:

- the run keys whose end has not been seen are looked up in Dagster (one query); those no longer
  queued or running are stamped with the tick's time (:func:`mark_finished`);
- a due step not in the cursor → launched (attempt 1);
- in the cursor with its run still queued or running → ``running``;
- finished less than the back-off ago (10 min, 30 min, 2 h, then every 6 h: :func:`backoff_seconds`),
  counted from the end of the run that failed it, not from its launch → ``waiting``;
- otherwise, with fewer than ``max_attempts`` launches → launched again (attempt n) in a new run,
  with the same provider idempotency key, so Resend still de-duplicates;
- after ``max_attempts`` launches it stays put (``exhausted``) until an operator acts (fix the cause
  and re-execute the failed step from its run in the UI, or mark the state ``exited``).

A step whose run succeeded without advancing it (``busy``) is still due and is treated the same way.
Entries whose state has left that step (advanced, exited, completed, deleted) are pruned with one
query on the cursor's state ids (:func:`load_positions`). The due query fetches ``cap + len(cursor)``
rows so that held-back steps can never crowd out launchable ones. Per tick: at most 3 SQL statements
on the application database (prune, ``SET LOCAL jit = off`` on Postgres, the due query; the prune is
chunked beyond 10,000 cursor entries) and at most one Dagster run-storage query per 500 open runs.
Steps launched per tick are capped (``SEQUENCE_MAX_REQUESTS_PER_TICK``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa

from dbb_orchestration.audience import sendable_sql
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.sequences.steps import STEPS, SequenceStep
from dbb_orchestration.timing import require_aware

__all__ = [
    "BACKOFF_SECONDS",
    "CursorEntry",
    "DueScan",
    "Launch",
    "PlannedRun",
    "TickPlan",
    "TickResult",
    "backoff_seconds",
    "batch_run_key",
    "describe_tick",
    "dump_cursor",
    "evaluate_tick",
    "find_due_steps",
    "group_runs",
    "load_positions",
    "mark_finished",
    "parse_cursor",
    "plan_tick",
    "prune_cursor",
    "run_key_for",
    "unfinished_run_keys",
]

BACKOFF_SECONDS: Final[tuple[int, ...]] = (600, 1800, 7200, 21600)
PRUNE_CHUNK: Final = 10_000
JIT_OFF: Final = "SET LOCAL jit = off"
CURSOR_VERSION: Final = 2


@dataclass(frozen=True)
class DueScan:
    steps: list[SequenceStep]  # at most ``limit``, oldest anchor first
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
    # the very rule the step applies before sending (audience.is_sendable)
    sendable = (
        sa.select(sa.case((sendable_sql(u), 1), else_=0)).where(u.c.id == active.c.user_id).scalar_subquery()
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
        SequenceStep(int(row.id), str(row.user_id), str(row.sequence_name), int(row.current_step))
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
    ended_at: int = 0  # epoch seconds of the first tick that saw the last run finished; 0 = not yet
    run_key: str = ""  # the run the step was last launched in


def parse_cursor(raw: str | None) -> dict[str, CursorEntry]:
    """The sensor cursor as ``{key: entry}``. ``None``, empty, unparsable JSON, an unknown version or
    malformed entries are dropped (an empty or partial cursor): the worst outcome is a due step
    launched again, which its claim and provider key make harmless.

    Version 1 cursors (one run per step, ``[attempts, last launch, state id, step]``) are read with the
    run key that version used (``run_key_for(key, attempts)``) and the launch time as the end time."""
    loaded = _load_cursor_json(raw)
    if loaded is None:
        return {}
    version, runs, keys = loaded
    entries: dict[str, CursorEntry] = {}
    for key, value in keys.items():
        entry = _cursor_entry(key, value, version, runs)
        if entry is not None:
            entries[key] = entry
    return entries


def _load_cursor_json(raw: str | None) -> tuple[int, list[str], dict[Any, Any]] | None:
    """``(version, run keys, entries)`` of a well-formed cursor of a known version, else ``None``."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        return None
    version, runs = data.get("v"), data.get("runs", [])
    if not (isinstance(runs, list) and all(isinstance(r, str) for r in runs)):
        return None
    if version not in (1, CURSOR_VERSION):
        return None
    return int(version), runs, data["keys"]


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _cursor_entry(key: object, value: object, version: int, runs: Sequence[str]) -> CursorEntry | None:
    """One cursor entry (version 1: ``[attempts, last launch, state id, step]``; version 2 adds the end
    time and the run key's index), or ``None`` when malformed."""
    if not isinstance(key, str) or not _int_list(value):
        return None
    assert isinstance(value, list)
    if version == 1 and len(value) == 4:
        attempts, launched, state_id, step = value
        return CursorEntry(attempts, launched, state_id, step, launched, run_key_for(key, attempts))
    if version == CURSOR_VERSION and len(value) == 6 and 0 <= value[5] < len(runs):
        attempts, launched, state_id, step, ended, run_index = value
        return CursorEntry(attempts, launched, state_id, step, ended, runs[run_index])
    return None


def dump_cursor(entries: Mapping[str, CursorEntry]) -> str:
    """Compact, key-sorted JSON (stable across ticks); run keys are stored once and referenced."""
    runs = sorted({e.run_key for e in entries.values()})
    index = {run_key: n for n, run_key in enumerate(runs)}
    keys = {
        k: [e.attempts, e.last_launch, e.state_id, e.step, e.ended_at, index[e.run_key]]
        for k, e in sorted(entries.items())
    }
    return json.dumps({"v": CURSOR_VERSION, "runs": runs, "keys": keys}, separators=(",", ":"))


def prune_cursor(
    entries: Mapping[str, CursorEntry], positions: Mapping[int, tuple[str, int]]
) -> dict[str, CursorEntry]:
    """Keep the entries whose state still exists, is ``active`` and is still at the entry's step."""
    return {k: e for k, e in entries.items() if positions.get(e.state_id) == ("active", e.step)}


def unfinished_run_keys(entries: Mapping[str, CursorEntry]) -> list[str]:
    """The run keys whose end the sensor has not seen yet (the only ones worth asking Dagster about)."""
    return sorted({e.run_key for e in entries.values() if e.ended_at == 0})


def mark_finished(
    entries: Mapping[str, CursorEntry], unfinished: Collection[str], *, now_epoch: int
) -> dict[str, CursorEntry]:
    """Stamp ``now_epoch`` as the end of every entry whose run is not in ``unfinished`` (queued or
    running runs, as Dagster reported them) and had no end yet. A run Dagster does not know counts as
    finished. The back-off of a failed step therefore counts from the tick that saw its run end (at
    most one sensor interval after the failure), never from its launch."""
    return {
        k: (replace(e, ended_at=now_epoch) if e.ended_at == 0 and e.run_key not in unfinished else e)
        for k, e in entries.items()
    }


def backoff_seconds(attempts: int) -> int:
    """Wait after the ``attempts``-th failure before the next launch: 10 min, 30 min, 2 h, then 6 h
    each time. ``attempts`` ≤ 0 → 0."""
    if attempts <= 0:
        return 0
    return BACKOFF_SECONDS[min(attempts, len(BACKOFF_SECONDS)) - 1]


def run_key_for(key: str, attempt: int) -> str:
    """The attempt's own key: attempt 1 → the idempotency key itself; attempt n ≥ 2 →
    ``<key>:attempt-<n>``. (Version 1 used it as the run key; now it names the attempt in run keys.)"""
    return key if attempt <= 1 else f"{key}:attempt-{attempt}"


def batch_run_key(attempt_keys: Iterable[str]) -> str:
    """The run key of a run carrying the given step attempts (``run_key_for`` values): the same set
    always gives the same key, so a tick that is evaluated twice launches nothing twice."""
    keys = sorted(set(attempt_keys))
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    return f"sequence-steps-{len(keys)}-{digest}"


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Launch:
    step: SequenceStep
    attempt: int

    @property
    def attempt_key(self) -> str:
        return run_key_for(self.step.key, self.attempt)


@dataclass(frozen=True)
class PlannedRun:
    """One run of the step job: several due steps, each a dynamic step keyed by its idempotency key."""

    run_key: str
    launches: tuple[Launch, ...]


@dataclass(frozen=True)
class TickPlan:
    launches: list[Launch]
    cursor: dict[str, CursorEntry]
    runs: list[PlannedRun] = field(default_factory=list)
    waiting: int = 0  # back-off after the last failure not over yet
    running: int = 0  # the last run is still queued or running
    exhausted: int = 0  # max attempts reached
    capped: int = 0  # launchable but over the per-tick cap
    retries: int = 0  # launches with attempt ≥ 2
    pruned: int = 0


def group_runs(launches: Sequence[Launch], per_run: int) -> list[PlannedRun]:
    """Consecutive groups of at most ``per_run`` (< 1 acts as 1) launches, each with its run key."""
    per_run = max(1, per_run)
    groups = [tuple(launches[i : i + per_run]) for i in range(0, len(launches), per_run)]
    return [PlannedRun(batch_run_key(launch.attempt_key for launch in group), group) for group in groups]


def launch_attempt(entry: CursorEntry | None, *, now_epoch: int, max_attempts: int) -> tuple[int, str | None]:
    """The attempt number a due step would be launched as, and why it is not launched now
    (``exhausted``, ``running``: its last run has not ended, ``waiting``: inside its back-off) or
    ``None``. A step without an entry is a first attempt."""
    if entry is None:
        return 1, None
    if entry.attempts >= max_attempts:
        return entry.attempts, "exhausted"
    if entry.ended_at == 0:
        return entry.attempts, "running"
    if now_epoch - entry.ended_at < backoff_seconds(entry.attempts):
        return entry.attempts, "waiting"
    return entry.attempts + 1, None


def plan_tick(
    steps: Sequence[SequenceStep],
    entries: Mapping[str, CursorEntry],
    *,
    now_epoch: int,
    max_attempts: int,
    cap: int,
    per_run: int = 1,
    pruned: int = 0,
) -> TickPlan:
    """Decide which due steps to launch and group them into runs (see the module docstring);
    ``entries`` must already be pruned and stamped (:func:`mark_finished`).

    ``max_attempts`` < 1 acts as 1; ``cap`` < 0 as 0; ``per_run`` < 1 as 1. Duplicate steps in
    ``steps`` are launched once. The returned cursor holds the kept entries plus one updated entry per
    launch (its run key, no end yet).
    """
    max_attempts = max(1, max_attempts)
    cap = max(0, cap)
    launches: list[Launch] = []
    held: Counter[str] = Counter()
    seen: set[str] = set()
    for step in steps:
        if step.key in seen:
            continue
        seen.add(step.key)
        attempt, why_not = launch_attempt(
            entries.get(step.key), now_epoch=now_epoch, max_attempts=max_attempts
        )
        if why_not is None and len(launches) >= cap:
            why_not = "capped"
        if why_not is not None:
            held[why_not] += 1
            continue
        launches.append(Launch(step, attempt))
    runs = group_runs(launches, per_run)
    cursor = dict(entries)
    for run in runs:
        for launch in run.launches:
            step = launch.step
            cursor[step.key] = CursorEntry(
                launch.attempt, now_epoch, step.state_id, step.step, 0, run.run_key
            )
    return TickPlan(
        launches=launches,
        cursor=cursor,
        runs=runs,
        waiting=held["waiting"],
        running=held["running"],
        exhausted=held["exhausted"],
        capped=held["capped"],
        retries=sum(1 for launch in launches if launch.attempt > 1),
        pruned=pruned,
    )


def describe_tick(scan: DueScan, plan: TickPlan) -> str:
    """One line for the SkipReason / tick log: counts only, no ids or addresses."""
    not_fetched = max(0, scan.due - len(scan.steps))
    return (
        f"{scan.due} due, {len(plan.launches)} launched in {len(plan.runs)} runs ({plan.retries} retries), "
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
    unfinished: Callable[[Sequence[str]], Collection[str]],
    per_run: int = 1,
) -> TickResult:
    """One sensor tick without Dagster: prune the cursor, note which runs ended, find due steps, plan
    the runs.

    ``unfinished(run_keys)`` returns those of ``run_keys`` whose run is still queued or running; it is
    called at most once, and only with the run keys whose end has not been seen yet. Naive ``now`` →
    ``ValueError``.
    """
    require_aware(now, "now")
    now_epoch = int(now.timestamp())
    entries = parse_cursor(raw_cursor)
    with engine.connect() as conn:
        positions = load_positions(conn, [e.state_id for e in entries.values()]) if entries else {}
        kept = prune_cursor(entries, positions)
        scan = find_due_steps(conn, now=now, limit=max(0, cap) + len(kept))
    open_keys = unfinished_run_keys(kept)
    still_open = set(unfinished(open_keys)) if open_keys else set()
    stamped = mark_finished(kept, still_open, now_epoch=now_epoch)
    plan = plan_tick(
        scan.steps,
        stamped,
        now_epoch=now_epoch,
        max_attempts=max_attempts,
        cap=cap,
        per_run=per_run,
        pruned=len(entries) - len(kept),
    )
    return TickResult(scan, plan, dump_cursor(plan.cursor))
