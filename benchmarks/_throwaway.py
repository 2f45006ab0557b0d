"""A throwaway Postgres database for a benchmark: created with a unique name, loaded with the backend's
DDL (``dbb_orchestration_tests/backend_schema.sql``, its indexes and no others) or left empty, dropped
afterwards unless kept. Shared by the benchmark scripts; not a benchmark itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import sqlalchemy as sa

DDL = Path(__file__).resolve().parent.parent / "dbb_orchestration_tests" / "backend_schema.sql"


@contextmanager
def throwaway_database(admin_url: str, *, keep: bool = False, schema: bool = True) -> Iterator[str]:
    """Yield the URL of a new database holding the backend's schema (an empty one when not ``schema``,
    e.g. for Dagster's own storage); drop it on exit unless ``keep``."""
    name = f"dbb_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        try:
            if schema:
                with psycopg.connect(url) as conn:
                    conn.execute(DDL.read_text())  # type: ignore[arg-type]
            yield url
        finally:
            if keep:
                print(f"kept database {name}: {url}")
            else:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
