"""Dagster wiring for email sequences: thin shells around ``process``, ``due`` and ``discover``.

- ``email_sequence_step_job`` (in-process executor, tags ``dbb/job=sequence_step``,
  ``dagster/max_retries=0``, ``dagster/priority=-1``): op ``email_sequence_plan`` fans the run's steps
  (config ``steps``: ``state_id``, ``sequence_name``, ``user_id``, ``step``) out as dynamic outputs keyed
  by their idempotency keys; op ``email_sequence_step`` (pool ``sequence_email``) processes one of them.
  One process start is shared by up to ``SEQUENCE_STEPS_PER_RUN`` steps.
- ``email_sequence_sensor`` (every 60 s, stopped by default): groups the due steps into runs, retries
  failed steps with back-off from their failure (see ``due.py`` and ``docs/sequences.md``).
- ``upgrade_sequence_discover_job`` + ``upgrade_sequence_discover_schedule`` (minute 15, UTC).

Logs and metadata carry ids and counts only, never addresses, names or email bodies.
"""

# No ``from __future__ import annotations``: Dagster reads the Config/resource annotations at runtime.

import dataclasses
from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from dbb_orchestration.automation import automation_skip_reason
from dbb_orchestration.config import SettingsError
from dbb_orchestration.redaction import scrub
from dbb_orchestration.resources import DatabaseResource, EmailResource, SettingsResource
from dbb_orchestration.sequences.discover import discover_upgrade_candidates
from dbb_orchestration.sequences.due import PlannedRun, describe_tick, evaluate_tick
from dbb_orchestration.sequences.process import StepConfigError, StepSendFailed, process_step
from dbb_orchestration.sequences.steps import SequenceStep

__all__ = [
    "DISCOVER_OP",
    "PLAN_OP",
    "SELF_HOSTED_SKIP",
    "SEQUENCE_POOL",
    "STEP_OP",
    "SequenceRunConfig",
    "SequenceStepConfig",
    "UpgradeDiscoverConfig",
    "definitions",
    "email_sequence_sensor",
    "email_sequence_step_job",
    "upgrade_sequence_discover_job",
    "upgrade_sequence_discover_schedule",
]

PLAN_OP = "email_sequence_plan"
STEP_OP = "email_sequence_step"
DISCOVER_OP = "upgrade_sequence_discover"
SEQUENCE_POOL = "sequence_email"
SELF_HOSTED_SKIP = "sequences are disabled in self-hosted mode"
RUN_KEY_TAG = "dagster/run_key"
_UNFINISHED = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)
_RUN_QUERY_CHUNK = 500


class SequenceStepConfig(dg.Config):
    """A :class:`~dbb_orchestration.sequences.steps.SequenceStep` in a run's config (the same fields; the
    sensor fills it)."""

    state_id: int = Field(description="email_sequence_states.id")
    sequence_name: str = Field(description="welcome, onboarding or upgrade")
    user_id: str = Field(description="the state's user id (checked against the row)")
    step: int = Field(description="the step to send; nothing happens if the state has moved on")


class SequenceRunConfig(dg.Config):
    """The steps one run processes, each as its own dynamic step."""

    steps: list[SequenceStepConfig] = Field(description="the due steps this run carries")


def _require_sender_settings(email: EmailResource, dry_run: bool) -> None:
    """A missing ``RESEND_API_KEY`` (dry run off) fails the op at once, naming the variable."""
    email.sender_for_op(dry_run=dry_run)


@dg.op(
    name=PLAN_OP,
    out=dg.DynamicOut(SequenceStep),
    description="Fans the run's due steps out, one dynamic step per idempotency key.",
)
def email_sequence_plan(
    context: dg.OpExecutionContext,
    config: SequenceRunConfig,
    settings: SettingsResource,
    email: EmailResource,
) -> Iterator[dg.DynamicOutput[SequenceStep]]:
    s = settings.get()
    if s.billing_enabled:
        _require_sender_settings(email, s.sequence_email_dry_run)  # before any step is fanned out
    seen: set[str] = set()
    for item in config.steps:
        ref = SequenceStep(**item.model_dump())
        key = ref.mapping_key
        if key in seen:  # the same step twice in one config: process it once
            continue
        seen.add(key)
        yield dg.DynamicOutput(ref, mapping_key=key)
    context.log.info(f"{len(seen)} sequence steps in this run")


