"""Automation runs after a deploy with no hand steps, and DBB_AUTOMATION=off pauses all of it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from dbb_orchestration.automation import automation_skip_reason
from dbb_orchestration.config import Settings, SettingsError
from dbb_orchestration.definitions import build_resources, make_definitions

TICK = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
SCHEDULES = ("digest_hourly_schedule", "upgrade_sequence_discover_schedule", "notion_sync_weekly_schedule")
WORKFLOW_SENSORS = ("first_digest_sensor", "email_sequence_sensor")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.mark.parametrize("value", [None, "", "on", "ON", "true", "1", "yes"])
def test_automation_is_on_unless_switched_off(value: str | None) -> None:
    env = {} if value is None else {"DBB_AUTOMATION": value}
    assert automation_skip_reason(env) is None


@pytest.mark.parametrize("value", ["off", "Off", "false", "0", "no"])
def test_off_pauses_with_a_reason_that_says_how_to_resume(value: str) -> None:
    reason = automation_skip_reason({"DBB_AUTOMATION": value})
    assert reason is not None and "DBB_AUTOMATION=off" in reason and "resume" in reason


def test_a_misspelt_switch_pauses_too_and_names_the_variable() -> None:
    reason = automation_skip_reason({"DBB_AUTOMATION": "of"})
    assert reason is not None and "DBB_AUTOMATION" in reason and "'of'" in reason
    with pytest.raises(SettingsError, match="DBB_AUTOMATION"):
        Settings.from_env({"DATABASE_URL": "sqlite:///x.sqlite", "DBB_AUTOMATION": "of"})


def test_settings_carry_the_switch() -> None:
    assert Settings.from_env({"DATABASE_URL": "sqlite:///x.sqlite"}).automation_enabled is True
    off = Settings.from_env({"DATABASE_URL": "sqlite:///x.sqlite", "DBB_AUTOMATION": "off"})
    assert off.automation_enabled is False


def test_every_schedule_and_sensor_starts_running() -> None:
    defs = make_definitions({})
    repo = defs.get_repository_def()
    schedules = {s.name: s.default_status for s in repo.schedule_defs}
    sensors = {s.name: s.default_status for s in repo.sensor_defs}
    assert set(schedules) == set(SCHEDULES)
    assert set(sensors) == {*WORKFLOW_SENSORS, "run_failure_alert_sensor"}
    assert set(schedules.values()) == {dg.DefaultScheduleStatus.RUNNING}
    assert set(sensors.values()) == {dg.DefaultSensorStatus.RUNNING}


@pytest.mark.parametrize("name", SCHEDULES)
def test_switch_off_skips_every_schedule(
    name: str, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_definitions({}).get_repository_def()
    schedule = repo.get_schedule_def(name)
    monkeypatch.setenv("DBB_AUTOMATION", "off")
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK, repository_def=repo)
    data = schedule.evaluate_tick(context)
    assert not data.run_requests
    assert data.skip_message is not None and "DBB_AUTOMATION=off" in data.skip_message


@pytest.mark.parametrize("name", SCHEDULES)
def test_switch_on_leaves_every_schedule_requesting_its_run(
    name: str, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_definitions({}).get_repository_def()
    schedule = repo.get_schedule_def(name)
    monkeypatch.delenv("DBB_AUTOMATION", raising=False)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK, repository_def=repo)
    (request,) = schedule.evaluate_tick(context).run_requests or []
    assert request.job_name in (None, schedule.job_name)
    if name == "digest_hourly_schedule":
        assert request.partition_key == "2026-02-08-08:00"
        assert request.tags["dagster/schedule_name"] == name


@pytest.mark.parametrize("name", WORKFLOW_SENSORS)
def test_switch_off_skips_every_workflow_sensor_before_touching_the_database(
    name: str, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The database file does not exist: a sensor that reached it would fail, not skip.
    missing = tmp_path / "absent" / "dbb.sqlite"
    defs = make_definitions({})
    sensor = defs.get_repository_def().get_sensor_def(name)
    monkeypatch.setenv("DBB_AUTOMATION", "off")
    resources = build_resources({"DATABASE_URL": f"sqlite:///{missing}"})
    with dg.build_sensor_context(instance=instance, resources=resources, cursor="kept") as context:
        data = sensor.evaluate_tick(context)
    assert not data.run_requests
    assert data.skip_message is not None and "DBB_AUTOMATION=off" in data.skip_message
    assert data.cursor in (None, "kept")  # the sensor resumes where it was once switched back on
