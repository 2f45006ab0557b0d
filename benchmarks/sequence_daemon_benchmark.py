"""A backlog of due sequence steps under a real ``dagster-daemon``: time to deliver all, CPU-seconds per
email, and how long a first digest inserted during the backlog waits.

    python benchmarks/sequence_daemon_benchmark.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--steps 1000] [--per-run 50] [--rate 2] [--first-digest-at 1000,500] [--timeout 1800] [--keep]

What it sets up (everything on this machine, everything stopped and dropped at the end):

- two fresh Postgres databases: the application database from the backend's DDL
  (``dbb_orchestration_tests/backend_schema.sql``) and an empty one for Dagster's storage;
- ``--steps`` verified users, each with a ``welcome`` state whose step 1 is due;
- the fake Resend (``python -m dbb_orchestration.testing resend``) in its own process;
- a temporary ``DAGSTER_HOME`` holding the repository's own ``dagster.yaml`` unchanged (Postgres
  storage through the ``DAGSTER_PG_*`` variables, QueuedRunCoordinator, the concurrency and run-retry
  settings; the DefaultRunLauncher, i.e. one process per run) and a workspace on
  ``dbb_orchestration.definitions``;
- ``first_digest_sensor`` and ``email_sequence_sensor`` turned on, then ``dagster-daemon run``.

While the daemon works through the backlog, a user with a pending first digest is inserted each time
the number of steps still due falls to one of ``--first-digest-at`` (the first as soon as the first step
was sent); the latency is the digest's ``sent_at`` minus the insert time.

CPU is measured from ``/proc``: every 0.2 s the script reads ``utime + stime`` of every descendant of
the daemon (the code server and every run process included) and keeps each process's last value; the
sum over all processes seen is the CPU of the whole tree (a process that exits loses at most its last
0.2 s). ``RUSAGE_CHILDREN`` of this script after the daemon exits is printed as a cross-check (it
only sees processes their parents waited for). The Postgres server's CPU is not included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from _throwaway import throwaway_database

from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import create_db_engine
from dbb_orchestration.testing import factories as f

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--admin-url",
        default=os.environ.get("DBB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--steps", type=int, default=1000, help="due sequence steps in the backlog")
    p.add_argument("--per-run", type=int, default=50, help="SEQUENCE_STEPS_PER_RUN")
    p.add_argument("--rate", type=float, default=2.0, help="EMAIL_RATE_LIMIT_PER_SECOND (per process)")
    p.add_argument(
        "--first-digest-at",
        default="1000,500",
        help="insert a first digest when this many steps are still due (comma-separated)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the databases and DAGSTER_HOME")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ /proc CPU


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, starttime, utime + stime in ticks) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


@dataclass
class TreeCpu:
    """Last seen CPU ticks per process of a tree, keyed by (pid, start time)."""

    root: int
    seen: dict[tuple[int, int], int] = field(default_factory=dict)

    def sample(self) -> None:
        stats: dict[int, tuple[int, int, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _stat(int(entry))) is not None:
                stats[int(entry)] = stat
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in stats:
                _, start, ticks = stats[pid]
                self.seen[(pid, start)] = max(ticks, self.seen.get((pid, start), 0))
            stack.extend(children.get(pid, []))

    def alive(self) -> list[int]:
        """The processes of the tree seen so far that still run (same pid and start time)."""
        return [pid for pid, start in self.seen if (stat := _stat(pid)) is not None and stat[1] == start]

    def stop_leftovers(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL, to the tree's processes that outlived the daemon (a code server
        started in its own session, say). Returns how many there were."""
        left = self.alive()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        return len(left)

    @property
    def seconds(self) -> float:
        return sum(self.seen.values()) / TICKS

    @property
    def processes(self) -> int:
        return len(self.seen)


# ------------------------------------------------------------------------------------------- setup


def seed_backlog(engine: sa.Engine, steps: int, now: datetime) -> None:
    with engine.begin() as conn:
        for n in range(steps):
            uid = f"seq{n:05d}"
            f.user(conn, uid, name=f"Reader {n}")
            f.sequence_state(conn, uid, "welcome", entered_at=now - timedelta(hours=2))


def insert_first_digest(engine: sa.Engine, uid: str, now: datetime) -> None:
    """A user whose first sync just finished: a connection, notes and a pending seed digest."""
    with engine.begin() as conn:
        f.user(conn, uid, name="New Reader")
        connection_id = f.connection(conn, uid, created_at=now - timedelta(minutes=5))
        docs = [
            f.document(conn, uid, connection_id, external_id=f"{uid}-{n}", title=f"Note {n}")
            for n in range(3)
        ]
        f.digest(
            conn,
            uid,
            status="scheduled",
            scheduled_for=now - timedelta(seconds=1),
            created_at=now,
            payload={"source": "seed_after_first_sync"},
            document_ids=docs,
        )


def counts(engine: sa.Engine, first_users: list[str]) -> tuple[int, dict[str, datetime | None]]:
    with engine.connect() as conn:
        sent = conn.execute(
            sa.select(sa.func.count())
            .select_from(t.email_sends)
            .where(t.email_sends.c.sequence_name == "welcome")
        ).scalar_one()
        digests: dict[str, datetime | None] = {uid: None for uid in first_users}
        if first_users:
            rows = conn.execute(
                sa.select(t.note_digests.c.user_id, t.note_digests.c.sent_at).where(
                    t.note_digests.c.user_id.in_(first_users), t.note_digests.c.status == "sent"
                )
            ).all()
            digests.update({row.user_id: row.sent_at for row in rows})
    return int(sent), digests