@dg.op(
    name=STEP_OP,
    pool=SEQUENCE_POOL,
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL),
    description="Checks, exits or sends one sequence step exactly once, records email_sends and advances.",
)
def email_sequence_step(
    context: dg.OpExecutionContext,
    ref: SequenceStep,
    settings: SettingsResource,
    database: DatabaseResource,
    email: EmailResource,
) -> dg.Output[str]:
    s = settings.get()
    if not s.billing_enabled:
        context.log.info(f"sequence step state_id={ref.state_id}: {SELF_HOSTED_SKIP}")
        return dg.Output("disabled", metadata={"outcome": "disabled", "state_id": ref.state_id})
    sender = email.sender_for_op(dry_run=s.sequence_email_dry_run)  # a missing RESEND_API_KEY fails here
    try:
        result = process_step(
            database.engine,
            ref,
            sender=sender,
            now=s.now(),
            frontend_url=s.frontend_url,
            mode=s.deployment_mode,
            unsubscribe_secret=s.unsubscribe_secret,
        )
    except StepConfigError as exc:
        raise dg.Failure(description=scrub(str(exc)), allow_retries=False) from exc
    except StepSendFailed as exc:
        raise dg.Failure(
            description=scrub(str(exc)),
            metadata={
                "state_id": ref.state_id,
                "status": exc.error.status or 0,
                "error": exc.error.name or "-",
            },
            allow_retries=exc.error.retryable,
        ) from exc
    context.log.info(
        f"sequence step state_id={ref.state_id} {ref.sequence_name} step={ref.step}: {result.outcome.value} "
        f"(recorded={result.recorded}, advanced={result.advanced}, dry_run={s.sequence_email_dry_run})"
    )
    return dg.Output(result.outcome.value, metadata=result.metadata())


@dg.job(
    name="email_sequence_step_job",
    tags={
        "dbb/job": "sequence_step",
        # The sensor retries failed steps itself (with back-off); the run-retry daemon must not.
        "dagster/max_retries": "0",
        # Queued digest runs (priority 0) are dequeued before sequence runs.
        "dagster/priority": "-1",
    },
    executor_def=dg.in_process_executor,
    description="Due sequence steps, one dynamic step per idempotency key (launched by email_sequence_sensor).",
)
def email_sequence_step_job() -> None:
    email_sequence_plan().map(email_sequence_step)


def _unfinished(instance: dg.DagsterInstance, run_keys: Sequence[str]) -> Collection[str]:
    """Those of ``run_keys`` with a run still queued or running (one run-storage query per 500 keys)."""
    found: set[str] = set()
    for start in range(0, len(run_keys), _RUN_QUERY_CHUNK):
        chunk = list(run_keys[start : start + _RUN_QUERY_CHUNK])
        runs = instance.get_runs(
            filters=dg.RunsFilter(
                job_name=email_sequence_step_job.name, tags={RUN_KEY_TAG: chunk}, statuses=list(_UNFINISHED)
            )
        )
        found.update(run.tags[RUN_KEY_TAG] for run in runs if RUN_KEY_TAG in run.tags)
    return found


def _run_request(run: PlannedRun) -> dg.RunRequest:
    steps = [SequenceStepConfig(**dataclasses.asdict(launch.step)) for launch in run.launches]
    sequences = sorted({launch.step.sequence_name for launch in run.launches})
    return dg.RunRequest(
        run_key=run.run_key,
        run_config=dg.RunConfig(ops={PLAN_OP: SequenceRunConfig(steps=steps)}),
        tags={
            "dbb/sequences": ",".join(sequences),
            "dbb/steps": str(len(steps)),
            "dbb/retried_steps": str(sum(1 for launch in run.launches if launch.attempt > 1)),
        },
    )


