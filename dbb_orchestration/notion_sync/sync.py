"""One Notion connection, end to end (docs/behaviour.md §11).

:func:`sync_connection` is the whole story for one connection, and never raises for a Notion or data
problem: it returns a :class:`ConnectionSyncResult` and leaves the record in the database.

1. Load the connection, its user's Notion token (``account`` row with ``provider_id = 'notion'`` and
   ``account_id = account_external_id``) and its enabled ``notion_database`` scope items. Not eligible
   any more (paused, revoked, token gone) → ``skipped``, nothing written.
2. Insert the ``sync_runs`` row (``running``, kind ``incremental``) and read the cursor.
3. For each database: retrieve it, and for each of its data sources query the pages (newest edits
   first, 100 a time, from the cursor's minute; see :mod:`~dbb_orchestration.notion_sync.fetch`). Each
   response is one batch, decided, loaded and written by :mod:`~dbb_orchestration.notion_sync.batch`.
4. Success → ``sync_state`` (cursor, ``last_incremental_sync_at``, health) and the ``sync_runs`` row
   (``success`` + stats) in one transaction, then the seed digest when needed (docs/behaviour.md §7).
   The cursor never passes a page that could not be stored.
   Failure (401, retries used up, any error) → ``sync_runs`` ``failed`` with ``error_json`` and
   ``sync_state.health_json``; the cursor does not move, so a rerun reads every page this run might
   have missed (batches already written are found unchanged).

A database is read in full (no cursor filter) on the first sync, when its scope item was created or
changed after the last sync (a newly enabled database would otherwise only show pages edited after the
connection's cursor), and after a sync that rejected pages for the note cap (so they are stored once
there is room, e.g. after an upgrade). Re-reading known, unchanged pages costs no block requests
(:func:`~dbb_orchestration.notion_sync.ingest.is_known_unchanged`).

A database or data source that answers 404 (deleted, or no longer shared) is skipped and counted; the
rest of the connection goes on. A page that answers 404 while its blocks are read is skipped.

The rest of the sync lives beside this module: ``targets.py`` (which connections, which databases),
``batch.py`` (one query response: decide, load, write), ``results.py`` (status and counters) and
``summary.py`` (the run's totals, read back from ``sync_runs``). The names the Dagster wiring and the
benchmarks use are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.batch import Batcher, earlier, later
from dbb_orchestration.notion_sync.client import NotionApi, NotionApiError, NotionNotFound
from dbb_orchestration.notion_sync.fetch import (
    cursor_json,
    data_sources_of,
    format_notion_time,
    iter_query_results,
    next_since,
    parse_cursor,
)
from dbb_orchestration.notion_sync.ingest import (
    NOTE_LIMIT_REACHED,
    NoteBudget,
    SyncStateSnapshot,
    count_live_documents,
    finish_sync_run,
    note_limit_for_user,
    read_sync_state,
    save_sync_failure,
    save_sync_success,
    start_sync_run,
)
from dbb_orchestration.notion_sync.results import ConnectionSyncResult, SyncStats, SyncStatus
from dbb_orchestration.notion_sync.summary import (
    RUN_ID_KEY,
    RecordedRun,
    load_recorded_runs,
    positive_int,
    summarize_runs,
)
from dbb_orchestration.notion_sync.targets import (
    ConnectionDetails,
    ScopeDatabase,
    SyncTarget,
    database_since,
    find_sync_targets,
    load_connection,
)
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.redaction import scrub

__all__ = [
    "ABANDONED_RUN_AGE",
    "RUN_ID_KEY",
    "ConnectionDetails",
    "ConnectionSyncResult",
    "RecordedRun",
    "ScopeDatabase",
    "SeedHook",
    "SyncOptions",
    "SyncStats",
    "SyncStatus",
    "SyncTarget",
    "database_since",
    "find_sync_targets",
    "load_connection",
    "load_recorded_runs",
    "summarize_runs",
    "sync_connection",
]

ABANDONED_RUN_AGE = timedelta(hours=6)
_ERROR_MESSAGE_LIMIT = 300

OpenApi = Callable[[str], AbstractContextManager[NotionApi]]
SeedHook = Callable[[sa.Connection, str, datetime], Any]
"""Called as ``seed(conn, user_id, now)`` after a successful sync, inside its own transaction."""


@dataclass(frozen=True)
class SyncOptions:
    keyring: ContentKeyring
    deployment_mode: DeploymentMode
    page_concurrency: int = 4
    run_info: Mapping[str, str] = field(default_factory=dict)
    """Copied into ``stats_json``/``error_json`` (e.g. ``{"dagsterRunId": ...}``) to trace a row to its run."""


@dataclass(frozen=True)
class _Started:
    """A connection whose ``sync_runs`` row is open."""

    details: ConnectionDetails
    run_id: int
    state: SyncStateSnapshot
    started: datetime


def sync_connection(
    engine: sa.Engine,
    connection_id: int,
    *,
    open_api: OpenApi,
    options: SyncOptions,
    clock: Callable[[], datetime],
    seed: SeedHook | None = None,
) -> ConnectionSyncResult:
    """Sync one connection (see the module docstring). ``open_api(token)`` gives the connection's API
    (a context manager); ``clock()`` the current time (aware); ``seed(conn, user_id, now)`` creates the
    seed digest when needed (``None`` skips it). Raises only when the failure cannot even be recorded
    (the database is unreachable)."""
    run = _start(engine, connection_id, clock())
    if run is None:
        return ConnectionSyncResult(connection_id, SyncStatus.SKIPPED)
    stats = SyncStats()
    try:
        with open_api(run.details.token) as api:
            try:
                new_since, full = _sync_databases(engine, run, api, options, clock, stats)
            finally:
                stats.requests, stats.retries = api.requests, api.retries
    except Exception as exc:
        return _record_failure(engine, run, stats, exc, options, clock)
    finished = clock()
    cursor = _record_success(engine, run, stats, options, new_since, full, finished)
    seed_result, seed_error = _seed(engine, seed, run.details.user_id, finished)
    details = run.details
    return ConnectionSyncResult(
        connection_id, SyncStatus.SUCCESS, details.user_id, run.run_id, stats, None, cursor,
        seed_result, seed_error,
    )  # fmt: skip


def _start(engine: sa.Engine, connection_id: int, started: datetime) -> _Started | None:
    """Load the connection and open its ``sync_runs`` row; ``None`` when it is not eligible."""
    with engine.begin() as conn:
        details = load_connection(conn, connection_id)
        if details is None:
            return None
        _abandon_stale_runs(conn, connection_id, started)
        run_id = start_sync_run(conn, connection_id, started)
        state = read_sync_state(conn, connection_id)
    return _Started(details, run_id, state, started)


def _record_success(
    engine: sa.Engine,
    run: _Started,
    stats: SyncStats,
    options: SyncOptions,
    new_since: datetime,
    full: bool,
    finished: datetime,
) -> str:
    """Move the cursor and close the ``sync_runs`` row (one transaction); returns the new cursor."""
    cursor = cursor_json(new_since)
    stats_json = {**stats.as_json(), **options.run_info, "cursor": cursor["since"]}
    previous = parse_cursor(run.state.cursor_json)
    if previous is not None:
        stats_json["previousCursor"] = format_notion_time(previous)
    health = {
        "status": "ok",
        "lastSyncRunId": run.run_id,
        "noteLimitReached": stats.rejected.get(NOTE_LIMIT_REACHED, 0),
    }
    with engine.begin() as conn:
        save_sync_success(
            conn, run.details.connection_id, cursor=cursor, now=finished, full=full, health=health
        )
        finish_sync_run(conn, run.run_id, SyncStatus.SUCCESS.value, finished, stats=stats_json)
    return cursor["since"]


def _seed(
    engine: sa.Engine, seed: SeedHook | None, user_id: str, now: datetime
) -> tuple[str | None, str | None]:
    """Run the seed hook in its own transaction: ``(outcome, None)`` or ``(None, short error)``."""
    if seed is None:
        return None, None
    try:
        with engine.begin() as conn:
            outcome = seed(conn, user_id, now)
    except Exception as exc:
        return None, _short_error(exc)
    return _describe(outcome), None


def _describe(outcome: Any) -> str | None:
    if outcome is None:
        return None
    for name in ("outcome", "status", "reason"):
        value = getattr(outcome, name, None)
        if value is not None:
            return str(getattr(value, "value", value))
    return str(outcome)[:100]


def _abandon_stale_runs(conn: sa.Connection, connection_id: int, now: datetime) -> None:
    """Close this connection's ``running`` rows older than :data:`ABANDONED_RUN_AGE` (a killed process
    left them) as ``failed``, so they do not block the seed digest's "no sync running" rule forever."""
    runs = t.sync_runs
    conn.execute(
        sa.update(runs)
        .where(
            runs.c.connection_id == connection_id,
            runs.c.status == "running",
            runs.c.started_at < now - ABANDONED_RUN_AGE,
        )
        .values(
            status="failed", finished_at=now, error_json={"type": "Abandoned", "message": "never finished"}
        )
    )


