"""Read-only comparison of a live database against the tables this code location relies on.

``dbb-orchestration check-schema`` prints one line per problem and exits non-zero when any is found.
Nothing is written: the backend owns the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
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


def _family(type_: sa.types.TypeEngine, dialect: str) -> str:
    """A coarse type family that survives reflection (``TEXT`` vs ``Text()`` etc.)."""
    t = type_
    if isinstance(t, sa.types.TypeDecorator):
        t = t.impl  # type: ignore[assignment]
    if isinstance(t, sa.Enum):
        return f"enum:{t.name}" if dialect == "postgresql" else "text"
    if isinstance(t, sa.JSON):
        return "json"
    if isinstance(t, sa.DateTime):
        if dialect != "postgresql":
            return "timestamp"
        return "timestamptz" if t.timezone else "timestamp"
    if isinstance(t, sa.Boolean):
        return "boolean"
    if isinstance(t, sa.Integer):
        return "integer"
    if isinstance(t, sa.Float | sa.Numeric):
        return "float"
    if isinstance(t, sa.String):
        return "text"
    name = type(t).__name__.upper()
    if "JSON" in name:
        return "json"
    return name.lower()


def check_schema(engine: Engine) -> list[SchemaProblem]:
    """Every table, column, type, enum value and unique index this code needs that the database lacks."""
    dialect = engine.dialect.name
    problems: list[SchemaProblem] = []
    insp = sa.inspect(engine)
    live_tables = set(insp.get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in live_tables:
            problems.append(SchemaProblem(table.name, None, "table is missing"))
            continue
        live_cols = {c["name"]: c for c in insp.get_columns(table.name)}
        for col in table.columns:
            live = live_cols.get(col.name)
            if live is None:
                problems.append(SchemaProblem(table.name, col.name, "column is missing"))
                continue
            want, got = _family(col.type, dialect), _family(live["type"], dialect)
            if want != got:
                problems.append(SchemaProblem(table.name, col.name, f"type is {got}, expected {want}"))
            if not col.nullable and live.get("nullable", True) and not col.primary_key:
                problems.append(
                    SchemaProblem(table.name, col.name, "is nullable, expected NOT NULL", fatal=False)
                )
        live_unique = {
            tuple(ix["column_names"]) for ix in insp.get_indexes(table.name) if ix.get("unique")
        } | {tuple(uc["column_names"]) for uc in insp.get_unique_constraints(table.name)}
        for ix in table.indexes:
            cols = tuple(c.name for c in ix.columns)
            if ix.unique and cols not in live_unique:
                problems.append(
                    SchemaProblem(table.name, None, f"unique index on ({', '.join(cols)}) is missing")
                )
    if dialect == "postgresql":
        problems.extend(_check_enums(engine))
    return problems


def _check_enums(engine: Engine) -> list[SchemaProblem]:
    insp = sa.inspect(engine)
    live = {e["name"]: list(e["labels"]) for e in insp.get_enums(schema="*")}  # type: ignore[attr-defined]
    problems: list[SchemaProblem] = []
    seen: set[str] = set()
    for table in metadata.sorted_tables:
        for col in table.columns:
            if not isinstance(col.type, sa.Enum) or col.type.name in seen:
                continue
            name = str(col.type.name)
            seen.add(name)
            if name not in live:
                problems.append(SchemaProblem(f"enum {name}", None, "enum type is missing"))
                continue
            missing = [v for v in col.type.enums if v not in live[name]]
            extra = [v for v in live[name] if v not in col.type.enums]
            if missing:
                problems.append(SchemaProblem(f"enum {name}", None, f"missing values: {', '.join(missing)}"))
            if extra:
                problems.append(
                    SchemaProblem(
                        f"enum {name}", None, f"values unknown to this code: {', '.join(extra)}", fatal=False
                    )
                )
    return problems


def has_no_tables(problems: list[SchemaProblem]) -> bool:
    """True when every table this code needs is missing (an empty database or the wrong one)."""
    missing = {p.table for p in problems if p.column is None and p.message == "table is missing"}
    return missing == {table.name for table in metadata.sorted_tables}