@dg.sensor(
    name="email_sequence_sensor",
    job=email_sequence_step_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the due sequence steps, several per email_sequence_step_job run, each a "
    "dynamic step keyed by its idempotency key; failed steps are retried with back-off from the failure.",
)
def email_sequence_sensor(
    context: dg.SensorEvaluationContext, settings: SettingsResource, database: DatabaseResource
) -> dg.SensorResult:
    if (reason := automation_skip_reason()) is not None:
        return dg.SensorResult(skip_reason=reason, cursor=context.cursor)
    s = settings.get()
    if not s.billing_enabled:
        return dg.SensorResult(skip_reason=SELF_HOSTED_SKIP, cursor=context.cursor)
    try:
        s.require_resend(dry_run=s.sequence_email_dry_run)
    except SettingsError as exc:
        return dg.SensorResult(skip_reason=f"no sequence step launched: {exc}", cursor=context.cursor)
    tick = evaluate_tick(
        database.engine,
        context.cursor,
        now=s.now(),
        cap=s.sequence_max_requests_per_tick,
        max_attempts=s.sequence_max_attempts,
        per_run=s.sequence_steps_per_run,
        unfinished=lambda keys: _unfinished(context.instance, keys),
    )
    summary = describe_tick(tick.scan, tick.plan)
    if not tick.plan.runs:
        return dg.SensorResult(skip_reason=f"no sequence step to launch: {summary}", cursor=tick.cursor)
    context.log.info(summary)
    return dg.SensorResult(run_requests=[_run_request(run) for run in tick.plan.runs], cursor=tick.cursor)


class UpgradeDiscoverConfig(dg.Config):
    entered_at: str | None = Field(
        default=None,
        description="entered_at of the new rows, ISO-8601 with an offset (the schedule passes its tick "
        "time); empty → now",
    )


def parse_entered_at(raw: str | None) -> datetime | None:
    """``None``/blank → ``None``; ISO-8601 with an offset (``Z`` allowed) → aware UTC; anything else
    (including a time without an offset) → ``ValueError`` naming ``entered_at``."""
    if raw is None or not raw.strip():
        return None
    try:
        value = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"entered_at must be an ISO-8601 time with an offset, got {raw!r}") from None
    if value.tzinfo is None:
        raise ValueError(f"entered_at must include a UTC offset, got {raw!r}")
    return value.astimezone(UTC)


@dg.op(
    name=DISCOVER_OP,
    description="Enrols free users with at least 4 sent digests into the upgrade sequence (one statement).",
)
def upgrade_sequence_discover(
    context: dg.OpExecutionContext,
    config: UpgradeDiscoverConfig,
    settings: SettingsResource,
    database: DatabaseResource,
) -> dg.Output[int]:
    s = settings.get()
    try:
        entered_at = parse_entered_at(config.entered_at) or s.now()
    except ValueError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    result = discover_upgrade_candidates(database.engine, entered_at=entered_at, mode=s.deployment_mode)
    context.log.info(
        f"upgrade discovery: {result.inserted} enrolled"
        + (f" ({result.skipped_reason})" if result.skipped_reason else "")
    )
    return dg.Output(
        result.inserted,
        metadata={
            "inserted": result.inserted,
            "entered_at": entered_at.isoformat(),
            "skipped": result.skipped_reason or "-",
        },
    )


@dg.job(
    name="upgrade_sequence_discover_job",
    tags={"dbb/job": "upgrade_discover"},
    executor_def=dg.in_process_executor,
    description="Enrols engaged free users into the upgrade email sequence.",
)
def upgrade_sequence_discover_job() -> None:
    upgrade_sequence_discover()


@dg.schedule(
    name="upgrade_sequence_discover_schedule",
    cron_schedule="15 * * * *",
    execution_timezone="UTC",
    job=upgrade_sequence_discover_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly at minute 15 UTC; new rows get the tick's time as entered_at.",
)
def upgrade_sequence_discover_schedule(
    context: dg.ScheduleEvaluationContext,
) -> dg.RunRequest | dg.SkipReason:
    if (reason := automation_skip_reason()) is not None:
        return dg.SkipReason(reason)
    tick = context.scheduled_execution_time  # None only when evaluated by hand without a time
    entered_at = tick.astimezone(UTC).isoformat() if tick is not None else None
    return dg.RunRequest(
        run_config=dg.RunConfig(ops={DISCOVER_OP: UpgradeDiscoverConfig(entered_at=entered_at)})
    )


definitions = dg.Definitions(
    jobs=[email_sequence_step_job, upgrade_sequence_discover_job],
    sensors=[email_sequence_sensor],
    schedules=[upgrade_sequence_discover_schedule],
)
