"""``dbb-orchestration demo``: a simulated day on the embedded default.

A SQLite application database, a persistent Dagster instance in ``<workdir>/dagster_home`` (or
``--dagster-home``), and the fake Resend and fake Notion servers on 127.0.0.1. The world of
:mod:`.world` is seeded once; then every hour of :data:`~.world.DAY` runs a partition of
``digest_hourly_job``, ticks ``first_digest_sensor`` and ``email_sequence_sensor`` (at :05 and :35) and
runs what they request, runs ``upgrade_sequence_discover_job`` at :15, and ``notion_sync_weekly_job``
at 03:00 (a Sunday). ``DBB_NOW`` pins each run's wall clock to the simulated time, so the day is the
same on every run.

Every run carries the tags Dagster's UI uses to attribute it: the partition and partition set (set by
``execute_in_process(partition_key=…)``) and the code location's repository label, so ``./dev ui``
shows the 24 hours as ran partitions of ``digest_hourly_job`` and every run under the location.

Every email lands in the outbox as ``.html``, ``.txt`` and ``.eml``. Rerunning into the same work
directory sends nothing twice: the database already records what went out, and the table printed is
that invocation's own runs (per run, not cumulative) with the reasons nothing was created or sent.
"""

from __future__ import annotations

import base64
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import create_db_engine, create_schema
from dbb_orchestration.db import tables as t
from dbb_orchestration.definitions import make_definitions
from dbb_orchestration.demo.world import DAY, NotionAccount, SimulatedClock, seed_notion, seed_world
from dbb_orchestration.testing.fake_notion import FakeNotion
from dbb_orchestration.testing.fake_resend import FakeResend

# A fixed demo key (never a real one): notes are stored encrypted like production.
DEMO_KEY = base64.b64encode(b"dbb-demo-key-32-bytes-not-secret").decode()
SENSOR_MINUTES = (5, 35)
# What the UI filters a location's runs and partition statuses by (`.dagster/repository`): the
# repository of a `Definitions` object is `__repository__`; the location is named in workspace.yaml.
LOCATION_NAME = "dbb_orchestration"
REPOSITORY_LABEL = f"__repository__@{LOCATION_NAME}"
REPOSITORY_LABEL_TAG = ".dagster/repository"


def demo_env(db_url: str) -> dict[str, str]:
    """Settings every demo run shares (the fakes' URLs are added when they start)."""
    return {
        "DATABASE_URL": db_url,
        "RESEND_API_KEY": "re_demo_local",
        "RESEND_REPLY_TO": "hello@demo.dbb.test",
        "FRONTEND_URL": "http://localhost:3000",
        "UNSUBSCRIBE_SECRET": "demo-unsubscribe-secret",  # emails carry the one-click List-Unsubscribe
        "CONTENT_ENCRYPTION_KEY": DEMO_KEY,
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        "EMAIL_MAX_CONCURRENCY": "1",  # one at a time: the outbox numbering is the same on every run
        "NOTION_REQUESTS_PER_SECOND": "0",
        "NOTION_CONNECTION_PAUSE_SECONDS": "0",
    }


@dataclass
class DayLog:
    hours: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    runs: Counter[str] = field(default_factory=Counter)
    failed_runs: list[str] = field(default_factory=list)
    notion: dict[str, Any] = field(default_factory=dict)
    not_created: Counter[str] = field(default_factory=Counter)  # generation: users given no digest, why
    not_sent: Counter[str] = field(default_factory=Counter)  # sending: users not due / skipped, why


def _output_metadata(
    result: dg.ExecuteInProcessResult, step_key: str, output: str = "result"
) -> dict[str, Any]:
    for event in result.all_events:
        if event.event_type_value == "STEP_OUTPUT" and event.step_key == step_key:
            data: Any = event.event_specific_data
            if data.output_name != output:
                continue
            return {k: v.value for k, v in (data.metadata or {}).items()}
    return {}


