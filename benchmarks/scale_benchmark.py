"""The hourly digest job fanned out over worker processes, at 100,000 and 1,000,000 users.

    python benchmarks/scale_benchmark.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--users 100000] [--docs 20] [--users-per-step 10000] [--workers 1,2] [--slices 3]
        [--slice-only] [--reuse] [--keep]

1. **Seed** (skipped with ``--reuse`` when the database ``dbb_bench_scale_<users>_<docs>`` is already
   there): the backend's DDL, then every table filled server side with ``INSERT … SELECT`` over
   ``generate_series`` (no row crosses the network: 100,000 users × 20 notes take seconds, not
   minutes). The shape is ``digest_benchmark.py``'s: seven timezones, every 5th user in their send
   window with a digest sent 8 days earlier (due), the others another send hour and a send 1–8 days
   earlier, every 50th of those never sent one; 10 % Pro (10 notes per digest); ``--docs`` AES-256-GCM
   notes per user (20 real encrypted notes of 0.2–1.2 KB reused), 40 % with a review state.
2. **Job runs** (unless ``--slice-only``): for each ``--workers`` count, a copy of the seeded database
   (``CREATE DATABASE … TEMPLATE``), then the real ``digest_hourly_job`` for 2026-02-08-08:00 through
   ``dagster.execute_job`` on a persistent temporary instance with the multiprocess executor and
   ``max_concurrent`` = workers, against the loopback fake Resend in its own process (no rate limit,
   4 provider workers per step). Printed: wall time, each batch step's time, the peak RSS of the
   step processes (each batch step runs in a fresh process), digests and emails recorded.
3. **Slices**: ``--slices`` ranges of ``--users-per-step`` users (first, middle, last of the table) run
   in this process exactly as one batch step does (``generate_digests`` + ``send_due_digests`` with a
   ``user_range``) on another copy: seconds, the process's peak RSS so far and SQL statements
   (a SQLAlchemy listener: an executemany of n parameter sets counts n) per slice and per 1,000 users.
   On the million-user table this shows whether a batch's cost grows with the table.

Every copy is dropped at the end, and the seeded database too unless ``--keep`` (rerun with
``--reuse`` to skip the seed).
"""

# ruff: noqa: S608  (the seed SQL is built from integers and this file's constants only)
from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digest_benchmark import KEY, TIMEZONES, StatementCounter, fake_resend_process, note_markdown

from dbb_orchestration.config import Settings
from dbb_orchestration.content import ContentKeyring, encode_content
from dbb_orchestration.db.engine import create_db_engine
from dbb_orchestration.definitions import make_definitions
from dbb_orchestration.digests.batches import user_ranges
from dbb_orchestration.digests.defs import BATCH_OP, SUMMARY_OP
from dbb_orchestration.digests.generate import generate_digests
from dbb_orchestration.digests.send import send_due_digests
from dbb_orchestration.email.sender import EmailSender
from dbb_orchestration.resources import resend_sender

DDL = Path(__file__).resolve().parent.parent / "dbb_orchestration_tests" / "backend_schema.sql"
HOUR = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
PARTITION = "2026-02-08-08:00"
WALL = HOUR + timedelta(seconds=5)


def hourly_job(env: dict[str, str]) -> dg.JobDefinition:
    """Module level, so the step processes can rebuild the job. The settings travel as the job's
    reconstruction arguments, not through ``os.environ``: a forkserver started by an earlier run of this
    process would hand its step processes that run's environment (another database)."""
    return make_definitions(env).resolve_job_def("digest_hourly_job")


def _reconstructable(env: dict[str, str]) -> dg.ReconstructableJob:
    here = Path(__file__).resolve().parent
    return dg.build_reconstructable_job(
        "scale_benchmark",
        "hourly_job",
        reconstructable_kwargs={"env": env},
        reconstructor_working_directory=str(here),
    )


# ------------------------------------------------------------------------------------------- seeding


