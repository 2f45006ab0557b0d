"""Dagster wiring for the weekly Notion sync (behaviour §11): a thin shell around ``sync.py``.

``notion_sync_weekly_job`` (tag ``dbb/job=notion_sync``, in-process executor so connections run one
after another, ``NOTION_CONNECTION_PAUSE_SECONDS`` apart):

- ``notion_sync_plan`` finds the eligible connections and maps one dynamic step per connection,
  mapping key ``conn_<id>``;
- ``notion_sync_connection[conn_<id>]`` syncs that connection. Its failure is recorded in ``sync_runs``
  first, then the step raises ``dg.Failure`` (with the counts and the error as metadata), so a failed
  connection is a red step in the UI and the others carry on. "Re-execute from failure" reruns exactly
  the failed connection steps (and the summary);
- ``notion_sync_summary`` runs once every connection step has succeeded (in the run itself, or in a
  re-execution after the failed ones were fixed) and reports totals over the whole run group, read back
  from the ``sync_runs`` rows the steps wrote (each row names the Dagster run that wrote it).

The connection ids travel between steps through :class:`ConnectionKeyIOManager`, which stores nothing
and rebuilds the id from the mapping key: a re-execution in a fresh pod (K8s run launcher) can load its
inputs without the parent run's local files, and no token or note ever passes through an IO manager.

``notion_sync_weekly_schedule``: Sundays 03:00 UTC (turned on in the UI, like the other schedules).
"""

# No ``from __future__ import annotations``: Dagster reads the Config/resource annotations at runtime.

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from dbb_orchestration.automation import switchable
from dbb_orchestration.digests.seed import SeedResult, create_seed_digest_if_needed
from dbb_orchestration.notion_sync.client import NotionResource
from dbb_orchestration.notion_sync.sync import (
    RUN_ID_KEY,
    ConnectionSyncResult,
    SeedHook,
    SyncOptions,
    SyncStatus,
    find_sync_targets,
    load_recorded_runs,
    summarize_runs,
    sync_connection,
)
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.redaction import scrub
from dbb_orchestration.resources import DatabaseResource, SettingsResource

__all__ = [
    "JOB_TAGS",
    "MAPPING_KEY_PREFIX",
    "PLAN_OP",
    "SUMMARY_OP",
    "SYNC_OP",
    "ConnectionKeyIOManager",
    "NotionSyncConfig",
    "connection_id_from_key",
    "definitions",
    "mapping_key",
    "notion_sync_weekly_job",
    "notion_sync_weekly_schedule",
    "seed_hook",
]

PLAN_OP = "notion_sync_plan"
SYNC_OP = "notion_sync_connection"
SUMMARY_OP = "notion_sync_summary"
JOB_TAGS = {"dbb/job": "notion_sync"}
MAPPING_KEY_PREFIX = "conn_"
KEY_IO_MANAGER = "notion_connection_key_io"
SUMMARY_LOOKBACK = timedelta(days=30)
"""How far back the summary looks for the run group's ``sync_runs`` rows (re-executions older than
that are not summed)."""


def mapping_key(connection_id: int) -> str:
    """``conn_<id>``, the dynamic step's mapping key."""
    return f"{MAPPING_KEY_PREFIX}{connection_id}"


def connection_id_from_key(key: str | None) -> int:
    """The connection id in a mapping key ``conn_<id>``; anything else raises ``ValueError``."""
    if not key or not key.startswith(MAPPING_KEY_PREFIX) or not key[len(MAPPING_KEY_PREFIX) :].isdigit():
        raise ValueError(f"not a Notion sync mapping key: {key!r}")
    return int(key[len(MAPPING_KEY_PREFIX) :])


