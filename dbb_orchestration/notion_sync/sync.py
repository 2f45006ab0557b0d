"""One Notion connection, end to end (SPEC §11), and the query that finds the connections to sync.

:func:`sync_connection` is the whole story for one connection, and never raises for a Notion or data
problem: it returns a :class:`ConnectionSyncResult` and leaves the record in the database.

1. Load the connection, its user's Notion token (``account`` row with ``provider_id = 'notion'`` and
   ``account_id = account_external_id``) and its enabled ``notion_database`` scope items. Not eligible
   any more (paused, revoked, token gone) → ``skipped``, nothing written.
2. Insert the ``sync_runs`` row (``running``, kind ``incremental``) and read the cursor.
3. For each database: retrieve it, and for each of its data sources query the pages (newest edits
   first, 100 a time, from the cursor's minute; see :mod:`~dbb_orchestration.notion_sync.fetch`). Each
   response is one batch: decide every page (:mod:`~dbb_orchestration.notion_sync.ingest`), fetch the
   content of the pages that need it (up to ``page_concurrency`` pages at once, all threads sharing the
   connection's rate limiter), then write the batch in one transaction.
4. Success → ``sync_state`` (cursor, ``last_incremental_sync_at``, health) and the ``sync_runs`` row
   (``success`` + stats) in one transaction, then the seed digest when needed (SPEC §7).
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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring, content_hash
from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.client import NotionApi, NotionApiError, NotionNotFound
from dbb_orchestration.notion_sync.fetch import (
    DataSourceRef,
    FetchedPage,
    cursor_json,
    data_sources_of,
    fetch_page,
    format_notion_time,
    iter_query_results,
    next_since,
    parse_cursor,
)
from dbb_orchestration.notion_sync.ingest import (
    NOTE_LIMIT_REACHED,
    Decision,
    NoteBudget,
    StoredDocument,
    SyncStateSnapshot,
    count_live_documents,
    decide_delete,
    decide_upsert,
    document_row,
    finish_sync_run,
    insert_tombstones,
    is_known_unchanged,
    is_stale,
    load_stored,
    mark_deleted,
    note_limit_for_user,
    read_sync_state,
    save_sync_failure,
    save_sync_success,
    start_sync_run,
    touch_synced,
    upsert_documents,
    would_add_live_note,
)
from dbb_orchestration.notion_sync.pages import (
    is_skippable_page,
    page_metadata,
    page_title,
    parse_notion_time,
)
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.redaction import scrub

__all__ = [
    "ABANDONED_RUN_AGE",
    "RUN_ID_KEY",
    "ConnectionDetails",
    "ConnectionSyncResult",
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
    "RecordedRun",
    "summarize_runs",
    "sync_connection",
]

ABANDONED_RUN_AGE = timedelta(hours=6)
_ERROR_MESSAGE_LIMIT = 300

OpenApi = Callable[[str], AbstractContextManager[NotionApi]]
SeedHook = Callable[[sa.Connection, str, datetime], Any]
"""Called as ``seed(conn, user_id, now)`` after a successful sync, inside its own transaction."""


# --------------------------------------------------------------------------------------------------
# which connections
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncTarget:
    connection_id: int
    user_id: str


def _eligible_join() -> tuple[Any, list[Any]]:
    c, a = t.integration_connections, t.account
    joined = c.join(
        a,
        sa.and_(
            a.c.user_id == c.c.user_id,
            a.c.provider_id == "notion",
            a.c.account_id == c.c.account_external_id,
            a.c.access_token.is_not(None),
            a.c.access_token != "",
        ),
    )
    return joined, [c.c.kind == "notion", c.c.status == "active"]


def find_sync_targets(conn: sa.Connection, connection_ids: Collection[int] | None = None) -> list[SyncTarget]:
    """Every ``active`` ``notion`` connection whose user has a ``notion`` account row with
    ``account_id = account_external_id`` and a non-empty access token, by connection id (one query).
    ``connection_ids`` (when given, even empty) restricts the result to those ids."""
    c = t.integration_connections
    joined, conditions = _eligible_join()
    query = sa.select(c.c.id, c.c.user_id).distinct().select_from(joined).where(*conditions).order_by(c.c.id)
    if connection_ids is not None:
        query = query.where(c.c.id.in_(sorted(set(connection_ids))))
    return [SyncTarget(int(row.id), str(row.user_id)) for row in conn.execute(query)]


@dataclass(frozen=True)
class ScopeDatabase:
    database_id: str
    changed_at: datetime | None
    """The scope item's newest of ``created_at``/``updated_at``."""


