"""How long one ``email_sequence_sensor`` evaluation takes on 1,000,000 sequence states, and how many SQL
statements it issues.

    python benchmarks/sequence_sensor_benchmark.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--states 1000000] [--due 10000] [--repeat 7] [--explain] [--keep]

Creates a throwaway Postgres database from ``dbb_orchestration_tests/backend_schema.sql`` (the backend's
DDL: its indexes and no others), fills it with COPY, runs ``VACUUM ANALYZE`` and times the real sensor
(``build_sensor_context`` → ``email_sequence_sensor``, resources and settings included) in three
situations, then drops the database (unless ``--keep``):

- ``fresh``: empty cursor, ``--due`` steps due → launches the first 500 (the per-tick cap) in runs of
  50 steps;
- ``next``: the cursor of that tick, one minute later → the next 500 due steps (the first 500 are
  marked ended by this tick: their runs are unknown to the ephemeral instance; the cursor is pruned
  first: one more statement, plus one Dagster run-storage query);
- ``retry``: the cursor of a tick that saw those runs end, 11 minutes after the launch (10 after the
  end) → the first 500 again, as attempt 2 (the run-storage query is not needed: every end is known).

Then ``find_due_steps`` alone (the SQL without Dagster), and with ``--explain`` its plan.

The data: ``ceil(states / 3)`` users (3% unverified), each with a welcome, an onboarding and an
upgrade state (the last user may have fewer, to hit ``--states`` exactly): mostly completed or exited
(history), ~13% active and not yet due, onboarding rows blocked without a first digest, and exactly
``--due`` due steps of verified users (plus 1% as many of unverified users, which the sensor counts
but does not launch). About 4.5 sent digests per user who got past onboarding.
Target: ≤ 1 s per evaluation (median) and ≤ 3 SQL statements per tick.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
import sqlalchemy as sa
from _throwaway import throwaway_database

from dbb_orchestration.db.engine import shared_engine
from dbb_orchestration.definitions import build_resources
from dbb_orchestration.sequences.defs import email_sequence_sensor
from dbb_orchestration.sequences.due import JIT_OFF, _due_query, find_due_steps
from dbb_orchestration.sequences.steps import STEPS

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@dataclass
class Row:
    user: int
    sequence: str
    step: int
    status: str
    anchor: datetime  # entered_at, or the first sent digest for onboarding
    exit_reason: str | None = None
    blocked: bool = False


def _not_due_anchor(rng: random.Random, offset: timedelta) -> datetime:
    return NOW - offset + timedelta(seconds=rng.randint(60, 86_400))


def _due_anchor(rng: random.Random, offset: timedelta) -> datetime:
    return NOW - offset - timedelta(seconds=rng.randint(0, 3 * 86_400))


def build_rows(states: int, due: int, seed: int = 7) -> tuple[int, list[Row], set[int]]:
    """Decide every state (pure); returns (user count, rows, unverified users)."""
    rng = random.Random(seed)
    users = -(-states // 3)
    unverified = {u for u in range(users) if rng.random() < 0.03}
    rows: list[Row] = []
    for u in range(users):
        old = NOW - timedelta(days=rng.randint(40, 700))
        r = rng.random()
        if r < 0.75:
            rows.append(Row(u, "welcome", 2, "exited", old, "connected"))
        elif r < 0.95:
            rows.append(Row(u, "welcome", 5, "completed", old))
        else:
            s = rng.randint(1, 4)
            rows.append(Row(u, "welcome", s, "active", _not_due_anchor(rng, STEPS["welcome"][s - 1].offset)))
        r = rng.random()
        if r < 0.70:
            rows.append(Row(u, "onboarding", 5, "completed", old))
        elif r < 0.80:
            rows.append(Row(u, "onboarding", 2, "exited", old, "upgraded"))
        elif r < 0.88:
            rows.append(Row(u, "onboarding", 1, "active", old, blocked=True))
        else:
            s = rng.randint(1, 4)
            rows.append(
                Row(u, "onboarding", s, "active", _not_due_anchor(rng, STEPS["onboarding"][s - 1].offset))
            )
        r = rng.random()
        if r < 0.60:
            rows.append(Row(u, "upgrade", 6, "completed", old))
        elif r < 0.85:
            rows.append(Row(u, "upgrade", 3, "exited", old, "upgraded"))
        else:
            s = rng.randint(2, 5)
            rows.append(Row(u, "upgrade", s, "active", _not_due_anchor(rng, STEPS["upgrade"][s - 1].offset)))
    rows = rows[:states]
    candidates = [i for i, row in enumerate(rows) if row.status == "active" and not row.blocked]
    verified = [i for i in candidates if rows[i].user not in unverified]
    unverified_rows = [i for i in candidates if rows[i].user in unverified]
    for i in rng.sample(verified, due) + rng.sample(unverified_rows, min(len(unverified_rows), due // 100)):
        row = rows[i]
        row.anchor = _due_anchor(rng, STEPS[row.sequence][row.step - 1].offset)  # type: ignore[index]
    return users, rows, unverified


def load(url: str, users: int, rows: list[Row], unverified: set[int], seed: int = 11) -> dict[str, int]:
    rng = random.Random(seed)
    naive = NOW.replace(tzinfo=None)
    onboarding = {row.user: row for row in rows if row.sequence == "onboarding"}
    counts = {"users": users, "states": len(rows), "digests": 0}
    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            'COPY "user" (id, name, email, email_verified, created_at, updated_at) FROM STDIN'
        ) as copy:
            for u in range(users):
                copy.write_row(
                    (f"u{u:07d}", f"User {u}", f"u{u:07d}@example.test", u not in unverified, naive, naive)
                )
        with cur.copy(
            "COPY email_sequence_states (user_id, sequence_name, current_step, status, entered_at, "
            "last_email_sent_at, completed_at, exit_reason) FROM STDIN"
        ) as copy:
            for row in rows:
                entered = row.anchor - timedelta(days=3) if row.sequence == "onboarding" else row.anchor
                done = row.anchor + 20 * DAY if row.status != "active" else None
                last = row.anchor if row.step > 1 else None
                copy.write_row(
                    (
                        f"u{row.user:07d}",
                        row.sequence,
                        row.step,
                        row.status,
                        entered,
                        last,
                        done,
                        row.exit_reason,
                    )
                )
        with cur.copy(
            "COPY note_digests (user_id, scheduled_for, sent_at, status, created_at, updated_at) FROM STDIN"
        ) as copy:
            for u in range(users):
                uid = f"u{u:07d}"
                ob = onboarding.get(u)
                if ob is not None and ob.blocked:
                    if rng.random() < 0.5:
                        copy.write_row((uid, ob.anchor, None, "skipped", ob.anchor, ob.anchor))
                        counts["digests"] += 1
                    continue
                first = (
                    ob.anchor
                    if ob is not None and ob.status == "active"
                    else NOW - timedelta(days=rng.randint(30, 700))
                )
                for k in range(1 + rng.randint(0, 7)):
                    sent = min(first + k * 3 * DAY, NOW)
                    copy.write_row((uid, sent, sent, "sent", sent, sent))
                    counts["digests"] += 1
                if rng.random() < 0.1:
                    copy.write_row((uid, NOW - DAY, None, "failed", NOW - DAY, NOW - DAY))
                    counts["digests"] += 1
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")  # let the load's writes settle before timing
    return counts


@contextmanager
def counted(engine: sa.Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def listener(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)


def evaluate(
    instance: dg.DagsterInstance, url: str, cursor: str | None, now: datetime
) -> tuple[dg.SensorResult, float, int]:
    env = {"DATABASE_URL": url, "DBB_NOW": now.isoformat(), "SEQUENCE_EMAIL_DRY_RUN": "true"}
    with (
        counted(shared_engine(url)) as statements,
        dg.build_sensor_context(instance=instance, cursor=cursor, resources=build_resources(env)) as context,
    ):
        start = time.perf_counter()
        result = email_sequence_sensor(context)
        elapsed = time.perf_counter() - start
    assert isinstance(result, dg.SensorResult)
    return result, elapsed, len(statements)


def explain(url: str) -> str:
    engine = shared_engine(url)
    compiled = _due_query(NOW, 500).compile(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql(JIT_OFF)  # as find_due_steps does
        rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), compiled.params).all()
    return "\n".join(r[0] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("DBB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--states", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--explain", action="store_true", help="print EXPLAIN (ANALYZE, BUFFERS) of the due query"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    args = parser.parse_args()

    with throwaway_database(args.admin_url, keep=args.keep) as url:
        try:
            t0 = time.perf_counter()
            users, rows, unverified = build_rows(args.states, args.due)
            counts = load(url, users, rows, unverified)
            active = sum(1 for r in rows if r.status == "active")
            print(
                f"loaded {counts['states']:,} states ({active:,} active), {counts['users']:,} users, "
                f"{counts['digests']:,} digests in {time.perf_counter() - t0:.1f} s"
            )
            with dg.DagsterInstance.ephemeral() as instance:
                first, _, _ = evaluate(instance, url, None, NOW)  # also the warm-up: pool, plan cache
                # the next tick sees the launched runs ended (none exist here): their back-off starts then
                seen, _, _ = evaluate(instance, url, first.cursor, NOW + timedelta(minutes=1))
                scenarios: dict[str, tuple[str | None, datetime]] = {
                    "fresh": (None, NOW),
                    "next": (first.cursor, NOW + timedelta(minutes=1)),
                    "retry": (seen.cursor, NOW + timedelta(minutes=11)),
                }
                for label, (cursor, now) in scenarios.items():
                    times: list[float] = []
                    statements: set[int] = set()
                    launched, retries = 0, 0
                    for _ in range(args.repeat):
                        result, elapsed, n = evaluate(instance, url, cursor, now)
                        times.append(elapsed)
                        statements.add(n)
                        requests = result.run_requests or []
                        launched = sum(int(r.tags["dbb/steps"]) for r in requests)
                        retries = sum(int(r.tags["dbb/retried_steps"]) for r in requests)
                    print(
                        f"{label:6s} median {statistics.median(times) * 1000:7.1f} ms  "
                        f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, n={args.repeat})  "
                        f"SQL statements/tick {sorted(statements)}  steps launched {launched} ({retries} retries) in {len(requests)} runs"
                    )
                query_times = []
                for _ in range(args.repeat):
                    with shared_engine(url).connect() as conn:
                        start = time.perf_counter()
                        scan = find_due_steps(conn, now=NOW, limit=500)
                        query_times.append(time.perf_counter() - start)
                print(
                    f"query  median {statistics.median(query_times) * 1000:7.1f} ms  "
                    f"(min {min(query_times) * 1000:.1f}, max {max(query_times) * 1000:.1f}): find_due_steps alone"
                )
                print(f"counts: {scan.due:,} due, {scan.unverified:,} unverified, {scan.blocked:,} blocked")
            if args.explain:
                print(explain(url))
        finally:
            shared_engine(url).dispose()
            shared_engine.cache_clear()


if __name__ == "__main__":
    main()
