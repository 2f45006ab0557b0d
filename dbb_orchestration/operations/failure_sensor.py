"""Failure alerting: every failed run of this code location is recorded and, with ``SENTRY_DSN``, sent to Sentry.

The record carries the job, partition, run id and a short error summary saying why: for each failed
step, the message of the exception the op raised (not its innermost cause); for a run killed or marked
failed from outside (no failed step), run monitoring's verdict or the run's latest engine event that
names a cause (the worker's exit code or signal). Messages go through
:func:`dbb_orchestration.redaction.scrub` (addresses, keys, tokens) before they leave the process, and note text
never reaches an error message in this code base (errors carry ids and counts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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


OUTSIDE_FAILURE = "marked as failed from outside the execution context"
# Engine events that say why a run died without a step failure: the run worker's exit code or signal,
# run monitoring's verdict, a timeout, a termination.
_CAUSE_MARKERS = (
    "signal",
    "exited",
    "exit code",
    "run worker",
    "worker status",
    "timed out",
    "timeout",
    "maximum runtime",
    "terminat",
    "killed",
    "memory",
    "crash",
)
_ENGINE_EVENTS_READ = 50


def top_level_message(error: Any) -> str | None:
    """``Class: message`` of the error an op raised, skipping Dagster's own wrappers around it.

    The exception the op raised says what went wrong in its own words (e.g. "3 of 10 digests failed
    to send"); its causes (a socket error three levels down) are detail for the run's logs.
    """
    err = error
    while err is not None and err.cls_name.startswith("Dagster") and err.cause is not None:
        err = err.cause
    if err is None:
        return None
    lines = (err.message or "").strip().splitlines()
    # Dagster writes "module.path.Class: text" for exceptions outside builtins; keep "Class: text".
    text = re.sub(rf"^(?:\w+\.)*{re.escape(err.cls_name)}:\s*", "", lines[0] if lines else "")
    return f"{err.cls_name}: {text}" if text else err.cls_name


def outside_failure_cause(failure_message: str | None, engine_messages: Sequence[str]) -> str:
    """Why a run failed when no step failed: the failure event's own message when it says why (run
    monitoring writes its verdict there), else the latest engine event that names a cause (the run
    worker's exit code or signal), else the failure message as it is."""
    message = (failure_message or "").strip()
    if _says_why(message):
        return message
    for candidate in reversed(engine_messages):
        text = candidate.strip()
        if _names_a_cause(text):
            return f"{text} ({OUTSIDE_FAILURE})" if OUTSIDE_FAILURE in message else text
    return message or "run failed"


def _says_why(failure_message: str) -> bool:
    """Not Dagster's generic wording ("... outside of the process ..." / "Execution of run ... failed")."""
    return (
        bool(failure_message)
        and OUTSIDE_FAILURE not in failure_message
        and not (failure_message.startswith("Execution of run"))
    )


def _names_a_cause(engine_message: str) -> bool:
    lower = engine_message.lower()
    return any(marker in lower for marker in _CAUSE_MARKERS)


def _engine_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The run's latest engine-event messages, oldest first (bounded: a big run logs many)."""
    result = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, ascending=False, limit=_ENGINE_EVENTS_READ
    )
    messages = []
    for record in result.records:
        entry = record.event_log_entry
        text = entry.dagster_event.message if entry.dagster_event else None
        messages.append(text or entry.user_message or "")
    return list(reversed(messages))


def failure_record(context: dg.RunFailureSensorContext) -> FailureRecord:
    run = context.dagster_run
    steps: list[str] = []
    messages: list[str] = []
    for event in context.get_step_failure_events():
        steps.append(event.step_key or "?")
        data: Any = event.event_specific_data
        message = top_level_message(getattr(data, "error", None))
        if message:
            messages.append(f"{event.step_key}: {message}")
    if not messages:  # the run failed outside any step: its own error, or the cause in its event log
        run_data: Any = context.failure_event.event_specific_data
        run_error = top_level_message(getattr(run_data, "error", None))
        messages.append(
            run_error
            or outside_failure_cause(
                context.failure_event.message, _engine_messages(context.instance, run.run_id)
            )
        )
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
