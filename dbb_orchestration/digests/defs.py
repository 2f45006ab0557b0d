"""Dagster wiring for digests: thin shells around ``generate.py`` and ``send.py``.

- ``digest_hourly_job``: hourly partitions in UTC (``2026-02-08-08:00`` is the run for 08:00 UTC and
  uses that instant as its logical time for every rule, so a backfilled hour behaves like the hour it
  stands for). Op ``plan_digest_batches`` splits the users into keyset ranges by id
  (``DIGEST_USERS_PER_STEP`` each, see ``batches.py``); op ``digest_batch[<range>]`` (pool
  ``digest_hourly``), one step per range, generates then sends for its users (overlapped page by page,
  see ``pipeline.py``); op
  ``summarize_digest_batches`` adds up the steps' counts (outputs ``generated`` and ``sent``). The
  executor comes from ``DIGEST_EXECUTOR`` (``multiprocess`` by default, whose run config also allows
  ``in_process`` and sets ``max_concurrent``; ``k8s`` runs each batch step in its own pod). Tag
  ``dbb/job=digest_hourly`` (``dagster.yaml`` allows one such run at a time).
- ``digest_hourly_schedule``: minute 0 of every hour, for the hour that starts then.
- ``first_digest_sensor`` (every 30 s) → ``digest_send_for_user_job`` (config ``user_id``, ``reason``;
  tag ``dbb/job=digest_send_for_user``): a user's first digest goes out right after their first sync.

Every batch step first checks the catch-up window: a partition whose hour ended more than
``DIGEST_CATCH_UP_HOURS`` before the location's clock creates and sends nothing (metadata
``outside_catch_up_window``; the plan then makes a single step). ``plan_digest_batches`` checks that
emails can be sent (``RESEND_API_KEY`` set, or dry run) before anything is written, so a missing key
fails the run with no rows written; the first-digest sensor skips with the same message.

Batch steps are safe to retry on their own, hence their ``RetryPolicy`` (and re-execution from failure
reruns only the failed ones): generation creates nothing for a user who already has a digest on the day,
and sending claims users, sends with the idempotency key ``note-digest-<id>`` and records only digests
still pending (see ``send.py``). Parallel steps share the ``digest_hourly`` pool (first-digest sends have their own,
``email_provider``, so they never queue behind an hourly run's batches) and the team-wide Postgres pacer
of ``EmailResource``, so the provider's rate limit holds across processes and pods.

Logs and metadata carry ids and counts only: never note text, email addresses or keys.
"""

# No ``from __future__ import annotations``: Dagster reads the Config/resource annotations at runtime.

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import dagster as dg
from pydantic import Field

from dbb_orchestration.automation import automation_skip_reason, switchable
from dbb_orchestration.config import SettingsError
from dbb_orchestration.digests.batches import (
    EventLogIOManager,
    RangeKeyIOManager,
    UserRange,
    add_counts,
    executor_kind,
    range_key,
    user_ranges,
)
from dbb_orchestration.digests.generate import GenerateReport, outside_catch_up_window
from dbb_orchestration.digests.pipeline import generate_and_send
from dbb_orchestration.digests.queries import find_first_digest_users
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.resources import DatabaseResource, EmailResource, SettingsResource

__all__ = [
    "DIGEST_PARTITIONS",
    "FIRST_DIGEST_REASON",
    "FIRST_DIGEST_SENSOR_LIMIT",
    "BATCH_OP",
    "PLAN_OP",
    "SEND_FOR_USER_OP",
    "SUMMARY_OP",
    "DigestSendForUserConfig",
    "definitions",
    "digest_hourly_job",
    "digest_hourly_schedule",
    "digest_send_for_user_job",
    "first_digest_run_key",
    "first_digest_sensor",
    "partition_start",
]

PLAN_OP = "plan_digest_batches"
BATCH_OP = "digest_batch"
SUMMARY_OP = "summarize_digest_batches"
RANGE_IO_MANAGER = "digest_user_range_io"
COUNTS_IO_MANAGER = "digest_batch_counts_io"
SEND_FOR_USER_OP = "send_digest_for_user"
FIRST_DIGEST_REASON = "seed_digest_ready"
# Provider lanes (Dagster pools): the hourly batch steps and first-digest sends never queue behind each
# other (nor behind sequence steps, pool "sequence_email"); the team-wide pacer shares the rate.
HOURLY_POOL = "digest_hourly"
FIRST_DIGEST_POOL = "email_provider"
FIRST_DIGEST_SENSOR_LIMIT = 200

