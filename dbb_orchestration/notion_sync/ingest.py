"""Storing what the Notion sync read (behaviour §11): decisions per page, document writes, sync bookkeeping.

Decisions (pure)
----------------
For an incoming page with *source time* ``t`` (its ``last_edited_time``, or the receive time when
Notion gave none) and the stored row, if any, whose *newest time* is the later of
``updated_at_source`` and ``deleted_at_source``:

* upsert (:func:`decide_upsert`): no row → ``insert``; ``t`` older than the newest time → ``stale``;
  ``t`` equal to it and the row deleted → ``stale``; equal and the same content hash → ``unchanged``;
  anything else → ``update`` (which clears ``deleted_at_source``);
* delete (:func:`decide_delete`, an archived or trashed page): no row → ``archived`` (nothing is
  written: like the backend, a page this location never stored leaves no row, so a user whose only
  pages are in the trash still has no documents); ``t`` older than the newest time → ``stale``; row
  already deleted → ``already_deleted``; otherwise ``delete`` (``deleted_at_source = t``).

Note cap: a page that would add a live note (no row, or a deleted row coming back) needs room under
the plan's ``max_notes`` (:class:`NoteBudget`, counting the user's non-deleted documents across all
connections); without room it is rejected ``note_limit_reached`` and not written. Self-hosted has no
cap. Staleness is known before the content is fetched (:func:`is_stale`), so stale and rejected pages
cost no block requests; so is a page whose stored copy was read after its last edit's minute had ended
(:func:`is_known_unchanged`), which makes re-reading unchanged pages cost one query per 100 pages.

Writes
------
One multi-row ``INSERT … ON CONFLICT (user_id, connection_id, external_id) DO UPDATE … WHERE <not
stale>`` per batch of pages, so a row the backend wrote meanwhile with a newer time is left alone even
though the decision was made on an earlier read; ``RETURNING`` tells which rows were really written.
Deletes are one ``executemany`` ``UPDATE`` guarded the same way. Content is encoded with the newest key
(behaviour §10), or ``none`` without a key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.audience import has_pro_subscription_sql, plan_for
from dbb_orchestration.content import ContentKeyring, encode_content, storable_json, storable_text
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import dialect_insert
from dbb_orchestration.plans import DeploymentMode

__all__ = [
    "NOTE_LIMIT_REACHED",
    "UNSTORABLE",
    "Decision",
    "NoteBudget",
    "StoredDocument",
    "SyncStateSnapshot",
    "count_live_documents",
    "decide_delete",
    "decide_upsert",
    "document_row",
    "finish_sync_run",
    "is_unstorable_row_error",
    "is_known_unchanged",
    "is_stale",
    "load_stored",
    "mark_deleted",
    "note_limit_for_user",
    "read_sync_state",
    "save_sync_failure",
    "save_sync_success",
    "start_sync_run",
    "touch_synced",
    "upsert_documents",
    "would_add_live_note",
]

NOTE_LIMIT_REACHED = "note_limit_reached"
UNSTORABLE = "unstorable"
"""Rejection reason of a page whose row the database refused even after cleaning."""
FRESHNESS_MARGIN = timedelta(seconds=2)
_DOCS = t.documents


class Decision(StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    UNCHANGED = "unchanged"
    STALE = "stale"
    DELETE = "delete"
    ARCHIVED_UNKNOWN = "archived"
    """An archived or trashed page with no stored row: skipped, nothing written."""
    ALREADY_DELETED = "already_deleted"


@dataclass(frozen=True)
class StoredDocument:
    """What the decisions need of an existing ``documents`` row."""

    id: int
    updated_at_source: datetime | None
    deleted_at_source: datetime | None
    content_hash: str
    last_synced_at: datetime | None = None

    @property
    def newest_time(self) -> datetime | None:
        """The later of ``updated_at_source`` and ``deleted_at_source`` (``None`` when both are)."""
        times = [x for x in (self.updated_at_source, self.deleted_at_source) if x is not None]
        return max(times) if times else None

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at_source is not None


def is_stale(stored: StoredDocument | None, source_time: datetime) -> bool:
    """True when an upsert at ``source_time`` must be skipped whatever its content: it is older than the
    row's newest time, or equal to it while the row is deleted. No row, or a row without times → False."""
    if stored is None:
        return False
    newest = stored.newest_time
    if newest is None:
        return False
    return source_time < newest or (source_time == newest and stored.is_deleted)