def _local_hour_case() -> str:
    """SQL: the partition's local hour in the user's timezone (i % 7 → TIMEZONES)."""
    whens = " ".join(
        f"WHEN {n} THEN {HOUR.astimezone(__import__('zoneinfo').ZoneInfo(tz)).hour}"
        for n, tz in enumerate(TIMEZONES)
    )
    return f"(CASE i % {len(TIMEZONES)} {whens} END)"


def seed(url: str, users: int, docs: int) -> float:
    """Fill the schema server side; returns seconds."""
    started = time.perf_counter()
    keyring = ContentKeyring.from_keys({1: KEY})
    notes = [encode_content(note_markdown(n), keyring) for n in range(20)]
    tz_array = "ARRAY[" + ",".join(f"'{tz}'" for tz in TIMEZONES) + "]"
    hour = HOUR.replace(tzinfo=None).isoformat()
    local_hour = _local_hour_case()
    with psycopg.connect(url, autocommit=False) as conn:
        conn.execute(DDL.read_text())  # type: ignore[arg-type]  # the backend's DDL, trusted
        conn.execute(
            "CREATE TEMP TABLE bench_notes (n int, ct text, iv text, alg text, kv int, h text, sz int)"
        )
        with conn.cursor().copy("COPY bench_notes FROM STDIN") as cp:
            for n, e in enumerate(notes):
                cp.write_row((n, e.ciphertext, e.iv, e.alg, e.key_version, e.content_hash, e.size_bytes))
        statements = [
            f"""INSERT INTO "user" (id, name, email, email_verified, created_at, updated_at)
                SELECT 'user-' || lpad(i::text, 7, '0'), 'Bench User ' || i, 'user' || i || '@bench.test',
                       true, timestamp '{hour}' - interval '60 days', timestamp '{hour}' - interval '60 days'
                FROM generate_series(0, {users - 1}) i""",
            f"""INSERT INTO user_settings (user_id, digest_interval_days, notes_per_digest, timezone,
                                           preferred_send_hour)
                SELECT 'user-' || lpad(i::text, 7, '0'), 3 + i % 5, CASE WHEN i % 10 = 3 THEN 10 ELSE 5 END,
                       ({tz_array})[i % {len(TIMEZONES)} + 1],
                       CASE WHEN i % 5 = 0 THEN {local_hour} ELSE ({local_hour} + 1 + i % 23) % 24 END
                FROM generate_series(0, {users - 1}) i""",
            f"""INSERT INTO billing_subscriptions (id, user_id, status)
                SELECT 'sub-' || i, 'user-' || lpad(i::text, 7, '0'), 'active'
                FROM generate_series(3, {users - 1}, 10) i""",
            f"""INSERT INTO integration_connections (id, user_id, kind, status, display_name,
                                                     account_external_id, created_at, updated_at)
                SELECT i + 1, 'user-' || lpad(i::text, 7, '0'),
                       (CASE WHEN i % 2 = 1 THEN 'notion' ELSE 'obsidian' END)::integration_kind,
                       'active', 'Source ' || i,
                       'ext-' || i, timestamptz '{HOUR.isoformat()}' - interval '50 days',
                       timestamptz '{HOUR.isoformat()}' - interval '50 days'
                FROM generate_series(0, {users - 1}) i""",
            f"""INSERT INTO documents (id, user_id, connection_id, external_id, title, content_ciphertext,
                    content_iv, content_alg, content_key_version, content_hash, content_size_bytes,
                    created_at_source, updated_at_source, last_synced_at)
                SELECT i * {docs} + k + 1, 'user-' || lpad(i::text, 7, '0'), i + 1, 'doc-' || k,
                       'Note ' || k || ' of user ' || i, b.ct, b.iv, b.alg, b.kv, b.h, b.sz,
                       timestamptz '{HOUR.isoformat()}' - interval '40 days' - k * interval '1 minute',
                       timestamptz '{HOUR.isoformat()}' - interval '40 days' - k * interval '1 minute',
                       timestamptz '{HOUR.isoformat()}' - interval '40 days' - k * interval '1 minute'
                FROM generate_series(0, {users - 1}) i CROSS JOIN generate_series(0, {docs - 1}) k
                JOIN bench_notes b ON b.n = (i + k) % 20""",
            f"""INSERT INTO review_states (document_id, user_id, status, priority_weight, last_sent_at,
                    next_due_at, interval_days, ease_factor, repetitions, updated_at)
                SELECT i * {docs} + k + 1, 'user-' || lpad(i::text, 7, '0'),
                       CASE WHEN (i * 7 + k * 3) % 33 = 0 THEN 'suspended' ELSE 'reviewing' END::review_status,
                       CASE (i + k) % 5 WHEN 3 THEN 2.0 WHEN 4 THEN 0.5 END,
                       timestamptz '{HOUR.isoformat()}' - (5 + (i + k) % 26) * interval '1 day',
                       timestamptz '{HOUR.isoformat()}' + ((i * 31 + k * 17) % 22 - 10) * interval '1 day',
                       3 + (i + k) % 8, 2.5, (i + k) % 5,
                       timestamptz '{HOUR.isoformat()}' - interval '5 days'
                FROM generate_series(0, {users - 1}) i CROSS JOIN generate_series(0, {docs - 1}) k
                WHERE (i * 7 + k * 13) % 10 < 4""",
            f"""INSERT INTO note_digests (user_id, scheduled_for, sent_at, status, payload_json, created_at,
                                          updated_at)
                SELECT 'user-' || lpad(i::text, 7, '0'), s, s, 'sent', '{{"source": "bench"}}', s, s
                FROM generate_series(0, {users - 1}) i,
                     LATERAL (SELECT timestamptz '{HOUR.isoformat()}'
                              - (CASE WHEN i % 5 = 0 THEN 8 ELSE 1 + i % 8 END) * interval '1 day' AS s) t
                WHERE i % 5 = 0 OR i % 50 <> 1""",
            "SELECT setval(pg_get_serial_sequence('integration_connections', 'id'), "
            "(SELECT max(id) FROM integration_connections))",
            "SELECT setval(pg_get_serial_sequence('documents', 'id'), (SELECT max(id) FROM documents))",
        ]
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]  # built from integers and constants
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------ databases