# end_offset=1: the hour in progress is a partition too, so the schedule's 08:00 tick runs 08:00.
DIGEST_PARTITIONS = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00", timezone="UTC", end_offset=1)

_RETRY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)


def partition_start(context: dg.OpExecutionContext) -> datetime:
    """The logical time of an hourly run: the start of its partition's hour, aware UTC."""
    return context.partition_time_window.start.astimezone(UTC)


def _summary(report: SendReport) -> str:
    return (
        f"users={report.users_considered} due={report.due} sent={report.sent} failed={report.failed} "
        f"superseded={report.superseded} skipped={dict(report.skipped)} not_due={dict(report.not_due)} "
        f"issues={dict(report.data_issues)} dry_run={report.dry_run}"
    )


def _check_send(report: SendReport) -> None:
    """Fail the op (so operators see it, and the retry policy tries again) when every send failed."""
    if report.failed and not report.sent:
        raise dg.Failure(
            description=f"every digest send failed ({report.failed}): is the email provider down?",
            metadata=report.metadata(),
            allow_retries=True,
        )


def io_managers() -> dict[str, dg.ConfigurableIOManager]:
    """The hourly job's IO managers (``definitions.build_resources`` adds them to every location)."""
    return {RANGE_IO_MANAGER: RangeKeyIOManager(), COUNTS_IO_MANAGER: EventLogIOManager()}


# Modules the forkserver imports once per run worker; every batch step process is then forked from it
# with Dagster, SQLAlchemy, the SDKs and the definitions already imported (the code location's module).
FORKSERVER_PRELOAD = ("dbb_orchestration.definitions",)


def _forkserver_by_default(config: dict[str, Any]) -> dict[str, Any]:
    """The run config of ``multi_or_in_process_executor`` with ``start_method: forkserver`` (preloading
    :data:`FORKSERVER_PRELOAD`) when a multiprocess run names no start method; ``in_process`` and an
    explicit ``start_method`` (``spawn`` included) are kept as given."""
    multiprocess = config.get("multiprocess")
    if multiprocess is None or multiprocess.get("start_method"):
        return config
    forkserver = {"forkserver": {"preload_modules": list(FORKSERVER_PRELOAD)}}
    return {**config, "multiprocess": {**multiprocess, "start_method": forkserver}}


def multiprocess_executor() -> dg.ExecutorDefinition:
    """Dagster's ``multi_or_in_process_executor`` (same run config) whose step processes are forked from
    a forkserver by default instead of spawned: a spawned step re-imports Dagster and the definitions
    (~4 s each on the dev VM, see benchmarks/README.md), a forked one starts with them loaded. The
    forkserver starts with the run worker's environment, once per run worker process (each run has its
    own), so a step sees the same settings as its run."""
    base = dg.multi_or_in_process_executor
    return base.configured(_forkserver_by_default, config_schema=base.config_schema.as_field())


def _executor() -> dg.ExecutorDefinition:
    """The hourly job's executor, from ``DIGEST_EXECUTOR`` (see ``batches.executor_kind``)."""
    kind = executor_kind()
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor  # the deployment image installs the k8s extra

        return cast(dg.ExecutorDefinition, k8s_job_executor)
    return multiprocess_executor()


