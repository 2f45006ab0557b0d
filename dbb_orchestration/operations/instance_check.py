"""Load the production instance config ``deploy/dagster.yaml`` against a real Postgres and check what it sets.

CI runs ``python -m dbb_orchestration.operations.instance_check``: it creates a throwaway database on
the Postgres named by ``DBB_TEST_POSTGRES_URL``, points the ``DAGSTER_PG_*`` variables at it, loads the
instance from a temporary ``DAGSTER_HOME`` holding that file, touches every storage, and drops
the database. Any config error fails the command.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"


def check_instance(dagster_yaml: Path, admin_url: str) -> list[str]:
    import dagster as dg

    from dbb_orchestration.db.engine import create_db_engine

    admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"dagster_check_{uuid.uuid4().hex[:10]}"
    url = admin.url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    home = Path(tempfile.mkdtemp(prefix="dagster_home_"))
    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", *_PG_VARS)}
    try:
        shutil.copy(dagster_yaml, home / "dagster.yaml")
        os.environ.update(_instance_env(home, url, name))
        with dg.DagsterInstance.get() as instance:
            report = _inspect(instance)
    finally:
        _restore_env(saved)
        shutil.rmtree(home, ignore_errors=True)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    return report


def _instance_env(home: Path, url: sa.URL, database: str) -> dict[str, str]:
    """``DAGSTER_HOME`` and the ``DAGSTER_PG_*`` variables deploy/dagster.yaml reads, for ``database``."""
    return {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_USERNAME": url.username or "postgres",
        "DAGSTER_PG_PASSWORD": url.password or "",
        "DAGSTER_PG_HOST": url.host or "127.0.0.1",
        "DAGSTER_PG_DB": database,
        "DAGSTER_PG_PORT": str(url.port or 5432),
    }


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _inspect(instance: Any) -> list[str]:
    """Fail unless the instance has Postgres storage, the queued coordinator, run retries and monitoring;
    touch each storage once; describe what was found."""
    from dagster._core.run_coordinator import QueuedRunCoordinator

    storage = type(instance.run_storage).__name__
    if storage != "PostgresRunStorage":
        raise SystemExit(f"run storage is {storage}, expected PostgresRunStorage")
    if not isinstance(instance.run_coordinator, QueuedRunCoordinator):
        raise SystemExit("run coordinator is not the QueuedRunCoordinator")
    assert instance.run_retries_enabled, "run retries are off"
    assert instance.run_monitoring_enabled, "run monitoring is off"
    instance.get_runs(limit=1)
    instance.event_log_storage.get_concurrency_keys()
    limits = instance.get_concurrency_config().run_queue_config
    return [
        f"run storage: {storage}",
        f"event log storage: {type(instance.event_log_storage).__name__}",
        f"schedule storage: {type(instance.schedule_storage).__name__}",
        "run coordinator: QueuedRunCoordinator",
        f"tag concurrency limits: {limits.tag_concurrency_limits if limits else None}",
    ]


_PG_VARS = (
    "DAGSTER_PG_USERNAME",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_DB",
    "DAGSTER_PG_PORT",
)


def main() -> int:
    admin_url = os.environ.get("DBB_TEST_POSTGRES_URL")
    if not admin_url:
        print(
            "DBB_TEST_POSTGRES_URL is not set: it names the Postgres to check deploy/dagster.yaml against",
            file=sys.stderr,
        )
        return 2
    for line in check_instance(PRODUCTION_DAGSTER_YAML, admin_url):
        print(line)
    print("deploy/dagster.yaml loads against Postgres: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