class Server:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    def url(self, name: str) -> str:
        return str(
            sa.make_url(self.admin_url).set(drivername="postgresql", database=name).render_as_string(False)
        )

    def exists(self, name: str) -> bool:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            return (
                conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
            )

    def create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{suffix}')  # type: ignore[arg-type]
        return self.url(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]

    @contextmanager
    def copy_of(self, template: str, name: str) -> Iterator[str]:
        url = self.create(name, template)
        try:
            yield url
        finally:
            self.drop(name)


def _env(url: str, resend_url: str, users_per_step: int) -> dict[str, str]:
    return {
        "DATABASE_URL": url,
        "DBB_NOW": WALL.isoformat(),
        "RESEND_API_KEY": "re_bench",
        "RESEND_API_URL": resend_url,
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        "EMAIL_MAX_CONCURRENCY": "4",
        "CONTENT_ENCRYPTION_KEY": __import__("base64").b64encode(KEY).decode(),
        "FRONTEND_URL": "https://app.example.test",
        "DIGEST_USERS_PER_STEP": str(users_per_step),
        "DIGEST_EXECUTOR": "multiprocess",
    }


def _counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT status::text, count(*) FROM note_digests WHERE created_at > %s GROUP BY 1",
            (HOUR - timedelta(hours=1),),
        ).fetchall()
    return {str(status): int(n) for status, n in rows}


# -------------------------------------------------------------------------------------------- the runs


