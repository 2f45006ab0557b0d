"""Digest generation (behaviour §5): who gets a digest, what it holds, idempotency, batching, statements."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.generate import DAILY_SOURCE, generate_digests
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.testing import factories as f

NOW = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)  # the partition's hour
REAL = datetime(2026, 2, 8, 8, 0, 7, tzinfo=UTC)  # the wall clock while it runs


def settings_for(engine: sa.Engine, **kw: Any) -> Settings:
    """Settings whose clock (``now_override``) is :data:`REAL` unless given: the partition runs on time."""
    values: dict[str, Any] = {
        "database_url": engine.url.render_as_string(hide_password=False),
        "now_override": REAL,
    }
    values.update(kw)
    return Settings(**values)


def digests(conn: sa.Connection, user_id: str | None = None) -> list[Any]:
    d = t.note_digests
    stmt = sa.select(d).order_by(d.c.id)
    if user_id is not None:
        stmt = stmt.where(d.c.user_id == user_id)
    return list(conn.execute(stmt))


def item_docs(conn: sa.Connection, digest_id: int) -> list[int]:
    i = t.note_digest_items
    rows = conn.execute(
        sa.select(i.c.document_id, i.c.position).where(i.c.note_digest_id == digest_id).order_by(i.c.position)
    ).all()
    assert [r.position for r in rows] == list(range(1, len(rows) + 1))
    return [r.document_id for r in rows]


class StatementCounter:
    """Counts statements as Postgres does: an executemany of n parameter sets counts n."""

    def __init__(self) -> None:
        self.count = 0
        self.statements: list[str] = []

    def __call__(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        self.count += len(parameters) if executemany else 1
        self.statements.append(statement)


@contextmanager
def count_statements(engine: sa.Engine) -> Iterator[StatementCounter]:
    counter = StatementCounter()
    sa.event.listen(engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        sa.event.remove(engine, "before_cursor_execute", counter)


def overdue_docs(conn: sa.Connection, user_id: str, days_overdue: list[int]) -> list[int]:
    """Documents already sent once, each overdue by the given number of days (so the selection order is
    fully decided by score: most overdue first)."""
    conn_id = f.connection(conn, user_id, account_external_id=f"vault-{user_id}-{len(days_overdue)}")
    ids = []
    for n, days in enumerate(days_overdue):
        doc = f.document(conn, user_id, conn_id, external_id=f"{user_id}-{n}", markdown=f"text {n}")
        f.review_state(
            conn,
            doc,
            user_id,
            status="reviewing",
            next_due_at=NOW - timedelta(days=days, hours=1),
            last_sent_at=NOW - timedelta(days=30),
        )
        ids.append(doc)
    return ids


def test_creates_a_scheduled_digest_with_the_selected_notes(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.settings(conn, "u1", notes_per_digest=3, timezone="Asia/Kolkata")
        docs = overdue_docs(conn, "u1", [2, 9, 0, 5, 1])
    report = generate_digests(engine, NOW, settings_for(engine), clock=lambda: REAL)
    assert (report.users_considered, report.digests_created, report.notes_selected) == (1, 1, 3)
    with engine.connect() as conn:
        (digest,) = digests(conn)
        assert digest.status == "scheduled"
        # 08:00Z is 13:30 in Kolkata on Feb 8; the local day started at Feb 7 18:30Z
        assert digest.scheduled_for == datetime(2026, 2, 7, 18, 30, tzinfo=UTC)
        assert digest.created_at == REAL and digest.updated_at == REAL
        assert digest.payload_json["source"] == DAILY_SOURCE
        assert item_docs(conn, digest.id) == [docs[1], docs[3], docs[0]]  # 9, 5, 2 days overdue
        hashes = dict(conn.execute(sa.select(t.documents.c.id, t.documents.c.content_hash)).all())
        stored = conn.execute(
            sa.select(t.note_digest_items.c.document_id, t.note_digest_items.c.content_hash_at_send)
        ).all()
        assert all(h == hashes[d] for d, h in stored)


def test_running_the_same_hour_twice_creates_nothing_new(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for uid in ("u1", "u2"):
            f.user(conn, uid)
            overdue_docs(conn, uid, [1, 2])
    s = settings_for(engine)
    first = generate_digests(engine, NOW, s, clock=lambda: REAL)
    again = generate_digests(engine, NOW + timedelta(minutes=30), s, clock=lambda: REAL)
    later_same_day = generate_digests(engine, NOW + timedelta(hours=10), s, clock=lambda: REAL)
    assert first.digests_created == 2
    assert (again.digests_created, again.already_generated) == (0, 2)
    assert later_same_day.digests_created == 0
    next_day = generate_digests(engine, NOW + timedelta(hours=16), s, clock=lambda: REAL)  # 00:00Z Feb 9
    assert next_day.digests_created == 2
    with engine.connect() as conn:
        assert len(digests(conn)) == 4


def test_local_day_decides_with_the_users_timezone(engine: sa.Engine) -> None:
    """A digest made at 23:00Z on Feb 7 is Feb 8 in Auckland (UTC+13) but Feb 7 in New York."""
    with engine.begin() as conn:
        for uid, tz in (("akl", "Pacific/Auckland"), ("nyc", "America/New_York")):
            f.user(conn, uid)
            f.settings(conn, uid, timezone=tz)
            overdue_docs(conn, uid, [1])
            f.digest(
                conn,
                uid,
                scheduled_for=datetime(2026, 2, 7, 23, 0, tzinfo=UTC),
                created_at=datetime(2026, 2, 7, 23, 0, tzinfo=UTC),
            )
    # 10:00Z Feb 8: Auckland is Feb 8 23:00 (same day → nothing); New York is Feb 8 05:00 (new day)
    report = generate_digests(engine, datetime(2026, 2, 8, 10, tzinfo=UTC), settings_for(engine))
    assert (report.digests_created, report.already_generated) == (1, 1)
    with engine.connect() as conn:
        assert len(digests(conn, "akl")) == 1
        newest = digests(conn, "nyc")[-1]
        assert newest.scheduled_for == datetime(2026, 2, 8, 5, 0, tzinfo=UTC)  # NY midnight (EST)


def test_latest_digest_without_scheduled_for_uses_created_at(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        overdue_docs(conn, "u1", [1])
        f.digest(conn, "u1", scheduled_for=None, created_at=NOW - timedelta(hours=1))
    report = generate_digests(engine, NOW, settings_for(engine))
    assert (report.digests_created, report.already_generated) == (0, 1)


def test_skipped_digests_for_no_documents_and_empty_selection(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "empty")  # no documents at all
        f.user(conn, "deleted")  # only a deleted document
        conn_id = f.connection(conn, "deleted")
        f.document(conn, "deleted", conn_id, external_id="d", deleted_at_source=NOW - timedelta(days=1))
        f.user(conn, "suspended")  # documents, but all suspended
        docs = overdue_docs(conn, "suspended", [1, 2])
        conn.execute(
            sa.update(t.review_states)
            .where(t.review_states.c.document_id.in_(docs))
            .values(status="suspended")
        )
        f.user(conn, "zero")  # notes_per_digest 0
        f.settings(conn, "zero", notes_per_digest=0)
        overdue_docs(conn, "zero", [1])
    report = generate_digests(engine, NOW, settings_for(engine))
    assert report.digests_created == 0
    assert dict(report.skipped) == {"no_documents": 2, "empty_selection": 2}
    assert report.notes_excluded["suspended"] == 2
    with engine.connect() as conn:
        got = {d.user_id: (d.status, d.payload_json["reason"]) for d in digests(conn)}
        assert got == {
            "empty": ("skipped", "no_documents"),
            "deleted": ("skipped", "no_documents"),
            "suspended": ("skipped", "empty_selection"),
            "zero": ("skipped", "empty_selection"),
        }
        assert conn.execute(sa.select(sa.func.count()).select_from(t.note_digest_items)).scalar() == 0


def test_plan_clamps_notes_per_digest(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "free")
        f.settings(conn, "free", notes_per_digest=8)
        overdue_docs(conn, "free", list(range(10)))
        f.user(conn, "pro")
        f.settings(conn, "pro", notes_per_digest=8)
        f.subscription(conn, "pro")
        overdue_docs(conn, "pro", list(range(10)))
        f.user(conn, "nosettings")
        overdue_docs(conn, "nosettings", list(range(10)))
    generate_digests(engine, NOW, settings_for(engine))
    with engine.connect() as conn:
        counts = {d.user_id: len(item_docs(conn, d.id)) for d in digests(conn)}
    assert counts == {"free": 5, "pro": 8, "nosettings": 5}


def test_self_hosted_users_are_all_pro(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.settings(conn, "u1", notes_per_digest=8)
        overdue_docs(conn, "u1", list(range(10)))
    generate_digests(engine, NOW, settings_for(engine, deployment_mode=DeploymentMode.SELF_HOSTED))
    with engine.connect() as conn:
        (digest,) = digests(conn)
        assert len(item_docs(conn, digest.id)) == 8


def test_invalid_timezone_falls_back_to_utc_and_is_counted(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "mars")
        f.settings(conn, "mars", timezone="Mars/Olympus")
        overdue_docs(conn, "mars", [1])
        f.user(conn, "ok")
        overdue_docs(conn, "ok", [1])
    report = generate_digests(engine, NOW, settings_for(engine))
    assert report.digests_created == 2
    assert report.data_issues == {"invalid_timezone": 1}
    with engine.connect() as conn:
        assert digests(conn, "mars")[0].scheduled_for == datetime(2026, 2, 8, tzinfo=UTC)


def test_keyset_batches_cover_every_user(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for n in range(7):
            f.user(conn, f"user-{n}")
            overdue_docs(conn, f"user-{n}", [1, 2])
    report = generate_digests(engine, NOW, settings_for(engine, digest_batch_size=3))
    assert (report.batches, report.users_considered, report.digests_created) == (3, 7, 7)
    with engine.connect() as conn:
        assert sorted(d.user_id for d in digests(conn)) == [f"user-{n}" for n in range(7)]


def test_statements_per_batch_do_not_grow_with_users(engine: sa.Engine) -> None:
    if not is_postgres(engine):
        pytest.skip("statement counts are measured as Postgres counts them")

    def run(users: int, prefix: str, now: datetime, expected: int) -> int:
        with engine.begin() as conn:
            for n in range(users):
                f.user(conn, f"{prefix}-{n:03d}")
                overdue_docs(conn, f"{prefix}-{n:03d}", [1, 2, 3, 4, 5, 6])
        with count_statements(engine) as counter:
            report = generate_digests(engine, now, settings_for(engine, digest_batch_size=1000))
        assert report.digests_created == expected
        return counter.count

    few = run(2, "a", NOW, 2)
    many = run(40, "b", NOW + timedelta(days=1), 42)  # the first two users get their next day's too
    assert few == many
    # users with their locks, last sends + digests near the day (one UNION ALL), candidates, and one
    # insert of the digests with their items
    assert many == 4
