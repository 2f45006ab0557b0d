"""The hourly digest job on N users × D notes: wall time per op, SQL statements, emails sent.

    python benchmarks/digest_benchmark.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--users 10000] [--docs 50] [--partition 2026-02-08-08:00] [--due-share 0.2]
        [--concurrency 4] [--batch-size 1000] [--executor in_process|multiprocess] [--users-per-step N]
        [--workers 2] [--keep]

Creates a throwaway Postgres database from ``dbb_orchestration_tests/backend_schema.sql`` (the backend's
DDL: its indexes and no others) and fills it with COPY:

- ``--users`` verified users across seven timezones (UTC, Paris, New York, Los Angeles, Tokyo, Kolkata,
  Sydney); a ``--due-share`` of them (every 5th by default) have their preferred send hour equal to the
  partition's local hour, the others another hour; 10 % Pro (10 notes per digest), the rest free
  (5 notes per digest); intervals 3–7 days; each user one source; the users in the window one digest
  sent 8 days earlier (so they are all due), the others one sent 1–8 days earlier (so some are due
  later that day and some not), except a ``--never-sent-share`` of them (every 50th user by default)
  who were never sent a digest;
- ``--docs`` documents per user (AES-256-GCM content, 20 realistic notes of 0.2–1.2 KB reused), 40 % of
  them with a review state (some overdue, some due soon, some later, a few boosted or suspended).

Then, with the loopback fake Resend running in its own process (so its HTTP handling does not share
this process's GIL) and no rate limit, it runs ``digest_hourly_job`` for the partition in process
through Dagster (resources and settings as in production), reports each op's wall time (from the
run's STEP_START/STEP_SUCCESS events), the SQL statements each op issued and the emails sent; then
runs the same partition again (nothing to do: the idempotency path) and drops the database unless
``--keep``.

With ``--executor multiprocess`` the runs go through ``dagster.execute_job`` on a temporary instance
with the multiprocess executor, as ``DIGEST_EXECUTOR``'s default does in production: each batch step of
``--users-per-step`` users (``DIGEST_USERS_PER_STEP``) in its own process, at most ``--workers`` at a
time. Statements issued in the step processes are not seen by the listener, so that mode reports
times only (the statement figure comes from the in-process mode; the SQL is the same).

With ``--day`` it then runs generation for every hour of the partition's UTC day (the location's clock
pinned 5 s into each hour; sending is not needed to count rows: a digest made at a user's send hour is
on their day whether or not it is sent) and prints the rows created per day against the users due
that day plus the never-sent users. ``--profile`` runs the first job under ``cProfile`` and prints the
functions with the most own time (the wall times of that run are inflated by the profiler).

Statements are counted with ``pg_stat_statements`` when the server has it loaded
(``shared_preload_libraries``), else with a SQLAlchemy ``before_cursor_execute`` listener on the
application engine, where an executemany of n parameter sets counts n (as Postgres would count it).
The output says which.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import functools
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
import sqlalchemy as sa
from _throwaway import throwaway_database

from dbb_orchestration.config import Settings
from dbb_orchestration.content import ContentKeyring, encode_content
from dbb_orchestration.db.engine import create_db_engine, shared_engine
from dbb_orchestration.definitions import build_resources
from dbb_orchestration.digests.defs import BATCH_OP, SUMMARY_OP, digest_hourly_job
from dbb_orchestration.digests.generate import generate_digests
from dbb_orchestration.timing import due_decision, resolve_timezone

TIMEZONES = (
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Australia/Sydney",
)
KEY = bytes(range(7, 39))
NOTE_PARAGRAPH = (
    "Spaced repetition works because reviewing just before you forget strengthens the memory. "
    "See [[Ebbinghaus curve|the forgetting curve]] and https://example.com/memory for more. "
)


def note_markdown(n: int) -> str:
    """One of 20 realistic notes of 0.2–1.2 KB: front matter, a heading, paragraphs, a list."""
    body = NOTE_PARAGRAPH * (1 + n % 6)
    return (
        f"---\ntags: [bench, n{n}]\n---\n# Note {n}\n\n{body}\n\n- first point\n- second point {n}\n\n"
        f"> A quote worth keeping ({n}).\n"
    )


# ------------------------------------------------------------------------------------------- seeding


@dataclass(frozen=True)
class Shape:
    users: int
    docs: int
    due_share: float
    hour: datetime
    never_sent_share: float = 0.02


def _ts(value: datetime) -> str:
    return value.isoformat()


def _naive(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat()


def seed(conn: psycopg.Connection[Any], shape: Shape) -> dict[str, int]:
    """Fill the schema with COPY; returns how many users are in their send window."""
    rng = random.Random(20260208)
    keyring = ContentKeyring.from_keys({1: KEY})
    notes = [encode_content(note_markdown(n), keyring) for n in range(20)]
    hour = shape.hour
    every = max(1, round(1 / shape.due_share)) if shape.due_share > 0 else 0
    never_every = max(1, round(1 / shape.never_sent_share)) if shape.never_sent_share > 0 else 0
    in_window = 0
    never_sent = 0
    with conn.cursor() as cur:
        with cur.copy(
            'COPY "user" (id, name, email, email_verified, created_at, updated_at) FROM STDIN'
        ) as cp:
            for i in range(shape.users):
                created = _naive(hour - timedelta(days=60))
                cp.write_row(
                    (f"user-{i:07d}", f"Bench User {i}", f"user{i}@bench.test", True, created, created)
                )
        with cur.copy(
            "COPY user_settings (user_id, digest_interval_days, notes_per_digest, timezone, preferred_send_hour)"
            " FROM STDIN"
        ) as cp:
            for i in range(shape.users):
                tz_name = TIMEZONES[i % len(TIMEZONES)]
                local_hour = hour.astimezone(resolve_timezone(tz_name).tz).hour
                due = every and i % every == 0
                in_window += int(bool(due))
                send_hour = local_hour if due else (local_hour + 1 + i % 23) % 24
                pro = i % 10 == 3
                cp.write_row((f"user-{i:07d}", 3 + i % 5, 10 if pro else 5, tz_name, send_hour))
        with cur.copy("COPY billing_subscriptions (id, user_id, status) FROM STDIN") as cp:
            for i in range(3, shape.users, 10):
                cp.write_row((f"sub-{i}", f"user-{i:07d}", "active"))
        with cur.copy(
            "COPY integration_connections (id, user_id, kind, status, display_name, account_external_id,"
            " created_at, updated_at) FROM STDIN"
        ) as cp:
            for i in range(shape.users):
                kind = "notion" if i % 2 else "obsidian"
                stamp = _ts(hour - timedelta(days=50))
                cp.write_row(
                    (i + 1, f"user-{i:07d}", kind, "active", f"Source {i}", f"ext-{i}", stamp, stamp)
                )
        with cur.copy(
            "COPY documents (id, user_id, connection_id, external_id, title, content_ciphertext, content_iv,"
            " content_alg, content_key_version, content_hash, content_size_bytes, created_at_source,"
            " updated_at_source, last_synced_at) FROM STDIN"
        ) as cp:
            doc_id = 0
            for i in range(shape.users):
                for k in range(shape.docs):
                    doc_id += 1
                    enc = notes[(i + k) % len(notes)]
                    stamp = _ts(hour - timedelta(days=40, minutes=k))
                    cp.write_row(
                        (
                            doc_id,
                            f"user-{i:07d}",
                            i + 1,
                            f"doc-{k}",
                            f"Note {k} of user {i}",
                            enc.ciphertext,
                            enc.iv,
                            enc.alg,
                            enc.key_version,
                            enc.content_hash,
                            enc.size_bytes,
                            stamp,
                            stamp,
                            stamp,
                        )
                    )
        with cur.copy(
            "COPY review_states (document_id, user_id, status, priority_weight, last_sent_at, next_due_at,"
            " interval_days, ease_factor, repetitions, updated_at) FROM STDIN"
        ) as cp:
            doc_id = 0
            for i in range(shape.users):
                for _k in range(shape.docs):
                    doc_id += 1
                    if rng.random() >= 0.4:
                        continue
                    due_in = rng.uniform(-10, 12)
                    status = "suspended" if rng.random() < 0.03 else "reviewing"
                    weight = rng.choice((None, None, None, 2.0, 0.5))
                    cp.write_row(
                        (
                            doc_id,
                            f"user-{i:07d}",
                            status,
                            weight,
                            _ts(hour - timedelta(days=rng.randint(5, 30))),
                            _ts(hour + timedelta(days=due_in)),
                            rng.randint(3, 10),
                            2.5,
                            rng.randint(0, 4),
                            _ts(hour - timedelta(days=5)),
                        )
                    )
        with cur.copy(
            "COPY note_digests (user_id, scheduled_for, sent_at, status, payload_json, created_at, updated_at)"
            " FROM STDIN"
        ) as cp:
            for i in range(shape.users):
                in_send_window = every and i % every == 0
                if not in_send_window and never_every and i % never_every == 1:
                    never_sent += 1
                    continue
                sent = _ts(hour - timedelta(days=8 if in_send_window else 1 + i % 8))
                cp.write_row(
                    (f"user-{i:07d}", sent, sent, "sent", json.dumps({"source": "bench"}), sent, sent)
                )
        for table, column in (("integration_connections", "id"), ("documents", "id")):
            cur.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), (SELECT max({column}) FROM {table}))"  # noqa: S608 - constants
            )
    conn.commit()
    return {"in_send_window": in_window, "never_sent": never_sent}


def seeded_user(shape: Shape, i: int) -> tuple[str, int, int, datetime | None]:
    """User ``i``'s timezone, send hour, interval and last send, as :func:`seed` writes them."""
    every = max(1, round(1 / shape.due_share)) if shape.due_share > 0 else 0
    never_every = max(1, round(1 / shape.never_sent_share)) if shape.never_sent_share > 0 else 0
    tz_name = TIMEZONES[i % len(TIMEZONES)]
    local_hour = shape.hour.astimezone(resolve_timezone(tz_name).tz).hour
    in_window = bool(every and i % every == 0)
    send_hour = local_hour if in_window else (local_hour + 1 + i % 23) % 24
    last: datetime | None = shape.hour - timedelta(days=8 if in_window else 1 + i % 8)
    if not in_window and never_every and i % never_every == 1:
        last = None
    return tz_name, send_hour, 3 + i % 5, last


