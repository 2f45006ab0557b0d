"""A failed step of a multi-step run is retried on its own: Dagster's re-execution "from failure" runs
only the failed dynamic step (the others are not sent again), with the same provider key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.definitions import make_definitions
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.sequences.conftest import NOW


def sequence_job() -> dg.JobDefinition:
    """Module level, so Dagster can rebuild the job for re-execution (settings come from the env)."""
    return make_definitions().resolve_job_def("email_sequence_step_job")


def _steps(url: str) -> list[dict[str, Any]]:
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    steps = []
    with engine.begin() as conn:
        for uid in ("a", "b", "c"):
            f.user(conn, uid)
            state_id = f.sequence_state(conn, uid, "upgrade", entered_at=NOW - timedelta(minutes=1))
            steps.append({"state_id": state_id, "sequence_name": "upgrade", "user_id": uid, "step": 1})
    engine.dispose()
    return steps


def _current_steps(url: str) -> list[int]:
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        s = t.email_sequence_states
        rows = conn.execute(sa.select(s.c.current_step).order_by(s.c.user_id)).scalars().all()
    engine.dispose()
    return list(rows)


def test_reexecution_from_failure_runs_only_the_failed_step(
    app_url: str, fake_resend: FakeResend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "DATABASE_URL": app_url,
        "DBB_NOW": NOW.isoformat(),
        "RESEND_API_KEY": "re_test",
        "RESEND_API_URL": fake_resend.base_url,
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        "SEQUENCE_EMAIL_DRY_RUN": "false",
    }.items():
        monkeypatch.setenv(name, value)
    config = {"ops": {"email_sequence_plan": {"config": {"steps": _steps(app_url)}}}}
    fake_resend.fail_next(422, count=1, name="validation_error", message="Invalid `to` field")
    job = dg.reconstructable(sequence_job)

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        with dg.execute_job(job, instance=instance, run_config=config, raise_on_error=False) as first:
            assert not first.success
            [failed] = [e.step_key for e in first.all_events if e.is_step_failure]
        assert sorted(_current_steps(app_url)) == [1, 2, 2]
        requests_before = len(fake_resend.requests)

        options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
        with dg.execute_job(job, instance=instance, reexecution_options=options) as second:
            assert second.success
            ran = sorted({e.step_key for e in second.all_events if e.is_step_success})

    assert ran == [failed]  # the plan op's outputs came from the first run; the others did not run
    assert _current_steps(app_url) == [2, 2, 2]
    new_requests = fake_resend.requests[requests_before:]
    assert len(new_requests) == 1 and len(fake_resend.sent) == 3
    assert new_requests[0].idempotency_key == f"sequence-upgrade-{failed.split('_')[-2]}-1"
