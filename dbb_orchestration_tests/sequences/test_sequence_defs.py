"""Dagster wiring: the step job, the sensor (with real failed runs and retries) and upgrade discovery."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.definitions import build_resources, make_definitions
from dbb_orchestration.sequences.defs import (
    SELF_HOSTED_SKIP,
    email_sequence_sensor,
    email_sequence_step_job,
    parse_entered_at,
    upgrade_sequence_discover_job,
    upgrade_sequence_discover_schedule,
)
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.sequences.conftest import NOW


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def overrides(url: str, now: datetime, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": url,
        "DBB_NOW": now.isoformat(),
        "FRONTEND_URL": "https://app.example.test",
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        # a key, so the sensor launches; a port nothing listens on, so nothing could be sent by accident
        "RESEND_API_KEY": "re_test",
        "RESEND_API_URL": "http://127.0.0.1:9",
        **extra,
    }


def tick(instance: dg.DagsterInstance, cursor: str | None, env: dict[str, str]) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=build_resources(env)) as context:
        result = email_sequence_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def launch(
    instance: dg.DagsterInstance, request: dg.RunRequest, env: dict[str, str]
) -> dg.ExecuteInProcessResult:
    """What the daemon does with a run request: a run of the job with its config, tags and run key."""
    return email_sequence_step_job.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        resources=build_resources(env),
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
        raise_on_error=False,
    )


def state(url: str, state_id: int) -> Any:
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(t.email_sequence_states).where(t.email_sequence_states.c.id == state_id)
        ).one()
    engine.dispose()
    return row


def seed(url: str, fn: Any) -> Any:
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        value = fn(conn)
    engine.dispose()
    return value


def steps_of(request: dg.RunRequest) -> list[dict[str, Any]]:
    return list(request.run_config["ops"]["email_sequence_plan"]["config"]["steps"])


def run_config(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"ops": {"email_sequence_plan": {"config": {"steps": list(steps)}}}}


def test_definitions() -> None:
    defs = make_definitions({"DATABASE_URL": "sqlite://"})
    job = defs.resolve_job_def("email_sequence_step_job")
    assert job.tags == {"dbb/job": "sequence_step", "dagster/max_retries": "0", "dagster/priority": "-1"}
    assert job.executor_def is dg.in_process_executor
    ops = {node.name: node for node in job.graph.node_defs}
    assert set(ops) == {"email_sequence_plan", "email_sequence_step"}
    assert ops["email_sequence_step"].pool == "sequence_email"  # type: ignore[attr-defined]
    assert ops["email_sequence_plan"].pool is None  # type: ignore[attr-defined]
    sensor = defs.resolve_sensor_def("email_sequence_sensor")
    assert sensor.minimum_interval_seconds == 60
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.job_name == "email_sequence_step_job"
    schedule = defs.resolve_schedule_def("upgrade_sequence_discover_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("15 * * * *", "UTC")
    assert schedule.job_name == "upgrade_sequence_discover_job"
    assert defs.resolve_job_def("upgrade_sequence_discover_job").executor_def is dg.in_process_executor


def test_sensor_launches_the_due_steps_in_one_run(app_url: str, instance: dg.DagsterInstance) -> None:
    def rows(conn: sa.Connection) -> list[int]:
        ids = []
        for uid in ("a", "b", "c"):
            f.user(conn, uid)
        ids.append(f.sequence_state(conn, "a", "welcome", entered_at=NOW - timedelta(hours=1)))
        ids.append(f.sequence_state(conn, "b", "upgrade", current_step=2, entered_at=NOW - timedelta(days=3)))
        f.sequence_state(conn, "c", "welcome", entered_at=NOW - timedelta(minutes=50))  # not yet
        f.sequence_state(conn, "c", "onboarding", entered_at=NOW - timedelta(days=9))  # blocked
        return ids

    welcome_id, upgrade_id = seed(app_url, rows)
    result = tick(instance, None, overrides(app_url, NOW))

    [request] = result.run_requests or []
    assert request.run_key is not None and request.run_key.startswith("sequence-steps-2-")
    assert steps_of(request) == [
        {"state_id": upgrade_id, "sequence_name": "upgrade", "user_id": "b", "step": 2},  # older anchor
        {"state_id": welcome_id, "sequence_name": "welcome", "user_id": "a", "step": 1},
    ]
    assert request.tags == {"dbb/sequences": "upgrade,welcome", "dbb/steps": "2", "dbb/retried_steps": "0"}

    again = tick(instance, result.cursor, overrides(app_url, NOW + timedelta(minutes=1)))
    assert not again.run_requests
    assert again.skip_reason is not None
    assert again.skip_reason.skip_message == (
        "no sequence step to launch: 2 due, 0 launched in 0 runs (0 retries), 0 capped (max per tick), "
        "2 waiting to retry, 0 still running, 0 out of attempts, "
        "1 blocked (onboarding without a first digest), 0 unverified email"
    )


def test_sensor_groups_steps_per_run_and_caps_per_tick(app_url: str, instance: dg.DagsterInstance) -> None:
    def rows(conn: sa.Connection) -> None:
        for n in range(5):
            f.user(conn, f"u{n}")
            f.sequence_state(conn, f"u{n}", "upgrade", entered_at=NOW)

    seed(app_url, rows)
    grouped = tick(instance, None, overrides(app_url, NOW, SEQUENCE_STEPS_PER_RUN="2"))
    assert [len(steps_of(r)) for r in grouped.run_requests or []] == [2, 2, 1]

    env = overrides(app_url, NOW, SEQUENCE_MAX_REQUESTS_PER_TICK="2")
    first = tick(instance, None, env)
    second = tick(instance, first.cursor, env)
    third = tick(instance, second.cursor, env)
    per_tick = [
        [s["user_id"] for r in res.run_requests or [] for s in steps_of(r)] for res in (first, second, third)
    ]
    assert [len(users) for users in per_tick] == [2, 2, 1]
    assert len({u for users in per_tick for u in users}) == 5


def test_self_hosted_sensor_says_so(app_url: str, instance: dg.DagsterInstance) -> None:
    seed(app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW)))
    result = tick(instance, "previous", overrides(app_url, NOW, DEPLOYMENT_MODE="self-hosted"))
    assert not result.run_requests
    assert result.skip_reason is not None and result.skip_reason.skip_message == SELF_HOSTED_SKIP
    assert result.cursor == "previous"


def test_without_an_api_key_the_sensor_launches_nothing_and_says_why(
    app_url: str, instance: dg.DagsterInstance
) -> None:
    seed(app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW)))
    result = tick(instance, "previous", overrides(app_url, NOW, RESEND_API_KEY=""))
    assert not result.run_requests
    assert result.skip_reason is not None and "RESEND_API_KEY" in (result.skip_reason.skip_message or "")
    assert result.cursor == "previous"
    dry = tick(instance, None, overrides(app_url, NOW, RESEND_API_KEY="", SEQUENCE_EMAIL_DRY_RUN="true"))
    assert len(dry.run_requests or []) == 1


def test_a_run_sends_each_step_as_its_own_dynamic_step(
    app_url: str, instance: dg.DagsterInstance, fake_resend: FakeResend
) -> None:
    def rows(conn: sa.Connection) -> list[int]:
        f.user(conn, "a", name="Ada")
        f.user(conn, "b", name="Bob")
        return [
            f.sequence_state(conn, "a", "welcome", entered_at=NOW - timedelta(days=1)),
            f.sequence_state(conn, "b", "upgrade", entered_at=NOW),
        ]

    a_id, b_id = seed(app_url, rows)
    env = overrides(app_url, NOW, RESEND_API_KEY="re_test", RESEND_API_URL=fake_resend.base_url)
    [request] = tick(instance, None, env).run_requests or []
    run = launch(instance, request, env)

    assert run.success
    tags = run.dagster_run.tags
    assert (tags["dbb/job"], tags["dagster/max_retries"], tags["dagster/priority"]) == (
        "sequence_step",
        "0",
        "-1",
    )
    assert run.output_for_node("email_sequence_step") == {
        "sequence_welcome_a_1": "sent",
        "sequence_upgrade_b_1": "sent",
    }
    assert "Welcome to Daily Brain Bits, Ada" in {d.subject for d in fake_resend.sent}
    assert sorted(r.idempotency_key for r in fake_resend.requests) == [
        "sequence-upgrade-b-1",
        "sequence-welcome-a-1",
    ]
    assert (state(app_url, a_id).current_step, state(app_url, a_id).last_email_sent_at) == (2, NOW)
    assert state(app_url, b_id).current_step == 2
    outputs = [e for e in run.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = {
        e.step_key: e.event_specific_data.metadata  # type: ignore[union-attr]
        for e in outputs
        if e.step_key.startswith("email_sequence_step[")
    }
    welcome = metadata["email_sequence_step[sequence_welcome_a_1]"]
    assert welcome["outcome"].value == "sent" and welcome["state_id"].value == a_id
    assert welcome["email_id"].value == "welcome-1"
    logs = " ".join(str(e.message) for e in instance.all_logs(run.run_id))
    assert "a@example.test" not in logs and "Ada" not in logs


def test_dry_run_needs_no_api_key(app_url: str, instance: dg.DagsterInstance) -> None:
    state_id = seed(
        app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW))[1]
    )
    env = overrides(app_url, NOW, RESEND_API_KEY="", SEQUENCE_EMAIL_DRY_RUN="true")
    [request] = tick(instance, None, env).run_requests or []
    assert launch(instance, request, env).success
    engine = create_db_engine(app_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        [row] = conn.execute(sa.select(t.email_sends.c.provider, t.email_sends.c.resend_id)).all()
    engine.dispose()
    assert tuple(row) == ("dry-run", "dry-run-sequence-upgrade-a-1")
    assert state(app_url, state_id).current_step == 2


def test_self_hosted_step_job_does_nothing_without_needing_a_key(
    app_url: str, instance: dg.DagsterInstance
) -> None:
    state_id = seed(
        app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW))[1]
    )
    config = run_config({"state_id": state_id, "sequence_name": "upgrade", "user_id": "a", "step": 1})
    run = email_sequence_step_job.execute_in_process(
        run_config=config,
        instance=instance,
        resources=build_resources(overrides(app_url, NOW, DEPLOYMENT_MODE="self-hosted")),
    )
    assert run.output_for_node("email_sequence_step") == {"sequence_upgrade_a_1": "disabled"}
    assert state(app_url, state_id).current_step == 1


def test_missing_api_key_fails_before_any_work(
    app_url: str, instance: dg.DagsterInstance, fake_resend: FakeResend
) -> None:
    state_id = seed(
        app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW))[1]
    )
    config = run_config({"state_id": state_id, "sequence_name": "upgrade", "user_id": "a", "step": 1})
    run = email_sequence_step_job.execute_in_process(
        run_config=config,
        instance=instance,
        resources=build_resources(
            overrides(app_url, NOW, RESEND_API_KEY="", RESEND_API_URL=fake_resend.base_url)
        ),
        raise_on_error=False,
    )
    assert not run.success
    [failure] = run.get_step_failure_events()
    assert failure.step_key == "email_sequence_plan"  # no step was fanned out
    error = failure.step_failure_data.error
    assert error is not None and "RESEND_API_KEY" in str(error.message) + str(
        error.cause and error.cause.message
    )
    assert not [e for e in run.all_events if e.step_key and e.step_key.startswith("email_sequence_step[")]
    assert fake_resend.requests == []
    assert state(app_url, state_id).current_step == 1


def test_a_failing_step_is_retried_with_back_off_from_its_failure_then_given_up(
    app_url: str, instance: dg.DagsterInstance, fake_resend: FakeResend
) -> None:
    """Real failed runs: the step is relaunched (same provider key, new run) only once the back-off has
    passed since the tick that saw its run fail, and stops after SEQUENCE_MAX_ATTEMPTS."""
    state_id = seed(
        app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW))[1]
    )
    fake_resend.fail_next(422, count=100, name="validation_error", message="Invalid `to` field")
    base = overrides(
        app_url, NOW, RESEND_API_KEY="re_test", RESEND_API_URL=fake_resend.base_url, SEQUENCE_MAX_ATTEMPTS="3"
    )

    def at(minutes: int) -> dict[str, str]:
        return {**base, "DBB_NOW": (NOW + timedelta(minutes=minutes)).isoformat()}

    cursor: str | None = None
    launched: list[tuple[int, int]] = []
    run_keys: list[str] = []
    for minutes in (0, 1, 10, 11, 12, 40, 41, 42, 1000):
        result = tick(instance, cursor, at(minutes))
        cursor = result.cursor
        for request in result.run_requests or []:
            launched.append((minutes, int(request.tags["dbb/retried_steps"])))
            run_keys.append(request.run_key or "")
            run = launch(instance, request, at(minutes))
            assert not run.success
            assert state(app_url, state_id).current_step == 1  # unchanged on failure

    # failed at 0, seen at 1 → 10 min → 11; failed at 11, seen at 12 → 30 min → 42
    assert launched == [(0, 0), (11, 1), (42, 1)]
    assert len(set(run_keys)) == 3
    assert result.skip_reason is not None and "1 out of attempts" in (result.skip_reason.skip_message or "")
    failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    assert sorted(r.tags["dagster/run_key"] for r in failed) == sorted(run_keys)
    # every attempt asked the provider with the same idempotency key
    assert {r.idempotency_key for r in fake_resend.requests} == {"sequence-upgrade-a-1"}
    assert fake_resend.sent == []


def test_only_the_failed_step_of_a_run_is_retried(
    app_url: str, instance: dg.DagsterInstance, fake_resend: FakeResend
) -> None:
    def rows(conn: sa.Connection) -> list[int]:
        ids = []
        for uid in ("a", "b", "c"):
            f.user(conn, uid)
            ids.append(f.sequence_state(conn, uid, "upgrade", entered_at=NOW))
        return ids

    ids = seed(app_url, rows)
    fake_resend.fail_next(422, count=1, name="validation_error", message="Invalid `to` field")
    base = overrides(app_url, NOW, RESEND_API_KEY="re_test", RESEND_API_URL=fake_resend.base_url)
    launching = tick(instance, None, base)
    [first] = launching.run_requests or []
    run = launch(instance, first, base)
    assert not run.success  # one step failed: the run is failed, the other steps went out
    [failure] = run.get_step_failure_events()
    failed_user = failure.step_key.removeprefix("email_sequence_step[sequence_upgrade_").removesuffix("_1]")
    assert sorted(state(app_url, i).current_step for i in ids) == [1, 2, 2]
    assert len(fake_resend.sent) == 2

    def at(minutes: int) -> dict[str, str]:
        return {**base, "DBB_NOW": (NOW + timedelta(minutes=minutes)).isoformat()}

    seen = tick(instance, launching.cursor, at(1))  # sees the run ended
    assert not seen.run_requests
    assert "1 waiting to retry" in (seen.skip_reason and seen.skip_reason.skip_message or "")
    retry = tick(instance, seen.cursor, at(11))
    [request] = retry.run_requests or []
    assert [s["user_id"] for s in steps_of(request)] == [failed_user]
    assert request.tags["dbb/retried_steps"] == "1" and request.run_key != first.run_key
    assert launch(instance, request, at(11)).success
    assert [state(app_url, i).current_step for i in ids] == [2, 2, 2]
    assert len(fake_resend.sent) == 3


def test_a_running_run_is_not_relaunched(app_url: str, instance: dg.DagsterInstance) -> None:
    seed(app_url, lambda conn: (f.user(conn, "a"), f.sequence_state(conn, "a", "upgrade", entered_at=NOW)))
    env = overrides(app_url, NOW, SEQUENCE_EMAIL_DRY_RUN="true")
    first = tick(instance, None, env)
    [request] = first.run_requests or []
    instance.create_run_for_job(
        email_sequence_step_job,
        run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
        status=dg.DagsterRunStatus.STARTED,
    )
    later = tick(instance, first.cursor, {**env, "DBB_NOW": (NOW + timedelta(hours=3)).isoformat()})
    assert not later.run_requests
    assert later.skip_reason is not None and "1 still running" in (later.skip_reason.skip_message or "")


# --------------------------------------------------------------------------------------------- discovery


def test_schedule_passes_its_tick_time() -> None:
    tick_time = datetime(2026, 3, 10, 13, 15, tzinfo=UTC)
    context = dg.build_schedule_context(scheduled_execution_time=tick_time)
    request = upgrade_sequence_discover_schedule(context)
    assert isinstance(request, dg.RunRequest)
    assert request.run_config["ops"]["upgrade_sequence_discover"]["config"] == {
        "entered_at": "2026-03-10T13:15:00+00:00"
    }


def _engaged(conn: sa.Connection) -> None:
    for uid, sent in (("eng", 4), ("few", 3), ("pro", 6), ("has", 5)):
        f.user(conn, uid)
        for n in range(sent):
            f.digest(conn, uid, status="sent", sent_at=NOW - timedelta(days=n))
    f.digest(conn, "few", status="failed")
    f.subscription(conn, "pro", status="active")
    f.sequence_state(conn, "has", "upgrade", status="completed")


def test_discovery_job_enrols_engaged_free_users(app_url: str, instance: dg.DagsterInstance) -> None:
    seed(app_url, _engaged)
    tick_time = datetime(2026, 3, 10, 13, 15, tzinfo=UTC)
    config = {"ops": {"upgrade_sequence_discover": {"config": {"entered_at": tick_time.isoformat()}}}}
    env = overrides(app_url, NOW)

    run = upgrade_sequence_discover_job.execute_in_process(
        run_config=config, instance=instance, resources=build_resources(env)
    )
    again = upgrade_sequence_discover_job.execute_in_process(
        run_config=config, instance=instance, resources=build_resources(env)
    )

    assert run.output_for_node("upgrade_sequence_discover") == 1
    assert again.output_for_node("upgrade_sequence_discover") == 0
    engine = create_db_engine(app_url, poolclass=sa.pool.NullPool)
    s = t.email_sequence_states
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(s.c.user_id, s.c.current_step, s.c.status, s.c.entered_at)
            .where(s.c.sequence_name == "upgrade")
            .order_by(s.c.user_id)
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("eng", 1, "active", tick_time), ("has", 1, "completed", f.EPOCH)]


def test_discovery_without_a_time_uses_now_and_self_hosted_does_nothing(
    app_url: str, instance: dg.DagsterInstance
) -> None:
    seed(app_url, _engaged)
    hosted = upgrade_sequence_discover_job.execute_in_process(
        instance=instance, resources=build_resources(overrides(app_url, NOW, DEPLOYMENT_MODE="self-hosted"))
    )
    assert hosted.output_for_node("upgrade_sequence_discover") == 0
    cloud = upgrade_sequence_discover_job.execute_in_process(
        instance=instance, resources=build_resources(overrides(app_url, NOW))
    )
    assert cloud.output_for_node("upgrade_sequence_discover") == 1
    engine = create_db_engine(app_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        entered = conn.execute(
            sa.select(t.email_sequence_states.c.entered_at).where(t.email_sequence_states.c.user_id == "eng")
        ).scalar_one()
    engine.dispose()
    assert entered == NOW


def test_parse_entered_at() -> None:
    assert parse_entered_at(None) is None
    assert parse_entered_at("  ") is None
    assert parse_entered_at("2026-03-10T13:15:00Z") == datetime(2026, 3, 10, 13, 15, tzinfo=UTC)
    assert parse_entered_at("2026-03-10T14:15:00+01:00") == datetime(2026, 3, 10, 13, 15, tzinfo=UTC)
    with pytest.raises(ValueError, match="offset"):
        parse_entered_at("2026-03-10T13:15:00")
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_entered_at("yesterday")


def test_the_run_config_carries_a_sequence_step_field_for_field() -> None:
    import dataclasses

    from dbb_orchestration.sequences.defs import SequenceStepConfig
    from dbb_orchestration.sequences.steps import SequenceStep

    step = SequenceStep(state_id=7, user_id="u1", sequence_name="welcome", step=2)
    config = SequenceStepConfig(**dataclasses.asdict(step))
    assert SequenceStep(**config.model_dump()) == step
    assert set(SequenceStepConfig.model_fields) == {f.name for f in dataclasses.fields(SequenceStep)}
