"""connection_problem turns a driver's error into one line naming the problem and the fix, never the
password."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from dbb_orchestration.db.engine import connection_problem

PG = make_url("postgresql+psycopg://dbb:s3cret@db.internal:6543/app")


@pytest.mark.parametrize(
    ("driver_message", "expected"),
    [
        (
            "connection failed: Connection refused",
            "cannot connect to Postgres at db.internal:6543 (connection refused): start the server or fix "
            "the host and port in DATABASE_URL",
        ),
        (
            'FATAL:  database "app" does not exist',
            "database 'app' does not exist on db.internal:6543: create it, or fix the database name in "
            "DATABASE_URL",
        ),
        (
            'FATAL:  password authentication failed for user "dbb"',
            "Postgres at db.internal:6543 rejected the login for user 'dbb': check the user and password in "
            "DATABASE_URL",
        ),
        (
            'FATAL:  role "dbb" does not exist',
            "Postgres at db.internal:6543 has no user 'dbb': check the user in DATABASE_URL",
        ),
        (
            'could not translate host name "db.internal" to address',
            "cannot resolve the database host 'db.internal': check the host in DATABASE_URL",
        ),
        (
            "connection timeout expired",
            "Postgres at db.internal:6543 did not answer in time: check the host, port and network "
            "(DATABASE_URL)",
        ),
        (
            "\n  connection failed: something odd\nsecond line",
            "cannot use the database at postgresql+psycopg://dbb:***@db.internal:6543/app: something odd",
        ),
    ],
)
def test_postgres_problems_name_the_cause_and_the_fix(driver_message: str, expected: str) -> None:
    line = connection_problem(RuntimeError(driver_message), PG)
    assert line == expected
    assert "s3cret" not in line


def test_sqlite_problems() -> None:
    url = make_url("sqlite:////nowhere/dbb.sqlite")
    assert connection_problem(RuntimeError("unable to open database file"), url) == (
        "cannot open the SQLite file '/nowhere/dbb.sqlite': check that its folder exists and is writable"
    )
    assert connection_problem(RuntimeError("disk I/O error"), url) == (
        "SQLite error on sqlite:////nowhere/dbb.sqlite: disk I/O error"
    )
