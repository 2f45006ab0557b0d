"""Helpers for the sequence tests: a fixed clock, the fake Resend, statement counting, engine clean-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.db.engine import shared_engine
from dbb_orchestration_tests.conftest import SENDER_FROM

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
FROM = SENDER_FROM


class StatementCounter:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)


@contextmanager
def count_statements(engine: sa.Engine) -> Iterator[StatementCounter]:
    counter = StatementCounter()
    sa.event.listen(engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        sa.event.remove(engine, "before_cursor_execute", counter)


@pytest.fixture
def app_url(db_url: str) -> Iterator[str]:
    """``db_url`` (SQLite, then Postgres) for tests that go through the Dagster resources, which use the
    process-wide ``shared_engine`` cache: its pool is closed afterwards so connections don't pile up."""
    yield db_url
    shared_engine(db_url).dispose()
    shared_engine.cache_clear()
