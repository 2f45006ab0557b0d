"""Engines for the application database (Postgres in production, SQLite locally)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from dbb_orchestration.db.tables import metadata


class DatabaseUrlError(ValueError):
    """``DATABASE_URL`` is missing or not a URL this code location can use."""


def normalize_database_url(raw: str) -> URL:
    """Turn the backend's ``DATABASE_URL`` into a SQLAlchemy URL.

    The backend writes ``postgres://`` or ``postgresql://``; both map to psycopg 3. SQLite URLs pass
    through. Anything else raises :class:`DatabaseUrlError` naming ``DATABASE_URL`` (the value itself is
    not echoed: it may hold a password).
    """
    raw = (raw or "").strip()
    if not raw:
        raise DatabaseUrlError("DATABASE_URL is not set")
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    try:
        url = make_url(raw)
    except sa.exc.ArgumentError as exc:
        raise DatabaseUrlError("DATABASE_URL is not a valid database URL") from exc
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.get_driver_name() in ("psycopg2", "psycopg", "") or "+" not in url.drivername:
            url = url.set(drivername="postgresql+psycopg")
        return url
    if backend == "sqlite":
        return url
    raise DatabaseUrlError(f"DATABASE_URL must be a postgres:// or sqlite:// URL, got scheme {backend!r}")


# The usual first-run Postgres mistakes, recognised in the driver's lower-cased message, first match wins.
_POSTGRES_PROBLEMS: tuple[tuple[Callable[[str], bool], str], ...] = (
    (
        lambda m: "connection refused" in m,
        "cannot connect to Postgres at {host} (connection refused): start the server or fix the host "
        "and port in DATABASE_URL",
    ),
    (
        lambda m: "does not exist" in m and "database" in m,
        "database {database!r} does not exist on {host}: create it, or fix the database name in DATABASE_URL",
    ),
    (
        lambda m: "password authentication failed" in m or "no password supplied" in m,
        "Postgres at {host} rejected the login for user {user!r}: check the user and password in DATABASE_URL",
    ),
    (
        lambda m: "role" in m and "does not exist" in m,
        "Postgres at {host} has no user {user!r}: check the user in DATABASE_URL",
    ),
    (
        lambda m: "could not translate host name" in m or "name or service not known" in m,
        "cannot resolve the database host {hostname!r}: check the host in DATABASE_URL",
    ),
    (
        lambda m: "timeout" in m or "timed out" in m,
        "Postgres at {host} did not answer in time: check the host, port and network (DATABASE_URL)",
    ),
)


def connection_problem(exc: BaseException, url: URL) -> str:
    """One line for a failure to reach or open the database at ``url``: what went wrong and the fix.

    Understands the usual first-run mistakes (server not running, unknown database, wrong login,
    unknown host, unreadable SQLite file) from the driver's message; anything else is reported with the
    driver's first line. The password is never included.
    """
    where = url.render_as_string(hide_password=True)
    message = str(getattr(exc, "orig", None) or exc)
    lower = message.lower()
    if url.get_backend_name() == "sqlite":
        if "unable to open database file" in lower:
            return (
                f"cannot open the SQLite file {url.database!r}: check that its folder exists and is writable"
            )
        return f"SQLite error on {where}: {_first_line(message)}"
    host = f"{url.host or 'localhost'}:{url.port or 5432}"
    for matches, template in _POSTGRES_PROBLEMS:
        if matches(lower):
            return template.format(host=host, database=url.database, user=url.username, hostname=url.host)
    return f"cannot use the database at {where}: {_first_line(message)}"


def _first_line(message: str) -> str:
    for line in message.splitlines():
        line = line.strip()
        if line:
            return line.removeprefix("connection failed: ")
    return "unknown error"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def create_db_engine(raw_url: str, **kwargs: Any) -> Engine:
    """A new engine for ``raw_url`` (see :func:`normalize_database_url`)."""
    url = normalize_database_url(raw_url)
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        if url.database and url.database != ":memory:":
            with engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 5)
    return sa.create_engine(url, **kwargs)


@functools.lru_cache(maxsize=8)
def shared_engine(raw_url: str) -> Engine:
    """One pooled engine per URL per process (sensors and ops reuse it across ticks)."""
    return create_db_engine(raw_url)


def create_schema(engine: Engine) -> None:
    """Create every table, enum and index (tests and local runs only; never production)."""
    metadata.create_all(engine)


def is_postgres(engine_or_conn: Engine | sa.Connection) -> bool:
    return engine_or_conn.dialect.name == "postgresql"
