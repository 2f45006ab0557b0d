"""Which Notion connections the weekly sync reads, and what it reads of each (docs/behaviour.md §11).

A connection is eligible when it is an ``active`` ``notion`` connection whose user has a ``notion``
``account`` row with ``account_id = account_external_id`` and a non-empty access token. Its enabled
``notion_database`` scope items are the databases to read; :func:`database_since` says whether a
database is read from the cursor or in full.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.audience import active_source_sql
from dbb_orchestration.db import tables as t

__all__ = [
    "ConnectionDetails",
    "ScopeDatabase",
    "SyncTarget",
    "database_since",
    "find_sync_targets",
    "load_connection",
]


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
    return joined, [c.c.kind == "notion", active_source_sql(c)]


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
