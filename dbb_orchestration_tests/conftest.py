"""Shared fixtures: application databases on SQLite and on a real Postgres.

Postgres tests run when ``DBB_TEST_POSTGRES_URL`` names a server login (e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``); each test gets a fresh database with a unique name,
created from the backend's own DDL (``backend_schema.sql``) and dropped afterwards. Without the variable
they are skipped with a message saying how to enable them; with it, an unreachable server fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine, create_schema
from dbb_orchestration.email.sender import ResendSender
from dbb_orchestration.testing.fake_resend import FakeResend

BACKEND_DDL = Path(__file__).with_name("backend_schema.sql")
PG_ENV = "DBB_TEST_POSTGRES_URL"
PG_HINT = f"Postgres tests are off: set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/postgres to run them"


def postgres_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_db_engine(url)
    create_schema(engine)
    engine.dispose()
    return url


class PostgresDatabases:
    """Creates throwaway databases on the test server and drops them all at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self.base_url = self.admin.url
        self.names: list[str] = []

    def create(self, *, ddl: str | None = None) -> str:
        name = f"dbb_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        url = self.base_url.set(database=name).render_as_string(hide_password=False)
        if ddl is not None:
            engine = create_db_engine(url, poolclass=sa.pool.NullPool)
            with engine.begin() as conn:
                conn.exec_driver_sql(ddl)
            engine.dispose()
        return url

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    admin_url = postgres_admin_url()
    if admin_url is None:
        pytest.skip(PG_HINT)
    dbs = PostgresDatabases(admin_url)
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture
def postgres_url(postgres_databases: PostgresDatabases) -> str:
    """A fresh Postgres database with the backend's real schema loaded from its DDL."""
    return postgres_databases.create(ddl=BACKEND_DDL.read_text())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on Postgres."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = create_db_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


SENDER_FROM = "Daily Brain Bits <digest@dbb.notionist.app>"


@pytest.fixture
def fake_resend() -> Iterator[FakeResend]:
    """The loopback fake Resend; a bug inside the fake fails the test."""
    with FakeResend() as fake:
        yield fake
    fake.raise_server_errors()


def resend_sender(fake: FakeResend) -> ResendSender:
    """The real Resend sender (real SDK, over HTTP) pointed at the fake; retries without sleeping."""
    return ResendSender(
        api_key="re_test",
        api_url=fake.base_url,
        from_address=SENDER_FROM,
        base_delay=0.001,
        sleep=lambda _s: None,
    )