@dataclass(frozen=True)
class ConnectionDetails:
    connection_id: int
    user_id: str
    token: str = field(repr=False)
    databases: tuple[ScopeDatabase, ...]


def load_connection(conn: sa.Connection, connection_id: int) -> ConnectionDetails | None:
    """The connection's user, token and enabled ``notion_database`` scope items (by id), or ``None``
    when it is not eligible (see :func:`find_sync_targets`) or does not exist. Two queries."""
    c, a, s = t.integration_connections, t.account, t.integration_scope_items
    joined, conditions = _eligible_join()
    row = conn.execute(
        sa.select(c.c.user_id, a.c.access_token)
        .select_from(joined)
        .where(c.c.id == connection_id, *conditions)
        .order_by(a.c.updated_at.desc(), a.c.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    items = conn.execute(
        sa.select(s.c.scope_value, s.c.created_at, s.c.updated_at)
        .where(s.c.connection_id == connection_id, s.c.scope_type == "notion_database", s.c.enabled.is_(True))
        .order_by(s.c.id)
    ).all()
    databases = tuple(
        ScopeDatabase(
            item.scope_value, max((x for x in (item.created_at, item.updated_at) if x), default=None)
        )
        for item in items
    )
    return ConnectionDetails(connection_id, str(row.user_id), str(row.access_token), databases)


def database_since(
    since: datetime | None,
    scope_changed_at: datetime | None,
    last_sync_at: datetime | None,
    *,
    recheck_all: bool,
) -> datetime | None:
    """The cursor to query one database with, ``None`` meaning "read it in full": no cursor, or
    ``recheck_all`` (the last sync rejected pages for the note cap), or the scope item changed after
    the last successful sync (or there was none)."""
    if since is None or recheck_all:
        return None
    if scope_changed_at is not None and (last_sync_at is None or scope_changed_at > last_sync_at):
        return None
    return since


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
class SyncStatus(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Not eligible any more when its step ran (paused, revoked, token removed): nothing was done."""


_ACCEPTED = {
    Decision.INSERT: "inserted",
    Decision.UPDATE: "updated",
    Decision.DELETE: "deleted",
    Decision.TOMBSTONE: "tombstoned",
}


@dataclass
class SyncStats:
    """Counters of one connection's sync (JSON for ``sync_runs.stats_json``, flat for Dagster metadata)."""

    databases: int = 0
    databases_not_found: int = 0
    databases_full: int = 0
    data_sources: int = 0
    data_sources_not_found: int = 0
    pages_visited: int = 0
    pages_fetched: int = 0
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    retries: int = 0

    @property
    def pages_skipped(self) -> int:
        """Pages returned by a query whose content was not fetched."""
        return self.pages_visited - self.pages_fetched

    def as_json(self) -> dict[str, Any]:
        return {
            "databases": self.databases,
            "databasesNotFound": self.databases_not_found,
            "databasesReadInFull": self.databases_full,
            "dataSources": self.data_sources,
            "dataSourcesNotFound": self.data_sources_not_found,
            "pagesVisited": self.pages_visited,
            "pagesFetched": self.pages_fetched,
            "pagesSkipped": self.pages_skipped,
            "documents": {
                "accepted": dict(sorted(self.accepted.items())),
                "rejected": dict(sorted(self.rejected.items())),
                "skipped": dict(sorted(self.skipped.items())),
            },
            "requests": self.requests,
            "retries": self.retries,
        }

    def metadata(self) -> dict[str, int]:
        """Flat counters: ``pages_*``, ``documents_accepted``/``_rejected``/``_skipped`` and one
        ``accepted_<x>`` / ``rejected_<reason>`` / ``skipped_<reason>`` per reason seen."""
        flat: dict[str, int] = {
            "databases": self.databases,
            "databases_not_found": self.databases_not_found,
            "data_sources": self.data_sources,
            "pages_visited": self.pages_visited,
            "pages_fetched": self.pages_fetched,
            "pages_skipped": self.pages_skipped,
            "documents_accepted": sum(self.accepted.values()),
            "documents_rejected": sum(self.rejected.values()),
            "documents_skipped": sum(self.skipped.values()),
            "notion_requests": self.requests,
            "notion_retries": self.retries,
        }
        for prefix, counter in (
            ("accepted", self.accepted),
            ("rejected", self.rejected),
            ("skipped", self.skipped),
        ):
            for reason, count in sorted(counter.items()):
                flat[f"{prefix}_{reason}"] = count
        return flat


@dataclass(frozen=True)
class ConnectionSyncResult:
    connection_id: int
    status: SyncStatus
    user_id: str | None = None
    sync_run_id: int | None = None
    stats: SyncStats = field(default_factory=SyncStats)
    error: Mapping[str, Any] | None = None
    cursor: str | None = None
    seed_result: str | None = None
    seed_error: str | None = None

    @property
    def failed(self) -> bool:
        """The sync failed, or it succeeded but creating the seed digest failed."""
        return self.status is SyncStatus.FAILED or self.seed_error is not None


@dataclass(frozen=True)
class SyncOptions:
    keyring: ContentKeyring
    deployment_mode: DeploymentMode
    page_concurrency: int = 4
    run_info: Mapping[str, str] = field(default_factory=dict)
    """Copied into ``stats_json``/``error_json`` (e.g. ``{"dagsterRunId": ...}``) to trace a row to its run."""


# --------------------------------------------------------------------------------------------------
# one connection
# --------------------------------------------------------------------------------------------------
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
    started = clock()
    with engine.begin() as conn:
        details = load_connection(conn, connection_id)
        if details is None:
            return ConnectionSyncResult(connection_id, SyncStatus.SKIPPED)
        _abandon_stale_runs(conn, connection_id, started)
        run_id = start_sync_run(conn, connection_id, started)
        state = read_sync_state(conn, connection_id)

    stats = SyncStats()
    try:
        with open_api(details.token) as api:
            try:
                new_since, full = _sync_databases(engine, details, state, api, options, clock, stats, started)
            finally:
                stats.requests, stats.retries = api.requests, api.retries
    except Exception as exc:
        return _record_failure(engine, details, run_id, stats, exc, options, clock, state)

    finished = clock()
    cursor = cursor_json(new_since)
    stats_json = {**stats.as_json(), **options.run_info, "cursor": cursor["since"]}
    previous = parse_cursor(state.cursor_json)
    if previous is not None:
        stats_json["previousCursor"] = format_notion_time(previous)
    health = {
        "status": "ok",
        "lastSyncRunId": run_id,
        "noteLimitReached": stats.rejected.get(NOTE_LIMIT_REACHED, 0),
    }
    with engine.begin() as conn:
        save_sync_success(conn, connection_id, cursor=cursor, now=finished, full=full, health=health)
        finish_sync_run(conn, run_id, SyncStatus.SUCCESS.value, finished, stats=stats_json)
    seed_result: str | None = None
    seed_error: str | None = None
    if seed is not None:
        try:
            with engine.begin() as conn:
                outcome = seed(conn, details.user_id, finished)
            seed_result = _describe(outcome)
        except Exception as exc:
            seed_error = _short_error(exc)
    return ConnectionSyncResult(
        connection_id,
        SyncStatus.SUCCESS,
        details.user_id,
        run_id,
        stats,
        None,
        cursor["since"],
        seed_result,
        seed_error,
    )


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
    details: ConnectionDetails,
    run_id: int,
    stats: SyncStats,
    exc: Exception,
    options: SyncOptions,
    clock: Callable[[], datetime],
    state: SyncStateSnapshot,
) -> ConnectionSyncResult:
    error = {**_error_json(exc), **options.run_info}
    finished = clock()
    previous = state.health_json if isinstance(state.health_json, Mapping) else {}
    health = {
        "status": "failed",
        "lastSyncRunId": run_id,
        "error": {k: error.get(k) for k in ("type", "status", "code")},
        # Kept so the next successful sync still re-reads pages an earlier sync rejected for the cap.
        "noteLimitReached": _positive_int(previous.get("noteLimitReached")),
    }
    try:
        with engine.begin() as conn:
            finish_sync_run(
                conn,
                run_id,
                SyncStatus.FAILED.value,
                finished,
                stats={**stats.as_json(), **options.run_info},
                error=error,
            )
            save_sync_failure(conn, details.connection_id, now=finished, health=health)
    except Exception as record_exc:
        raise record_exc from exc
    return ConnectionSyncResult(
        details.connection_id, SyncStatus.FAILED, details.user_id, run_id, stats, error
    )


def _sync_databases(
    engine: sa.Engine,
    details: ConnectionDetails,
    state: SyncStateSnapshot,
    api: NotionApi,
    options: SyncOptions,
    clock: Callable[[], datetime],
    stats: SyncStats,
    started: datetime,
) -> tuple[datetime, bool]:
    """Read and store every enabled database; returns ``(next cursor, every database read in full)``."""
    since = parse_cursor(state.cursor_json)
    health = state.health_json if isinstance(state.health_json, Mapping) else {}
    recheck_all = _positive_int(health.get("noteLimitReached")) > 0
    with engine.connect() as conn:
        budget = NoteBudget(
            note_limit_for_user(conn, details.user_id, options.deployment_mode),
            count_live_documents(conn, details.user_id),
        )
    newest_seen: datetime | None = None
    all_full = True
    with ThreadPoolExecutor(
        max_workers=max(1, options.page_concurrency),
        thread_name_prefix=f"notion-conn-{details.connection_id}",
    ) as pool:
        batcher = _Batcher(engine, details, api, pool, options, clock, stats, budget)
        for database in details.databases:
            db_since = database_since(
                since, database.changed_at, state.last_incremental_sync_at, recheck_all=recheck_all
            )
            stats.databases += 1
            if db_since is None:
                stats.databases_full += 1
            else:
                all_full = False
            try:
                payload = api.retrieve_database(database.database_id)
            except NotionNotFound:
                stats.databases_not_found += 1
                continue
            for ref in data_sources_of(payload, database.database_id):
                stats.data_sources += 1
                try:
                    for pages in iter_query_results(api, ref.data_source_id, db_since):
                        batch_newest = batcher.ingest(pages, ref, incremental=db_since is not None)
                        newest_seen = _later(newest_seen, batch_newest)
                except NotionNotFound:
                    stats.data_sources_not_found += 1
    return next_since(since, newest_seen, started), all_full


def _positive_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _add(counter: Counter[str], key: str, count: int) -> None:
    if count > 0:
        counter[key] += count


def _page_time(value: Any) -> datetime | None:
    try:
        return parse_notion_time(value)
    except ValueError:
        return None


@dataclass
class _Pending:
    page: dict[str, Any]
    stored: StoredDocument | None
    source_time: datetime
    reserved: bool


@dataclass
class _Batcher:
    """Decides, fetches and writes one query response at a time (all on the caller's thread except the
    block fetching)."""

    engine: sa.Engine
    details: ConnectionDetails
    api: NotionApi
    pool: ThreadPoolExecutor
    options: SyncOptions
    clock: Callable[[], datetime]
    stats: SyncStats
    budget: NoteBudget

    def ingest(
        self, pages: Sequence[dict[str, Any]], ref: DataSourceRef, *, incremental: bool
    ) -> datetime | None:
        """Store one batch; returns the newest ``last_edited_time`` in it (every page is handled or the
        call raises)."""
        stats = self.stats
        stats.pages_visited += len(pages)
        received_at = self.clock()
        user_id, connection_id = self.details.user_id, self.details.connection_id
        with self.engine.connect() as conn:
            stored = load_stored(conn, user_id, connection_id, [str(p["id"]) for p in pages])

        newest: datetime | None = None
        pending: list[_Pending] = []
        tombstones: list[dict[str, Any]] = []
        deletions: list[tuple[int, datetime]] = []
        seen: set[str] = set()
        for page in pages:
            page_id = str(page["id"])
            if page_id in seen:  # never twice in one statement (Postgres refuses that upsert)
                continue
            seen.add(page_id)
            edited = _page_time(page.get("last_edited_time"))
            newest = _later(newest, edited)
            source_time = edited or received_at
            existing = stored.get(page_id)
            if is_skippable_page(page):
                if existing is None and not incremental:
                    stats.skipped["archived"] += 1
                    continue
                decision = decide_delete(existing, source_time)
                if decision is Decision.TOMBSTONE:
                    tombstones.append(self._row(page, ref, "", source_time, received_at, deleted=True))
                elif decision is Decision.DELETE and existing is not None:
                    deletions.append((existing.id, source_time))
                else:
                    stats.skipped[decision.value] += 1
                continue
            if is_stale(existing, source_time):
                stats.skipped[Decision.STALE.value] += 1
                continue
            if is_known_unchanged(existing, source_time):
                stats.skipped[Decision.UNCHANGED.value] += 1
                continue
            reserved = would_add_live_note(existing)
            if reserved and not self.budget.try_take():
                stats.rejected[NOTE_LIMIT_REACHED] += 1
                continue
            pending.append(_Pending(page, existing, source_time, reserved))

        fetched = self._fetch_all([p.page for p in pending])
        rows: list[dict[str, Any]] = []
        decisions: dict[str, tuple[Decision, _Pending]] = {}
        unchanged_ids: list[int] = []
        for item in pending:
            page_id = str(item.page["id"])
            result = fetched.get(page_id)
            if result is None:
                stats.skipped["not_found"] += 1
                if item.reserved:
                    self.budget.release()
                continue
            stats.pages_fetched += 1
            decision = decide_upsert(item.stored, item.source_time, content_hash(result.markdown))
            if decision is Decision.UNCHANGED and item.stored is not None:
                unchanged_ids.append(item.stored.id)
                stats.skipped[decision.value] += 1
                continue
            if decision not in (Decision.INSERT, Decision.UPDATE):
                stats.skipped[decision.value] += 1
                if item.reserved:
                    self.budget.release()
                continue
            rows.append(
                self._row(item.page, ref, result.markdown, item.source_time, received_at, deleted=False)
            )
            decisions[page_id] = (decision, item)

        with self.engine.begin() as conn:
            written = upsert_documents(conn, rows)
            tombstoned = insert_tombstones(conn, tombstones)
            deleted = mark_deleted(conn, deletions, received_at)
            touch_synced(conn, unchanged_ids, received_at)

        for page_id, (decision, item) in decisions.items():
            if page_id in written:
                stats.accepted[_ACCEPTED[decision]] += 1
            else:  # a newer row was written between our read and our write
                stats.skipped[Decision.STALE.value] += 1
                if item.reserved:
                    self.budget.release()
        _add(stats.accepted, _ACCEPTED[Decision.TOMBSTONE], len(tombstoned))
        _add(stats.skipped, Decision.STALE.value, len(tombstones) - len(tombstoned))
        _add(stats.accepted, _ACCEPTED[Decision.DELETE], deleted)
        _add(stats.skipped, Decision.STALE.value, len(deletions) - deleted)
        for _ in range(deleted):
            self.budget.release()
        return newest

    def _row(
        self,
        page: Mapping[str, Any],
        ref: DataSourceRef,
        markdown: str,
        source_time: datetime,
        received_at: datetime,
        *,
        deleted: bool,
    ) -> dict[str, Any]:
        return document_row(
            user_id=self.details.user_id,
            connection_id=self.details.connection_id,
            external_id=str(page["id"]),
            title=page_title(page),
            markdown=markdown,
            keyring=self.options.keyring,
            metadata=page_metadata(page, ref.database_id, ref.data_source_id),
            created_at_source=_page_time(page.get("created_time")),
            updated_at_source=source_time,
            deleted_at_source=source_time if deleted else None,
            now=received_at,
        )

    def _fetch_all(self, pages: Sequence[dict[str, Any]]) -> dict[str, FetchedPage | None]:
        """Content of ``pages``, ``None`` for pages that answered 404. Any other error cancels what has
        not started and propagates."""
        futures: dict[Future[FetchedPage], str] = {
            self.pool.submit(fetch_page, self.api, page): str(page["id"]) for page in pages
        }
        results: dict[str, FetchedPage | None] = {}
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except NotionNotFound:
                    results[futures[future]] = None
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results


# --------------------------------------------------------------------------------------------------
# the run's summary, read back from sync_runs
# --------------------------------------------------------------------------------------------------
RUN_ID_KEY = "dagsterRunId"
"""Key of ``SyncOptions.run_info`` naming the Dagster run that wrote a ``sync_runs`` row."""


@dataclass(frozen=True)
class RecordedRun:
    connection_id: int
    sync_run_id: int
    status: str
    stats: Mapping[str, Any]
    error: Mapping[str, Any] | None


def load_recorded_runs(conn: sa.Connection, since: datetime, run_ids: Collection[str]) -> list[RecordedRun]:
    """The newest ``sync_runs`` row per connection among rows started at or after ``since`` whose
    ``stats_json`` (or ``error_json``) names one of ``run_ids`` under :data:`RUN_ID_KEY` (a re-execution
    and the runs it re-executes form one group). Ordered by connection id. Rows of other writers (the
    backend's "sync now") are ignored. Empty ``run_ids`` → ``[]``."""
    wanted = sorted(set(run_ids))
    if not wanted:
        return []
    runs = t.sync_runs
    rows = conn.execute(
        sa.select(runs.c.id, runs.c.connection_id, runs.c.status, runs.c.stats_json, runs.c.error_json)
        .where(
            runs.c.started_at >= since,
            sa.or_(
                runs.c.stats_json[RUN_ID_KEY].as_string().in_(wanted),
                runs.c.error_json[RUN_ID_KEY].as_string().in_(wanted),
            ),
        )
        .order_by(runs.c.id)
    ).all()
    newest: dict[int, RecordedRun] = {}
    for row in rows:
        stats = row.stats_json if isinstance(row.stats_json, Mapping) else {}
        error = row.error_json if isinstance(row.error_json, Mapping) else None
        newest[int(row.connection_id)] = RecordedRun(
            int(row.connection_id), int(row.id), str(row.status), stats, error
        )
    return [newest[key] for key in sorted(newest)]


def summarize_runs(runs: Sequence[RecordedRun]) -> dict[str, int]:
    """Totals over connections: ``connections_total``/``_synced``/``_failed`` (``running`` rows count as
    neither), ``pages_visited``/``_fetched``/``_skipped``, ``documents_accepted``/``_rejected``/
    ``_skipped`` and one ``accepted_<x>``/``rejected_<reason>``/``skipped_<reason>`` per reason. Malformed
    stats count as zero."""
    totals: Counter[str] = Counter()
    totals["connections_total"] = len(runs)
    totals["connections_synced"] = sum(1 for r in runs if r.status == SyncStatus.SUCCESS.value)
    totals["connections_failed"] = sum(1 for r in runs if r.status == SyncStatus.FAILED.value)
    for run in runs:
        for key, name in (
            ("pagesVisited", "pages_visited"),
            ("pagesFetched", "pages_fetched"),
            ("pagesSkipped", "pages_skipped"),
        ):
            totals[name] += _positive_int(run.stats.get(key))
        documents = run.stats.get("documents")
        documents = documents if isinstance(documents, Mapping) else {}
        for group in ("accepted", "rejected", "skipped"):
            counts = documents.get(group)
            for reason, count in counts.items() if isinstance(counts, Mapping) else []:
                value = _positive_int(count)
                totals[f"documents_{group}"] += value
                totals[f"{group}_{reason}"] += value
    for name in ("pages_visited", "pages_fetched", "pages_skipped"):
        totals.setdefault(name, 0)
    for group in ("accepted", "rejected", "skipped"):
        totals.setdefault(f"documents_{group}", 0)
    return dict(totals)