@dg.op(
    name=PLAN_OP,
    out=dg.DynamicOut(tuple, io_manager_key=RANGE_IO_MANAGER),
    description="Checks that emails can be sent, then splits the users into keyset ranges by id "
    "(DIGEST_USERS_PER_STEP each): one batch step per range.",
)
def plan_digest_batches(
    context: dg.OpExecutionContext,
    settings: SettingsResource,
    database: DatabaseResource,
    email: EmailResource,
) -> Iterator[dg.DynamicOutput[tuple[str | None, str | None]]]:
    s = settings.get()
    email.sender_for_op(dry_run=s.digest_email_dry_run)  # a missing RESEND_API_KEY fails before any row
    now = partition_start(context)
    if outside_catch_up_window(now, s.now(), s.digest_catch_up_hours):
        ranges: list[UserRange] = [(None, None)]  # one step, which reports the window and does nothing
    else:
        with database.engine.connect() as conn:
            ranges = user_ranges(conn, s.digest_users_per_step)
    context.log.info(f"digests for {now.isoformat()}: {len(ranges)} batch step(s)")
    for index, user_range in enumerate(ranges):
        yield dg.DynamicOutput(user_range, mapping_key=range_key(index, user_range))


@dg.op(
    name=BATCH_OP,
    ins={"user_range": dg.In(tuple, input_manager_key=RANGE_IO_MANAGER)},
    out={
        "generated": dg.Out(dict, io_manager_key=COUNTS_IO_MANAGER),
        "sent": dg.Out(dict, io_manager_key=COUNTS_IO_MANAGER),
    },
    pool=HOURLY_POOL,
    description="For one range of users: creates the digests needed at the partition's hour, then sends "
    "the newest pending digest of every user due then, exactly once.",
)
def digest_batch(
    context: dg.OpExecutionContext,
    user_range: tuple[str | None, str | None],
    settings: SettingsResource,
    database: DatabaseResource,
    email: EmailResource,
) -> Iterator[dg.Output[dict[str, Any]]]:
    s = settings.get()
    sender = email.sender_for_op(dry_run=s.digest_email_dry_run)
    now = partition_start(context)
    bounds = (user_range[0], user_range[1])
    if outside_catch_up_window(now, s.now(), s.digest_catch_up_hours):
        generated = GenerateReport(logical_time=now, outside_catch_up_window=True)
        context.log.info(f"digests for {now.isoformat()}: outside_catch_up_window: nothing created or sent")
        sent: dict[str, Any] = {
            "logical_time": now.isoformat(),
            "outside_catch_up_window": True,
            "catch_up_hours": s.digest_catch_up_hours,
            "sent": 0,
        }
    else:
        generated, report = generate_and_send(database.engine, sender, s, now, bounds, clock=s.now)
        context.log.info(f"digest generation for {now.isoformat()}: {generated.summary()}")
        context.log.info(f"digest sending for {now.isoformat()}: {_summary(report)}")
        _check_send(report)
        sent = {"outside_catch_up_window": False, **report.metadata()}
    yield dg.Output(generated.metadata(), "generated", metadata=generated.metadata())
    yield dg.Output(sent, "sent", metadata=sent)


@dg.op(
    name=SUMMARY_OP,
    out={"generated": dg.Out(int), "sent": dg.Out(int)},
    description="Adds up the batch steps' counts: digest rows created and digests sent in the run.",
)
def summarize_digest_batches(
    context: dg.OpExecutionContext, generated: list[dict[str, Any]], sent: list[dict[str, Any]]
) -> Iterator[dg.Output[int]]:
    gen_total = {**add_counts(generated), "batch_steps": len(generated)}
    send_total = {**add_counts(sent), "batch_steps": len(sent)}
    context.log.info(
        f"digests: {len(generated)} batch step(s), rows_created={gen_total.get('rows_created', 0)} "
        f"sent={send_total.get('sent', 0)}"
    )
    yield dg.Output(int(gen_total.get("rows_created", 0)), "generated", metadata=gen_total)
    yield dg.Output(int(send_total.get("sent", 0)), "sent", metadata=send_total)


@dg.job(
    name="digest_hourly_job",
    partitions_def=DIGEST_PARTITIONS,
    tags={"dbb/job": "digest_hourly"},
    executor_def=_executor(),
    op_retry_policy=_RETRY,  # every step is safe to retry on its own
    description="Hourly: users split into ranges by id, each range a step that generates the day's "
    "digests and sends the ones due in each user's send hour; a last step adds up the counts.",
)
def digest_hourly_job() -> None:
    generated, sent = plan_digest_batches().map(digest_batch)
    summarize_digest_batches(generated=generated.collect(), sent=sent.collect())