def is_known_unchanged(
    stored: StoredDocument | None, source_time: datetime, margin: timedelta = FRESHNESS_MARGIN
) -> bool:
    """True when the stored content is already the page's content for ``source_time``, so the blocks need
    not be fetched: the row is live, its ``updated_at_source`` equals ``source_time`` (Notion's time,
    rounded down to the minute), and its content was read after that minute had ended
    (``last_synced_at >= source_time + 1 min + margin``): no edit can have followed, or Notion would now
    report a later time. A row without ``last_synced_at`` is never known unchanged."""
    if stored is None or stored.is_deleted or stored.last_synced_at is None:
        return False
    if stored.updated_at_source is None or stored.updated_at_source != source_time:
        return False
    return stored.last_synced_at >= source_time + timedelta(minutes=1) + margin


def decide_upsert(stored: StoredDocument | None, source_time: datetime, content_hash: str) -> Decision:
    """``insert``, ``stale``, ``unchanged`` or ``update`` (rules in the module docstring)."""
    if stored is None:
        return Decision.INSERT
    if is_stale(stored, source_time):
        return Decision.STALE
    if source_time == stored.newest_time and content_hash == stored.content_hash:
        return Decision.UNCHANGED
    return Decision.UPDATE


def decide_delete(stored: StoredDocument | None, source_time: datetime) -> Decision:
    """``archived``, ``stale``, ``already_deleted`` or ``delete`` (rules in the module docstring)."""
    if stored is None:
        return Decision.ARCHIVED_UNKNOWN
    newest = stored.newest_time
    if newest is not None and source_time < newest:
        return Decision.STALE
    if stored.is_deleted:
        return Decision.ALREADY_DELETED
    return Decision.DELETE


def would_add_live_note(stored: StoredDocument | None) -> bool:
    """Whether writing the page adds a note to the user's live count (new, or a deleted row revived)."""
    return stored is None or stored.is_deleted


class NoteBudget:
    """Room left under a plan's note cap. ``limit`` ``None`` = unlimited; ``used`` = live notes now.

    Not thread-safe (the sync decides on one thread). A negative ``used`` counts as 0."""

    def __init__(self, limit: int | None, used: int) -> None:
        self.limit = limit
        self.used = max(0, used)

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)

    def try_take(self) -> bool:
        """Reserve one note; ``False`` (nothing reserved) when the cap is reached."""
        if self.limit is not None and self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        """Give one note back (a live note was deleted, or a reservation was not used)."""
        self.used = max(0, self.used - 1)


# --------------------------------------------------------------------------------------------------
# reads
# --------------------------------------------------------------------------------------------------
def load_stored(
    conn: sa.Connection, user_id: str, connection_id: int, external_ids: Iterable[str]
) -> dict[str, StoredDocument]:
    """The stored rows of ``external_ids`` for this user and connection, by external id (one query)."""
    ids = sorted(set(external_ids))
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(
            _DOCS.c.external_id,
            _DOCS.c.id,
            _DOCS.c.updated_at_source,
            _DOCS.c.deleted_at_source,
            _DOCS.c.content_hash,
            _DOCS.c.last_synced_at,
        ).where(
            _DOCS.c.user_id == user_id,
            _DOCS.c.connection_id == connection_id,
            _DOCS.c.external_id.in_(ids),
        )
    ).all()
    return {
        row.external_id: StoredDocument(
            row.id, row.updated_at_source, row.deleted_at_source, row.content_hash, row.last_synced_at
        )
        for row in rows
    }


def count_live_documents(conn: sa.Connection, user_id: str) -> int:
    """The user's non-deleted documents across all connections."""
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(_DOCS)
            .where(_DOCS.c.user_id == user_id, _DOCS.c.deleted_at_source.is_(None))
        ).scalar_one()
    )


def note_limit_for_user(conn: sa.Connection, user_id: str, mode: DeploymentMode | str) -> int | None:
    """The user's ``max_notes`` (behaviour §3): self-hosted ``None`` (no cap); cloud 10,000 when any
    subscription is ``active``/``trialing``, else 500."""
    has_pro = bool(conn.execute(sa.select(has_pro_subscription_sql(sa.literal(user_id)))).scalar_one())
    return plan_for(has_pro, mode)[1].max_notes