def expected_rows_for_day(shape: Shape) -> dict[str, int]:
    """From the seed's parameters alone (no database): over the 24 hours of the partition's UTC day, the
    users due at their send hour (the pure behaviour §4 rule), the never-sent users' local days touched (one
    dashboard digest each), and what one digest per user per local day touched would be."""
    day0 = shape.hour.replace(hour=0, minute=0, second=0, microsecond=0)
    hours = [day0 + timedelta(hours=h) for h in range(24)]
    due = never_sent_days = every_user_days = 0
    for i in range(shape.users):
        tz_name, send_hour, interval, last = seeded_user(shape, i)
        tz = resolve_timezone(tz_name).tz
        days = {h.astimezone(tz).date() for h in hours}
        every_user_days += len(days)
        if last is None:
            never_sent_days += len(days)
            continue
        due += int(any(due_decision(h, tz, send_hour, last, interval).due for h in hours))
    return {"due": due, "never_sent_days": never_sent_days, "every_user_days": every_user_days}


def _fixed(value: datetime) -> datetime:
    return value


def simulate_day(url: str, env: dict[str, str], shape: Shape) -> tuple[int, Counter[str], float]:
    """Generation for each hour of the partition's UTC day, the clock 5 s into each hour: rows created
    (the partition's own hour included, already run), rows by why, seconds."""
    settings = Settings.from_env(env)
    engine = shared_engine(url)
    day0 = shape.hour.replace(hour=0, minute=0, second=0, microsecond=0)
    rows, why = 0, Counter[str]()
    started = time.perf_counter()
    for h in range(24):
        at = day0 + timedelta(hours=h)
        wall = at + timedelta(seconds=5)
        report = generate_digests(engine, at, settings, clock=functools.partial(_fixed, wall))
        rows += report.rows_created
        why.update(report.created_for)
    return rows, why, time.perf_counter() - started


