"""The sensor's query (SQLite and Postgres) and its retry cursor (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from dbb_orchestration.sequences.due import (
    CursorEntry,
    backoff_seconds,
    batch_run_key,
    describe_tick,
    dump_cursor,
    evaluate_tick,
    find_due_steps,
    group_runs,
    mark_finished,
    parse_cursor,
    plan_tick,
    prune_cursor,
    run_key_for,
    unfinished_run_keys,
)
from dbb_orchestration.sequences.steps import STEPS, SequenceStep, is_due, mapping_key
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.sequences.conftest import NOW, count_statements

SECOND = timedelta(seconds=1)


def _keys(steps: list[SequenceStep]) -> set[str]:
    return {s.key for s in steps}


def test_the_query_applies_the_step_table_at_the_boundaries(engine: sa.Engine) -> None:
    """One state per (sequence, step) exactly at its due time, and one a second short of it."""
    expected: set[str] = set()
    with engine.begin() as conn:
        for sequence, steps in STEPS.items():
            for step in steps:
                for label, shift in (("due", timedelta(0)), ("early", SECOND)):
                    user_id = f"{label}-{sequence}-{step.number}"
                    f.user(conn, user_id)
                    anchor = NOW - step.offset + shift
                    if sequence == "onboarding":
                        entered = anchor - timedelta(days=90)
                        f.digest(conn, user_id, status="sent", sent_at=anchor)
                        f.digest(conn, user_id, status="sent", sent_at=anchor + timedelta(days=1))
                        f.digest(conn, user_id, status="failed", sent_at=anchor - timedelta(days=5))
                    else:
                        entered = anchor
                    f.sequence_state(conn, user_id, sequence, current_step=step.number, entered_at=entered)
                    first = anchor if sequence == "onboarding" else None
                    if is_due(sequence, step.number, now=NOW, entered_at=entered, first_digest_sent_at=first):
                        expected.add(f"sequence-{sequence}-{user_id}-{step.number}")
    assert len(expected) == 13  # the pure rule agrees that exactly the "due" ones are due
    assert all("-due-" in key for key in expected)

    with engine.connect() as conn:
        scan = find_due_steps(conn, now=NOW, limit=100)

    assert _keys(scan.steps) == expected
    assert (scan.due, scan.unverified, scan.blocked) == (13, 0, 0)


def test_an_address_of_blanks_is_not_sendable(engine: sa.Engine) -> None:
    """Same rule as the step (which strips the address): blanks only → counted as unverified, never
    launched."""
    with engine.begin() as conn:
        f.user(conn, "ok")
        f.user(conn, "spaces", email="   ")
        f.user(conn, "blanks", email=" \t\r\n ")
        for uid in ("ok", "spaces", "blanks"):
            f.sequence_state(conn, uid, "upgrade", entered_at=NOW)
    with engine.connect() as conn:
        scan = find_due_steps(conn, now=NOW, limit=10)
    assert [s.user_id for s in scan.steps] == ["ok"]
    assert (scan.due, scan.unverified) == (1, 2)


def test_counts_exclusions_and_order(engine: sa.Engine) -> None:
    old = NOW - timedelta(days=60)
    with engine.begin() as conn:
        for uid in ("a", "b", "c", "d", "e"):
            f.user(conn, uid)
        f.user(conn, "unverified", email_verified=False)
        f.user(conn, "no-email", email="")
        f.sequence_state(conn, "a", "welcome", current_step=2, entered_at=NOW - timedelta(days=3))  # due
        f.sequence_state(conn, "b", "welcome", current_step=4, entered_at=old)  # due, older anchor
        f.sequence_state(conn, "c", "welcome", current_step=5, entered_at=NOW)  # beyond the last: due
        f.sequence_state(conn, "d", "welcome", status="completed", entered_at=old)
        f.sequence_state(conn, "e", "welcome", status="exited", entered_at=old)
        f.sequence_state(conn, "a", "onboarding", entered_at=old)  # blocked
        f.sequence_state(conn, "b", "onboarding", entered_at=old)  # blocked (only a skipped digest)
        f.digest(conn, "b", status="skipped")
        f.sequence_state(conn, "c", "onboarding", entered_at=old, current_step=0)  # below 1: never due
        f.digest(conn, "c", status="sent", sent_at=old)
        f.sequence_state(conn, "unverified", "upgrade", entered_at=old)
        f.sequence_state(conn, "no-email", "upgrade", entered_at=old)
    with engine.connect() as conn:
        scan = find_due_steps(conn, now=NOW, limit=10)
        capped = find_due_steps(conn, now=NOW, limit=2)
        counts_only = find_due_steps(conn, now=NOW, limit=0)

    assert [s.key for s in scan.steps] == [
        "sequence-welcome-b-4",  # anchor 60 days ago
        "sequence-welcome-a-2",  # 3 days ago
        "sequence-welcome-c-5",  # now
    ]
    assert (scan.due, scan.unverified, scan.blocked) == (3, 2, 2)
    assert [s.key for s in capped.steps] == ["sequence-welcome-b-4", "sequence-welcome-a-2"]
    assert (capped.due, capped.unverified, capped.blocked) == (3, 2, 2)
    assert (counts_only.steps, counts_only.due) == ([], 3)


def test_statements_per_tick(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for n in range(30):
            f.user(conn, f"u{n}")
            f.sequence_state(conn, f"u{n}", "onboarding", entered_at=NOW - timedelta(days=30))
            f.digest(conn, f"u{n}", status="sent", sent_at=NOW - timedelta(days=n % 20))
    pg = engine.dialect.name == "postgresql"
    with count_statements(engine) as counter:
        first = evaluate_tick(engine, None, now=NOW, cap=500, max_attempts=5, unfinished=lambda k: set())
    # one query (on Postgres preceded by SET LOCAL jit = off)
    assert counter.count == 1 + pg
    assert (counter.statements[0] == "SET LOCAL jit = off") is pg
    assert len(first.plan.launches) == first.scan.due > 0
    with count_statements(engine) as counter:
        second = evaluate_tick(
            engine,
            first.cursor,
            now=NOW + timedelta(minutes=5),
            cap=500,
            max_attempts=5,
            unfinished=lambda k: set(),
        )
    assert counter.count == 2 + pg  # + the cursor's prune query
    assert second.plan.launches == [] and second.plan.waiting == first.scan.due


def test_retries_back_off_from_the_failure_and_stop(engine: sa.Engine) -> None:
    """The step keeps failing (the state stays at step 1). Its runs end 5 min after launch (they sat
    in the queue): the next attempt comes 10 min after the tick that saw the first run end, then 30
    min after the second one; at most 3 attempts."""
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.sequence_state(conn, "u1", "upgrade", entered_at=NOW)
    cursor: str | None = None
    launched: list[tuple[int, str]] = []
    running_until = -1

    def unfinished(minutes: int) -> Callable[[Sequence[str]], set[str]]:
        return lambda keys: set(keys) if minutes < running_until else set()

    for minutes in (0, 1, 5, 10, 14, 15, 16, 44, 45, 46, 400, 10_000):
        now = NOW + timedelta(minutes=minutes)
        tick = evaluate_tick(
            engine, cursor, now=now, cap=500, max_attempts=3, unfinished=unfinished(minutes), per_run=50
        )
        for launch in tick.plan.launches:
            launched.append((minutes, launch.attempt_key))
            running_until = minutes + 5
        cursor = tick.cursor
    key = "sequence-upgrade-u1-1"
    # first run ends at 5 → retry at 15 (not at 10, 10 min after the launch); second ends at 20
    # (seen at 44) → retry at 44 + 30 min is beyond 46: next at 400
    assert launched == [(0, key), (15, f"{key}:attempt-2"), (400, f"{key}:attempt-3")]
    assert tick.plan.exhausted == 1
    assert "1 out of attempts" in describe_tick(tick.scan, tick.plan)
    assert json.loads(tick.cursor)["keys"][key][0] == 3


def test_a_run_still_in_flight_is_not_relaunched(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.sequence_state(conn, "u1", "upgrade", entered_at=NOW)
    first = evaluate_tick(engine, None, now=NOW, cap=500, max_attempts=5, unfinished=lambda k: set())
    [run] = first.plan.runs
    asked: list[list[str]] = []

    def running(keys: Sequence[str]) -> set[str]:
        asked.append(list(keys))
        return set(keys)

    later = evaluate_tick(
        engine, first.cursor, now=NOW + timedelta(hours=1), cap=500, max_attempts=5, unfinished=running
    )
    assert asked == [[run.run_key]]
    assert later.plan.launches == [] and later.plan.running == 1
    assert later.cursor == first.cursor  # no end stamped while it runs


def test_steps_are_grouped_into_runs(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for n in range(7):
            f.user(conn, f"u{n}")
            f.sequence_state(conn, f"u{n}", "upgrade", entered_at=NOW - timedelta(minutes=n))
    tick = evaluate_tick(
        engine, None, now=NOW, cap=500, max_attempts=5, unfinished=lambda k: set(), per_run=3
    )
    assert [len(run.launches) for run in tick.plan.runs] == [3, 3, 1]
    assert [launch.step.user_id for run in tick.plan.runs for launch in run.launches] == [
        f"u{n}" for n in (6, 5, 4, 3, 2, 1, 0)
    ]
    entries = parse_cursor(tick.cursor)
    assert {e.run_key for e in entries.values()} == {run.run_key for run in tick.plan.runs}
    assert entries["sequence-upgrade-u0-1"].run_key == tick.plan.runs[2].run_key
    assert "7 launched in 3 runs" in describe_tick(tick.scan, tick.plan)
    again = evaluate_tick(
        engine, None, now=NOW, cap=500, max_attempts=5, unfinished=lambda k: set(), per_run=3
    )
    assert [r.run_key for r in again.plan.runs] == [r.run_key for r in tick.plan.runs]  # deterministic


def test_the_cap_and_the_cursor_share_the_work_across_ticks(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for n in range(7):
            f.user(conn, f"u{n}")
            f.sequence_state(conn, f"u{n}", "upgrade", entered_at=NOW - timedelta(minutes=n))
    seen: list[str] = []
    cursor = None
    for tick_no in range(4):
        tick = evaluate_tick(
            engine,
            cursor,
            now=NOW + timedelta(minutes=tick_no),
            cap=3,
            max_attempts=5,
            unfinished=lambda k: set(),
        )
        seen += [launch.attempt_key for launch in tick.plan.launches]
        cursor = tick.cursor
        if tick_no == 0:
            assert "4 capped" in describe_tick(tick.scan, tick.plan)
    assert len(seen) == len(set(seen)) == 7
    assert seen[:3] == ["sequence-upgrade-u6-1", "sequence-upgrade-u5-1", "sequence-upgrade-u4-1"]


# ------------------------------------------------------------------------------------------------ pure


def _step(n: int = 1, *, state_id: int = 7) -> SequenceStep:
    return SequenceStep(state_id, "u1", "welcome", n)


def test_backoff_schedule() -> None:
    assert [backoff_seconds(a) for a in range(0, 7)] == [0, 600, 1800, 7200, 21600, 21600, 21600]
    assert backoff_seconds(-3) == 0


def test_run_keys() -> None:
    assert run_key_for("sequence-welcome-u1-1", 1) == "sequence-welcome-u1-1"
    assert run_key_for("sequence-welcome-u1-1", 0) == "sequence-welcome-u1-1"
    assert run_key_for("sequence-welcome-u1-1", 4) == "sequence-welcome-u1-1:attempt-4"


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "not json",
        "[]",
        '{"v": 3, "keys": {}}',
        '{"v": 2}',
        '{"v": 2, "keys": []}',
        '{"v": 2, "runs": "x", "keys": {}}',
    ],
)
def test_unusable_cursors_read_as_empty(raw: str | None) -> None:
    assert parse_cursor(raw) == {}


def test_cursor_round_trip_drops_malformed_entries() -> None:
    entries = {
        "k1": CursorEntry(2, 1_700_000_000, 5, 3, 1_700_000_600, "run-b"),
        "k0": CursorEntry(1, 1_700_000_100, 6, 1, 0, "run-a"),
    }
    raw = dump_cursor(entries)
    assert raw == (
        '{"v":2,"runs":["run-a","run-b"],'
        '"keys":{"k0":[1,1700000100,6,1,0,0],"k1":[2,1700000000,5,3,1700000600,1]}}'
    )
    assert parse_cursor(raw) == entries
    mixed = (
        '{"v":2,"runs":["r"],"keys":{"ok":[1,2,3,4,5,0],"short":[1,2],"text":["1",2,3,4,5,0],'
        '"flag":[true,2,3,4,5,0],"no_run":[1,2,3,4,5,1]}}'
    )
    assert parse_cursor(mixed) == {"ok": CursorEntry(1, 2, 3, 4, 5, "r")}


def test_a_version_1_cursor_is_read_with_its_per_step_run_keys() -> None:
    raw = '{"v":1,"keys":{"k":[2,1700000000,5,3],"bad":[1,2]}}'
    assert parse_cursor(raw) == {"k": CursorEntry(2, 1_700_000_000, 5, 3, 1_700_000_000, "k:attempt-2")}


def test_prune_keeps_only_states_still_at_that_step() -> None:
    entries = {
        "same": CursorEntry(1, 0, 1, 2),
        "advanced": CursorEntry(1, 0, 2, 2),
        "exited": CursorEntry(1, 0, 3, 1),
        "deleted": CursorEntry(1, 0, 4, 1),
    }
    positions = {1: ("active", 2), 2: ("active", 3), 3: ("exited", 1)}
    assert prune_cursor(entries, positions) == {"same": CursorEntry(1, 0, 1, 2)}


def test_mark_finished_stamps_only_runs_that_ended() -> None:
    entries = {
        "a": CursorEntry(1, 100, 1, 1, 0, "r1"),
        "b": CursorEntry(1, 100, 2, 1, 0, "r2"),
        "c": CursorEntry(1, 100, 3, 1, 150, "r3"),
    }
    assert unfinished_run_keys(entries) == ["r1", "r2"]
    marked = mark_finished(entries, {"r2"}, now_epoch=500)
    assert [marked[k].ended_at for k in "abc"] == [500, 0, 150]


def test_plan_tick_decisions() -> None:
    now = 1_800_000_000
    steps = [SequenceStep(n, f"u{n}", "welcome", n) for n in (1, 2, 3, 4, 5)]
    k = [s.key for s in steps]
    entries = {
        k[1]: CursorEntry(1, now - 10**4, 2, 2, now - 599, "r1"),  # failed 599 s ago: back-off 600 s
        k[2]: CursorEntry(2, now - 10**4, 3, 3, now - 1800, "r2"),  # 30 min over → attempt 3
        k[3]: CursorEntry(5, now - 10**6, 4, 4, now - 10**6, "r3"),  # exhausted
        k[4]: CursorEntry(1, now - 10**6, 5, 5, 0, "r4"),  # still running, however long ago
    }
    plan = plan_tick(steps + [steps[0]], entries, now_epoch=now, max_attempts=5, cap=10, per_run=50)
    assert [(launch.attempt_key, launch.attempt) for launch in plan.launches] == [
        (k[0], 1),
        (f"{k[2]}:attempt-3", 3),
    ]
    assert (plan.waiting, plan.exhausted, plan.running, plan.capped, plan.retries) == (1, 1, 1, 0, 1)
    [run] = plan.runs
    assert run.run_key == batch_run_key([k[0], f"{k[2]}:attempt-3"])
    assert plan.cursor[k[0]] == CursorEntry(1, now, 1, 1, 0, run.run_key)
    assert plan.cursor[k[2]] == CursorEntry(3, now, 3, 3, 0, run.run_key)
    assert all(plan.cursor[k[i]] == entries[k[i]] for i in (1, 3, 4))

    capped = plan_tick(steps, entries, now_epoch=now, max_attempts=5, cap=1)
    assert [launch.attempt_key for launch in capped.launches] == [k[0]] and capped.capped == 1
    assert capped.cursor[k[2]] == entries[k[2]]  # not launched: unchanged


def test_run_grouping_and_keys() -> None:
    steps = [SequenceStep(n, f"u{n}", "welcome", 1) for n in range(5)]
    plan = plan_tick(steps, {}, now_epoch=0, max_attempts=5, cap=10, per_run=2)
    assert [[launch.step.state_id for launch in run.launches] for run in plan.runs] == [[0, 1], [2, 3], [4]]
    assert len({run.run_key for run in plan.runs}) == 3
    assert batch_run_key(["b", "a"]) == batch_run_key(["a", "b", "a"]) != batch_run_key(["a"])
    assert batch_run_key(["a", "b"]).startswith("sequence-steps-2-")
    assert group_runs(plan.launches, 0)[0].launches == (plan.launches[0],)  # < 1 acts as 1


def test_mapping_keys_are_dagster_safe_and_one_to_one() -> None:
    assert mapping_key("sequence-welcome-u1-2", 7) == "sequence_welcome_u1_2"
    assert mapping_key("sequence-welcome-u_1-2", 7) == "sequence_welcome_u_1_2_s7"
    assert mapping_key("sequence-welcome-u.1-2", 8) == "sequence_welcome_u_1_2_s8"
    keys = [
        ("sequence-welcome-u-1-2", 1),
        ("sequence-welcome-u_1-2", 2),
        ("sequence-welcome-u.1-2", 3),
        ("sequence-welcome-u-1-2-s3", 4),
        ("sequence-upgrade-é-1", 5),
    ]
    mapped = [mapping_key(k, sid) for k, sid in keys]
    assert len(set(mapped)) == len(mapped)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", m) for m in mapped)


def test_describe_tick_has_counts_only() -> None:
    from dbb_orchestration.sequences.due import DueScan, TickPlan

    text = describe_tick(
        DueScan([_step()], 5, 2, 3), TickPlan(launches=[], cursor={}, waiting=1, exhausted=1)
    )
    assert text == (
        "5 due, 0 launched in 0 runs (0 retries), 4 capped (max per tick), 1 waiting to retry, 0 still running, "
        "1 out of attempts, 3 blocked (onboarding without a first digest), 2 unverified email"
    )


def test_naive_now_is_rejected(engine: sa.Engine) -> None:
    with engine.connect() as conn, pytest.raises(ValueError, match="now must be a timezone-aware"):
        find_due_steps(conn, now=datetime(2026, 3, 1), limit=1)
