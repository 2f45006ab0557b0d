"""Generic set-based reads and writes on Postgres and SQLite, written once for every workflow.

- :func:`in_ids` — ``column IN ids`` as ONE bind parameter whatever the list's length: on Postgres the
  ids travel as a single array (``col = ANY(:ids)``), on SQLite as one JSON parameter
  (``col IN (SELECT value FROM json_each(:ids))``), so neither hits a bind-parameter limit.
- :func:`dialect_insert` — the dialect's ``insert`` (both offer ``on_conflict_do_nothing`` /
  ``on_conflict_do_update`` and ``.excluded``).
- :func:`insert_many` — Postgres: ``INSERT … SELECT … FROM unnest(:col1, :col2, …)`` (one statement for
  any number of rows, one array parameter per column, optional ``ON CONFLICT … DO UPDATE`` and
  ``RETURNING``); SQLite: the dialect's ``insert`` executed with a list of rows.
- :func:`update_many` — Postgres: ``UPDATE … FROM unnest(…) AS v WHERE t.id = v.id``; SQLite: one
  ``UPDATE … SET c = CASE id WHEN … END WHERE id IN (…)`` per 300 rows.

Nothing here decides anything: callers pass plain values and get plain rows back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from dbb_orchestration.db.engine import is_postgres

__all__ = ["dialect_insert", "in_ids", "insert_many", "update_many"]

_SQLITE_UPDATE_CHUNK = 300


def dialect_insert(conn: sa.Connection | bool) -> Callable[[sa.Table], Any]:
    """``postgresql.insert`` or ``sqlite.insert`` for ``conn`` (or for ``True`` = Postgres)."""
    postgres = conn if isinstance(conn, bool) else is_postgres(conn)
    return postgresql.insert if postgres else sqlite.insert  # type: ignore[return-value]


def in_ids(conn: sa.Connection, column: sa.ColumnElement[Any], ids: Sequence[Any]) -> sa.ColumnElement[bool]:
    """``column IN ids`` as one bind parameter (see the module docstring). ``ids`` must be all ``int`` or
    all ``str``; an empty list gives a condition that is always false."""
    values = list(ids)
    if not values:
        return sa.false()
    if is_postgres(conn):
        item_type: sa.types.TypeEngine[Any] = sa.Integer() if isinstance(values[0], int) else sa.Text()
        return column == sa.any_(sa.bindparam(None, values, type_=postgresql.ARRAY(item_type)))
    each = sa.func.json_each(sa.bindparam(None, json.dumps(values), type_=sa.Text())).table_valued("value")
    return column.in_(sa.select(each.c.value))


def _is_json(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.JSON) or "JSON" in type(column.type).__name__.upper()


def _array_param(column: sa.Column[Any], values: list[Any]) -> tuple[sa.BindParameter[Any], bool]:
    """An array bind parameter for ``column``'s values; the flag says whether the unnested value must be
    cast back to the column type (enums and JSON travel as text)."""
    col_type = column.type
    if isinstance(col_type, sa.Enum):
        return sa.bindparam(None, values, type_=postgresql.ARRAY(sa.Text())), True
    if _is_json(column):
        encoded = [None if v is None else json.dumps(v) for v in values]
        return sa.bindparam(None, encoded, type_=postgresql.ARRAY(sa.Text())), True
    return sa.bindparam(None, values, type_=postgresql.ARRAY(col_type)), False


def _unnest(
    table: sa.Table, names: Sequence[str], rows: Sequence[Mapping[str, Any]], alias: str
) -> tuple[Any, dict[str, sa.ColumnElement[Any]]]:
    """``unnest(:a, :b, …) AS alias(a, b, …)`` and, per column name, the expression to select (cast back
    to the column type where needed)."""
    params = []
    casts: dict[str, bool] = {}
    for name in names:
        param, cast = _array_param(table.c[name], [row[name] for row in rows])
        params.append(param)
        casts[name] = cast
    derived = sa.func.unnest(*params).table_valued(*names, name=alias).render_derived()
    exprs: dict[str, sa.ColumnElement[Any]] = {}
    for name in names:
        col = derived.c[name]
        exprs[name] = sa.cast(col, table.c[name].type) if casts[name] else col
    return derived, exprs


def insert_many(
    conn: sa.Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    returning: Sequence[sa.Column[Any]] = (),
    on_conflict: Callable[[Any], Insert] | None = None,
) -> list[sa.Row[Any]]:
    """Insert ``rows`` (all with the same keys) in one statement on Postgres; returns the ``returning``
    columns of the inserted (or upserted) rows, in no particular order.

    ``on_conflict`` receives the dialect's insert statement (Postgres or SQLite, both offer
    ``.excluded`` and ``.on_conflict_do_update``) and returns it with the conflict clause added. No rows
    → no statement, ``[]``.
    """
    if not rows:
        return []
    names = list(rows[0].keys())
    if is_postgres(conn):
        derived, exprs = _unnest(table, names, rows, "v")
        stmt: Any = dialect_insert(True)(table).from_select(
            names, sa.select(*[exprs[n] for n in names]).select_from(derived)
        )
        params: Any = None
    else:
        stmt, params = dialect_insert(False)(table), [dict(r) for r in rows]
    if on_conflict is not None:
        stmt = on_conflict(stmt)
    return _execute(conn, stmt, returning, params)


def _execute(
    conn: sa.Connection, stmt: Any, returning: Sequence[sa.Column[Any]], params: Any = None
) -> list[Any]:
    """Run ``stmt`` (with ``returning`` added when asked) and return its rows, else ``[]``."""
    if returning:
        return list(conn.execute(stmt.returning(*returning), params).all())
    conn.execute(stmt, params)
    return []


def update_many(
    conn: sa.Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: str = "id",
    where: sa.ColumnElement[bool] | None = None,
    returning: Sequence[sa.Column[Any]] = (),
) -> list[sa.Row[Any]]:
    """Set, for each row, the given columns of the table row whose ``key`` equals ``row[key]`` (all rows
    carry the same keys); ``where`` adds a condition (a compare-and-set guard such as "status is still
    pending"). Returns the ``returning`` columns of the rows actually updated. One statement on Postgres;
    one per 300 rows on SQLite. No rows → no statement."""
    if not rows:
        return []
    names = [n for n in rows[0] if n != key]
    if is_postgres(conn):
        derived, exprs = _unnest(table, [key, *names], rows, "v")
        stmt = sa.update(table).values({n: exprs[n] for n in names}).where(table.c[key] == derived.c[key])
        return _execute(conn, stmt if where is None else stmt.where(where), returning)
    out: list[sa.Row[Any]] = []
    for start in range(0, len(rows), _SQLITE_UPDATE_CHUNK):
        stmt = _case_update(table, key, names, rows[start : start + _SQLITE_UPDATE_CHUNK])
        out.extend(_execute(conn, stmt if where is None else stmt.where(where), returning))
    return out


def _case_update(table: sa.Table, key: str, names: Sequence[str], chunk: Sequence[Mapping[str, Any]]) -> Any:
    """SQLite: ``UPDATE … SET c = CASE key WHEN … END WHERE key IN (…)`` for one chunk of rows."""
    values = {
        n: sa.case({row[key]: sa.literal(row[n], type_=table.c[n].type) for row in chunk}, value=table.c[key])
        for n in names
    }
    return sa.update(table).values(values).where(table.c[key].in_([row[key] for row in chunk]))