class Simulation:
    def __init__(
        self, base_env: dict[str, str], instance: dg.DagsterInstance, log: DayLog, clock: SimulatedClock
    ) -> None:
        self.clock = clock
        self.base_env = base_env
        self.instance = instance
        self.log = log
        self.cursors: dict[str, str | None] = {}
        self.log_level = "ERROR"

    def defs_at(self, when: datetime) -> dg.Definitions:
        self.clock.now = when  # the fake Resend dates what it receives now by the simulated time
        return make_definitions({**self.base_env, "DBB_NOW": when.isoformat()})

    def run(self, defs: dg.Definitions, job_name: str, **kwargs: Any) -> dg.ExecuteInProcessResult:
        run_config = dict(kwargs.pop("run_config", None) or {})
        run_config["loggers"] = {"console": {"config": {"log_level": self.log_level}}}
        tags = {**(kwargs.pop("tags", None) or {}), REPOSITORY_LABEL_TAG: REPOSITORY_LABEL}
        result = defs.get_job_def(job_name).execute_in_process(
            instance=self.instance, raise_on_error=False, run_config=run_config, tags=tags, **kwargs
        )
        self.log.runs[job_name] += 1
        if not result.success:
            self.log.failed_runs.append(f"{job_name} {kwargs.get('partition_key') or ''} {result.run_id}")
        return result

    def hourly(self, hour: int) -> None:
        when = DAY + timedelta(hours=hour)
        result = self.run(
            self.defs_at(when), "digest_hourly_job", partition_key=when.strftime("%Y-%m-%d-%H:%M")
        )
        gen = _output_metadata(result, "summarize_digest_batches", "generated")
        send = _output_metadata(result, "summarize_digest_batches", "sent")
        counts = self.log.hours[hour]
        counts["created"] += int(gen.get("rows_created", 0) or 0)
        counts["due"] += int(send.get("due", 0) or 0)
        counts["sent"] += int(send.get("sent", 0) or 0)
        counts["failed"] += int(send.get("failed", 0) or 0)
        counts["skipped"] += sum((send.get("skipped_by_reason") or {}).values())
        self.log.not_created["already_generated"] += int(gen.get("already_generated", 0) or 0)
        self.log.not_created.update(gen.get("not_needed_by_reason") or {})
        self.log.not_sent.update(send.get("not_due_by_reason") or {})
        self.log.not_sent.update(send.get("skipped_by_reason") or {})

    def tick(self, sensor_name: str, when: datetime, hour: int) -> None:
        defs = self.defs_at(when)
        sensor = defs.get_sensor_def(sensor_name)
        with dg.build_sensor_context(
            instance=self.instance, resources=defs.resources, cursor=self.cursors.get(sensor_name)
        ) as context:
            data = sensor.evaluate_tick(context)
        self.cursors[sensor_name] = data.cursor if data.cursor is not None else self.cursors.get(sensor_name)
        for request in data.run_requests or []:
            self._launch(defs, sensor_name, str(request.job_name or sensor.job_name), request, hour)

    def _launch(
        self, defs: dg.Definitions, sensor_name: str, job: str, request: dg.RunRequest, hour: int
    ) -> None:
        """Run what a sensor asked for, once per run key, as the daemon would."""
        run_key = request.run_key or ""
        if run_key and self.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": run_key})):
            return  # Dagster launches a run key once; so does the simulation
        tags = {**(request.tags or {}), "dagster/run_key": run_key, "dagster/sensor_name": sensor_name}
        result = self.run(defs, job, run_config=request.run_config, tags=tags)
        if sensor_name == "first_digest_sensor":
            sent = _output_metadata(result, "send_digest_for_user").get("sent", 0)
            self.log.hours[hour]["first"] += int(sent or 0)

    def discovery(self, when: datetime) -> None:
        config = {"ops": {"upgrade_sequence_discover": {"config": {"entered_at": when.isoformat()}}}}
        self.run(self.defs_at(when), "upgrade_sequence_discover_job", run_config=config)

    def notion_sync(self, when: datetime) -> None:
        result = self.run(self.defs_at(when), "notion_sync_weekly_job")
        self.log.notion = _output_metadata(result, "notion_sync_summary")

    def day(self) -> None:
        for hour in range(24):
            start = DAY + timedelta(hours=hour)
            if hour == 3:
                self.notion_sync(start)
            self.hourly(hour)
            for minute in SENSOR_MINUTES:
                if minute == 35:
                    self.discovery(start + timedelta(minutes=15))
                for sensor in ("first_digest_sensor", "email_sequence_sensor"):
                    self.tick(sensor, start + timedelta(minutes=minute), hour)


def _notion_accounts(engine: sa.Engine) -> list[NotionAccount]:
    """Rebuild the Notion accounts of an existing demo database (the fake starts empty every time)."""
    query = (
        sa.select(t.account.c.user_id, t.account.c.access_token, t.integration_scope_items.c.scope_value)
        .join(
            t.integration_connections,
            t.integration_connections.c.account_external_id == t.account.c.account_id,
        )
        .join(
            t.integration_scope_items,
            t.integration_scope_items.c.connection_id == t.integration_connections.c.id,
        )
        .where(t.account.c.provider_id == "notion")
        .order_by(t.account.c.user_id)
    )
    with engine.connect() as conn:
        return [NotionAccount(u, tok, db) for u, tok, db in conn.execute(query).all()]


def sequence_summary(engine: sa.Engine) -> dict[str, Counter[str]]:
    """Per sequence, what the simulated day did: steps sent, states ended (by how), upgrade enrolments."""
    day_end = DAY + timedelta(days=1)
    out: dict[str, Counter[str]] = defaultdict(Counter)
    with engine.connect() as conn:
        for name, count in _sends_per_sequence(conn, day_end):
            out[str(name)]["steps sent"] += count
        for name, status, reason, count in _ends_per_sequence(conn, day_end):
            label = f"exited ({reason})" if status == "exited" else str(status)
            out[str(name)][label] += count
        enrolled = _upgrade_enrolments(conn, day_end)
    if enrolled:
        out["upgrade"]["enrolled today"] += enrolled
    return out