digest_hourly_schedule = cast(
    dg.ScheduleDefinition,  # a job (not asset) target: always a plain ScheduleDefinition
    dg.build_schedule_from_partitioned_job(
        digest_hourly_job,
        name="digest_hourly_schedule",
        minute_of_hour=0,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Minute 0 of every hour (UTC), for the hour that starts then.",
    ),
)
digest_hourly_schedule = switchable(digest_hourly_schedule)  # DBB_AUTOMATION=off pauses it


class DigestSendForUserConfig(dg.Config):
    user_id: str = Field(description="the user whose pending digest is sent now")
    reason: str = Field(default=FIRST_DIGEST_REASON, description="why the run was launched")


@dg.op(
    name=SEND_FOR_USER_OP,
    pool=FIRST_DIGEST_POOL,
    retry_policy=_RETRY,
    description="behaviour §6 for one user, the send hour bypassed when they have never been sent a digest.",
)
def send_digest_for_user(
    context: dg.OpExecutionContext,
    config: DigestSendForUserConfig,
    settings: SettingsResource,
    database: DatabaseResource,
    email: EmailResource,
) -> dg.Output[int]:
    s = settings.get()
    sender = email.sender_for_op(dry_run=s.digest_email_dry_run)  # a missing RESEND_API_KEY fails here
    report = send_due_digests(
        database.engine,
        sender,
        s,
        s.now(),
        clock=s.now,
        only_user_id=config.user_id,
        first_digest_bypass=True,
    )
    context.log.info(f"digest send for user {config.user_id} ({config.reason}): {_summary(report)}")
    _check_send(report)
    return dg.Output(report.sent, metadata={"user_id": config.user_id, **report.metadata()})


@dg.job(
    name="digest_send_for_user_job",
    tags={"dbb/job": "digest_send_for_user"},
    executor_def=dg.in_process_executor,
    description="Sends one user's pending digest now (launched by first_digest_sensor).",
)
def digest_send_for_user_job() -> None:
    send_digest_for_user()


def first_digest_run_key(user_id: str) -> str:
    return f"digest-send-{user_id}-{FIRST_DIGEST_REASON}"


@dg.sensor(
    name="first_digest_sensor",
    job=digest_send_for_user_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches digest_send_for_user_job for verified users with a pending digest who have "
    "never been sent one (run key digest-send-<userId>-seed_digest_ready).",
)
def first_digest_sensor(
    context: dg.SensorEvaluationContext, settings: SettingsResource, database: DatabaseResource
) -> dg.SensorResult:
    """At most :data:`FIRST_DIGEST_SENSOR_LIMIT` users per tick (newest pending digest first), one run
    each under the run key ``digest-send-<userId>-seed_digest_ready``.

    A pending digest is ``scheduled`` or ``failed``. A run key is used once for ever, so a first-digest
    run that fails is not launched again by this sensor. That is acceptable: the failed digest stays
    pending and the hourly job sends or retries it at the user's send hour like any digest.

    Without ``RESEND_API_KEY`` (and dry run off) the sensor launches nothing and its skip reason names
    the variable: every launched run would fail.
    """
    if (reason := automation_skip_reason()) is not None:
        return dg.SensorResult(skip_reason=reason)
    s = settings.get()
    try:
        s.require_resend(dry_run=s.digest_email_dry_run)
    except SettingsError as exc:
        return dg.SensorResult(skip_reason=f"digests cannot be sent: {exc}")
    with database.engine.connect() as conn:
        users = find_first_digest_users(conn, s.now(), FIRST_DIGEST_SENSOR_LIMIT)
    if not users:
        return dg.SensorResult(skip_reason="found 0 users with a pending first digest")
    context.log.info(f"found {len(users)} users with a pending first digest")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=first_digest_run_key(uid),
                run_config=dg.RunConfig(ops={SEND_FOR_USER_OP: DigestSendForUserConfig(user_id=uid)}),
                tags={"dbb/user_id": uid, "dbb/reason": FIRST_DIGEST_REASON},
            )
            for uid in users
        ]
    )


definitions = dg.Definitions(
    jobs=[digest_hourly_job, digest_send_for_user_job],
    schedules=[digest_hourly_schedule],
    sensors=[first_digest_sensor],
)