class StepMemory:
    """Peak RSS (``VmHWM``) of the step processes, sampled from ``/proc`` every 0.2 s while a run goes:
    the processes spawned by this one (``spawn``) or forked by its forkserver. ``RUSAGE_CHILDREN`` sees
    only the former (the forkserver, alive until this process exits, reaps the latter)."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _read(pid: str) -> tuple[int, str, int]:
        """(parent pid, command line, VmHWM in kB) of a process."""
        proc = Path("/proc") / pid
        ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        hwm = next(
            (
                int(line.split()[1])
                for line in (proc / "status").read_text().splitlines()
                if line.startswith("VmHWM:")
            ),
            0,
        )
        return ppid, cmdline, hwm

    def _scan(self) -> None:
        me = os.getpid()
        procs = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    procs[int(entry.name)] = self._read(entry.name)
                except (OSError, ValueError, IndexError):
                    continue
        forkservers = {pid for pid, (ppid, cmd, _) in procs.items() if ppid == me and "forkserver" in cmd}
        for _pid, (ppid, cmd, hwm) in procs.items():
            if (ppid == me and "spawn_main" in cmd) or ppid in forkservers:
                self.peak_kb = max(self.peak_kb, hwm)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self._scan()

    def __enter__(self) -> StepMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _step_times(instance: dg.DagsterInstance, run_id: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per step: the start-up (the executor asks for a worker process → the step starts in it) and the
    step's own time (start → success), from the run's event log."""
    asked: dict[str, float] = {}
    starts: dict[str, float] = {}
    startup: dict[str, float] = {}
    steps: dict[str, float] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        kind = event.event_type_value
        if kind == "STEP_WORKER_STARTING":
            asked[event.step_key] = record.timestamp
        elif kind == "STEP_START":
            starts[event.step_key] = record.timestamp
            if event.step_key in asked:
                startup[event.step_key] = record.timestamp - asked[event.step_key]
        elif kind == "STEP_SUCCESS":
            steps[event.step_key] = record.timestamp - starts[event.step_key]
    return startup, steps


