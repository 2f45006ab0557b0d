"""Dagster wiring of digests: the hourly partitioned job, its schedule, the first-digest sensor and job."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import shared_engine
from dbb_orchestration.definitions import build_resources, make_definitions
from dbb_orchestration.digests.defs import (
    BATCH_OP,
    DIGEST_PARTITIONS,
    FIRST_DIGEST_SENSOR_LIMIT,
    PLAN_OP,
    SEND_FOR_USER_OP,
    SUMMARY_OP,
    _check_send,
    digest_hourly_job,
    digest_hourly_schedule,
    digest_send_for_user_job,
    first_digest_sensor,
)
from dbb_orchestration.digests.send import SendReport
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f

HOUR = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
WALL = datetime(2026, 2, 8, 9, 23, 5, tzinfo=UTC)  # the real clock, after the backfilled hour


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture
def app_url(db_url: str) -> Iterator[str]:
    yield db_url
    shared_engine(db_url).dispose()


def env(url: str, fake: FakeResend | None = None, **extra: str) -> dict[str, str]:
    values = {
        "DATABASE_URL": url,
        "DBB_NOW": WALL.isoformat(),
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        "FRONTEND_URL": "https://app.example.test",
    }
    if fake is not None:
        values.update({"RESEND_API_URL": fake.base_url, "RESEND_API_KEY": "re_test"})
    return {**values, **extra}


def seed(url: str, fn: Any) -> Any:
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        value = fn(conn)
    engine.dispose()
    return value


def query(url: str, stmt: Any) -> list[Any]:
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = list(conn.execute(stmt))
    engine.dispose()
    return rows


GENERATED = (SUMMARY_OP, "generated")
SENT = (SUMMARY_OP, "sent")


def user_with_notes(conn: sa.Connection, uid: str, *, hour: int = 8, verified: bool = True) -> list[int]:
    f.user(conn, uid, email_verified=verified)
    f.settings(conn, uid, preferred_send_hour=hour)
    conn_id = f.connection(conn, uid)
    return [f.document(conn, uid, conn_id, external_id=f"{uid}-{n}", markdown=f"n{n}") for n in range(3)]


def test_wiring_tags_pools_retries_and_partitions() -> None:
    assert digest_hourly_job.tags["dbb/job"] == "digest_hourly"
    assert digest_send_for_user_job.tags["dbb/job"] == "digest_send_for_user"
    batch = cast(dg.OpDefinition, digest_hourly_job.graph.node_named(BATCH_OP).definition)
    plan = cast(dg.OpDefinition, digest_hourly_job.graph.node_named(PLAN_OP).definition)
    for_user = cast(dg.OpDefinition, digest_send_for_user_job.graph.node_named(SEND_FOR_USER_OP).definition)
    # lanes: the hourly batches and first-digest sends never queue behind each other
    assert batch.pool == "digest_hourly" and for_user.pool == "email_provider"
    assert plan.pool is None
    assert digest_hourly_job.op_retry_policy is not None and batch.retry_policy is None  # job-wide policy
    # the batch steps map the plan's ranges; the summary collects both of their outputs
    deps = digest_hourly_job.graph.dependency_structure
    assert [h.node_name for h in deps.all_upstream_outputs_from_node(BATCH_OP)] == [PLAN_OP]
    assert {h.node_name for h in deps.all_upstream_outputs_from_node(SUMMARY_OP)} == {BATCH_OP}
    assert isinstance(DIGEST_PARTITIONS, dg.HourlyPartitionsDefinition)
    assert DIGEST_PARTITIONS.timezone == "UTC"
    window = DIGEST_PARTITIONS.time_window_for_partition_key("2026-02-08-08:00")
    assert window.start == HOUR
    names = {j.name for j in make_definitions({}).resolve_all_job_defs()}
    assert {"digest_hourly_job", "digest_send_for_user_job"} <= names


def test_schedule_runs_the_hour_that_starts_at_minute_zero(instance: dg.DagsterInstance) -> None:
    assert digest_hourly_schedule.cron_schedule == "0 * * * *"
    assert digest_hourly_schedule.execution_timezone == "UTC"
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=HOUR)
    (request,) = list(digest_hourly_schedule.evaluate_tick(context).run_requests or [])
    assert request.partition_key == "2026-02-08-08:00"


def test_a_backfilled_partition_behaves_like_its_hour(
    instance: dg.DagsterInstance, app_url: str, fake_resend: FakeResend
) -> None:
    seed(app_url, lambda c: (user_with_notes(c, "at8"), user_with_notes(c, "at9", hour=9)))
    result = digest_hourly_job.execute_in_process(
        partition_key="2026-02-08-08:00",
        instance=instance,
        resources=build_resources(env(app_url, fake_resend)),
    )
    assert result.success
    assert result.output_for_node(SUMMARY_OP, "generated") == 2  # rows created: at8 is due, at9 never sent
    materials = {
        (e.step_key, e.step_output_data.output_name): e.step_output_data.metadata
        for e in result.all_events
        if e.event_type_value == "STEP_OUTPUT" and e.step_output_data is not None
    }
    assert materials[GENERATED]["users_considered"].value == 2
    assert materials[GENERATED]["created_for"].value == {"due": 1, "never_sent": 1}
    assert materials[SENT]["outside_catch_up_window"].value is False
    assert materials[SENT]["due"].value == 1
    assert materials[SENT]["sent"].value == 1
    assert materials[SENT]["not_due_by_reason"].value == {"not_send_hour": 1}
    assert [d.to for d in fake_resend.sent] == [["at8@example.test"]]
    d = t.note_digests
    rows = query(
        app_url, sa.select(d.c.user_id, d.c.status, d.c.scheduled_for, d.c.sent_at).order_by(d.c.user_id)
    )
    assert [(r.user_id, r.status, r.scheduled_for) for r in rows] == [
        ("at8", "sent", datetime(2026, 2, 8, tzinfo=UTC)),
        ("at9", "scheduled", datetime(2026, 2, 8, tzinfo=UTC)),
    ]
    assert rows[0].sent_at == WALL  # sent_at records the real clock, not the partition's hour
    rs = query(app_url, sa.select(t.review_states.c.last_sent_at).distinct())
    assert [r.last_sent_at for r in rs] == [WALL]  # review scheduling counts from the acceptance

    # the next hour sends the 09:00 user and nothing twice
    again = digest_hourly_job.execute_in_process(
        partition_key="2026-02-08-09:00",
        instance=instance,
        resources=build_resources(env(app_url, fake_resend)),
    )
    assert again.success and again.output_for_node(SUMMARY_OP, "sent") == 1
    assert sorted(d.to[0] for d in fake_resend.sent) == ["at8@example.test", "at9@example.test"]


def test_send_fails_the_op_only_when_every_send_failed() -> None:
    """A provider outage needs an operator (and the op's retry policy tries again); a partial failure is
    recorded per digest and the run succeeds. Checked on the report directly: through Dagster the retry
    policy would wait minutes."""
    report = SendReport(logical_time=HOUR, failed=3)
    with pytest.raises(dg.Failure) as failure:
        _check_send(report)
    assert failure.value.allow_retries and "every digest send failed (3)" in str(failure.value.description)
    _check_send(SendReport(logical_time=HOUR, failed=3, sent=1))
    _check_send(SendReport(logical_time=HOUR))


def test_missing_resend_key_fails_the_first_op_before_any_row(
    instance: dg.DagsterInstance, app_url: str
) -> None:
    seed(app_url, lambda c: user_with_notes(c, "u1"))
    result = digest_hourly_job.execute_in_process(
        partition_key="2026-02-08-08:00",
        instance=instance,
        resources=build_resources(env(app_url, RESEND_API_KEY="")),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == PLAN_OP
    assert "RESEND_API_KEY" in str(failure.step_failure_data.error)
    assert query(app_url, sa.select(t.note_digests.c.id)) == []
    assert query(app_url, sa.select(t.note_digest_items.c.id)) == []


def test_first_digest_sensor_skips_naming_the_missing_key(instance: dg.DagsterInstance, app_url: str) -> None:
    def world(conn: sa.Connection) -> None:
        docs = user_with_notes(conn, "fresh")
        f.digest(conn, "fresh", scheduled_for=WALL - timedelta(minutes=1), document_ids=docs)

    seed(app_url, world)
    with dg.build_sensor_context(instance=instance, resources=build_resources(env(app_url))) as context:
        result = first_digest_sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert not result.run_requests
    assert "RESEND_API_KEY" in str(result.skip_reason)
    dry = env(app_url, DIGEST_EMAIL_DRY_RUN="true")
    with dg.build_sensor_context(instance=instance, resources=build_resources(dry)) as context:
        result = first_digest_sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert [r.run_key for r in result.run_requests or []] == ["digest-send-fresh-seed_digest_ready"]


def test_dry_run_setting_uses_the_dry_run_sender(instance: dg.DagsterInstance, app_url: str) -> None:
    seed(app_url, lambda c: user_with_notes(c, "u1"))
    result = digest_hourly_job.execute_in_process(
        partition_key="2026-02-08-08:00",
        instance=instance,
        resources=build_resources(env(app_url, DIGEST_EMAIL_DRY_RUN="true")),
    )
    assert result.success
    (row,) = query(app_url, sa.select(t.note_digests.c.id, t.note_digests.c.payload_json))
    assert row.payload_json["provider_id"] == f"dry-run-note-digest-{row.id}"


def _tick(instance: dg.DagsterInstance, url: str) -> dg.SensorResult:
    resources = build_resources(env(url, RESEND_API_KEY="re_test"))
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = first_digest_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_first_digest_sensor_launches_one_run_per_new_user(
    instance: dg.DagsterInstance, app_url: str, fake_resend: FakeResend
) -> None:
    def world(conn: sa.Connection) -> None:
        docs = user_with_notes(conn, "fresh", hour=20)
        f.digest(conn, "fresh", scheduled_for=WALL - timedelta(minutes=1), created_at=WALL, document_ids=docs)
        docs = user_with_notes(conn, "veteran")
        f.digest(conn, "veteran", status="sent", sent_at=WALL - timedelta(days=9))
        f.digest(conn, "veteran", document_ids=docs)
        docs = user_with_notes(conn, "unverified", verified=False)
        f.digest(conn, "unverified", document_ids=docs)
        docs = user_with_notes(conn, "later")  # pending only in the future
        f.digest(conn, "later", scheduled_for=WALL + timedelta(hours=2), document_ids=docs)
        docs = user_with_notes(conn, "sentfailed")  # a failed digest of a user sent one before
        f.digest(conn, "sentfailed", status="sent", sent_at=WALL - timedelta(days=2))
        f.digest(conn, "sentfailed", status="failed", document_ids=docs)

    seed(app_url, world)
    result = _tick(instance, app_url)
    (request,) = result.run_requests or []
    assert request.run_key == "digest-send-fresh-seed_digest_ready"
    assert request.run_config["ops"] == {
        SEND_FOR_USER_OP: {"config": {"user_id": "fresh", "reason": "seed_digest_ready"}}
    }

    run = digest_send_for_user_job.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        resources=build_resources(env(app_url, fake_resend)),
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
    )
    assert run.success and run.output_for_node(SEND_FOR_USER_OP) == 1
    (delivery,) = fake_resend.sent
    assert delivery.subject == "Your first Brain Bits are ready! (3 notes)"
    after = _tick(instance, app_url)
    assert not after.run_requests
    assert after.skip_reason is not None and "found 0" in str(after.skip_reason)


def test_first_digest_sensor_is_bounded(instance: dg.DagsterInstance, app_url: str) -> None:
    def world(conn: sa.Connection) -> None:
        for n in range(FIRST_DIGEST_SENSOR_LIMIT + 5):
            f.user(conn, f"u{n:04d}")
            f.digest(conn, f"u{n:04d}", created_at=WALL - timedelta(seconds=n))

    seed(app_url, world)
    requests = _tick(instance, app_url).run_requests or []
    assert len(requests) == FIRST_DIGEST_SENSOR_LIMIT
    # newest pending digests first: the oldest five wait for the next tick
    assert requests[0].run_key == "digest-send-u0000-seed_digest_ready"
    assert "digest-send-u0204-seed_digest_ready" not in {r.run_key for r in requests}


def test_first_digest_sensor_finds_a_failed_first_digest(instance: dg.DagsterInstance, app_url: str) -> None:
    """A pending digest is ``scheduled`` or ``failed``: a never-sent user whose only digest failed is found."""

    def world(conn: sa.Connection) -> None:
        docs = user_with_notes(conn, "retry")
        f.digest(conn, "retry", status="failed", scheduled_for=WALL - timedelta(hours=1), document_ids=docs)
        user_with_notes(conn, "skipped-only")
        f.digest(conn, "skipped-only", status="skipped", scheduled_for=WALL - timedelta(hours=1))

    seed(app_url, world)
    requests = _tick(instance, app_url).run_requests or []
    assert [r.run_key for r in requests] == ["digest-send-retry-seed_digest_ready"]