def _short_error(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error; its message has no SQL
    source = orig if isinstance(orig, BaseException) else exc
    text = str(source).strip().splitlines()[0] if str(source).strip() else ""
    return scrub(f"{type(source).__name__}: {text}", _ERROR_MESSAGE_LIMIT)


def _error_json(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, NotionApiError):
        error = exc.as_json()
        error["message"] = scrub(str(error["message"]), _ERROR_MESSAGE_LIMIT)
        return error
    return {"type": type(exc).__name__, "message": _short_error(exc)}


def _record_failure(
    engine: sa.Engine,
    run: _Started,
    stats: SyncStats,
    exc: Exception,
    options: SyncOptions,
    clock: Callable[[], datetime],
) -> ConnectionSyncResult:
    error = {**_error_json(exc), **options.run_info}
    finished = clock()
    previous = run.state.health_json if isinstance(run.state.health_json, Mapping) else {}
    health = {
        "status": "failed",
        "lastSyncRunId": run.run_id,
        "error": {k: error.get(k) for k in ("type", "status", "code")},
        # Kept so the next successful sync still re-reads pages an earlier sync rejected for the cap.
        "noteLimitReached": positive_int(previous.get("noteLimitReached")),
    }
    details = run.details
    try:
        with engine.begin() as conn:
            finish_sync_run(
                conn,
                run.run_id,
                SyncStatus.FAILED.value,
                finished,
                stats={**stats.as_json(), **options.run_info},
                error=error,
            )
            save_sync_failure(conn, details.connection_id, now=finished, health=health)
    except Exception as record_exc:
        raise record_exc from exc
    return ConnectionSyncResult(
        details.connection_id, SyncStatus.FAILED, details.user_id, run.run_id, stats, error
    )


@dataclass
class _Progress:
    """What the databases read so far mean for the cursor."""

    newest_seen: datetime | None = None
    hold: datetime | None = None
    all_full: bool = True


def _sync_databases(
    engine: sa.Engine,
    run: _Started,
    api: NotionApi,
    options: SyncOptions,
    clock: Callable[[], datetime],
    stats: SyncStats,
) -> tuple[datetime, bool]:
    """Read and store every enabled database; returns ``(next cursor, every database read in full)``."""
    details, state = run.details, run.state
    since = parse_cursor(state.cursor_json)
    health = state.health_json if isinstance(state.health_json, Mapping) else {}
    recheck_all = positive_int(health.get("noteLimitReached")) > 0
    with engine.connect() as conn:
        budget = NoteBudget(
            note_limit_for_user(conn, details.user_id, options.deployment_mode),
            count_live_documents(conn, details.user_id),
        )
    progress = _Progress()
    with ThreadPoolExecutor(
        max_workers=max(1, options.page_concurrency),
        thread_name_prefix=f"notion-conn-{details.connection_id}",
    ) as pool:
        batcher = Batcher(engine, details, api, pool, options.keyring, clock, stats, budget)
        for database in details.databases:
            db_since = database_since(
                since, database.changed_at, state.last_incremental_sync_at, recheck_all=recheck_all
            )
            _sync_database(batcher, api, database.database_id, db_since, stats, progress)
    cursor = next_since(since, progress.newest_seen, run.started, hold=progress.hold)
    return cursor, progress.all_full


def _sync_database(
    batcher: Batcher,
    api: NotionApi,
    database_id: str,
    db_since: datetime | None,
    stats: SyncStats,
    progress: _Progress,
) -> None:
    """Read one database (from ``db_since``, or in full when ``None``): each data source, each query
    response stored by ``batcher``. A database or data source that answers 404 is counted and skipped."""
    stats.databases += 1
    if db_since is None:
        stats.databases_full += 1
    else:
        progress.all_full = False
    try:
        payload = api.retrieve_database(database_id)
    except NotionNotFound:
        stats.databases_not_found += 1
        return
    for ref in data_sources_of(payload, database_id):
        stats.data_sources += 1
        try:
            for pages in iter_query_results(api, ref.data_source_id, db_since):
                batch = batcher.ingest(pages, ref)
                progress.newest_seen = later(progress.newest_seen, batch.newest)
                progress.hold = earlier(progress.hold, batch.hold)
        except NotionNotFound:
            stats.data_sources_not_found += 1