# ------------------------------------------------------------------------------------ measuring


class StatementCounter:
    """Counts statements on an engine as Postgres would: an executemany of n parameter sets counts n."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        self.count += len(params) if many else 1


@contextmanager
def fake_resend_process() -> Iterator[str]:
    """The loopback fake Resend in its own process; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbb_orchestration.testing", "resend", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1"):
            raise RuntimeError(f"fake Resend did not start: {url!r}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pg_stat_available(url: str) -> bool:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


def pg_stat_calls(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = current_database() AND s.query NOT ILIKE '%pg_stat_statements%'"
        ).fetchone()
        return int(row[0]) if row else 0


def run_job_multiprocess(partition: str, env: dict[str, str], workers: int) -> dict[str, Any]:
    """One run of the hourly job on the multiprocess executor (each batch step its own process); per-step
    seconds and the ops' outputs. The step processes read their settings from the environment."""
    os.environ.update(env)
    with tempfile.TemporaryDirectory() as home, dg.instance_for_test(temp_dir=home) as instance:
        started = time.perf_counter()
        with dg.execute_job(
            dg.reconstructable(_hourly_job),
            instance=instance,
            run_config={
                "execution": {"config": {"multiprocess": {"max_concurrent": workers}}},
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
            tags={"dagster/partition": partition},
        ) as result:
            total = time.perf_counter() - started
            if not result.success:
                raise RuntimeError("digest_hourly_job failed")
            steps, metadata = _step_times_and_outputs(instance.all_logs(result.run_id))
    return {"total": total, "steps": steps, "statements": {"total": 0}, "metadata": metadata}


def _hourly_job() -> dg.JobDefinition:
    """The job as the code location defines it (for :func:`dagster.reconstructable`)."""
    from dbb_orchestration.definitions import defs

    return defs.resolve_job_def("digest_hourly_job")


def _step_times_and_outputs(records: Any) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    step_times: dict[str, float] = {}
    metadata: dict[str, dict[str, Any]] = {}
    starts: dict[str, float] = {}
    for record in records:
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = record.timestamp
        elif event.event_type_value == "STEP_SUCCESS":
            step_times[event.step_key] = record.timestamp - starts[event.step_key]
        elif event.event_type_value == "STEP_OUTPUT" and event.step_output_data is not None:
            name = event.step_output_data.output_name
            metadata[f"{event.step_key}.{name}"] = {
                k: v.value for k, v in event.step_output_data.metadata.items()
            }
    return step_times, metadata


def run_job(
    partition: str,
    env: dict[str, str],
    counter: StatementCounter,
    use_pg_stat: bool,
    url: str,
    profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """One in-process run of the hourly job; per-op seconds and statements, and the ops' outputs."""
    statements: dict[str, int] = {}
    with dg.DagsterInstance.ephemeral() as instance:
        started = time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            result = digest_hourly_job.execute_in_process(
                partition_key=partition,
                instance=instance,
                resources=build_resources(env),
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            )
        finally:
            if profile is not None:
                profile.disable()
        total = time.perf_counter() - started
        if not result.success:
            raise RuntimeError("digest_hourly_job failed")
        step_times, metadata = _step_times_and_outputs(instance.all_logs(result.run_id))
    statements["total"] = pg_stat_calls(url) if use_pg_stat else counter.count
    return {"total": total, "steps": step_times, "statements": statements, "metadata": metadata}


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("DBB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--partition", default="2026-02-08-08:00")
    parser.add_argument("--due-share", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--never-sent-share", type=float, default=0.02)
    parser.add_argument("--day", action="store_true", help="then count the rows created over the day")
    parser.add_argument("--profile", action="store_true", help="cProfile the first run")
    parser.add_argument("--executor", choices=("in_process", "multiprocess"), default="in_process")
    parser.add_argument("--users-per-step", type=int, default=None, help="DIGEST_USERS_PER_STEP")
    parser.add_argument("--workers", type=int, default=2, help="multiprocess: steps at a time")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    hour = datetime.strptime(args.partition, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC)
    with throwaway_database(args.admin_url, keep=args.keep) as url:
        with psycopg.connect(url) as conn:
            started = time.perf_counter()
            shape_args = Shape(args.users, args.docs, args.due_share, hour, args.never_sent_share)
            shape = seed(conn, shape_args)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        print(
            f"seeded {args.users:,} users × {args.docs} notes ({args.users * args.docs:,} documents) in "
            f"{time.perf_counter() - started:.1f} s; {shape['in_send_window']:,} users in their send window "
            f"at {hour.isoformat()}; {shape['never_sent']:,} never sent a digest"
        )
        use_pg_stat = pg_stat_available(url)
        counting = (
            "pg_stat_statements (calls)"
            if use_pg_stat
            else "SQLAlchemy before_cursor_execute listener (executemany counts n; pg_stat_statements is "
            "not loaded on this server)"
        )
        with fake_resend_process() as fake_url:
            env = {
                "DATABASE_URL": url,
                "RESEND_API_KEY": "re_bench",
                "RESEND_API_URL": fake_url,
                "EMAIL_RATE_LIMIT_PER_SECOND": "0",
                "EMAIL_MAX_CONCURRENCY": str(args.concurrency),
                "DIGEST_BATCH_SIZE": str(args.batch_size),
                "CONTENT_ENCRYPTION_KEY": base64.b64encode(KEY).decode(),
                "DBB_NOW": (hour + timedelta(seconds=5)).isoformat(),
                "DIGEST_EXECUTOR": args.executor,
            }
            if args.users_per_step:
                env["DIGEST_USERS_PER_STEP"] = str(args.users_per_step)
            engine = shared_engine(url)
            first_run_rows = 0
            for label in ("first run", "same partition again"):
                counter = StatementCounter()
                sa.event.listen(engine, "before_cursor_execute", counter)
                if use_pg_stat:
                    pg_stat_available(url)  # resets the counters
                profile = cProfile.Profile() if args.profile and label == "first run" else None
                try:
                    if args.executor == "multiprocess":
                        run = run_job_multiprocess(args.partition, env, args.workers)
                    else:
                        run = run_job(args.partition, env, counter, use_pg_stat, url, profile)
                finally:
                    sa.event.remove(engine, "before_cursor_execute", counter)
                if profile is not None:
                    out = io.StringIO()
                    stats = pstats.Stats(profile, stream=out)
                    stats.sort_stats("cumulative").print_stats(
                        r"dbb_orchestration|sqlalchemy/engine/base", 40
                    )
                    stats.sort_stats("tottime").print_stats(15)
                    print(
                        "\n== profile of the first run (inflated by the profiler): cumulative, then own time"
                    )
                    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
                gen = run["metadata"][f"{SUMMARY_OP}.generated"]
                send = run["metadata"][f"{SUMMARY_OP}.sent"]
                batch_times = [v for k, v in run["steps"].items() if k.startswith(BATCH_OP)]
                if label == "first run":
                    first_run_rows = int(gen["rows_created"])
                per_1000 = run["statements"]["total"] / max(1, args.users) * 1000
                print(f"\n== {label}: digest_hourly_job partition {args.partition}")
                print(
                    f"   wall time: {len(batch_times)} batch step(s) (generate + send) {sum(batch_times):.2f} s, "
                    f"job total {run['total']:.2f} s"
                )
                print(
                    f"   generate: users={gen['users_considered']:,} rows created={gen['rows_created']:,} "
                    f"for={gen['created_for']} (scheduled {gen['digests_created']:,}, skipped "
                    f"{gen['skipped_by_reason']}), items={gen['items_created']:,}, "
                    f"already={gen['already_generated']:,}, not needed={gen['not_needed_by_reason']}"
                )
                print(
                    f"   send: due={send['due']:,} sent={send['sent']:,} failed={send['failed']} "
                    f"superseded={send['superseded']} not_due={send['not_due']:,}"
                )
                if args.executor == "multiprocess" and not use_pg_stat:
                    print(
                        "   SQL statements: not counted (issued in the step processes; see the in-process mode)"
                    )
                else:
                    print(
                        f"   SQL statements: {run['statements']['total']:,} ({per_1000:.1f} per 1,000 users), "
                        f"counted by {counting}"
                    )
            with create_db_engine(url, poolclass=sa.pool.NullPool).connect() as conn:
                emails = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM note_digests WHERE status = 'sent' AND payload_json ? 'provider_id'"
                        " AND payload_json->>'provider' = 'resend'"
                    )
                ).scalar()
            print(f"\nemails accepted by the fake Resend and recorded: {emails:,}")
            if args.day:
                rows, why, seconds = simulate_day(url, env, shape_args)
                first_rows = first_run_rows
                expected = expected_rows_for_day(shape_args)
                print(
                    f"\n== the partition's UTC day, 24 hourly generations ({seconds:.1f} s for the other 23)\n"
                    f"   rows created: {rows + first_rows:,} ({first_rows:,} in the first run, then {dict(why)})\n"
                    f"   expected from the seed alone: {expected['due']:,} users due that day + "
                    f"{expected['never_sent_days']:,} never-sent user-days = "
                    f"{expected['due'] + expected['never_sent_days']:,}\n"
                    f"   one digest per user per local day touched (the previous rule) would be "
                    f"{expected['every_user_days']:,}"
                )
            engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
