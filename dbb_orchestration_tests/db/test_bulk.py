"""The generic bulk writes on SQLite and Postgres: one statement per call, enums and JSON round-trip."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import dialect_insert, in_ids, insert_many, update_many
from dbb_orchestration.testing import factories as f

NOW = datetime(2026, 3, 1, 8, tzinfo=UTC)


def _digest_rows(user_ids: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "user_id": uid,
            "scheduled_for": NOW,
            "status": "scheduled",
            "payload_json": {"n": n, "note": "kept as JSON"},
            "created_at": NOW,
            "updated_at": NOW,
        }
        for n, uid in enumerate(user_ids)
    ]


def test_insert_update_and_read_many(engine: sa.Engine) -> None:
    users = [f"u{n:04d}" for n in range(450)]  # more than one SQLite update chunk
    d = t.note_digests
    with engine.begin() as conn:
        for uid in users:
            f.user(conn, uid)
        inserted = insert_many(conn, d, _digest_rows(users), returning=(d.c.id, d.c.user_id))
        assert len(inserted) == len(users)
        ids = {r.user_id: int(r.id) for r in inserted}
        changes = [
            {"id": ids[uid], "status": "failed", "payload_json": {"retry": uid}} for uid in users[:400]
        ]
        # the guard keeps one row out: it is no longer scheduled when the update runs
        conn.execute(sa.update(d).where(d.c.id == ids[users[0]]).values(status="sent"))
        updated = update_many(conn, d, changes, where=d.c.status == "scheduled", returning=(d.c.id,))
        assert len(updated) == 399
        rows = {
            r.user_id: r
            for r in conn.execute(
                sa.select(d.c.user_id, d.c.status, d.c.payload_json).where(in_ids(conn, d.c.user_id, users))
            ).all()
        }
    assert len(rows) == len(users)
    assert rows[users[0]].status == "sent"
    assert rows[users[1]].status == "failed" and rows[users[1]].payload_json == {"retry": users[1]}
    assert rows[users[449]].status == "scheduled" and rows[users[449]].payload_json["n"] == 449


def test_empty_inputs_issue_no_statement(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        assert insert_many(conn, t.note_digests, []) == []
        assert update_many(conn, t.note_digests, []) == []
        assert conn.execute(sa.select(sa.func.count()).where(in_ids(conn, t.user.c.id, []))).scalar_one() == 0


def test_upsert_through_the_dialect_insert(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        rows = [{"id": "s1", "user_id": "u1", "status": "canceled"}]
        insert_many(conn, t.billing_subscriptions, rows)

        def upsert(stmt: Any) -> Any:
            return stmt.on_conflict_do_update(index_elements=["id"], set_={"status": stmt.excluded.status})

        insert_many(conn, t.billing_subscriptions, [{**rows[0], "status": "active"}], on_conflict=upsert)
        again = dialect_insert(conn)(t.billing_subscriptions).values(**rows[0]).on_conflict_do_nothing()
        conn.execute(again)
        status = conn.execute(sa.select(t.billing_subscriptions.c.status)).scalar_one()
    assert status == "active"
