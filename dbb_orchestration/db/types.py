"""Column types that behave the same on Postgres and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """``timestamptz`` that always hands back timezone-aware UTC datetimes.

    Postgres stores ``timestamp with time zone`` natively. SQLite has no time zones, so values are
    stored as naive UTC and re-tagged as UTC on the way out. Binding a naive datetime is a bug in the
    caller (its meaning is ambiguous) and raises ``ValueError``.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value!r} bound to a timestamptz column; pass an aware datetime"
            )
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite server defaults such as CURRENT_TIMESTAMP
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSON everywhere, JSONB on Postgres (the backend's type).
JSONB: Any = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
