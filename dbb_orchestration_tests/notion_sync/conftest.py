"""Fixtures for the Notion sync tests: a FakeNotion, a settable clock, and backend-shaped rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.client import NotionApi, make_sdk_client
from dbb_orchestration.testing import FakeNotion
from dbb_orchestration.testing import factories as f

T0 = datetime(2026, 2, 8, 10, 0, tzinfo=UTC)
"""Page edit times are around this instant; the clock starts an hour later."""
LONG_AGO = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    """A settable ``now`` for ``sync_connection(clock=...)``."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class ApiFactory:
    """``open_api`` for ``sync_connection``: a real SDK client against the fake, no pacing, recorded
    back-off sleeps (so 429 tests do not wait)."""

    base_url: str
    sleeps: list[float] = field(default_factory=list)

    def __call__(self, token: str) -> AbstractContextManager[NotionApi]:
        @contextmanager
        def opened() -> Iterator[NotionApi]:
            with NotionApi(make_sdk_client(token, self.base_url), sleep=self.sleeps.append) as api:
                yield api

        return opened()


@pytest.fixture
def fake() -> Iterator[FakeNotion]:
    with FakeNotion() as server:
        yield server
    server.raise_server_errors()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + timedelta(hours=1))


@pytest.fixture
def open_api(fake: FakeNotion) -> ApiFactory:
    return ApiFactory(fake.base_url)


def notion_connection(
    conn: sa.Connection,
    fake: FakeNotion,
    user_id: str,
    databases: list[str],
    *,
    token: str | None = None,
    create_user: bool = True,
    workspace: str | None = None,
) -> int:
    """A user (optional) with a Notion account and an active notion connection whose enabled scope
    items are ``databases``; the token is registered with ``fake``. Scope items are dated long ago so
    they do not count as "changed since the last sync"."""
    token = token or f"secret_{user_id}"
    workspace = workspace or f"ws-{user_id}"
    if create_user:
        f.user(conn, user_id)
    connection_id = f.connection(
        conn, user_id, kind="notion", account_external_id=workspace, display_name="Notes"
    )
    f.notion_account(conn, user_id, account_id=workspace, access_token=token)
    for database_id in databases:
        f.scope_item(conn, connection_id, database_id)
    conn.execute(
        sa.update(t.integration_scope_items)
        .where(t.integration_scope_items.c.connection_id == connection_id)
        .values(created_at=LONG_AGO, updated_at=LONG_AGO)
    )
    fake.add_token(token)
    return connection_id
