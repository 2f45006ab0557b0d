"""Dagster wiring for digests: thin shells around ``generate.py`` and ``send.py``.

- ``digest_hourly_job``: hourly partitions in UTC (``2026-02-08-08:00`` is the run for 08:00 UTC and
  uses that instant as its logical time for every rule, so a backfilled hour behaves like the hour it
  stands for); op ``generate_digests`` then op ``send_digests`` (pool ``email_provider``). Tag
  ``dbb/job=digest_hourly`` (``dagster.yaml`` allows one such run at a time).
- ``digest_hourly_schedule``: minute 0 of every hour, for the hour that starts then.
- ``first_digest_sensor`` (every 30 s) → ``digest_send_for_user_job`` (config ``user_id``, ``reason``;
  tag ``dbb/job=digest_send_for_user``): a user's first digest goes out right after their first sync.

Both ops first check the catch-up window: a partition whose hour ended more than
``DIGEST_CATCH_UP_HOURS`` before the location's clock creates and sends nothing (metadata
``outside_catch_up_window``). ``generate_digests`` also checks that emails can be sent (``RESEND_API_KEY``
set, or dry run) before it writes anything, so a missing key fails the run with no rows written; the
first-digest sensor skips with the same message.

Both ops are safe to retry, hence their ``RetryPolicy``: generation creates nothing for a user who
already has a digest on the day, and sending claims digests with row locks, sends with the idempotency
key ``note-digest-<id>`` and records only digests still pending (see ``send.py``).

Logs and metadata carry ids and counts only: never note text, email addresses or keys.
"""

# No ``from __future__ import annotations``: Dagster reads the Config/resource annotations at runtime.

from datetime import UTC, datetime
from typing import cast

import dagster as dg
from pydantic import Field

from dbb_orchestration.automation import automation_skip_reason, switchable
from dbb_orchestration.config import SettingsError
from dbb_orchestration.digests.generate import generate_digests, outside_catch_up_window
from dbb_orchestration.digests.queries import find_first_digest_users
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.resources import DatabaseResource, EmailResource, SettingsResource

__all__ = [
    "DIGEST_PARTITIONS",
    "FIRST_DIGEST_REASON",
    "FIRST_DIGEST_SENSOR_LIMIT",
    "GENERATE_OP",
    "SEND_FOR_USER_OP",
    "SEND_OP",
    "DigestSendForUserConfig",
    "definitions",
    "digest_hourly_job",
    "digest_hourly_schedule",
    "digest_send_for_user_job",
    "first_digest_run_key",
    "first_digest_sensor",
    "partition_start",
]

GENERATE_OP = "generate_digests"
SEND_OP = "send_digests"
SEND_FOR_USER_OP = "send_digest_for_user"
FIRST_DIGEST_REASON = "seed_digest_ready"
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


@dg.op(
    name=GENERATE_OP,
    retry_policy=_RETRY,
    description="Creates the digests needed at the partition's hour: for users due then, and one a day "
    "for users never sent a digest (idempotent per user and local day).",
)
def generate_digests_op(
    context: dg.OpExecutionContext,
    settings: SettingsResource,
    database: DatabaseResource,
    email: EmailResource,
) -> dg.Output[int]:
    s = settings.get()
    email.sender_for_op(dry_run=s.digest_email_dry_run)  # a missing RESEND_API_KEY fails before any row
    now = partition_start(context)
    report = generate_digests(database.engine, now, s, clock=s.now)
    context.log.info(f"digest generation for {now.isoformat()}: {report.summary()}")
    return dg.Output(report.rows_created, metadata=report.metadata())


@dg.op(
    name=SEND_OP,
    ins={"generated": dg.In(dg.Nothing)},
    pool="email_provider",
    retry_policy=_RETRY,
    description="Sends the newest pending digest of every user due at the partition's hour, exactly once.",
)
def send_digests_op(
    context: dg.OpExecutionContext,
    settings: SettingsResource,
    database: DatabaseResource,
    email: EmailResource,
) -> dg.Output[int]:
    s = settings.get()
    sender = email.sender_for_op(dry_run=s.digest_email_dry_run)  # a missing RESEND_API_KEY fails here
    now = partition_start(context)
    if outside_catch_up_window(now, s.now(), s.digest_catch_up_hours):
        context.log.info(f"digest sending for {now.isoformat()}: outside_catch_up_window: nothing sent")
        return dg.Output(
            0,
            metadata={
                "logical_time": now.isoformat(),
                "outside_catch_up_window": True,
                "catch_up_hours": s.digest_catch_up_hours,
                "sent": 0,
            },
        )
    report = send_due_digests(database.engine, sender, s, now, clock=s.now)
    context.log.info(f"digest sending for {now.isoformat()}: {_summary(report)}")
    _check_send(report)
    return dg.Output(report.sent, metadata={"outside_catch_up_window": False, **report.metadata()})


@dg.job(
    name="digest_hourly_job",
    partitions_def=DIGEST_PARTITIONS,
    tags={"dbb/job": "digest_hourly"},
    executor_def=dg.in_process_executor,
    description="Hourly: generate the day's digests, then send the ones due in each user's send hour.",
)
def digest_hourly_job() -> None:
    send_digests_op(generated=generate_digests_op())


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
    pool="email_provider",
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
