"""The sensor's query (SQLite and Postgres) and its retry cursor (pure)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from dbb_orchestration.sequences.due import (
    CursorEntry,
    DueStep,
    backoff_seconds,
    describe_tick,
    dump_cursor,
    evaluate_tick,
    find_due_steps,
    parse_cursor,
    plan_tick,
    prune_cursor,
    relaunch_candidates,
    run_key_for,
)
from dbb_orchestration.sequences.steps import STEPS, is_due
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.sequences.conftest import NOW, count_statements

SECOND = timedelta(seconds=1)


def _keys(steps: list[DueStep]) -> set[str]:
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
        first = evaluate_tick(engine, None, now=NOW, cap=500, max_attempts=5, in_flight=lambda k: set())
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
            in_flight=lambda k: set(),
        )
    assert counter.count == 2 + pg  # + the cursor's prune query
    assert second.plan.launches == [] and second.plan.waiting == first.scan.due


def test_retries_back_off_and_stop(engine: sa.Engine) -> None:
    """The step's run keeps failing (the state stays at step 1): attempts at 0, +10 min, +40 min (max 3)."""
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.sequence_state(conn, "u1", "upgrade", entered_at=NOW)
    cursor: str | None = None
    launched: list[tuple[int, str]] = []
    for minutes in (0, 1, 9, 10, 11, 39, 40, 41, 159, 160, 400, 10_000):
        now = NOW + timedelta(minutes=minutes)
        tick = evaluate_tick(engine, cursor, now=now, cap=500, max_attempts=3, in_flight=lambda k: set())
        launched += [(minutes, launch.run_key) for launch in tick.plan.launches]
        cursor = tick.cursor
    key = "sequence-upgrade-u1-1"
    assert launched == [(0, key), (10, f"{key}:attempt-2"), (40, f"{key}:attempt-3")]
    assert tick.plan.exhausted == 1
    assert "1 out of attempts" in describe_tick(tick.scan, tick.plan)
    assert json.loads(tick.cursor)["keys"][key][0] == 3


def test_a_run_still_in_flight_is_not_relaunched(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.sequence_state(conn, "u1", "upgrade", entered_at=NOW)
    first = evaluate_tick(engine, None, now=NOW, cap=500, max_attempts=5, in_flight=lambda k: set())
    asked: list[list[str]] = []

    def running(keys: Sequence[str]) -> set[str]:
        asked.append(list(keys))
        return set(keys)

    later = evaluate_tick(
        engine, first.cursor, now=NOW + timedelta(hours=1), cap=500, max_attempts=5, in_flight=running
    )
    assert asked == [["sequence-upgrade-u1-1"]]
    assert later.plan.launches == [] and later.plan.running == 1
    assert later.cursor == first.cursor  # the clock of the last launch is not reset


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
            in_flight=lambda k: set(),
        )
        seen += [launch.run_key for launch in tick.plan.launches]
        cursor = tick.cursor
        if tick_no == 0:
            assert "4 capped" in describe_tick(tick.scan, tick.plan)
    assert len(seen) == len(set(seen)) == 7
    assert seen[:3] == ["sequence-upgrade-u6-1", "sequence-upgrade-u5-1", "sequence-upgrade-u4-1"]


# ------------------------------------------------------------------------------------------------ pure


def _step(n: int = 1, *, state_id: int = 7) -> DueStep:
    return DueStep(state_id, "u1", "welcome", n)


def test_backoff_schedule() -> None:
    assert [backoff_seconds(a) for a in range(0, 7)] == [0, 600, 1800, 7200, 21600, 21600, 21600]
    assert backoff_seconds(-3) == 0


def test_run_keys() -> None:
    assert run_key_for("sequence-welcome-u1-1", 1) == "sequence-welcome-u1-1"
    assert run_key_for("sequence-welcome-u1-1", 0) == "sequence-welcome-u1-1"
    assert run_key_for("sequence-welcome-u1-1", 4) == "sequence-welcome-u1-1:attempt-4"


@pytest.mark.parametrize(
    "raw",
    [None, "", "not json", "[]", '{"v": 2, "keys": {}}', '{"v": 1}', '{"v": 1, "keys": []}'],
)
def test_unusable_cursors_read_as_empty(raw: str | None) -> None:
    assert parse_cursor(raw) == {}


