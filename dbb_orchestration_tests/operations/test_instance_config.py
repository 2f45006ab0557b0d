"""The production instance config (deploy/dagster.yaml) loads against a real Postgres with the settings
we rely on, and the repository-root dagster.yaml (local, no environment needed) runs and queues the same."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from dbb_orchestration.operations.instance_check import PRODUCTION_DAGSTER_YAML, REPO_ROOT, check_instance
from dbb_orchestration_tests.conftest import postgres_admin_url

DAGSTER_YAML = PRODUCTION_DAGSTER_YAML
LOCAL_DAGSTER_YAML = REPO_ROOT / "dagster.yaml"
SHARED_SECTIONS = ("run_coordinator", "concurrency", "run_retries", "run_monitoring")


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


@pytest.mark.parametrize("section", SHARED_SECTIONS)
def test_local_and_production_dagster_yaml_share_queue_limits_retries_and_monitoring(section: str) -> None:
    local = yaml.safe_load(LOCAL_DAGSTER_YAML.read_text())
    production = yaml.safe_load(DAGSTER_YAML.read_text())
    assert local[section] == production[section]


def _env_references(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [str(node["env"])] if set(node) == {"env"} else []
        return found + [ref for value in node.values() for ref in _env_references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _env_references(value)]
    return []


def test_local_dagster_yaml_needs_no_environment() -> None:
    config = yaml.safe_load(LOCAL_DAGSTER_YAML.read_text())
    assert "storage" not in config and "run_storage" not in config  # Dagster's local default storage
    assert _env_references(config) == []
    assert "DAGSTER_PG_HOST" in _env_references(yaml.safe_load(DAGSTER_YAML.read_text()))


def test_local_dagster_yaml_loads_in_an_empty_home(tmp_path, monkeypatch) -> None:

    import dagster as dg
    from dagster._core.run_coordinator import QueuedRunCoordinator

    for key in [k for k in os.environ if k.startswith("DAGSTER_PG")]:
        monkeypatch.delenv(key)
    shutil.copy(LOCAL_DAGSTER_YAML, tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_retries_enabled and instance.run_monitoring_enabled
        limits = instance.get_concurrency_config().run_queue_config
        assert limits is not None
        assert {"key": "dbb/job", "value": "digest_hourly", "limit": 1} in limits.tag_concurrency_limits