def run_job(env: dict[str, str], workers: int, start_method: str) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as home,
        dg.instance_for_test(temp_dir=home) as instance,
        StepMemory() as memory,
    ):
        started = time.perf_counter()
        multiprocess: dict[str, Any] = {"max_concurrent": workers}
        if start_method != "default":
            multiprocess["start_method"] = {
                start_method: {"preload_modules": ["dbb_orchestration.definitions"]}
                if start_method == "forkserver"
                else {}
            }
        with dg.execute_job(
            _reconstructable(env),
            instance=instance,
            run_config={
                "execution": {"config": {"multiprocess": multiprocess}},
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
            tags={"dagster/partition": PARTITION},
        ) as result:
            total = time.perf_counter() - started
            if not result.success:
                raise RuntimeError("digest_hourly_job failed")
            startup, steps = _step_times(instance, result.run_id)
            generated = result.output_for_node(SUMMARY_OP, "generated")
            sent = result.output_for_node(SUMMARY_OP, "sent")
    return {
        "total": total,
        "startup": startup,
        "steps": steps,
        "generated": generated,
        "sent": sent,
        "peak_step_rss_mb": memory.peak_kb / 1024,
        "digests": _counts(env["DATABASE_URL"]),
    }


def _fixed(value: datetime) -> datetime:
    return value


def run_slice(url: str, env: dict[str, str], user_range: tuple[str | None, str | None]) -> dict[str, Any]:
    """One batch step's work in this process: seconds, peak RSS, statements."""
    settings = Settings.from_env(env)
    engine = create_db_engine(settings.database_url)
    counter = StatementCounter()
    sa.event.listen(engine, "before_cursor_execute", counter)
    sender: EmailSender = resend_sender(settings)
    clock = functools.partial(_fixed, WALL)
    started = time.perf_counter()
    gen = generate_digests(engine, HOUR, settings, clock=clock, user_range=user_range)
    gen_s, gen_statements = time.perf_counter() - started, counter.count
    send = send_due_digests(engine, sender, settings, HOUR, clock=clock, user_range=user_range)
    total = time.perf_counter() - started
    engine.dispose()
    return {
        "users": gen.users_considered,
        "generate_s": gen_s,
        "send_s": total - gen_s,
        "total_s": total,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "statements": counter.count,
        "generate_statements": gen_statements,
        "rows": gen.rows_created,
        "sent": send.sent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("DBB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--users-per-step", type=int, default=10_000)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker process counts")
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument(
        "--start-method",
        choices=("default", "spawn", "forkserver"),
        default="default",
        help="how the multiprocess executor starts step processes (default: the job's own setting)",
    )
    parser.add_argument("--slice-only", action="store_true", help="skip the job runs")
    parser.add_argument("--reuse", action="store_true", help="reuse the seeded database when present")
    parser.add_argument("--keep", action="store_true", help="keep the seeded database")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the step processes inherit it
    server = Server(args.admin_url)
    base = f"dbb_bench_scale_{args.users}_{args.docs}"
    print(f"== {args.users:,} users × {args.docs} notes, {args.users_per_step:,} users per batch step")
    if args.reuse and server.exists(base):
        print(f"   reusing database {base}")
    else:
        url = server.create(base)
        print(f"   seeded in {seed(url, args.users, args.docs):.1f} s (server-side INSERT … SELECT)")
    try:
        with fake_resend_process() as resend_url:
            if not args.slice_only:
                for workers in (int(w) for w in args.workers.split(",")):
                    with server.copy_of(base, f"{base}_run{workers}") as url:
                        run = run_job(_env(url, resend_url, args.users_per_step), workers, args.start_method)
                    batches = sorted(v for k, v in run["steps"].items() if k.startswith(BATCH_OP))
                    startup = sorted(run["startup"].values())
                    print(
                        f"\n== digest_hourly_job, multiprocess executor ({args.start_method} start method), "
                        f"{workers} worker process(es)"
                    )
                    print(f"   wall time {run['total']:.1f} s; {len(batches)} batch steps")
                    if batches:
                        print(
                            f"   batch step time: min {batches[0]:.1f} s, median {batches[len(batches) // 2]:.1f} s, "
                            f"max {batches[-1]:.1f} s, sum {sum(batches):.1f} s"
                        )
                    if startup:
                        print(
                            f"   step start-up (worker asked for → step started), {len(startup)} steps: "
                            f"min {startup[0]:.2f} s, median {startup[len(startup) // 2]:.2f} s, "
                            f"max {startup[-1]:.2f} s, sum {sum(startup):.1f} s"
                        )
                    print(f"   peak RSS of a step process (VmHWM): {run['peak_step_rss_mb']:.0f} MB")
                    print(
                        f"   digest rows created {run['generated']:,}, sent {run['sent']:,}; now {run['digests']}"
                    )
            with server.copy_of(base, f"{base}_slice") as url:
                engine = create_db_engine(url)
                with engine.connect() as conn:
                    ranges = user_ranges(conn, args.users_per_step)
                engine.dispose()
                picks = sorted({0, len(ranges) // 2, len(ranges) - 1})[: max(1, args.slices)]
                print(f"\n== batch slices in one process ({len(ranges)} ranges in the table)")
                for index in picks:
                    s = run_slice(url, _env(url, resend_url, args.users_per_step), ranges[index])
                    per_1000 = s["statements"] / max(1, s["users"]) * 1000
                    print(
                        f"   range {index}: {s['users']:,} users, generate {s['generate_s']:.1f} s + send "
                        f"{s['send_s']:.1f} s = {s['total_s']:.1f} s; process peak RSS {s['rss_peak_mb']:.0f} MB; "
                        f"{s['statements']} statements ({s['generate_statements']} generating; "
                        f"{per_1000:.1f} per 1,000 users); rows {s['rows']:,}, sent {s['sent']:,}"
                    )
    finally:
        if not args.keep:
            server.drop(base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