# --------------------------------------------------------------------------------------------------
# document writes
# --------------------------------------------------------------------------------------------------
def document_row(
    *,
    user_id: str,
    connection_id: int,
    external_id: str,
    title: str,
    markdown: str,
    keyring: ContentKeyring,
    metadata: Mapping[str, Any],
    created_at_source: datetime | None,
    updated_at_source: datetime,
    deleted_at_source: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    """Column values of one ``documents`` row, content encoded with the newest key (or ``none``).

    Title and metadata are first made storable (:func:`~dbb_orchestration.content.storable_text`
    / :func:`~dbb_orchestration.content.storable_json`: NUL removed, lone surrogates → U+FFFD, NaN →
    ``null``), so one odd character in a page never makes Postgres refuse the batch. The content is
    kept exactly: it is stored base64-encoded (Postgres never sees its characters) and its hash must
    stay the backend's, or the two sides would keep rewriting the page."""
    encoded = encode_content(markdown, keyring)
    return {
        "user_id": user_id,
        "connection_id": connection_id,
        "external_id": external_id,
        "title": storable_text(title),
        "content_ciphertext": encoded.ciphertext,
        "content_iv": encoded.iv,
        "content_alg": encoded.alg,
        "content_key_version": encoded.key_version,
        "content_hash": encoded.content_hash,
        "content_size_bytes": encoded.size_bytes,
        "metadata_json": storable_json(dict(metadata)),
        "created_at_source": created_at_source,
        "updated_at_source": updated_at_source,
        "deleted_at_source": deleted_at_source,
        "last_synced_at": now,
    }


def is_unstorable_row_error(exc: BaseException) -> bool:
    """Whether ``exc``, raised while writing document rows, is about the rows' values (the database
    refused a value: bad text or JSON, a constraint) rather than about the database (connection lost,
    timeout, missing table): only then does writing the rows one by one help."""
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError | UnicodeError):
        return True
    return isinstance(exc, sa.exc.StatementError) and isinstance(exc.orig, UnicodeError | ValueError)


_CONFLICT_KEYS = [_DOCS.c.user_id, _DOCS.c.connection_id, _DOCS.c.external_id]
_UPSERT_COLUMNS = (
    "title",
    "content_ciphertext",
    "content_iv",
    "content_alg",
    "content_key_version",
    "content_hash",
    "content_size_bytes",
    "metadata_json",
    "created_at_source",
    "updated_at_source",
    "deleted_at_source",
    "last_synced_at",
)


