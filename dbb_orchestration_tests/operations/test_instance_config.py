"""The production dagster.yaml loads against a real Postgres with the settings we rely on."""

from __future__ import annotations

import pytest
import yaml

from dbb_orchestration.operations.instance_check import REPO_ROOT, check_instance
from dbb_orchestration_tests.conftest import postgres_admin_url

DAGSTER_YAML = REPO_ROOT / "dagster.yaml"


def test_dagster_yaml_limits_digest_runs_to_one() -> None:
    config = yaml.safe_load(DAGSTER_YAML.read_text())
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "dbb/job", "value": "digest_hourly", "limit": 1} in limits
    assert any(limit["value"] == "sequence_step" for limit in limits)
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert config["run_retries"]["enabled"] is True
    assert config["run_monitoring"]["enabled"] is True


@pytest.mark.postgres
def test_dagster_yaml_loads_against_postgres() -> None:
    admin_url = postgres_admin_url()
    if admin_url is None:
        pytest.skip("set DBB_TEST_POSTGRES_URL to check dagster.yaml against Postgres")
    report = check_instance(DAGSTER_YAML, admin_url)
    assert "run storage: PostgresRunStorage" in report
    assert "run coordinator: QueuedRunCoordinator" in report
