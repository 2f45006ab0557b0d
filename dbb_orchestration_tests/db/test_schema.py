"""The Core tables round-trip on SQLite and Postgres and match the backend's DDL."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from dbb_orchestration.cli import main as cli_main
from dbb_orchestration.db import create_db_engine, create_schema, normalize_database_url
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.schema_check import check_schema
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import BACKEND_DDL


def test_backend_ddl_copy_declares_what_the_tables_mirror() -> None:
    """The repository's copy of the backend DDL and ``tables.py`` name the same tables and enums."""
    ddl = BACKEND_DDL.read_text()
    ddl_tables = {name.strip('"') for name in re.findall(r"^CREATE TABLE (\S+) \(", ddl, flags=re.M)}
    ddl_enums = dict(re.findall(r"^CREATE TYPE (\w+) AS ENUM \(([^)]*)\);", ddl, flags=re.M))
    assert ddl_tables == set(t.metadata.tables)
    mirrored_enums = {
        col.type.name: tuple(col.type.enums)
        for table in t.metadata.tables.values()
        for col in table.columns
        if isinstance(col.type, sa.Enum)
    }
    assert {name: tuple(v.strip(" '") for v in values.split(",")) for name, values in ddl_enums.items()} == (
        mirrored_enums
    )


def test_every_spec_table_is_mirrored() -> None:
    expected = {
        "user", "account", "integration_connections", "integration_scope_items", "documents", "sync_state",
        "sync_runs", "review_states", "review_events", "user_settings", "billing_customers",
        "billing_subscriptions", "note_digests", "note_digest_items", "email_sequence_states", "email_sends",
    }  # fmt: skip
    assert set(t.metadata.tables) == expected


def test_round_trip_rows_and_aware_timestamps(engine: sa.Engine) -> None:
    when = datetime(2026, 2, 8, 8, 30, tzinfo=timezone(timedelta(hours=-5)))
    with engine.begin() as conn:
        f.user(conn, "u1", name="Ada")
        f.settings(conn, "u1", timezone="Asia/Kolkata", preferred_send_hour=7)
        conn_id = f.connection(conn, "u1", kind="notion", display_name="Study Notes")
        doc = f.document(conn, "u1", conn_id, external_id="p1", markdown="hello", updated_at_source=when)
        f.review_state(conn, doc, "u1", priority_weight=2.5, next_due_at=when, scheduling_json={"a": [1, 2]})
        digest_id = f.digest(conn, "u1", scheduled_for=when, document_ids=[doc], payload={"source": "x"})
    with engine.connect() as conn:
        row = conn.execute(sa.select(t.review_states)).mappings().one()
        assert row["next_due_at"] == when and row["next_due_at"].tzinfo is not None
        assert row["next_due_at"].utcoffset() == timedelta(0)
        assert row["scheduling_json"] == {"a": [1, 2]}
        assert row["status"] == "new"
        d = conn.execute(sa.select(t.note_digests)).mappings().one()
        assert d["id"] == digest_id and d["payload_json"] == {"source": "x"}
        assert d["created_at"].tzinfo is not None
        settings = conn.execute(sa.select(t.user_settings)).mappings().one()
        assert settings["digest_interval_days"] == 3 and settings["quiz_enabled"] is False
        # server defaults come back aware too
        assert settings["created_at"].tzinfo == UTC


def test_unique_constraints_hold(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.sequence_state(conn, "u1", "welcome")
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        f.sequence_state(conn, "u1", "welcome")
    with engine.begin() as conn:
        values = {"user_id": "u1", "email_name": "welcome-1", "idempotency_key": "k"}
        conn.execute(sa.insert(t.email_sends).values(**values))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.insert(t.email_sends).values(**values))


def test_naive_datetime_is_refused(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), engine.begin() as conn:
        conn.execute(
            sa.insert(t.note_digests).values(
                user_id="u1", status="scheduled", scheduled_for=datetime(2026, 1, 1)
            )
        )


def test_check_schema_is_clean_on_created_schema(engine: sa.Engine) -> None:
    # On Postgres ``engine`` holds the backend's own DDL; on SQLite our metadata.
    assert [str(p) for p in check_schema(engine) if p.fatal] == []


@pytest.mark.postgres
def test_metadata_create_all_matches_backend_ddl_on_postgres(postgres_databases) -> None:
    ours = create_db_engine(postgres_databases.create())
    create_schema(ours)
    assert [str(p) for p in check_schema(ours)] == []
    ours.dispose()


@pytest.mark.postgres
def test_check_schema_reports_dropped_column_and_missing_enum_value(postgres_databases, capsys) -> None:
    ddl = BACKEND_DDL.read_text().replace(
        "CREATE TYPE note_digest_status AS ENUM ('scheduled', 'sent', 'failed', 'skipped');",
        "CREATE TYPE note_digest_status AS ENUM ('scheduled', 'sent', 'failed');",
    )
    assert "'failed');" in ddl
    url = postgres_databases.create(ddl=ddl)
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE review_states DROP COLUMN next_due_at")
        conn.exec_driver_sql("DROP INDEX email_sends_idempotency_idx")
        conn.exec_driver_sql("ALTER TABLE email_sends ALTER COLUMN resend_id TYPE integer USING NULL")
    problems = {str(p) for p in check_schema(engine)}
    assert "ERROR review_states.next_due_at: column is missing" in problems
    assert "ERROR enum note_digest_status: missing values: skipped" in problems
    assert "ERROR email_sends: unique index on (idempotency_key) is missing" in problems
    assert "ERROR email_sends.resend_id: type is integer, expected text" in problems
    engine.dispose()
    # the CLI exits non-zero and names the problems, read-only
    assert cli_main(["check-schema", "--database-url", url]) == 1
    out = capsys.readouterr().out
    assert "review_states.next_due_at: column is missing" in out
    assert "4 problem(s)" in out


def test_check_schema_cli_ok_and_init_db(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    assert cli_main(["init-db", "--database-url", url]) == 0
    assert cli_main(["check-schema", "--database-url", url]) == 0
    assert "schema OK" in capsys.readouterr().out


def test_check_schema_on_sqlite_reports_missing_table(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'y.sqlite'}")
    create_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE email_sends")
    assert [str(p) for p in check_schema(engine)] == ["ERROR email_sends: table is missing"]


@pytest.mark.parametrize(
    ("raw", "driver", "database"),
    [
        ("postgres://u:p@db:5432/app", "postgresql+psycopg", "app"),
        ("postgresql://u@db/app", "postgresql+psycopg", "app"),
        ("postgresql+psycopg2://u@db/app", "postgresql+psycopg", "app"),
        ("sqlite:///tmp/x.sqlite", "sqlite", "tmp/x.sqlite"),
    ],
)
def test_database_url_normalisation(raw: str, driver: str, database: str) -> None:
    url = normalize_database_url(raw)
    assert url.drivername == driver and url.database == database


@pytest.mark.parametrize("raw", ["", "   ", "mysql://x@y/z", "not a url"])
def test_bad_database_url_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        normalize_database_url(raw)
