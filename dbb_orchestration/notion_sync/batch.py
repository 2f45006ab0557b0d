"""One query response of a data source, stored: decide, load, write (docs/behaviour.md §11).

:class:`Batcher` handles the pages of one ``data_sources.query`` response at a time:

1. **decide** on what is stored (one query), before any block is read: an archived or trashed page
   marks its stored row deleted, or is skipped when it was never stored; a stale page, or one known
   unchanged, is skipped; a page that would exceed the note cap is rejected. What is left is pending.
2. **load** the pending pages' blocks (up to ``page_concurrency`` pages at once, all threads sharing
   the connection's rate limiter), render the markdown, make it storable, hash it and decide again:
   unchanged, stale, or a row to write.
3. **write** the rows, the deletions and the ``last_synced_at`` of unchanged pages in one
   transaction. When the database refuses a row's *values* (:func:`~dbb_orchestration.notion_sync.
   ingest.is_unstorable_row_error`), the rows are written again one per transaction: the pages it
   still refuses are counted ``rejected_unstorable`` and their earliest source time is returned as
   the batch's *hold*, so the connection's cursor never passes a page that was not stored. Any other
   database error propagates and fails the connection.

No transaction is open while Notion is called.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring, content_hash, storable_text
from dbb_orchestration.notion_sync.client import NotionApi, NotionNotFound
from dbb_orchestration.notion_sync.fetch import DataSourceRef, FetchedPage, fetch_page
from dbb_orchestration.notion_sync.ingest import (
    NOTE_LIMIT_REACHED,
    UNSTORABLE,
    Decision,
    NoteBudget,
    StoredDocument,
    decide_delete,
    decide_upsert,
    document_row,
    is_known_unchanged,
    is_stale,
    is_unstorable_row_error,
    load_stored,
    mark_deleted,
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
from dbb_orchestration.notion_sync.results import SyncStats
from dbb_orchestration.notion_sync.targets import ConnectionDetails

__all__ = ["BatchResult", "Batcher", "earlier", "later"]

_ACCEPTED = {
    Decision.INSERT: "inserted",
    Decision.UPDATE: "updated",
    Decision.DELETE: "deleted",
}


def later(a: datetime | None, b: datetime | None) -> datetime | None:
    """The later of two optional times (``None`` when both are)."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def earlier(a: datetime | None, b: datetime | None) -> datetime | None:
    """The earlier of two optional times (``None`` when both are)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _add(counter: Counter[str], key: str, count: int) -> None:
    if count > 0:
        counter[key] += count


def _page_time(value: Any) -> datetime | None:
    try:
        return parse_notion_time(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class BatchResult:
    """What one query response changed for the cursor."""

    newest: datetime | None
    """The newest ``last_edited_time`` among its pages."""
    hold: datetime | None
    """The earliest source time of a page that could not be stored (the cursor must not pass it)."""


@dataclass
class _Pending:
    """A page whose content must be read before it can be decided."""

    page: dict[str, Any]
    stored: StoredDocument | None
    source_time: datetime
    reserved: bool
    """A note of the cap is reserved for it (it would add a live note)."""

    @property
    def page_id(self) -> str:
        return str(self.page["id"])


@dataclass
class _Plan:
    """The decisions made before any block is read."""

    pending: list[_Pending] = field(default_factory=list)
    deletions: list[tuple[int, datetime]] = field(default_factory=list)
    newest: datetime | None = None


@dataclass
class _Writes:
    """The rows to write once the content is known."""

    deletions: list[tuple[int, datetime]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    upserts: dict[str, tuple[Decision, _Pending]] = field(default_factory=dict)
    unchanged_ids: list[int] = field(default_factory=list)


@dataclass
class _Written:
    upserted: set[str] = field(default_factory=set)
    unstorable: set[str] = field(default_factory=set)
    deleted: int = 0


@dataclass
class Batcher:
    """Decides, fetches and writes one query response at a time (all on the caller's thread except the
    block fetching)."""

    engine: sa.Engine
    details: ConnectionDetails
    api: NotionApi
    pool: ThreadPoolExecutor
    keyring: ContentKeyring
    clock: Callable[[], datetime]
    stats: SyncStats
    budget: NoteBudget

    def ingest(self, pages: Sequence[dict[str, Any]], ref: DataSourceRef) -> BatchResult:
        """Store one batch: decide every page on what is stored, read the content of those that need it,
        write the rows. Every page is handled (stored, skipped, rejected or counted unstorable) or the
        call raises."""
        self.stats.pages_visited += len(pages)
        received_at = self.clock()
        with self.engine.connect() as conn:
            stored = load_stored(
                conn, self.details.user_id, self.details.connection_id, [str(p["id"]) for p in pages]
            )
        plan = self._decide(pages, stored, received_at)
        fetched = self._fetch_all([item.page for item in plan.pending])
        writes = self._prepare(plan, fetched, ref, received_at)
        written = self._write(writes, received_at)
        return BatchResult(plan.newest, self._count(writes, written))

    # -- decide (before any block is read) ------------------------------------------------------------
    def _decide(
        self, pages: Sequence[dict[str, Any]], stored: Mapping[str, StoredDocument], received_at: datetime
    ) -> _Plan:
        plan = _Plan()
        seen: set[str] = set()
        for page in pages:
            page_id = str(page["id"])
            if page_id in seen:  # never twice in one statement (Postgres refuses that upsert)
                continue
            seen.add(page_id)
            edited = _page_time(page.get("last_edited_time"))
            plan.newest = later(plan.newest, edited)
            self._decide_page(plan, page, stored.get(page_id), edited or received_at)
        return plan

    def _decide_page(
        self, plan: _Plan, page: dict[str, Any], existing: StoredDocument | None, source_time: datetime
    ) -> None:
        skipped = self.stats.skipped
        if is_skippable_page(page):
            decision = decide_delete(existing, source_time)
            if decision is Decision.DELETE and existing is not None:
                plan.deletions.append((existing.id, source_time))
            else:  # never stored (the backend skips it too), stale or already deleted
                skipped[decision.value] += 1
        elif is_stale(existing, source_time):
            skipped[Decision.STALE.value] += 1
        elif is_known_unchanged(existing, source_time):
            skipped[Decision.UNCHANGED.value] += 1
        else:
            reserved = would_add_live_note(existing)
            if reserved and not self.budget.try_take():
                self.stats.rejected[NOTE_LIMIT_REACHED] += 1
            else:
                plan.pending.append(_Pending(page, existing, source_time, reserved))

    # -- load: the content, then the rows -------------------------------------------------------------
    def _prepare(
        self,
        plan: _Plan,
        fetched: Mapping[str, FetchedPage | None],
        ref: DataSourceRef,
        received_at: datetime,
    ) -> _Writes:
        writes = _Writes(plan.deletions)
        for item in plan.pending:
            result = fetched.get(item.page_id)
            if result is None:
                self._drop(item, self.stats.skipped, "not_found")
                continue
            self.stats.pages_fetched += 1
            markdown = storable_text(result.markdown)  # hashed as it will be stored
            decision = decide_upsert(item.stored, item.source_time, content_hash(markdown))
            if decision is Decision.UNCHANGED and item.stored is not None:
                writes.unchanged_ids.append(item.stored.id)
                self.stats.skipped[decision.value] += 1
            elif decision in (Decision.INSERT, Decision.UPDATE):
                writes.rows.append(self._row(item.page, ref, markdown, item.source_time, received_at))
                writes.upserts[item.page_id] = (decision, item)
            else:
                self._drop(item, self.stats.skipped, decision.value)
        return writes

    # -- write ----------------------------------------------------------------------------------------
    def _write(self, writes: _Writes, received_at: datetime) -> _Written:
        """One transaction for the batch; when the database refuses a row's values, the rows are written
        again one per transaction so only the pages it refuses are left out."""
        try:
            with self.engine.begin() as conn:
                return self._write_in(conn, writes, writes.rows, received_at)
        except Exception as exc:
            if not writes.rows or not is_unstorable_row_error(exc):
                raise
        with self.engine.begin() as conn:
            written = self._write_in(conn, writes, [], received_at)
        for row in writes.rows:
            try:
                with self.engine.begin() as conn:
                    written.upserted |= upsert_documents(conn, [row])
            except Exception as exc:
                if not is_unstorable_row_error(exc):
                    raise
                written.unstorable.add(str(row["external_id"]))
        return written

    @staticmethod
    def _write_in(
        conn: sa.Connection, writes: _Writes, rows: Sequence[Mapping[str, Any]], received_at: datetime
    ) -> _Written:
        upserted = upsert_documents(conn, rows)
        deleted = mark_deleted(conn, writes.deletions, received_at)
        touch_synced(conn, writes.unchanged_ids, received_at)
        return _Written(upserted=upserted, deleted=deleted)

    def _count(self, writes: _Writes, written: _Written) -> datetime | None:
        """Count what was written; returns the earliest source time of a page left unstored."""
        stats, hold = self.stats, None
        for page_id, (decision, item) in writes.upserts.items():
            if page_id in written.upserted:
                stats.accepted[_ACCEPTED[decision]] += 1
            elif page_id in written.unstorable:
                self._drop(item, stats.rejected, UNSTORABLE)
                stats.unstorable_page_ids.append(page_id)
                hold = earlier(hold, item.source_time)
            else:  # a newer row was written between our read and our write
                self._drop(item, stats.skipped, Decision.STALE.value)
        _add(stats.accepted, _ACCEPTED[Decision.DELETE], written.deleted)
        _add(stats.skipped, Decision.STALE.value, len(writes.deletions) - written.deleted)
        for _ in range(written.deleted):
            self.budget.release()
        return hold

    def _drop(self, item: _Pending, counter: Counter[str], reason: str) -> None:
        """Count a pending page that is not written, giving back its reserved note."""
        counter[reason] += 1
        if item.reserved:
            self.budget.release()

    def _row(
        self,
        page: Mapping[str, Any],
        ref: DataSourceRef,
        markdown: str,
        source_time: datetime,
        received_at: datetime,
    ) -> dict[str, Any]:
        return document_row(
            user_id=self.details.user_id,
            connection_id=self.details.connection_id,
            external_id=str(page["id"]),
            title=page_title(page),
            markdown=markdown,
            keyring=self.keyring,
            metadata=page_metadata(page, ref.database_id, ref.data_source_id),
            created_at_source=_page_time(page.get("created_time")),
            updated_at_source=source_time,
            deleted_at_source=None,
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
