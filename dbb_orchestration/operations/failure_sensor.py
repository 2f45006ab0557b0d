"""Failure alerting: every failed run of this code location is recorded and, with ``SENTRY_DSN``, sent to Sentry.

The record carries the job, partition, run id and a short error summary. Messages go through
:func:`dbb_orchestration.redaction.scrub` (addresses, keys, tokens) before they leave the process, and note text
never reaches an error message in this code base (errors carry ids and counts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dagster as dg

from dbb_orchestration.redaction import SUMMARY_LIMIT, scrub
from dbb_orchestration.resources import SettingsResource

__all__ = [
    "FAILURE_TAG",
    "SUMMARY_LIMIT",
    "FailureRecord",
    "failure_record",
    "run_failure_alert_sensor",
    "scrub",
]

FAILURE_TAG = "dbb/failure_summary"


@dataclass(frozen=True)
class FailureRecord:
    job: str
    run_id: str
    partition: str | None
    error: str
    failed_steps: tuple[str, ...]

    def as_tags(self) -> dict[str, str]:
        return {
            "job": self.job,
            "run_id": self.run_id,
            "partition": self.partition or "-",
        }


def failure_record(context: dg.RunFailureSensorContext) -> FailureRecord:
    run = context.dagster_run
    steps: list[str] = []
    messages: list[str] = []
    for event in context.get_step_failure_events():
        steps.append(event.step_key or "?")
        data: Any = event.event_specific_data
        err = getattr(data, "error", None)
        while err is not None and err.cause is not None:  # the user's exception, not Dagster's wrapper
            err = err.cause
        if err is not None:
            message = err.message.strip()
            if not message.startswith(f"{err.cls_name}:"):
                message = f"{err.cls_name}: {message}"
            messages.append(f"{event.step_key}: {message}")
    if not messages:
        messages.append(context.failure_event.message or "run failed")
    return FailureRecord(
        job=run.job_name,
        run_id=run.run_id,
        partition=run.tags.get("dagster/partition"),
        error=scrub(" | ".join(messages)),
        failed_steps=tuple(steps),
    )


def send_to_sentry(dsn: str, record: FailureRecord) -> None:
    """Capture one message per failed run. Imported lazily: sentry-sdk is an optional extra."""
    import sentry_sdk

    client = sentry_sdk.get_client()
    if not client.is_active() or client.dsn != dsn:
        sentry_sdk.init(dsn=dsn, default_integrations=False, send_default_pii=False, traces_sample_rate=0)
    with sentry_sdk.new_scope() as scope:
        for key, value in record.as_tags().items():
            scope.set_tag(key, value)
        scope.set_context("dagster_run", asdict(record))
        sentry_sdk.capture_message(f"Dagster run failed: {record.job}: {record.error}", level="error")
    sentry_sdk.flush(timeout=5)


@dg.run_failure_sensor(
    name="run_failure_alert_sensor",
    description="Records every failed run (job, partition, run id, error summary) and sends it to Sentry "
    "when SENTRY_DSN is set.",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, settings: SettingsResource) -> None:
    record = failure_record(context)
    context.instance.add_run_tags(record.run_id, {FAILURE_TAG: record.error[:255]})
    context.log.error(
        f"run failed: job={record.job} partition={record.partition or '-'} run_id={record.run_id} "
        f"steps={','.join(record.failed_steps) or '-'} error={record.error}"
    )
    dsn = settings.get().sentry_dsn
    if dsn:
        send_to_sentry(dsn, record)


definitions = dg.Definitions(sensors=[run_failure_alert_sensor])
