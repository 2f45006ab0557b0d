"""The Dagster job: one step per connection, failures as failed steps, re-execution of only those."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.definitions import make_definitions
from dbb_orchestration.notion_sync.defs import (
    SUMMARY_OP,
    SYNC_OP,
    connection_id_from_key,
    mapping_key,
    notion_sync_weekly_job,
    notion_sync_weekly_schedule,
)
from dbb_orchestration.testing import FakeNotion
from dbb_orchestration.testing.fake_notion import block
from dbb_orchestration_tests.notion_sync.conftest import T0, notion_connection

JOB = "notion_sync_weekly_job"


def job_from_environment() -> dg.JobDefinition:
    """Module-level factory for ``dg.reconstructable``: resources read the settings from the environment."""
    return make_definitions().get_job_def(JOB)


def settings_env(db_url: str, fake: FakeNotion) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "NOTION_API_URL": fake.base_url,
        "NOTION_REQUESTS_PER_SECOND": "0",
        "NOTION_CONNECTION_PAUSE_SECONDS": "0",
    }


def two_connections(db_url: str, fake: FakeNotion) -> tuple[int, int]:
    """``good`` (one page) and ``bad`` (its token revoked → 401)."""
    fake.add_database("db-good", ["ds-good"], "Good")
    fake.add_database("db-bad", ["ds-bad"], "Bad")
    fake.add_page("ds-good", "good-page", "Good page", T0, blocks=[block("paragraph", "hello")])
    fake.add_page("ds-bad", "bad-page", "Bad page", T0, blocks=[block("paragraph", "later")])
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        good = notion_connection(conn, fake, "good", ["db-good"])
        bad = notion_connection(conn, fake, "bad", ["db-bad"], token="secret_bad_token")
    engine.dispose()
    fake.revoke_token("secret_bad_token")
    return good, bad


def rows(db_url: str, table: sa.Table) -> Sequence[Any]:
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
    finally:
        engine.dispose()


def step_events(events: Sequence[dg.DagsterEvent], event_type: str) -> dict[str, dg.DagsterEvent]:
    return {e.step_key: e for e in events if e.event_type_value == event_type and e.step_key}


def output_metadata(events: Sequence[dg.DagsterEvent], step_key: str) -> Mapping[str, Any]:
    data: Any = step_events(events, "STEP_OUTPUT")[step_key].event_specific_data
    return {name: value.value for name, value in data.metadata.items()}


def failure_metadata(events: Sequence[dg.DagsterEvent], step_key: str) -> Mapping[str, Any]:
    data: Any = step_events(events, "STEP_FAILURE")[step_key].event_specific_data
    return {name: value.value for name, value in data.user_failure_data.metadata.items()}


def test_mapping_keys_round_trip() -> None:
    assert mapping_key(42) == "conn_42"
    assert connection_id_from_key("conn_42") == 42
    for bad in (None, "", "conn_", "conn_x", "42", "conn_-1"):
        with pytest.raises(ValueError):
            connection_id_from_key(bad)


def test_schedule_and_tags() -> None:
    assert notion_sync_weekly_schedule.cron_schedule == "0 3 * * 0"
    assert notion_sync_weekly_schedule.execution_timezone == "UTC"
    assert notion_sync_weekly_schedule.job_name == JOB
    assert notion_sync_weekly_job.tags["dbb/job"] == "notion_sync"
    assert isinstance(notion_sync_weekly_job.executor_def, dg.ExecutorDefinition)
    assert notion_sync_weekly_job.executor_def.name == "in_process"


def test_one_failing_connection_does_not_stop_the_other(db_url: str) -> None:
    with FakeNotion() as fake:
        good, bad = two_connections(db_url, fake)
        job = make_definitions(settings_env(db_url, fake)).get_job_def(JOB)

        result = job.execute_in_process(raise_on_error=False)

    assert not result.success
    events = result.all_events
    failures = step_events(events, "STEP_FAILURE")
    successes = step_events(events, "STEP_SUCCESS")
    assert set(failures) == {f"{SYNC_OP}[conn_{bad}]"}
    assert f"{SYNC_OP}[conn_{good}]" in successes
    assert SUMMARY_OP not in successes  # the summary waits for every connection

    good_meta = output_metadata(events, f"{SYNC_OP}[conn_{good}]")
    assert good_meta["status"] == "success"
    assert (good_meta["pages_visited"], good_meta["accepted_inserted"]) == (1, 1)
    assert good_meta["seed_digest"] == "created"
    bad_meta = failure_metadata(events, f"{SYNC_OP}[conn_{bad}]")
    assert (bad_meta["status"], bad_meta["error_code"]) == ("failed", "unauthorized")
    assert "secret_bad_token" not in str(failures[f"{SYNC_OP}[conn_{bad}]"].event_specific_data)

    runs = {r.connection_id: r for r in rows(db_url, t.sync_runs)}
    assert runs[good].status == "success" and runs[bad].status == "failed"
    assert runs[good].stats_json["dagsterRunId"] == result.run_id
    assert runs[bad].error_json["code"] == "unauthorized"
    assert runs[bad].error_json["dagsterRunId"] == result.run_id
    digests = rows(db_url, t.note_digests)
    assert [(d.user_id, d.status) for d in digests] == [("good", "scheduled")]  # §7 seed digest
    assert result.dagster_run.tags["dbb/job"] == "notion_sync"


def test_all_connections_succeed_and_the_summary_reports(db_url: str) -> None:
    with FakeNotion() as fake:
        good, bad = two_connections(db_url, fake)
        fake.add_token("secret_bad_token")  # valid again
        job = make_definitions(settings_env(db_url, fake)).get_job_def(JOB)

        result = job.execute_in_process()

    summary = output_metadata(result.all_events, SUMMARY_OP)
    assert summary["connections_total"] == 2
    assert summary["connections_synced"] == 2
    assert summary["connections_failed"] == 0
    assert summary["pages_visited"] == 2
    assert summary["accepted_inserted"] == 2
    assert summary["failed_connections"] == "-"


def test_reexecution_reruns_only_the_failed_connection(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeNotion() as fake, dg.instance_for_test() as instance:
        good, bad = two_connections(db_url, fake)
        for name, value in settings_env(db_url, fake).items():
            monkeypatch.setenv(name, value)
        reconstructable = dg.reconstructable(job_from_environment)

        with dg.execute_job(reconstructable, instance, raise_on_error=False) as first:
            assert not first.success
            first_id = first.run_id

        fake.add_token("secret_bad_token")  # the user reconnected
        fake.reset_log()
        with dg.execute_job(
            reconstructable,
            instance,
            reexecution_options=dg.ReexecutionOptions.from_failure(first_id, instance),
        ) as second:
            assert second.success
            started = sorted(step_events(second.all_events, "STEP_START"))
            summary = output_metadata(second.all_events, SUMMARY_OP)

        tokens = {r.token for r in fake.requests}

    assert started == sorted([f"{SYNC_OP}[conn_{bad}]", SUMMARY_OP])
    assert tokens == {"secret_bad_token"}  # the good connection was not synced again
    runs = rows(db_url, t.sync_runs)
    assert [(r.connection_id, r.status) for r in runs] == [
        (good, "success"),
        (bad, "failed"),
        (bad, "success"),
    ]
    assert summary["runs_in_group"] == 2
    assert summary["connections_synced"] == 2  # the parent run's success counts too
    assert summary["connections_failed"] == 0
    assert summary["pages_visited"] == 2


def test_no_eligible_connection_is_a_quiet_success(sqlite_url: str) -> None:
    with FakeNotion() as fake:
        result = make_definitions(settings_env(sqlite_url, fake)).get_job_def(JOB).execute_in_process()

        assert fake.requests == []
    assert result.success
    summary = output_metadata(result.all_events, SUMMARY_OP)
    assert (summary["connections_total"], summary["pages_visited"]) == (0, 0)
