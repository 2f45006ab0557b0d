"""Database access: the backend's tables, engines and schema checks."""

from dbb_orchestration.db import tables
from dbb_orchestration.db.engine import (
    DatabaseUrlError,
    create_db_engine,
    create_schema,
    is_postgres,
    normalize_database_url,
    shared_engine,
)

__all__ = [
    "DatabaseUrlError",
    "create_db_engine",
    "create_schema",
    "is_postgres",
    "normalize_database_url",
    "shared_engine",
    "tables",
]