def _sends_per_sequence(conn: sa.Connection, day_end: datetime) -> Sequence[Any]:
    sends = t.email_sends.c
    return conn.execute(
        sa.select(sends.sequence_name, sa.func.count())
        .where(sends.sent_at >= DAY, sends.sent_at < day_end)
        .group_by(sends.sequence_name)
    ).all()


def _ends_per_sequence(conn: sa.Connection, day_end: datetime) -> Sequence[Any]:
    states = t.email_sequence_states.c
    return conn.execute(
        sa.select(states.sequence_name, states.status, states.exit_reason, sa.func.count())
        .where(states.completed_at >= DAY, states.completed_at < day_end)
        .group_by(states.sequence_name, states.status, states.exit_reason)
    ).all()


def _upgrade_enrolments(conn: sa.Connection, day_end: datetime) -> int:
    states = t.email_sequence_states.c
    return conn.execute(
        sa.select(sa.func.count())
        .select_from(t.email_sequence_states)
        .where(states.sequence_name == "upgrade", states.entered_at >= DAY, states.entered_at < day_end)
    ).scalar_one()


def render_table(
    log: DayLog, sequences: dict[str, Counter[str]], outbox: Path, emails: int, seconds: float
) -> str:
    lines = [
        f"Simulated day {DAY.date()} (UTC): this invocation's runs (per run, not cumulative)",
        "",
        "hour  created  due  sent  first  skipped  failed",
    ]
    for hour in range(24):
        c = log.hours[hour]
        lines.append(
            f"{hour:02d}:00 {c['created']:8d} {c['due']:4d} {c['sent']:5d} {c['first']:6d} "
            f"{c['skipped']:8d} {c['failed']:7d}"
        )
    total = Counter[str]()
    for c in log.hours.values():
        total.update(c)
    lines.append(
        f"total {total['created']:8d} {total['due']:4d} {total['sent']:5d} {total['first']:6d} "
        f"{total['skipped']:8d} {total['failed']:7d}"
    )
    lines += [
        "",
        "no digest created (user-hours): " + _reasons(log.not_created),
        "not sent (user-hours):          " + _reasons(log.not_sent),
    ]
    lines += ["", "sequence     what (the database's record of the day: cumulative over invocations)"]
    for name in ("welcome", "onboarding", "upgrade"):
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(sequences.get(name, Counter()).items())) or "nothing"
        lines.append(f"{name:12s} {parts}")
    if log.notion:
        keys = ("connections_synced", "connections_failed", "documents_accepted", "pages_visited")
        lines += ["", "notion sync  " + ", ".join(f"{k}: {log.notion[k]}" for k in keys if k in log.notion)]
    lines += ["", f"runs: {dict(sorted(log.runs.items()))}"]
    if log.failed_runs:
        lines.append(f"failed runs: {log.failed_runs}")
    lines.append(f"{emails} emails written to {outbox}/ in {seconds:.1f} s")
    return "\n".join(lines)


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "none"


def run_demo(
    *, workdir: str | Path, outbox: str | Path, quiet: bool = False, dagster_home: str | Path | None = None
) -> int:
    started = time.monotonic()
    warnings.filterwarnings("ignore", category=UserWarning, module="dagster")
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    workdir, outbox = Path(workdir), Path(outbox)
    workdir.mkdir(parents=True, exist_ok=True)
    outbox.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "dbb.sqlite"
    fresh = not db_path.exists()
    db_url = f"sqlite:///{db_path.resolve()}"
    engine = create_db_engine(db_url)
    if fresh:
        create_schema(engine)
        with engine.begin() as conn:
            seed_world(conn, ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY": DEMO_KEY}))
    accounts = _notion_accounts(engine)
    before = len(list(outbox.glob("*.eml")))
    clock = SimulatedClock(DAY)
    with FakeResend(outbox_dir=outbox, clock=clock) as resend_fake, FakeNotion() as notion_fake:
        seed_notion(notion_fake, accounts)
        env = {
            **demo_env(db_url),
            "RESEND_API_URL": resend_fake.base_url,
            "NOTION_API_URL": notion_fake.base_url,
        }
        log = DayLog()
        home = Path(dagster_home) if dagster_home is not None else workdir / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        with dg.DagsterInstance.from_config(str(home.resolve())) as instance:
            Simulation(env, instance, log, clock).day()
        emails = len(resend_fake.sent)
        resend_fake.raise_server_errors()
        notion_fake.raise_server_errors()
    table = render_table(log, sequence_summary(engine), outbox, emails, time.monotonic() - started)
    engine.dispose()
    if not quiet:
        print(table)
        if not fresh:
            print(f"(reran on the existing {db_path}: {len(list(outbox.glob('*.eml'))) - before} new emails)")
    return 1 if log.failed_runs else 0