def test_cursor_round_trip_drops_malformed_entries() -> None:
    entries = {"k1": CursorEntry(2, 1_700_000_000, 5, 3), "k0": CursorEntry(1, 1_700_000_100, 6, 1)}
    raw = dump_cursor(entries)
    assert raw == '{"v":1,"keys":{"k0":[1,1700000100,6,1],"k1":[2,1700000000,5,3]}}'
    assert parse_cursor(raw) == entries
    mixed = '{"v":1,"keys":{"ok":[1,2,3,4],"short":[1,2],"text":["1",2,3,4],"flag":[true,2,3,4]}}'
    assert parse_cursor(mixed) == {"ok": CursorEntry(1, 2, 3, 4)}


def test_prune_keeps_only_states_still_at_that_step() -> None:
    entries = {
        "same": CursorEntry(1, 0, 1, 2),
        "advanced": CursorEntry(1, 0, 2, 2),
        "exited": CursorEntry(1, 0, 3, 1),
        "deleted": CursorEntry(1, 0, 4, 1),
    }
    positions = {1: ("active", 2), 2: ("active", 3), 3: ("exited", 1)}
    assert prune_cursor(entries, positions) == {"same": CursorEntry(1, 0, 1, 2)}


def test_plan_tick_decisions() -> None:
    now = 1_800_000_000
    steps = [_step(1, state_id=1), _step(2, state_id=2), _step(3, state_id=3), _step(4, state_id=4)]
    steps = [DueStep(s.state_id, f"u{s.state_id}", "welcome", s.step) for s in steps]
    k = [s.key for s in steps]
    entries = {
        k[1]: CursorEntry(1, now - 599, 2, 2),  # back-off not over (10 min)
        k[2]: CursorEntry(2, now - 1800, 3, 3),  # 30 min over → attempt 3
        k[3]: CursorEntry(5, now - 10**6, 4, 4),  # exhausted
    }
    plan = plan_tick(steps + [steps[0]], entries, now_epoch=now, max_attempts=5, cap=10)
    assert [(launch.run_key, launch.attempt) for launch in plan.launches] == [
        (k[0], 1),
        (f"{k[2]}:attempt-3", 3),
    ]
    assert (plan.waiting, plan.exhausted, plan.running, plan.capped, plan.retries) == (1, 1, 0, 0, 1)
    assert plan.cursor[k[0]] == CursorEntry(1, now, 1, 1)
    assert plan.cursor[k[2]] == CursorEntry(3, now, 3, 3)
    assert plan.cursor[k[1]] == entries[k[1]] and plan.cursor[k[3]] == entries[k[3]]
    assert relaunch_candidates(steps, entries, now_epoch=now, max_attempts=5) == [f"{k[2]}:attempt-2"]

    running = plan_tick(
        steps, entries, now_epoch=now, max_attempts=5, cap=10, in_flight_run_keys={f"{k[2]}:attempt-2"}
    )
    assert [launch.run_key for launch in running.launches] == [k[0]] and running.running == 1

    capped = plan_tick(steps, entries, now_epoch=now, max_attempts=5, cap=1)
    assert [launch.run_key for launch in capped.launches] == [k[0]] and capped.capped == 1
    assert k[2] in capped.cursor and capped.cursor[k[2]] == entries[k[2]]  # not launched: unchanged


def test_describe_tick_has_counts_only() -> None:
    from dbb_orchestration.sequences.due import DueScan, TickPlan

    text = describe_tick(
        DueScan([_step()], 5, 2, 3), TickPlan(launches=[], cursor={}, waiting=1, exhausted=1)
    )
    assert text == (
        "5 due, 0 launched (0 retries), 4 capped (max per tick), 1 waiting to retry, 0 still running, "
        "1 out of attempts, 3 blocked (onboarding without a first digest), 2 unverified email"
    )


def test_naive_now_is_rejected(engine: sa.Engine) -> None:
    with engine.connect() as conn, pytest.raises(ValueError, match="now must be a timezone-aware"):
        find_due_steps(conn, now=datetime(2026, 3, 1), limit=1)
