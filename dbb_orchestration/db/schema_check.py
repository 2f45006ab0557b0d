"""Read-only comparison of a live database against the tables this code location relies on.

``dbb-orchestration check-schema`` prints one line per problem and exits non-zero when any is found.
Nothing is written: the backend owns the schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from dbb_orchestration.db.tables import metadata


@dataclass(frozen=True)
class SchemaProblem:
    table: str
    column: str | None
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        where = self.table if self.column is None else f"{self.table}.{self.column}"
        return f"{'ERROR' if self.fatal else 'WARN '} {where}: {self.message}"


# Simple type families by SQLAlchemy type class, most specific first (enums and timestamps need more).
_FAMILIES: tuple[tuple[type[Any], str], ...] = (
    (sa.JSON, "json"),
    (sa.Boolean, "boolean"),
    (sa.Integer, "integer"),
    (sa.Float, "float"),
    (sa.Numeric, "float"),
    (sa.String, "text"),
)


def _family(type_: sa.types.TypeEngine, dialect: str) -> str:
    """A coarse type family that survives reflection (``TEXT`` vs ``Text()`` etc.)."""
    t = type_
    if isinstance(t, sa.types.TypeDecorator):
        t = t.impl  # type: ignore[assignment]
    if isinstance(t, sa.Enum):
        return f"enum:{t.name}" if dialect == "postgresql" else "text"
    if isinstance(t, sa.DateTime):
        return "timestamptz" if dialect == "postgresql" and t.timezone else "timestamp"
    return next((name for cls, name in _FAMILIES if isinstance(t, cls)), None) or _family_by_name(t)


def _family_by_name(type_: sa.types.TypeEngine) -> str:
    """A dialect type none of :data:`_FAMILIES` covers, by its class name (``JSONB`` → ``json``)."""
    name = type(type_).__name__.upper()
    return "json" if "JSON" in name else name.lower()


def check_schema(engine: Engine) -> list[SchemaProblem]:
    """Every table, column, type, enum value and unique index this code needs that the database lacks.

    Tables, columns, types (compared by :func:`_family`) and nullability come from alembic's
    ``compare_metadata`` (read-only reflection); unique indexes and enum values are checked here.
    Whatever the database has beyond what this code needs (the backend's other tables, columns and
    indexes) is not a problem."""
    dialect = engine.dialect.name
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": _type_differs})
        diffs = compare_metadata(context, metadata)
        problems = [p for diff in _flatten(diffs) if (p := _problem(diff, dialect)) is not None]
        problems.extend(
            _check_unique_indexes(sa.inspect(conn), {p.table for p in problems if p.column is None})
        )
    if dialect == "postgresql":
        problems.extend(_check_enums(engine))
    return problems


def _type_differs(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_type: sa.types.TypeEngine[Any],
    metadata_type: sa.types.TypeEngine[Any],
) -> bool:
    dialect = context.dialect.name
    return _family(inspected_type, dialect) != _family(metadata_type, dialect)


def _flatten(diffs: list[Any]) -> Iterator[tuple[Any, ...]]:
    """alembic groups a column's ``modify_*`` diffs in a list: one tuple per difference."""
    for diff in diffs:
        if isinstance(diff, list):
            yield from diff
        else:
            yield diff


def _problem(diff: tuple[Any, ...], dialect: str) -> SchemaProblem | None:
    """The problem a diff means, or ``None`` for what the database may have beyond this code's needs."""
    kind = diff[0]
    if kind == "add_table":
        return SchemaProblem(diff[1].name, None, "table is missing")
    if kind == "add_column":
        return SchemaProblem(diff[2], diff[3].name, "column is missing")
    if kind == "modify_type":
        _kind, _schema, table, column, _existing, live_type, want_type = diff
        got, want = _family(live_type, dialect), _family(want_type, dialect)
        return SchemaProblem(table, column, f"type is {got}, expected {want}")
    if kind == "modify_nullable":
        _kind, _schema, table, column, _existing, _live_nullable, want_nullable = diff
        if not want_nullable and not metadata.tables[table].c[column].primary_key:
            return SchemaProblem(table, column, "is nullable, expected NOT NULL", fatal=False)
    return None


def _check_unique_indexes(insp: Any, missing_tables: set[str]) -> list[SchemaProblem]:
    """Each unique index this code relies on (upserts' conflict targets) that the live table lacks, as a
    unique index or a unique constraint on the same columns."""
    problems: list[SchemaProblem] = []
    for table in metadata.sorted_tables:
        if table.name in missing_tables:
            continue
        live_unique = {
            tuple(ix["column_names"]) for ix in insp.get_indexes(table.name) if ix.get("unique")
        } | {tuple(uc["column_names"]) for uc in insp.get_unique_constraints(table.name)}
        for ix in table.indexes:
            cols = tuple(c.name for c in ix.columns)
            if ix.unique and cols not in live_unique:
                problems.append(
                    SchemaProblem(table.name, None, f"unique index on ({', '.join(cols)}) is missing")
                )
    return problems


def _check_enums(engine: Engine) -> list[SchemaProblem]:
    insp = sa.inspect(engine)
    live = {e["name"]: list(e["labels"]) for e in insp.get_enums(schema="*")}  # type: ignore[attr-defined]
    wanted = {
        str(col.type.name): list(col.type.enums)
        for table in metadata.sorted_tables
        for col in table.columns
        if isinstance(col.type, sa.Enum)
    }
    return [p for name, values in wanted.items() for p in _enum_problems(name, values, live.get(name))]


def _enum_problems(name: str, want: list[str], live: list[str] | None) -> list[SchemaProblem]:
    """A missing enum type, values this code writes that it lacks, values this code does not know."""
    if live is None:
        return [SchemaProblem(f"enum {name}", None, "enum type is missing")]
    problems: list[SchemaProblem] = []
    missing = [v for v in want if v not in live]
    extra = [v for v in live if v not in want]
    if missing:
        problems.append(SchemaProblem(f"enum {name}", None, f"missing values: {', '.join(missing)}"))
    if extra:
        message = f"values unknown to this code: {', '.join(extra)}"
        problems.append(SchemaProblem(f"enum {name}", None, message, fatal=False))
    return problems


def has_no_tables(problems: list[SchemaProblem]) -> bool:
    """True when every table this code needs is missing (an empty database or the wrong one)."""
    missing = {p.table for p in problems if p.column is None and p.message == "table is missing"}
    return missing == {table.name for table in metadata.sorted_tables}