class ConnectionKeyIOManager(dg.ConfigurableIOManager):
    """Stores nothing: a connection id is its mapping key (see the module docstring)."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        expected = connection_id_from_key(context.mapping_key)
        if obj != expected:
            raise ValueError(f"connection id {obj!r} does not match mapping key {context.mapping_key!r}")

    def load_input(self, context: dg.InputContext) -> int:
        upstream = context.upstream_output
        return connection_id_from_key(upstream.mapping_key if upstream is not None else None)


class NotionSyncConfig(dg.Config):
    connection_ids: list[int] = Field(
        default_factory=list,
        description="Sync only these connections (still only if eligible); empty = every eligible one",
    )


@dg.op(
    name=PLAN_OP,
    out=dg.DynamicOut(int, io_manager_key=KEY_IO_MANAGER),
    description="Finds active Notion connections with a token and maps one sync step per connection.",
)
def notion_sync_plan(
    context: dg.OpExecutionContext, config: NotionSyncConfig, database: DatabaseResource
) -> Iterator[dg.DynamicOutput[int]]:
    with database.engine.connect() as conn:
        targets = find_sync_targets(conn, config.connection_ids or None)
    context.log.info(f"notion sync: {len(targets)} eligible connection(s)")
    for target in targets:
        yield dg.DynamicOutput(target.connection_id, mapping_key=mapping_key(target.connection_id))


def seed_hook(mode: DeploymentMode) -> SeedHook:
    """behaviour §7 after a successful sync: :func:`create_seed_digest_if_needed` with the deployment mode."""

    def seed(conn: sa.Connection, user_id: str, now: datetime) -> SeedResult:
        return create_seed_digest_if_needed(conn, user_id, now, mode=mode)

    return seed


def _step_metadata(result: ConnectionSyncResult) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "connection_id": result.connection_id,
        "status": result.status.value,
        "sync_run_id": result.sync_run_id if result.sync_run_id is not None else -1,
        **result.stats.metadata(),
    }
    if result.cursor is not None:
        metadata["cursor"] = result.cursor
    if result.seed_result is not None:
        metadata["seed_digest"] = result.seed_result
    if result.error is not None:
        metadata["error_code"] = str(result.error.get("code") or result.error.get("type") or "-")
        metadata["error"] = scrub(str(result.error.get("message") or ""))
    if result.seed_error is not None:
        metadata["seed_error"] = result.seed_error
    return metadata


@dg.op(
    name=SYNC_OP,
    out=dg.Out(dg.Nothing),
    pool="notion_api",
    description="Syncs one Notion connection; records failures in sync_runs and then fails the step.",
)
def notion_sync_connection(
    context: dg.OpExecutionContext,
    connection_id: int,
    settings: SettingsResource,
    database: DatabaseResource,
    notion: NotionResource,
) -> None:
    s = settings.get()
    waited = notion.pause_between_connections(s.notion_connection_pause_seconds)
    try:
        result = sync_connection(
            database.engine,
            connection_id,
            open_api=notion.open,
            options=SyncOptions(
                keyring=s.keyring,
                deployment_mode=s.deployment_mode,
                page_concurrency=s.notion_page_concurrency,
                run_info={RUN_ID_KEY: context.run_id},
            ),
            clock=s.now,
            seed=seed_hook(s.deployment_mode),
        )
    finally:
        notion.connection_finished()
    metadata = _step_metadata(result)
    metadata["paused_seconds"] = round(waited, 3)
    stats = result.stats
    context.log.info(
        f"notion connection {connection_id}: {result.status.value} (visited={stats.pages_visited} "
        f"fetched={stats.pages_fetched} accepted={sum(stats.accepted.values())} "
        f"rejected={sum(stats.rejected.values())} skipped={sum(stats.skipped.values())} "
        f"requests={stats.requests} retries={stats.retries})"
    )
    if result.failed:
        what = "seed digest failed" if result.status is SyncStatus.SUCCESS else "sync failed"
        raise dg.Failure(
            description=f"Notion connection {connection_id}: {what} ({metadata.get('error_code') or metadata.get('seed_error')})",
            metadata=metadata,
            allow_retries=False,
        )
    context.add_output_metadata(metadata)


@dg.op(
    name=SUMMARY_OP,
    ins={"synced": dg.In(dg.Nothing)},
    out=dg.Out(dg.Nothing),
    description="Totals over the run (and the runs it re-executes), read back from sync_runs.",
)
def notion_sync_summary(
    context: dg.OpExecutionContext, settings: SettingsResource, database: DatabaseResource
) -> None:
    root_id, group = context.instance.get_run_group(context.run_id) or (context.run_id, [])
    run_ids = {run.run_id for run in group} | {context.run_id}
    since = settings.get().now() - SUMMARY_LOOKBACK
    with database.engine.connect() as conn:
        runs = load_recorded_runs(conn, since, run_ids)
    totals = summarize_runs(runs)
    failed = [str(r.connection_id) for r in runs if r.status == SyncStatus.FAILED.value]
    context.log.info(
        f"notion sync summary over {len(run_ids)} run(s) (root {root_id}): {totals['connections_synced']} "
        f"synced, {totals['connections_failed']} failed of {totals['connections_total']}"
    )
    context.add_output_metadata(
        {**totals, "runs_in_group": len(run_ids), "failed_connections": ", ".join(failed) or "-"}
    )


@dg.job(
    name="notion_sync_weekly_job",
    tags=JOB_TAGS,
    executor_def=dg.in_process_executor,
    description="Weekly Notion sync: one step per active connection, then a summary.",
)
def notion_sync_weekly_job() -> None:
    notion_sync_summary(notion_sync_plan().map(notion_sync_connection).collect())


notion_sync_weekly_schedule = dg.ScheduleDefinition(
    name="notion_sync_weekly_schedule",
    job=notion_sync_weekly_job,
    cron_schedule="0 3 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Sundays 03:00 UTC.",
)
notion_sync_weekly_schedule = switchable(notion_sync_weekly_schedule)  # DBB_AUTOMATION=off pauses it

definitions = dg.Definitions(
    jobs=[notion_sync_weekly_job],
    schedules=[notion_sync_weekly_schedule],
    resources={KEY_IO_MANAGER: ConnectionKeyIOManager()},
)
