"""Set-based loaders and writers shared by digest generation, sending and the seed digest.

Every loader takes a list of ids and issues ONE statement whatever the list's length: on Postgres the
ids travel as a single array parameter (``col = ANY(:ids)``), on SQLite as one JSON parameter
(``col IN (SELECT value FROM json_each(:ids))``), so neither hits a bind-parameter limit.

Writers are multi-row:

- :func:`insert_many` — Postgres: ``INSERT … SELECT … FROM unnest(:col1, :col2, …)`` (one statement for
  any number of rows, one array parameter per column, optional ``ON CONFLICT … DO UPDATE`` and
  ``RETURNING``); SQLite: the dialect's ``insert`` executed with a list of rows.
- :func:`update_many` — Postgres: ``UPDATE … FROM unnest(…) AS v WHERE t.id = v.id``; SQLite: one
  ``UPDATE … SET c = CASE id WHEN … END WHERE id IN (…)`` per 300 rows.

Nothing here decides anything: callers pass plain values and get plain rows back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.selection import Candidate
from dbb_orchestration.plans import PRO_SUBSCRIPTION_STATUSES

__all__ = [
    "DIGEST_LOCK_KEY",
    "PENDING_STATUSES",
    "DigestRow",
    "GenerationFacts",
    "ItemRow",
    "NewDigest",
    "ReviewRow",
    "UserRow",
    "advisory_xact_lock",
    "find_first_digest_users",
    "in_ids",
    "insert_digests_with_items",
    "insert_many",
    "load_active_sources",
    "load_candidates",
    "load_content_hashes",
    "load_digest_statuses",
    "load_document_counts",
    "load_generation_facts",
    "load_items",
    "load_last_sends",
    "load_latest_digests",
    "load_marked_pending",
    "load_pending_digests",
    "load_review_states",
    "load_user_batch",
    "lock_pending_digests",
    "update_many",
]

PENDING_STATUSES = ("scheduled", "failed")
# pg_advisory_xact_lock key shared by digest generation and seed-digest creation ("dbbdigs" in ASCII):
# two generations (or a generation and a seed) for the same users never interleave their
# "does this user already have today's digest?" read and their insert.
DIGEST_LOCK_KEY = 0x64626264696773
_SQLITE_UPDATE_CHUNK = 300


# --------------------------------------------------------------------------------------------- helpers


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


def advisory_xact_lock(conn: sa.Connection, key: int = DIGEST_LOCK_KEY) -> None:
    """Postgres: wait for the transaction-scoped advisory lock ``key`` (released at commit/rollback).
    SQLite: nothing (a SQLite database has one writer at a time anyway)."""
    if is_postgres(conn):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


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
        stmt: Any = postgresql.insert(table).from_select(
            names, sa.select(*[exprs[n] for n in names]).select_from(derived)
        )
        if on_conflict is not None:
            stmt = on_conflict(stmt)
        if returning:
            stmt = stmt.returning(*returning)
            return list(conn.execute(stmt).all())
        conn.execute(stmt)
        return []
    stmt = sqlite.insert(table)
    if on_conflict is not None:
        stmt = on_conflict(stmt)
    if returning:
        stmt = stmt.returning(*returning)
        return list(conn.execute(stmt, [dict(r) for r in rows]).all())
    conn.execute(stmt, [dict(r) for r in rows])
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
    out: list[sa.Row[Any]] = []
    if is_postgres(conn):
        derived, exprs = _unnest(table, [key, *names], rows, "v")
        stmt: Any = (
            sa.update(table).values({n: exprs[n] for n in names}).where(table.c[key] == derived.c[key])
        )
        if where is not None:
            stmt = stmt.where(where)
        if returning:
            return list(conn.execute(stmt.returning(*returning)).all())
        conn.execute(stmt)
        return []
    for start in range(0, len(rows), _SQLITE_UPDATE_CHUNK):
        chunk = rows[start : start + _SQLITE_UPDATE_CHUNK]
        keys = [row[key] for row in chunk]
        values = {
            n: sa.case(
                {row[key]: sa.literal(row[n], type_=table.c[n].type) for row in chunk},
                value=table.c[key],
            )
            for n in names
        }
        stmt = sa.update(table).values(values).where(table.c[key].in_(keys))
        if where is not None:
            stmt = stmt.where(where)
        if returning:
            out.extend(conn.execute(stmt.returning(*returning)).all())
        else:
            conn.execute(stmt)
    return out


# --------------------------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class UserRow:
    """A user with their settings (``has_settings`` False → the columns are ``None``) and Pro flag
    (any subscription ``active``/``trialing``; the deployment mode is applied by the caller)."""

    id: str
    name: str | None
    email: str | None
    email_verified: bool
    has_settings: bool
    digest_interval_days: int | None
    notes_per_digest: int | None
    timezone: str | None
    preferred_send_hour: int | None
    has_pro_subscription: bool


def load_user_batch(
    conn: sa.Connection,
    *,
    after: str | None,
    limit: int,
    verified_only: bool = False,
    only_user_id: str | None = None,
    upto: str | None = None,
) -> list[UserRow]:
    """The next ``limit`` users with ``id > after`` (keyset pagination, ``None`` = from the start) ordered
    by id, joined with their settings and Pro flag: one statement. ``verified_only`` keeps users with a
    non-blank email and ``email_verified``; ``only_user_id`` restricts to that one user; ``upto`` stops
    at ids ``<= upto`` (the end of a batch step's range, ``None`` = no end)."""
    u, s = t.user, t.user_settings
    b = t.billing_subscriptions
    pro = (
        sa.select(sa.literal(1))
        .where(b.c.user_id == u.c.id, b.c.status.in_(sorted(PRO_SUBSCRIPTION_STATUSES)))
        .exists()
    )
    stmt = (
        sa.select(
            u.c.id,
            u.c.name,
            u.c.email,
            u.c.email_verified,
            s.c.user_id.is_not(None).label("has_settings"),
            s.c.digest_interval_days,
            s.c.notes_per_digest,
            s.c.timezone,
            s.c.preferred_send_hour,
            pro.label("has_pro_subscription"),
        )
        .select_from(u.outerjoin(s, s.c.user_id == u.c.id))
        .order_by(u.c.id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(u.c.id > after)
    if upto is not None:
        stmt = stmt.where(u.c.id <= upto)
    if only_user_id is not None:
        stmt = stmt.where(u.c.id == only_user_id)
    if verified_only:
        stmt = stmt.where(u.c.email_verified.is_(True), sa.func.length(sa.func.trim(u.c.email)) > 0)
    return [
        UserRow(
            id=r.id,
            name=r.name,
            email=r.email,
            email_verified=bool(r.email_verified),
            has_settings=bool(r.has_settings),
            digest_interval_days=r.digest_interval_days,
            notes_per_digest=r.notes_per_digest,
            timezone=r.timezone,
            preferred_send_hour=r.preferred_send_hour,
            has_pro_subscription=bool(r.has_pro_subscription),
        )
        for r in conn.execute(stmt).all()
    ]


@dataclass(frozen=True)
class DigestRow:
    id: int
    user_id: str
    status: str
    scheduled_for: datetime | None
    created_at: datetime
    payload_json: Any
    error_json: Any = None


_DIGEST_COLUMNS = (
    t.note_digests.c.id,
    t.note_digests.c.user_id,
    t.note_digests.c.status,
    t.note_digests.c.scheduled_for,
    t.note_digests.c.created_at,
    t.note_digests.c.payload_json,
    t.note_digests.c.error_json,
)


def _digest(r: Any) -> DigestRow:
    return DigestRow(r.id, r.user_id, r.status, r.scheduled_for, r.created_at, r.payload_json, r.error_json)


def load_latest_digests(conn: sa.Connection, user_ids: Sequence[str]) -> dict[str, DigestRow]:
    """Each user's most recent digest by ``created_at`` (ties: highest id), via ``ROW_NUMBER()``: one
    statement. Users without a digest are absent."""
    if not user_ids:
        return {}
    d = t.note_digests
    rn = (
        sa.func.row_number()
        .over(partition_by=d.c.user_id, order_by=(d.c.created_at.desc(), d.c.id.desc()))
        .label("rn")
    )
    inner = sa.select(*_DIGEST_COLUMNS, rn).where(in_ids(conn, d.c.user_id, user_ids)).subquery()
    stmt = sa.select(*[inner.c[c.name] for c in _DIGEST_COLUMNS]).where(inner.c.rn == 1)
    return {r.user_id: _digest(r) for r in conn.execute(stmt).all()}


def load_last_sends(conn: sa.Connection, user_ids: Sequence[str]) -> dict[str, datetime]:
    """Newest ``sent_at`` of each user's ``sent`` digests (one ``GROUP BY``); never-sent users are
    absent. A ``sent`` digest without ``sent_at`` falls back to its ``updated_at``."""
    if not user_ids:
        return {}
    d = t.note_digests
    stmt = (
        sa.select(d.c.user_id, sa.func.max(sa.func.coalesce(d.c.sent_at, d.c.updated_at)).label("last"))
        .where(in_ids(conn, d.c.user_id, user_ids), d.c.status == "sent")
        .group_by(d.c.user_id)
    )
    return {r.user_id: r.last for r in conn.execute(stmt).all() if r.last is not None}


def lock_pending_digests(
    conn: sa.Connection, user_ids: Sequence[str], now: datetime, *, skip_locked: bool = False
) -> list[DigestRow]:
    """Every pending digest (``scheduled`` or ``failed``, ``scheduled_for`` ≤ ``now``) of these users, rows
    locked ``FOR UPDATE`` in id order on Postgres until the transaction ends. With ``skip_locked`` rows
    another transaction holds are left out instead of waited on (compare with
    :func:`load_pending_digests` to see whose rows were held). One statement. SQLite has no row locks:
    a plain read."""
    if not user_ids:
        return []
    stmt = _pending_select(conn, user_ids, now).with_for_update(of=t.note_digests, skip_locked=skip_locked)
    return [_digest(r) for r in conn.execute(stmt).all()]


def _pending_select(conn: sa.Connection, user_ids: Sequence[str], now: datetime) -> sa.Select[Any]:
    d = t.note_digests
    return (
        sa.select(*_DIGEST_COLUMNS)
        .where(
            in_ids(conn, d.c.user_id, user_ids),
            d.c.status.in_(PENDING_STATUSES),
            d.c.scheduled_for <= now,
        )
        .order_by(d.c.id)
    )


def _aware_timestamp(conn: sa.Connection, column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """``column`` as psycopg hands it over on Postgres (already an aware datetime: skipping the
    ``UTCDateTime`` result processor saves a Python call per value on large loads); on SQLite the
    column itself, whose processor tags the stored naive UTC value as UTC."""
    if is_postgres(conn):
        return sa.type_coerce(column, sa.DateTime(timezone=True)).label(column.name)
    return column


def load_candidates(conn: sa.Connection, user_ids: Sequence[str]) -> dict[str, list[Candidate]]:
    """Selection candidates per user: every non-deleted document of these users left-joined with its
    review state (no state row → status ``new`` and null fields): one statement. Content and hashes are
    not loaded (:func:`insert_digests_with_items` reads the selected ones'). Users without documents get an
    empty list."""
    out: dict[str, list[Candidate]] = {uid: [] for uid in user_ids}
    if not user_ids:
        return out
    doc, rs = t.documents, t.review_states
    stmt = (
        sa.select(
            doc.c.id,
            doc.c.user_id,
            rs.c.status,
            rs.c.priority_weight,
            _aware_timestamp(conn, rs.c.deprioritized_until),
            _aware_timestamp(conn, rs.c.next_due_at),
            _aware_timestamp(conn, rs.c.last_sent_at),
        )
        .select_from(doc.outerjoin(rs, rs.c.document_id == doc.c.id))
        .where(in_ids(conn, doc.c.user_id, user_ids), doc.c.deleted_at_source.is_(None))
    )
    result = conn.execute(stmt)
    if is_postgres(conn):
        # The rows as psycopg built them (plain tuples; no column needs a result processor here, see
        # _aware_timestamp): skips building ~50 SQLAlchemy Row objects per user on large loads.
        rows: Sequence[Any] = result.cursor.fetchall()
        result.close()
    else:
        rows = result.all()
    for doc_id, user_id, status, weight, deprioritized, due, last_sent in rows:
        bucket = out.get(user_id)
        if bucket is not None:
            bucket.append(Candidate(doc_id, status or "new", weight, deprioritized, due, last_sent))
    return out


@dataclass(frozen=True)
class GenerationFacts:
    """What generation needs to know about a user's digests: the newest send (``sent_at``, or
    ``updated_at`` of a ``sent`` digest without it; ``None`` = never sent) and the day stamps
    (``scheduled_for``, or ``created_at`` when null) of their digests near the logical time."""

    last_sent_at: datetime | None = None
    near_stamps: tuple[datetime, ...] = ()


def load_generation_facts(
    conn: sa.Connection, user_ids: Sequence[str], near_from: datetime, near_to: datetime
) -> dict[str, GenerationFacts]:
    """Per user: the newest send and the day stamps of their digests with ``near_from`` ≤ stamp <
    ``near_to``: ONE statement (a ``UNION ALL`` of the two reads). Users with neither are absent."""
    if not user_ids:
        return {}
    d = t.note_digests
    stamp = sa.func.coalesce(d.c.scheduled_for, d.c.created_at)
    near = sa.select(d.c.user_id, sa.literal(False).label("is_send"), stamp.label("at")).where(
        in_ids(conn, d.c.user_id, user_ids), stamp >= near_from, stamp < near_to
    )
    sends = (
        sa.select(
            d.c.user_id,
            sa.literal(True).label("is_send"),
            sa.func.max(sa.func.coalesce(d.c.sent_at, d.c.updated_at)).label("at"),
        )
        .where(in_ids(conn, d.c.user_id, user_ids), d.c.status == "sent")
        .group_by(d.c.user_id)
    )
    last: dict[str, datetime] = {}
    stamps: dict[str, list[datetime]] = {}
    for user_id, is_send, at in conn.execute(sa.union_all(near, sends)).all():
        if at is None:
            continue
        if is_send:
            last[user_id] = at
        else:
            stamps.setdefault(user_id, []).append(at)
    return {
        uid: GenerationFacts(last.get(uid), tuple(stamps.get(uid, ()))) for uid in set(last) | set(stamps)
    }


_INSERT_DIGESTS_WITH_ITEMS = sa.text(
    """
WITH v AS (
  SELECT * FROM unnest(:user_ids, :scheduled_fors, :statuses, :payloads)
    AS v(user_id, scheduled_for, status, payload)
), ins AS (
  INSERT INTO note_digests (user_id, scheduled_for, status, payload_json, created_at, updated_at)
  SELECT v.user_id, v.scheduled_for, CAST(v.status AS note_digest_status), CAST(v.payload AS jsonb),
         :stamp, :stamp
  FROM v
  RETURNING id, user_id
), it AS (
  SELECT * FROM unnest(:item_user_ids, :item_document_ids, :item_positions)
    AS it(user_id, document_id, position)
)
INSERT INTO note_digest_items (note_digest_id, document_id, position, content_hash_at_send, created_at)
SELECT ins.id, it.document_id,
       row_number() OVER (PARTITION BY ins.id ORDER BY it.position), doc.content_hash, :stamp
FROM it
JOIN ins ON ins.user_id = it.user_id
JOIN documents AS doc ON doc.id = it.document_id
"""
).bindparams(
    sa.bindparam("user_ids", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("scheduled_fors", type_=postgresql.ARRAY(sa.DateTime(timezone=True))),
    sa.bindparam("statuses", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("payloads", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("stamp", type_=sa.DateTime(timezone=True)),
    sa.bindparam("item_user_ids", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("item_document_ids", type_=postgresql.ARRAY(sa.Integer())),
    sa.bindparam("item_positions", type_=postgresql.ARRAY(sa.Integer())),
)


@dataclass(frozen=True)
class NewDigest:
    """A digest to insert (at most one per user per call) and its documents in position order."""

    user_id: str
    scheduled_for: datetime
    status: str
    payload: dict[str, Any]
    document_ids: tuple[int, ...] = ()


def insert_digests_with_items(conn: sa.Connection, digests: Sequence[NewDigest], stamp: datetime) -> None:
    """Insert the digests and their items (positions 1..n, ``content_hash_at_send`` = the document's
    current hash; a document deleted meanwhile is left out), ``created_at``/``updated_at`` = ``stamp``.
    Postgres: ONE statement (a data-modifying CTE inserts the digests, the outer insert their items
    joined to ``documents`` for the hashes). SQLite: the digests, the hashes, the items."""
    if not digests:
        return
    if len({dg.user_id for dg in digests}) != len(digests):
        raise ValueError("insert_digests_with_items takes at most one digest per user")
    items = [(dg.user_id, doc, pos) for dg in digests for pos, doc in enumerate(dg.document_ids, start=1)]
    if is_postgres(conn):
        conn.execute(
            _INSERT_DIGESTS_WITH_ITEMS,
            {
                "user_ids": [dg.user_id for dg in digests],
                "scheduled_fors": [dg.scheduled_for for dg in digests],
                "statuses": [dg.status for dg in digests],
                "payloads": [json.dumps(dg.payload) for dg in digests],
                "stamp": stamp,
                "item_user_ids": [i[0] for i in items],
                "item_document_ids": [i[1] for i in items],
                "item_positions": [i[2] for i in items],
            },
        )
        return
    rows = [
        {
            "user_id": dg.user_id,
            "scheduled_for": dg.scheduled_for,
            "status": dg.status,
            "payload_json": dg.payload,
            "created_at": stamp,
            "updated_at": stamp,
        }
        for dg in digests
    ]
    inserted = insert_many(
        conn, t.note_digests, rows, returning=(t.note_digests.c.id, t.note_digests.c.user_id)
    )
    ids = {r.user_id: int(r.id) for r in inserted}
    hashes = load_content_hashes(conn, [doc for _uid, doc, _pos in items])
    item_rows: list[dict[str, Any]] = []
    positions: dict[str, int] = {}
    for uid, doc, _pos in items:
        if doc not in hashes:
            continue
        positions[uid] = positions.get(uid, 0) + 1
        item_rows.append(
            {
                "note_digest_id": ids[uid],
                "document_id": doc,
                "position": positions[uid],
                "content_hash_at_send": hashes[doc],
                "created_at": stamp,
            }
        )
    insert_many(conn, t.note_digest_items, item_rows)


@dataclass(frozen=True)
class ItemRow:
    """A digest item with what the email shows about its document."""

    note_digest_id: int
    document_id: int
    position: int
    title: str | None
    content_ciphertext: str
    content_iv: str
    content_alg: str
    content_key_version: int | None
    source_kind: str | None
    source_name: str | None


def load_items(conn: sa.Connection, digest_ids: Sequence[int]) -> dict[int, list[ItemRow]]:
    """Items of these digests in position order, each with its document's title and stored content and
    its connection's kind and display name: two statements (the items; then their documents by primary
    key). Two rather than one join because today's digests are newer than the table statistics: the
    planner then misjudges how many items match and hash-joins the whole ``documents`` table, while a
    primary-key lookup of known ids is always cheap. Digests without items are absent."""
    if not digest_ids:
        return {}
    i, doc, c = t.note_digest_items, t.documents, t.integration_connections
    items = conn.execute(
        sa.select(i.c.note_digest_id, i.c.document_id, i.c.position)
        .where(in_ids(conn, i.c.note_digest_id, digest_ids))
        .order_by(i.c.note_digest_id, i.c.position, i.c.id)
    ).all()
    if not items:
        return {}
    docs = {
        r.id: r
        for r in conn.execute(
            sa.select(
                doc.c.id,
                doc.c.title,
                doc.c.content_ciphertext,
                doc.c.content_iv,
                doc.c.content_alg,
                doc.c.content_key_version,
                c.c.kind,
                c.c.display_name,
            )
            .select_from(doc.outerjoin(c, c.c.id == doc.c.connection_id))
            .where(in_ids(conn, doc.c.id, sorted({r.document_id for r in items})))
        ).all()
    }
    out: dict[int, list[ItemRow]] = {}
    for item in items:
        d = docs.get(item.document_id)
        if d is None:  # deleted between the two reads: its item row is gone too (cascade)
            continue
        out.setdefault(item.note_digest_id, []).append(
            ItemRow(
                note_digest_id=item.note_digest_id,
                document_id=item.document_id,
                position=item.position,
                title=d.title,
                content_ciphertext=d.content_ciphertext,
                content_iv=d.content_iv,
                content_alg=d.content_alg,
                content_key_version=d.content_key_version,
                source_kind=d.kind,
                source_name=d.display_name,
            )
        )
    return out


def load_active_sources(conn: sa.Connection, user_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """Each user's most recently created ``active`` connection as ``(kind, display_name)``: one
    statement (``ROW_NUMBER()``). Users without an active connection are absent."""
    if not user_ids:
        return {}
    c = t.integration_connections
    rn = (
        sa.func.row_number()
        .over(partition_by=c.c.user_id, order_by=(c.c.created_at.desc(), c.c.id.desc()))
        .label("rn")
    )
    inner = (
        sa.select(c.c.user_id, c.c.kind, c.c.display_name, rn)
        .where(in_ids(conn, c.c.user_id, user_ids), c.c.status == "active")
        .subquery()
    )
    stmt = sa.select(inner.c.user_id, inner.c.kind, inner.c.display_name).where(inner.c.rn == 1)
    return {r.user_id: (r.kind, r.display_name) for r in conn.execute(stmt).all()}


def load_document_counts(conn: sa.Connection, user_ids: Sequence[str]) -> dict[str, int]:
    """Number of non-deleted documents per user (one ``GROUP BY``); users without any are absent."""
    if not user_ids:
        return {}
    doc = t.documents
    stmt = (
        sa.select(doc.c.user_id, sa.func.count().label("n"))
        .where(in_ids(conn, doc.c.user_id, user_ids), doc.c.deleted_at_source.is_(None))
        .group_by(doc.c.user_id)
    )
    return {r.user_id: int(r.n) for r in conn.execute(stmt).all()}


@dataclass(frozen=True)
class ReviewRow:
    document_id: int
    interval_days: int | None


def load_review_states(conn: sa.Connection, document_ids: Iterable[int]) -> dict[int, ReviewRow]:
    """The review-state fields the send rescheduling reads, per document id (one statement)."""
    ids = sorted(set(document_ids))
    if not ids:
        return {}
    rs = t.review_states
    stmt = sa.select(rs.c.document_id, rs.c.interval_days).where(in_ids(conn, rs.c.document_id, ids))
    return {r.document_id: ReviewRow(r.document_id, r.interval_days) for r in conn.execute(stmt).all()}


def load_content_hashes(conn: sa.Connection, document_ids: Iterable[int]) -> dict[int, str]:
    """Current ``content_hash`` per document id (one statement)."""
    ids = sorted(set(document_ids))
    if not ids:
        return {}
    doc = t.documents
    stmt = sa.select(doc.c.id, doc.c.content_hash).where(in_ids(conn, doc.c.id, ids))
    return {r.id: r.content_hash for r in conn.execute(stmt).all()}


def find_first_digest_users(conn: sa.Connection, now: datetime, limit: int) -> list[str]:
    """Users with a verified, non-blank email, a pending digest (``scheduled`` or ``failed``) with
    ``scheduled_for`` ≤ ``now`` and no ``sent`` digest ever: at most ``limit``, newest pending digest (by
    ``updated_at``) first, so a fresh seed digest is never starved by older ones whose runs already
    happened. One statement."""
    d, u = t.note_digests, t.user
    s = t.note_digests.alias("s")
    sent = sa.select(sa.literal(1)).where(s.c.user_id == d.c.user_id, s.c.status == "sent").exists()
    latest = sa.func.max(d.c.updated_at)
    stmt = (
        sa.select(d.c.user_id, latest.label("latest"))
        .select_from(d.join(u, u.c.id == d.c.user_id))
        .where(
            d.c.status.in_(PENDING_STATUSES),
            d.c.scheduled_for <= now,
            u.c.email_verified.is_(True),
            sa.func.length(sa.func.trim(u.c.email)) > 0,
            ~sent,
        )
        .group_by(d.c.user_id)
        .order_by(latest.desc(), d.c.user_id)
        .limit(limit)
    )
    return [r.user_id for r in conn.execute(stmt).all()]


def load_pending_digests(conn: sa.Connection, user_ids: Sequence[str], now: datetime) -> list[DigestRow]:
    """:func:`lock_pending_digests` without any lock (never waits): one statement."""
    if not user_ids:
        return []
    return [_digest(r) for r in conn.execute(_pending_select(conn, user_ids, now)).all()]


def load_digest_statuses(conn: sa.Connection, digest_ids: Sequence[int]) -> dict[int, tuple[str, Any]]:
    """``(status, payload_json)`` per digest id (a plain read, one statement); unknown ids are absent."""
    if not digest_ids:
        return {}
    d = t.note_digests
    stmt = sa.select(d.c.id, d.c.status, d.c.payload_json).where(in_ids(conn, d.c.id, list(digest_ids)))
    return {r.id: (r.status, r.payload_json) for r in conn.execute(stmt).all()}


def load_marked_pending(conn: sa.Connection, user_ids: Sequence[str]) -> list[tuple[str, Any]]:
    """``(user_id, payload_json)`` of these users' pending digests whose payload carries a
    ``delivery.batch_key`` (handed to the provider, outcome not recorded): one statement."""
    if not user_ids:
        return []
    d = t.note_digests
    key = d.c.payload_json["delivery"]["batch_key"].as_string()
    stmt = sa.select(d.c.user_id, d.c.payload_json).where(
        in_ids(conn, d.c.user_id, user_ids), d.c.status.in_(PENDING_STATUSES), key.is_not(None)
    )
    return [(r.user_id, r.payload_json) for r in conn.execute(stmt).all()]
