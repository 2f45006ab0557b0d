"""One switch for every schedule and workflow sensor: ``DBB_AUTOMATION=off`` (maintenance).

Schedules and sensors start ``RUNNING`` after a deploy. Each one asks :func:`automation_skip_reason`
first, at evaluation time, and skips with the reason it returns, so setting ``DBB_AUTOMATION=off`` on the
code location (and restarting it) pauses all of them at once without touching their state in Dagster.
A value that is not on/off also pauses (a typo in a maintenance switch must not start sending).
``run_failure_alert_sensor`` does not ask: it only records failures, and pausing it would lose them.

To pause one workflow instead, stop its schedule or sensor (UI → Automation, or
``dagster schedule stop`` / ``dagster sensor stop``); see docs/operations.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import dagster as dg

from dbb_orchestration.config import AUTOMATION_VARIABLE, SettingsError, automation_enabled

__all__ = ["AUTOMATION_VARIABLE", "automation_skip_reason", "switchable"]


def automation_skip_reason(env: Mapping[str, str] | None = None) -> str | None:
    """``None`` when automation is on; otherwise the skip reason to show on the tick.

    ``env`` defaults to ``os.environ``; only ``DBB_AUTOMATION`` is read, so the switch works even when
    other settings are missing.
    """
    environment = os.environ if env is None else env
    try:
        enabled = automation_enabled(environment)
    except SettingsError as exc:
        return f"automation is paused: {exc} (use on or off)"
    if enabled:
        return None
    return f"automation is paused ({AUTOMATION_VARIABLE}=off): unset it or set it to on to resume"


def switchable(schedule: dg.ScheduleDefinition) -> dg.ScheduleDefinition:
    """The same schedule (name, cron, timezone, job, status, description), asking the switch first.

    For schedules that have no body of their own (``build_schedule_from_partitioned_job`` or a plain
    ``ScheduleDefinition``): when automation is on, the original schedule's tick is evaluated unchanged.
    """

    def evaluate(context: dg.ScheduleEvaluationContext) -> Iterator[dg.SkipReason | dg.RunRequest]:
        reason = automation_skip_reason()
        if reason is not None:
            yield dg.SkipReason(reason)
            return
        data = schedule.evaluate_tick(context)
        if not data.run_requests:
            yield dg.SkipReason(data.skip_message or "nothing to run")
            return
        yield from data.run_requests

    return dg.ScheduleDefinition(
        name=schedule.name,
        cron_schedule=schedule.cron_schedule,
        execution_timezone=schedule.execution_timezone,
        job=schedule.job,
        description=schedule.description,
        default_status=schedule.default_status,
        metadata=schedule.metadata,
        execution_fn=evaluate,
    )