def upsert_documents(conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Insert or update ``rows`` (from :func:`document_row`, ``deleted_at_source`` ``None``) in one
    statement; returns the external ids actually written. A conflicting row is updated only when the
    incoming ``updated_at_source`` is not stale against it (same rule as :func:`is_stale`), so a newer
    write that happened after the decision wins."""
    if not rows:
        return set()
    stmt = dialect_insert(conn)(_DOCS).values([dict(r) for r in rows])
    incoming = stmt.excluded.updated_at_source
    not_stale = sa.and_(
        sa.or_(_DOCS.c.updated_at_source.is_(None), _DOCS.c.updated_at_source <= incoming),
        sa.or_(_DOCS.c.deleted_at_source.is_(None), _DOCS.c.deleted_at_source < incoming),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=_CONFLICT_KEYS,
        set_={name: stmt.excluded[name] for name in _UPSERT_COLUMNS},
        where=not_stale,
    ).returning(_DOCS.c.external_id)
    return set(conn.execute(stmt).scalars())


def mark_deleted(conn: sa.Connection, deletions: Sequence[tuple[int, datetime]], now: datetime) -> int:
    """Set ``deleted_at_source`` (and ``last_synced_at = now``) on rows ``(document id, source time)``
    that are live and not newer than the deletion; one ``executemany``. Returns rows changed."""
    if not deletions:
        return 0
    when = sa.bindparam("b_when", type_=_DOCS.c.deleted_at_source.type)
    stmt = (
        sa.update(_DOCS)
        .where(
            _DOCS.c.id == sa.bindparam("b_id"),
            _DOCS.c.deleted_at_source.is_(None),
            sa.or_(_DOCS.c.updated_at_source.is_(None), _DOCS.c.updated_at_source <= when),
        )
        .values(deleted_at_source=when, last_synced_at=now)
    )
    result = conn.execute(stmt, [{"b_id": doc_id, "b_when": at} for doc_id, at in deletions])
    return max(0, result.rowcount or 0)


def touch_synced(conn: sa.Connection, document_ids: Iterable[int], when: datetime) -> int:
    """Set ``last_synced_at = when`` on rows whose content was read and found unchanged (one statement),
    so a later sync knows them unchanged without reading them again (:func:`is_known_unchanged`).
    Never moves ``last_synced_at`` backwards. Returns rows changed."""
    ids = sorted(set(document_ids))
    if not ids:
        return 0
    result = conn.execute(
        sa.update(_DOCS)
        .where(
            _DOCS.c.id.in_(ids),
            sa.or_(_DOCS.c.last_synced_at.is_(None), _DOCS.c.last_synced_at < when),
        )
        .values(last_synced_at=when)
    )
    return max(0, result.rowcount or 0)


# --------------------------------------------------------------------------------------------------
# sync_runs and sync_state
# --------------------------------------------------------------------------------------------------
def start_sync_run(
    conn: sa.Connection, connection_id: int, now: datetime, *, kind: str = "incremental"
) -> int:
    """Insert the connection's ``sync_runs`` row, status ``running``; returns its id."""
    return int(
        conn.execute(
            sa.insert(t.sync_runs)
            .values(connection_id=connection_id, kind=kind, status="running", started_at=now, created_at=now)
            .returning(t.sync_runs.c.id)
        ).scalar_one()
    )


def finish_sync_run(
    conn: sa.Connection,
    run_id: int,
    status: str,
    now: datetime,
    *,
    stats: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
) -> None:
    """Close a ``sync_runs`` row: ``status`` (``success``/``failed``/``partial``), ``finished_at``,
    ``stats_json`` and ``error_json``."""
    conn.execute(
        sa.update(t.sync_runs)
        .where(t.sync_runs.c.id == run_id)
        .values(
            status=status,
            finished_at=now,
            stats_json=dict(stats) if stats is not None else None,
            error_json=dict(error) if error is not None else None,
        )
    )


@dataclass(frozen=True)
class SyncStateSnapshot:
    """The parts of ``sync_state`` the sync reads. All ``None`` when the connection has no row yet."""

    cursor_json: Any = None
    last_incremental_sync_at: datetime | None = None
    health_json: Any = None


def read_sync_state(conn: sa.Connection, connection_id: int) -> SyncStateSnapshot:
    row = conn.execute(
        sa.select(
            t.sync_state.c.cursor_json,
            t.sync_state.c.last_incremental_sync_at,
            t.sync_state.c.health_json,
        ).where(t.sync_state.c.connection_id == connection_id)
    ).first()
    if row is None:
        return SyncStateSnapshot()
    return SyncStateSnapshot(row.cursor_json, row.last_incremental_sync_at, row.health_json)


def _upsert_sync_state(conn: sa.Connection, connection_id: int, values: Mapping[str, Any]) -> None:
    stmt = dialect_insert(conn)(t.sync_state).values(connection_id=connection_id, **values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.sync_state.c.connection_id], set_={k: stmt.excluded[k] for k in values}
    )
    conn.execute(stmt)


def save_sync_success(
    conn: sa.Connection,
    connection_id: int,
    *,
    cursor: Mapping[str, Any],
    now: datetime,
    full: bool,
    health: Mapping[str, Any],
) -> None:
    """Upsert ``sync_state`` after a successful sync: ``cursor_json``, ``last_incremental_sync_at``,
    ``updated_at``, ``health_json``, and ``last_full_sync_at`` when every database was read in full."""
    values: dict[str, Any] = {
        "cursor_json": dict(cursor),
        "last_incremental_sync_at": now,
        "health_json": dict(health),
        "updated_at": now,
    }
    if full:
        values["last_full_sync_at"] = now
    _upsert_sync_state(conn, connection_id, values)


def save_sync_failure(
    conn: sa.Connection, connection_id: int, *, now: datetime, health: Mapping[str, Any]
) -> None:
    """Record a failed sync in ``health_json`` (and ``updated_at``); the cursor is not touched, so the
    next sync reads again everything this one may have missed."""
    _upsert_sync_state(conn, connection_id, {"health_json": dict(health), "updated_at": now})
