"""Set-based loaders and writers of digest generation, sending and the seed digest.

Every loader takes a list of ids and issues ONE statement whatever the list's length (the ids travel
as one parameter: :func:`dbb_orchestration.db.bulk.in_ids`); multi-row writes go through
:mod:`dbb_orchestration.db.bulk`. Nothing here decides anything: callers pass plain values and get
plain rows back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dbb_orchestration.audience import has_pro_subscription_sql, latest_active_sources_select, sendable_sql
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import in_ids, insert_many
from dbb_orchestration.db.engine import is_postgres

__all__ = [
    "GENERATION_LOCK_NAMESPACE",
    "PENDING_STATUSES",
    "ClaimedDigests",
    "DeliveryUser",
    "DigestRow",
    "GenerationFacts",
    "ItemRow",
    "NewDigest",
    "ReviewBounds",
    "ReviewRow",
    "UserRow",
    "find_first_digest_users",
    "insert_digests_with_items",
    "load_candidates",
    "load_content_hashes",
    "load_delivery_users",
    "load_digests",
    "load_first_digest_facts",
    "load_generation_facts",
    "load_items",
    "load_latest_digests",
    "load_marked_in_scope",
    "load_review_states",
    "load_and_lock_user_batch",
    "load_user_batch",
    "lock_claimed_digests",
    "lock_users_for_generation",
    "record_outcomes_postgres",
]

RowT = TypeVar("RowT")

PENDING_STATUSES = ("scheduled", "failed")
# Advisory-lock namespace ("dbbg") of the per-user generation locks: digest generation and seed-digest
# creation take pg_advisory_xact_lock(GENERATION_LOCK_NAMESPACE, hashtext(user id)) for every user whose
# "does this user already have a digest?" read and insert they are about to make, so two of them never
# interleave those for the same user, while generators over different users never wait on each other.
# Keys are computed by Postgres (hashtext, the server's own text hash), so every caller derives the same
# key from an id on that server; two ids sharing a key only make their generators wait for each other.
# Distinct from the send claims' namespace (delivery.CLAIM_NAMESPACE): a send never waits on a generation.
GENERATION_LOCK_NAMESPACE = 0x64626267


# --------------------------------------------------------------------------------------------- helpers


def _generation_lock_key(user_id: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    return sa.func.hashtext(user_id, type_=sa.Integer())


def _lock_keys_in_order(keys: sa.Subquery) -> sa.Select[Any]:
    """``pg_advisory_xact_lock`` on each distinct key of ``keys.c.k``, in ascending key order: Postgres
    evaluates volatile output expressions after the sort (since 9.6), so every locker takes its keys in
    the same order and two lockers over overlapping users cannot deadlock."""
    locked = sa.func.pg_advisory_xact_lock(GENERATION_LOCK_NAMESPACE, keys.c.k, type_=sa.types.NullType())
    return sa.select(keys.c.k, locked.label("locked")).order_by(keys.c.k)


def lock_users_for_generation(conn: sa.Connection, user_ids: Sequence[str]) -> None:
    """Postgres: wait for the transaction-scoped generation lock of each of these users (released at
    commit/rollback), all in one statement, in key order. SQLite: nothing (a SQLite database has one
    writer at a time anyway)."""
    if not user_ids or not is_postgres(conn):
        return
    array = sa.bindparam("ids", list(user_ids), type_=postgresql.ARRAY(sa.Text()))
    ids = sa.func.unnest(array).table_valued("id").render_derived(name="ids")
    keys = sa.select(_generation_lock_key(ids.c.id).label("k")).distinct().subquery("keys")
    conn.execute(_lock_keys_in_order(keys)).all()


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


def _user_row_columns(u: sa.Table, s: sa.Table) -> list[sa.ColumnElement[Any]]:
    """The columns of a :class:`UserRow`: the user, their settings (``has_settings`` when a row exists)
    and the Pro flag (``audience.has_pro_subscription_sql``)."""
    return [
        u.c.id,
        u.c.name,
        u.c.email,
        u.c.email_verified,
        s.c.user_id.is_not(None).label("has_settings"),
        s.c.digest_interval_days,
        s.c.notes_per_digest,
        s.c.timezone,
        s.c.preferred_send_hour,
        has_pro_subscription_sql(u.c.id).label("has_pro_subscription"),
    ]


SelectT = TypeVar("SelectT", bound=sa.Select[Any])


def _in_keyset_range(
    stmt: SelectT,
    user_id: sa.ColumnElement[str],
    after: str | None,
    upto: str | None,
    only_user_id: str | None,
) -> SelectT:
    """``stmt`` limited to users with ``after < user_id <= upto`` (``None`` = unbounded), or to one user."""
    if after is not None:
        stmt = stmt.where(user_id > after)
    if upto is not None:
        stmt = stmt.where(user_id <= upto)
    if only_user_id is not None:
        stmt = stmt.where(user_id == only_user_id)
    return stmt


def _user_batch_select(
    *,
    after: str | None,
    limit: int,
    verified_only: bool = False,
    only_user_id: str | None = None,
    upto: str | None = None,
) -> sa.Select[Any]:
    u, s = t.user, t.user_settings
    stmt = (
        sa.select(*_user_row_columns(u, s))
        .select_from(u.outerjoin(s, s.c.user_id == u.c.id))
        .order_by(u.c.id)
        .limit(limit)
    )
    stmt = _in_keyset_range(stmt, u.c.id, after, upto, only_user_id)
    if verified_only:
        stmt = stmt.where(sendable_sql(u))
    return stmt


def _user_row(r: Any) -> UserRow:
    """A :class:`UserRow` from a row whose first columns are :func:`_user_row_columns` (read by
    position: a page builds 1,000 of these, and by-name access was most of a rerun's Python time)."""
    uid, name, email, verified, has_settings, interval, notes, tz, hour, pro = r[:10]
    return UserRow(uid, name, email, bool(verified), bool(has_settings), interval, notes, tz, hour, bool(pro))


def _user_rows(result: sa.Result[Any]) -> list[UserRow]:
    return [_user_row(r) for r in result.all()]


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
    stmt = _user_batch_select(
        after=after, limit=limit, verified_only=verified_only, only_user_id=only_user_id, upto=upto
    )
    return _user_rows(conn.execute(stmt))


def load_and_lock_user_batch(
    conn: sa.Connection, *, after: str | None, upto: str | None, limit: int
) -> list[UserRow]:
    """:func:`load_user_batch`'s page of users, and on Postgres, in the SAME statement, the generation
    lock of every user of the page (:data:`GENERATION_LOCK_NAMESPACE`, transaction-scoped: held until
    the caller's transaction ends), taken in key order. The statement returns only once every lock is
    held, so the caller's next statement (its own snapshot) sees every digest committed by whoever held
    one of these users before. The page's users and settings are read with the statement's snapshot,
    taken before the locks: only the digest reads must come after them.

    The page is a CTE; the locks are a second CTE over its distinct keys that a one-time filter counts
    before any row is returned (a CTE with a volatile function is always evaluated in full, never
    inlined). A transaction holds up to ``limit`` advisory locks: see docs/deployment.md on
    ``max_locks_per_transaction``."""
    stmt = _user_batch_select(after=after, limit=limit, upto=upto)
    if not is_postgres(conn):
        return _user_rows(conn.execute(stmt))
    page = stmt.cte("page")
    keys = sa.select(_generation_lock_key(page.c.id).label("k")).distinct().subquery("keys")
    locks = _lock_keys_in_order(keys).cte("locks")
    all_locked = sa.select(sa.func.count()).select_from(locks).scalar_subquery() >= 0
    return _user_rows(conn.execute(sa.select(page).where(all_locked).order_by(page.c.id)))


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


def _aware_timestamp(conn: sa.Connection, column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """``column`` as psycopg hands it over on Postgres (already an aware datetime: skipping the
    ``UTCDateTime`` result processor saves a Python call per value on large loads); on SQLite the
    column itself, whose processor tags the stored naive UTC value as UTC."""
    if is_postgres(conn):
        return sa.type_coerce(column, sa.DateTime(timezone=True)).label(column.name)
    return column


def load_candidates(
    conn: sa.Connection, user_ids: Sequence[str], make: Callable[..., RowT]
) -> dict[str, list[RowT]]:
    """Selection candidates per user: every non-deleted document of these users left-joined with its
        review state (no state row → status ``new`` and null fields): one statement. Each candidate is
    ``make(document_id, status, priority_weight, deprioritized_until, next_due_at, last_sent_at)`` (the
    caller's row type: this module knows nothing of selection). Content and hashes are
        not loaded (:func:`insert_digests_with_items` reads the selected ones'). Users without documents get an
        empty list."""
    out: dict[str, list[RowT]] = {uid: [] for uid in user_ids}
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
            bucket.append(make(doc_id, status or "new", weight, deprioritized, due, last_sent))
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
    if is_postgres(conn):
        return _generation_facts_postgres(conn, user_ids, near_from, near_to)
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


# Per user of the page, through the (user_id, scheduled_for) index: their newest send and the day stamps
# of their digests near the logical time. One index probe per user whatever the table's statistics;
# the UNION ALL over ``user_id = ANY(...)`` made Postgres plan bitmap scans with parallel workers, which
# on a busy 2-core machine cost 35-60 ms per 1,000-user page against ~10 ms this way.
_GENERATION_FACTS = sa.text(
    """
SELECT u.id AS user_id,
       (SELECT max(coalesce(d.sent_at, d.updated_at)) FROM note_digests AS d
         WHERE d.user_id = u.id AND d.status = 'sent') AS last_sent_at,
       ARRAY(SELECT coalesce(d.scheduled_for, d.created_at) FROM note_digests AS d
              WHERE d.user_id = u.id
                AND coalesce(d.scheduled_for, d.created_at) >= :near_from
                AND coalesce(d.scheduled_for, d.created_at) < :near_to) AS near_stamps
FROM unnest(:user_ids) AS u(id)
"""
).bindparams(
    sa.bindparam("user_ids", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("near_from", type_=sa.DateTime(timezone=True)),
    sa.bindparam("near_to", type_=sa.DateTime(timezone=True)),
)


def _generation_facts_postgres(
    conn: sa.Connection, user_ids: Sequence[str], near_from: datetime, near_to: datetime
) -> dict[str, GenerationFacts]:
    rows = conn.execute(
        _GENERATION_FACTS, {"user_ids": list(user_ids), "near_from": near_from, "near_to": near_to}
    ).all()
    return {
        r.user_id: GenerationFacts(r.last_sent_at, tuple(r.near_stamps))
        for r in rows
        if r.last_sent_at is not None or r.near_stamps
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
        _insert_digests_postgres(conn, digests, items, stamp)
    else:
        _insert_digests_sqlite(conn, digests, items, stamp)


def _insert_digests_postgres(
    conn: sa.Connection, digests: Sequence[NewDigest], items: list[tuple[str, int, int]], stamp: datetime
) -> None:
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


def _insert_digests_sqlite(
    conn: sa.Connection, digests: Sequence[NewDigest], items: list[tuple[str, int, int]], stamp: datetime
) -> None:
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
            sendable_sql(u),
            ~sent,
        )
        .group_by(d.c.user_id)
        .order_by(latest.desc(), d.c.user_id)
        .limit(limit)
    )
    return [r.user_id for r in conn.execute(stmt).all()]


# ------------------------------------------------------------------------------ delivery (delivery.py)


@dataclass(frozen=True)
class DeliveryUser:
    """A user of a delivery page: the row, their newest send (``None`` = never sent) and the newest
    ``delivery.prepared_at`` among their pending digests that carry a batch key (``None`` = none: the
    caller decides whether that marker is still live)."""

    row: UserRow
    last_sent_at: datetime | None
    marked_at: str | None


def _marker_field(name: str) -> sa.ColumnElement[Any]:
    return t.note_digests.c.payload_json["delivery"][name].as_string()


def load_delivery_users(
    conn: sa.Connection,
    *,
    after: str | None = None,
    upto: str | None = None,
    limit: int | None = None,
    only_user_id: str | None = None,
    user_ids: Sequence[str] | None = None,
) -> list[DeliveryUser]:
    """Sendable users (verified, non-blank email) by id — the next ``limit`` with ``after < id <= upto``
    (keyset pagination; ``None`` = unbounded), or exactly ``user_ids`` — each with their settings, Pro
    flag, newest send and newest in-flight marker time: ONE statement (the last two are correlated
    subqueries on ``note_digests``' user index)."""
    u, s, d = t.user, t.user_settings, t.note_digests
    # The status tests sit inside the aggregates, not in WHERE: the user's digests are then always
    # found through the (user_id, scheduled_for) index. With ``status = 'sent'`` in WHERE, statistics
    # taken before a large send (few ``sent`` rows) make the planner walk the status index instead,
    # every ``sent`` digest once per user: seconds per page.
    sent = sa.case((d.c.status == "sent", sa.func.coalesce(d.c.sent_at, d.c.updated_at)))
    in_flight = sa.and_(d.c.status.in_(PENDING_STATUSES), _marker_field("batch_key").is_not(None))
    last = sa.select(sa.func.max(sent)).where(d.c.user_id == u.c.id).scalar_subquery()
    marked = (
        sa.select(sa.func.max(sa.case((in_flight, _marker_field("prepared_at")))))
        .where(d.c.user_id == u.c.id)
        .scalar_subquery()
    )
    stmt = (
        sa.select(*_user_row_columns(u, s), last.label("last_sent_at"), marked.label("marked_at"))
        .select_from(u.outerjoin(s, s.c.user_id == u.c.id))
        .where(sendable_sql(u))
        .order_by(u.c.id)
    )
    if user_ids is not None:
        stmt = stmt.where(in_ids(conn, u.c.id, list(user_ids)))
    stmt = _in_keyset_range(stmt, u.c.id, after, upto, only_user_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        DeliveryUser(
            _user_row(r),
            r.last_sent_at,
            r.marked_at,
        )
        for r in conn.execute(stmt).all()
    ]


def load_marked_in_scope(
    conn: sa.Connection, *, after: str | None, upto: str | None, only_user_id: str | None
) -> list[DigestRow]:
    """Pending digests carrying a ``delivery.batch_key`` (handed to the provider, outcome not recorded)
    of the sendable users with ``after < id <= upto`` (or of ``only_user_id``): ONE statement, driven by
    the ``(status, scheduled_for)`` index (pending digests are few)."""
    d, u = t.note_digests, t.user
    stmt = (
        sa.select(*_DIGEST_COLUMNS)
        .select_from(d.join(u, u.c.id == d.c.user_id))
        .where(d.c.status.in_(PENDING_STATUSES), _marker_field("batch_key").is_not(None), sendable_sql(u))
        .order_by(d.c.id)
    )
    stmt = _in_keyset_range(stmt, d.c.user_id, after, upto, only_user_id)
    return [_digest(r) for r in conn.execute(stmt).all()]


def load_digests(conn: sa.Connection, digest_ids: Sequence[int]) -> list[DigestRow]:
    """These digests (a plain read by primary key, one statement); unknown ids are absent."""
    if not digest_ids:
        return []
    d = t.note_digests
    stmt = sa.select(*_DIGEST_COLUMNS).where(in_ids(conn, d.c.id, sorted(set(digest_ids)))).order_by(d.c.id)
    return [_digest(r) for r in conn.execute(stmt).all()]


@dataclass(frozen=True)
class ClaimedDigests:
    """What a run reads under its claims: the pending digests it now holds row locks on (SQLite: every
    pending digest), the users with a pending digest another transaction holds, the newest sends."""

    pending: list[DigestRow]
    held_elsewhere: set[str]
    last_sends: dict[str, datetime]

    def pending_of(self, user_id: str) -> list[DigestRow]:
        return [d for d in self.pending if d.user_id == user_id]


_MINE, _HELD, _LAST = 0, 1, 2


def lock_claimed_digests(conn: sa.Connection, user_ids: Sequence[str], now: datetime) -> ClaimedDigests:
    """Under the callers' per-user claims, in ONE statement: every pending digest (``scheduled`` or
    ``failed``, ``scheduled_for`` ≤ ``now``) of these users, locked ``FOR UPDATE SKIP LOCKED`` in a CTE
    (never waits) and returned with the locked row's values; the users of the pending rows the CTE
    skipped (held by another transaction: the backend, say); and each user's newest send (``sent_at``,
    else ``updated_at``, of their ``sent`` digests), all as one ``UNION ALL``. SQLite has no row locks:
    a plain read."""
    if not user_ids:
        return ClaimedDigests([], set(), {})
    d = t.note_digests
    pending_where = (
        in_ids(conn, d.c.user_id, user_ids),
        d.c.status.in_(PENDING_STATUSES),
        d.c.scheduled_for <= now,
    )
    last_type = d.c.sent_at.type
    branches: list[sa.Select[Any]] = []
    if is_postgres(conn):
        locked = (
            sa.select(*_DIGEST_COLUMNS)
            .where(*pending_where)
            .with_for_update(of=d, skip_locked=True)
            .cte("locked")
        )
        mine_cols: list[Any] = [locked.c[c.name] for c in _DIGEST_COLUMNS]
        branches.append(
            sa.select(
                sa.literal_column(str(_MINE)).label("kind"),
                *mine_cols,
                sa.cast(sa.null(), last_type).label("last"),
            )
        )
        branches.append(
            sa.select(sa.literal_column(str(_HELD)), *_nulls_but_user(d), sa.null()).where(
                *pending_where, d.c.id.not_in(sa.select(locked.c.id))
            )
        )
    else:
        branches.append(
            sa.select(
                sa.literal_column(str(_MINE)).label("kind"),
                *_DIGEST_COLUMNS,
                sa.cast(sa.null(), last_type).label("last"),
            ).where(*pending_where)
        )
    branches.append(
        sa.select(
            sa.literal_column(str(_LAST)),
            *_nulls_but_user(d),
            sa.func.max(sa.func.coalesce(d.c.sent_at, d.c.updated_at)),
        )
        .where(in_ids(conn, d.c.user_id, user_ids), d.c.status == "sent")
        .group_by(d.c.user_id)
    )
    out = ClaimedDigests([], set(), {})
    for r in conn.execute(sa.union_all(*branches)).all():
        if r.kind == _MINE:
            out.pending.append(_digest(r))
        elif r.kind == _HELD:
            out.held_elsewhere.add(r.user_id)
        elif r.last is not None:
            out.last_sends[r.user_id] = r.last
    out.pending.sort(key=lambda dg: dg.id)
    return out


def _nulls_but_user(d: sa.Table) -> list[Any]:
    """The digest columns of a ``UNION ALL`` branch that carries only the user id."""
    return [d.c.user_id if c.name == "user_id" else sa.null() for c in _DIGEST_COLUMNS]


def load_items(conn: sa.Connection, digest_ids: Sequence[int]) -> dict[int, list[ItemRow]]:
    """Items of these digests in position order, each with its document's title and stored content and
    its connection's kind and display name: ONE statement. On Postgres each item's document (and
    connection) comes from a ``LATERAL`` primary-key lookup that cannot be flattened into a join
    (``LIMIT 1``): today's digests are newer than the table statistics, so with a plain join the planner
    misjudges how many items match and hash-joins the whole ``documents`` table, while a primary-key
    lookup per item is always cheap. SQLite's planner always uses the primary key. Items whose document
    is gone are absent; digests without items too."""
    if not digest_ids:
        return {}
    i, doc, c = t.note_digest_items, t.documents, t.integration_connections
    doc_cols = (
        doc.c.title,
        doc.c.content_ciphertext,
        doc.c.content_iv,
        doc.c.content_alg,
        doc.c.content_key_version,
        c.c.kind,
        c.c.display_name,
    )
    docs_from = doc.outerjoin(c, c.c.id == doc.c.connection_id)
    if is_postgres(conn):
        lookup = (
            sa.select(*doc_cols)
            .select_from(docs_from)
            .where(doc.c.id == i.c.document_id)
            .limit(1)
            .lateral("dl")
        )
        cols: list[Any] = [lookup.c[col.name] for col in doc_cols]
        source: Any = i.join(lookup, sa.true())
    else:
        cols, source = list(doc_cols), i.join(docs_from, doc.c.id == i.c.document_id)
    stmt = (
        sa.select(i.c.note_digest_id, i.c.document_id, i.c.position, *cols)
        .select_from(source)
        .where(in_ids(conn, i.c.note_digest_id, digest_ids))
        .order_by(i.c.note_digest_id, i.c.position, i.c.id)
    )
    out: dict[int, list[ItemRow]] = {}
    for r in conn.execute(stmt).all():
        out.setdefault(r.note_digest_id, []).append(
            ItemRow(
                note_digest_id=r.note_digest_id,
                document_id=r.document_id,
                position=r.position,
                title=r.title,
                content_ciphertext=r.content_ciphertext,
                content_iv=r.content_iv,
                content_alg=r.content_alg,
                content_key_version=r.content_key_version,
                source_kind=r.kind,
                source_name=r.display_name,
            )
        )
    return out


def load_first_digest_facts(
    conn: sa.Connection, user_ids: Sequence[str]
) -> tuple[dict[str, tuple[str, str | None]], dict[str, int]]:
    """What a first digest shows besides its notes, in ONE statement (a ``UNION ALL``): each user's
    most recently created ``active`` connection as ``(kind, display_name)`` and their number of
    non-deleted documents. Users without either are absent from that dict."""
    if not user_ids:
        return {}, {}
    doc = t.documents
    sources = latest_active_sources_select(
        in_ids(conn, t.integration_connections.c.user_id, user_ids)
    ).add_columns(sa.cast(sa.null(), sa.Integer).label("n"))
    counts = (
        sa.select(doc.c.user_id, sa.null(), sa.null(), sa.func.count())
        .where(in_ids(conn, doc.c.user_id, user_ids), doc.c.deleted_at_source.is_(None))
        .group_by(doc.c.user_id)
    )
    found: dict[str, tuple[str, str | None]] = {}
    totals: dict[str, int] = {}
    for r in conn.execute(sa.union_all(sources, counts)).all():
        if r.n is None:
            found[r.user_id] = (r.kind, r.display_name)
        else:
            totals[r.user_id] = int(r.n)
    return found, totals


_RECORD_OUTCOMES = sa.text(
    """
WITH v AS (
  SELECT * FROM unnest(:ids, :statuses, :sent_ats, :payloads, :errors, :stamps)
    AS v(id, status, sent_at, payload, error, updated_at)
), upd AS (
  UPDATE note_digests AS d
  SET status = CAST(v.status AS note_digest_status), sent_at = v.sent_at,
      payload_json = CAST(v.payload AS jsonb), error_json = CAST(v.error AS jsonb),
      updated_at = v.updated_at
  FROM v
  WHERE d.id = v.id AND d.status IN ('scheduled', 'failed')
  RETURNING d.id
), r AS (
  SELECT r.*, LEAST(:max_days, GREATEST(r.interval_days, :min_days)) AS days
  FROM unnest(:r_digest_ids, :r_document_ids, :r_user_ids, :r_intervals, :r_accepted, :r_stamps)
    AS r(digest_id, document_id, user_id, interval_days, accepted_at, updated_at)
), ins AS (
  INSERT INTO review_states AS rs
    (document_id, user_id, status, interval_days, last_sent_at, next_due_at, ease_factor, repetitions,
     updated_at)
  SELECT r.document_id, r.user_id, 'new', r.days, r.accepted_at,
         r.accepted_at + make_interval(days => r.days), :ease, 0, r.updated_at
  FROM r JOIN upd ON upd.id = r.digest_id
  ON CONFLICT (document_id) DO UPDATE SET
    interval_days = LEAST(:max_days, GREATEST(COALESCE(rs.interval_days, 0), EXCLUDED.interval_days)),
    last_sent_at = EXCLUDED.last_sent_at,
    next_due_at = EXCLUDED.last_sent_at + make_interval(
      days => LEAST(:max_days, GREATEST(COALESCE(rs.interval_days, 0), EXCLUDED.interval_days))),
    ease_factor = COALESCE(rs.ease_factor, EXCLUDED.ease_factor),
    repetitions = COALESCE(rs.repetitions, EXCLUDED.repetitions),
    updated_at = EXCLUDED.updated_at
)
SELECT id FROM upd
"""
).bindparams(
    sa.bindparam("ids", type_=postgresql.ARRAY(sa.Integer())),
    sa.bindparam("statuses", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("sent_ats", type_=postgresql.ARRAY(sa.DateTime(timezone=True))),
    sa.bindparam("payloads", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("errors", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("stamps", type_=postgresql.ARRAY(sa.DateTime(timezone=True))),
    sa.bindparam("r_digest_ids", type_=postgresql.ARRAY(sa.Integer())),
    sa.bindparam("r_document_ids", type_=postgresql.ARRAY(sa.Integer())),
    sa.bindparam("r_user_ids", type_=postgresql.ARRAY(sa.Text())),
    sa.bindparam("r_intervals", type_=postgresql.ARRAY(sa.Integer())),
    sa.bindparam("r_accepted", type_=postgresql.ARRAY(sa.DateTime(timezone=True))),
    sa.bindparam("r_stamps", type_=postgresql.ARRAY(sa.DateTime(timezone=True))),
    sa.bindparam("min_days", type_=sa.Integer()),
    sa.bindparam("max_days", type_=sa.Integer()),
    sa.bindparam("ease", type_=sa.Float()),
)


_UPDATE_PARAMS = {
    "ids": "id",
    "statuses": "status",
    "sent_ats": "sent_at",
    "payloads": "payload_json",
    "errors": "error_json",
    "stamps": "updated_at",
}
_REVIEW_PARAMS = {
    "r_digest_ids": "digest_id",
    "r_document_ids": "document_id",
    "r_user_ids": "user_id",
    "r_intervals": "interval_days",
    "r_accepted": "last_sent_at",
    "r_stamps": "updated_at",
}
_JSON_FIELDS = frozenset({"payload_json", "error_json"})


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


@dataclass(frozen=True)
class ReviewBounds:
    """The review interval rule the record applies: ``min(max_days, max(existing or 0, effective,
    min_days))`` days; a new review state starts with ``ease_factor``."""

    min_days: int
    max_days: int
    ease_factor: float


def record_outcomes_postgres(
    conn: sa.Connection,
    updates: Sequence[dict[str, Any]],
    reviews: Sequence[dict[str, Any]],
    bounds: ReviewBounds,
) -> set[int]:
    """Postgres, ONE statement (data-modifying CTEs): set each digest's ``status``, ``sent_at``,
    ``payload_json``, ``error_json`` and ``updated_at`` where it is still pending (the guard), then upsert
    the review states of the delivered items of the digests actually updated (``reviews`` rows:
    ``digest_id``, ``document_id`` (unique), ``user_id``, ``interval_days`` = the effective interval,
    ``last_sent_at`` = acceptance, ``updated_at``) with the interval and next due date computed from the
    existing row by the :class:`ReviewBounds` rule. Returns the ids of the digests updated."""
    if not updates:
        return set()
    params: dict[str, Any] = {
        param: [_json_text(row[name]) if name in _JSON_FIELDS else row[name] for row in rows]
        for rows, names in ((updates, _UPDATE_PARAMS), (reviews, _REVIEW_PARAMS))
        for param, name in names.items()
    }
    params.update(min_days=bounds.min_days, max_days=bounds.max_days, ease=bounds.ease_factor)
    return {int(r.id) for r in conn.execute(_RECORD_OUTCOMES, params).all()}