def write_home(home: Path) -> None:
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    (home / "workspace.yaml").write_text(
        "load_from:\n"
        "  - python_module:\n"
        "      module_name: dbb_orchestration.definitions\n"
        "      location_name: dbb_orchestration\n"
        f"      working_directory: {ROOT}\n"
    )


def start_fake_resend(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbb_orchestration.testing", "resend", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM to the process group this script started, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------------------------- run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    thresholds = sorted({int(x) for x in args.first_digest_at.split(",") if x.strip()}, reverse=True)
    with (
        throwaway_database(args.admin_url, keep=args.keep) as app_url,
        throwaway_database(args.admin_url, keep=args.keep, schema=False) as dagster_db,
    ):
        return run(args, thresholds, app_url, dagster_db)


def run(args: argparse.Namespace, thresholds: list[int], app_url: str, dagster_db: str) -> int:
    """The benchmark on the two databases: the daemon, the backlog, the report (returns the exit code)."""
    dagster_name = sa.engine.make_url(dagster_db).database or ""
    home = Path(tempfile.mkdtemp(prefix="dbb_bench_home_"))
    engine = create_db_engine(app_url, poolclass=sa.pool.NullPool)
    fake: subprocess.Popen[str] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    url = sa.engine.make_url(args.admin_url)
    try:
        now = datetime.now(UTC)
        seed_backlog(engine, args.steps, now)
        write_home(home)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DBB_", "DAGSTER_"))}
        fake, resend_url = start_fake_resend(base_env)
        env = {
            **base_env,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_USERNAME": url.username or "postgres",
            "DAGSTER_PG_PASSWORD": url.password or "",
            "DAGSTER_PG_HOST": url.host or "127.0.0.1",
            "DAGSTER_PG_PORT": str(url.port or 5432),
            "DAGSTER_PG_DB": dagster_name,
            "DATABASE_URL": app_url,
            "RESEND_API_KEY": "re_benchmark_local",
            "RESEND_API_URL": resend_url,
            "FRONTEND_URL": "https://app.example.test",
            "EMAIL_RATE_LIMIT_PER_SECOND": str(args.rate),
            "SEQUENCE_STEPS_PER_RUN": str(args.per_run),
        }
        workspace = str(home / "workspace.yaml")
        for sensor in ("email_sequence_sensor", "first_digest_sensor"):
            subprocess.run(
                [str(BIN / "dagster"), "sensor", "start", sensor, "-w", workspace],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                cwd=home,
            )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", workspace],
            env=env,
            cwd=home,
            stdout=subprocess.DEVNULL,
            stderr=(home / "daemon.log").open("wb"),
            start_new_session=True,
        )
        cpu = TreeCpu(daemon.pid)
        first_users: list[str] = []
        inserted: dict[str, datetime] = {}
        first_sent_at: float | None = None
        sent = 0
        last_report = 0.0
        while True:
            cpu.sample()
            sent, digests = counts(engine, first_users)
            elapsed = time.monotonic() - started
            if sent and first_sent_at is None:
                first_sent_at = elapsed
            due = args.steps - sent
            while thresholds and sent > 0 and due <= thresholds[0]:
                uid = f"first{len(first_users) + 1}"
                insert_now = datetime.now(UTC)
                insert_first_digest(engine, uid, insert_now)
                first_users.append(uid)
                inserted[uid] = insert_now
                print(
                    f"[{elapsed:6.1f} s] {due} steps still due: inserted a first digest ({uid})", flush=True
                )
                thresholds.pop(0)
            if elapsed - last_report >= 30:
                print(
                    f"[{elapsed:6.1f} s] {sent}/{args.steps} sent, CPU so far {cpu.seconds:.1f} s", flush=True
                )
                last_report = elapsed
            all_first = all(digests.get(uid) for uid in first_users)
            if sent >= args.steps and all_first and not thresholds:
                break
            if elapsed > args.timeout:
                print(f"timed out after {elapsed:.0f} s", flush=True)
                break
            if daemon.poll() is not None:
                print("the daemon exited early; see its log", flush=True)
                break
            time.sleep(0.2)
        total = time.monotonic() - started
        cpu.sample()
        tree_cpu = cpu.seconds
        stop(daemon)
        leftovers = cpu.stop_leftovers()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rusage = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        _, digests = counts(engine, first_users)
        print()
        print(
            f"backlog {args.steps} due welcome steps, {args.per_run} per run, "
            f"EMAIL_RATE_LIMIT_PER_SECOND={args.rate} per run process"
        )
        print(
            f"delivered {sent}/{args.steps} in {total:.1f} s from daemon start (first email at {first_sent_at or 0:.1f} s)"
        )
        print(
            f"CPU of the daemon tree: {tree_cpu:.1f} s over {cpu.processes} processes -> "
            f"{tree_cpu / max(1, sent):.3f} CPU-s per email (RUSAGE_CHILDREN cross-check {rusage:.1f} s)"
        )
        for uid in first_users:
            sent_at = digests.get(uid)
            wait = f"{(sent_at - inserted[uid]).total_seconds():.1f} s" if sent_at else "not sent"
            print(f"first digest {uid}: sent {wait} after its insert")
        with engine.connect() as conn:
            runs = conn.execute(
                sa.select(sa.func.count(sa.distinct(t.email_sends.c.idempotency_key)))
            ).scalar_one()
        print(f"email_sends rows with distinct keys: {runs}")
        print(f"processes of the daemon tree still running after it stopped (now stopped): {leftovers}")
        return 0 if sent >= args.steps and all(digests.get(uid) for uid in first_users) else 1
    finally:
        if daemon is not None:
            stop(daemon)
            TreeCpu(daemon.pid).stop_leftovers()
        if fake is not None:
            stop(fake, grace=5)
        engine.dispose()
        if args.keep:
            print(f"kept DAGSTER_HOME {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
