"""The seed digest after a first sync (behaviour §7): create, reuse a skipped one, or leave alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.digests.seed import SEED_SOURCE, create_seed_digest_if_needed
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.testing import factories as f

NOW = datetime(2026, 2, 8, 9, 30, tzinfo=UTC)


def _docs(
    conn: sa.Connection, user_id: str, count: int, *, connection_id: int | None = None, days_ago: int = 0
) -> list[int]:
    """``count`` documents synced one hour apart: the last one is the most recent."""
    conn_id = connection_id or f.connection(conn, user_id)
    return [
        f.document(
            conn,
            user_id,
            conn_id,
            external_id=f"{user_id}-{days_ago}-n{i}",
            markdown=f"note {i}",
            last_synced_at=NOW - timedelta(days=days_ago, hours=count - i),
        )
        for i in range(count)
    ]


def _digests(conn: sa.Connection, user_id: str) -> list[sa.Row]:
    d = t.note_digests
    return list(conn.execute(sa.select(d).where(d.c.user_id == user_id).order_by(d.c.id)))


def _items(conn: sa.Connection, digest_id: int) -> list[tuple[int, int, str]]:
    i = t.note_digest_items
    rows = conn.execute(
        sa.select(i.c.document_id, i.c.position, i.c.content_hash_at_send)
        .where(i.c.note_digest_id == digest_id)
        .order_by(i.c.position)
    )
    return [tuple(r) for r in rows]


def _hash(conn: sa.Connection, doc_id: int) -> str:
    return str(conn.execute(sa.select(t.documents.c.content_hash).where(t.documents.c.id == doc_id)).scalar())


def test_creates_a_scheduled_digest_of_the_most_recently_synced_notes(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.settings(conn, "u1", notes_per_digest=3)
        docs = _docs(conn, "u1", 6)
        conn.execute(sa.update(t.documents).where(t.documents.c.id == docs[-1]).values(deleted_at_source=NOW))
        result = create_seed_digest_if_needed(conn, "u1", NOW)
    assert result.outcome == "created" and result.created and result.note_count == 3
    with engine.connect() as conn:
        (digest,) = _digests(conn, "u1")
        assert digest.id == result.digest_id
        assert digest.status == "scheduled"
        assert digest.scheduled_for == NOW
        assert digest.payload_json["source"] == SEED_SOURCE
        # newest synced first; the deleted newest one is never taken
        expected = [docs[4], docs[3], docs[2]]
        assert _items(conn, digest.id) == [(d, pos, _hash(conn, d)) for pos, d in enumerate(expected, 1)]


def test_reuses_a_latest_skipped_digest_instead_of_adding_one(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        old_docs = _docs(conn, "u1", 2, days_ago=5)
        skipped_id = f.digest(
            conn,
            "u1",
            status="skipped",
            scheduled_for=NOW - timedelta(days=1),
            created_at=NOW - timedelta(days=1),
            payload={"reason": "no_documents"},
            document_ids=[old_docs[0]],
        )
        new_docs = _docs(conn, "u1", 7, connection_id=f.connection(conn, "u1", kind="notion"))
        result = create_seed_digest_if_needed(conn, "u1", NOW)
    assert result.outcome == "reused" and result.digest_id == skipped_id and result.note_count == 5
    with engine.connect() as conn:
        (digest,) = _digests(conn, "u1")
        assert (digest.id, digest.status, digest.scheduled_for) == (skipped_id, "scheduled", NOW)
        assert digest.payload_json["source"] == SEED_SOURCE
        assert [d for d, _p, _h in _items(conn, skipped_id)] == new_docs[::-1][:5]


@pytest.mark.parametrize(
    "skip_payload",
    [
        {"reason": "no_documents"},  # what the backend's daily generation writes
        {"reason": "empty_selection"},
        {"reason": "superseded_by_newer_pending_digest", "superseded_by": 41},
        {"reason": "empty_snapshot", "idempotency_key": "note-digest-7", "last_attempt_at": "x"},
        None,
    ],
)
def test_a_reused_digest_keeps_nothing_of_its_skip(
    engine: sa.Engine, skip_payload: dict[str, object] | None
) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        skipped_id = f.digest(
            conn, "u1", status="skipped", created_at=NOW - timedelta(days=1), payload=skip_payload
        )
        conn.execute(
            sa.update(t.note_digests)
            .where(t.note_digests.c.id == skipped_id)
            .values(error_json={"message": "old"}, sent_at=NOW - timedelta(days=1))
        )
        _docs(conn, "u1", 2)
        assert create_seed_digest_if_needed(conn, "u1", NOW).outcome == "reused"
    with engine.connect() as conn:
        (digest,) = _digests(conn, "u1")
    # exactly what a newly created seed digest carries: no reason, no stale provider keys
    assert digest.payload_json == {"source": SEED_SOURCE, "note_count": 2}
    assert (digest.status, digest.error_json, digest.sent_at) == ("scheduled", None, None)


def test_created_and_reused_seed_digests_carry_the_same_payload(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "new")
        f.user(conn, "old")
        f.digest(conn, "old", status="skipped", payload={"reason": "no_documents"})
        _docs(conn, "new", 3)
        _docs(conn, "old", 3)
        assert create_seed_digest_if_needed(conn, "new", NOW).outcome == "created"
        assert create_seed_digest_if_needed(conn, "old", NOW).outcome == "reused"
    with engine.connect() as conn:
        assert _digests(conn, "new")[0].payload_json == _digests(conn, "old")[0].payload_json


@pytest.mark.parametrize("status", ["scheduled", "sent", "failed"])
def test_leaves_users_with_a_live_latest_digest_alone(engine: sa.Engine, status: str) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        docs = _docs(conn, "u1", 3)
        # an older skipped digest does not matter: only the latest counts
        f.digest(conn, "u1", status="skipped", created_at=NOW - timedelta(days=3))
        f.digest(conn, "u1", status=status, created_at=NOW - timedelta(days=1), document_ids=docs[:1])
        result = create_seed_digest_if_needed(conn, "u1", NOW)
    assert result.outcome == "has_digest" and not result.created
    with engine.connect() as conn:
        assert [d.status for d in _digests(conn, "u1")] == ["skipped", status]


def test_waits_while_a_sync_of_the_user_is_running(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        _docs(conn, "u1", 3)
        other = f.connection(conn, "u1", kind="notion")
        conn.execute(sa.insert(t.sync_runs).values(connection_id=other, kind="incremental", status="running"))
        assert create_seed_digest_if_needed(conn, "u1", NOW).outcome == "sync_running"
        conn.execute(sa.update(t.sync_runs).values(status="success"))
        assert create_seed_digest_if_needed(conn, "u1", NOW).outcome == "created"


def test_a_running_sync_of_another_user_does_not_block(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.user(conn, "u2")
        _docs(conn, "u1", 2)
        conn.execute(
            sa.insert(t.sync_runs).values(
                connection_id=f.connection(conn, "u2"), kind="initial", status="running"
            )
        )
        assert create_seed_digest_if_needed(conn, "u1", NOW).outcome == "created"


@pytest.mark.parametrize(
    ("pro", "mode", "requested", "expected"),
    [
        (False, DeploymentMode.CLOUD, 10, 5),  # free: at most 5
        (True, DeploymentMode.CLOUD, 10, 10),
        (False, DeploymentMode.SELF_HOSTED, 10, 10),  # self-hosted: everyone Pro
        (False, DeploymentMode.CLOUD, None, 5),  # no settings row: default 5
    ],
)
def test_notes_per_digest_is_plan_clamped(
    engine: sa.Engine, pro: bool, mode: DeploymentMode, requested: int | None, expected: int
) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        if requested is not None:
            f.settings(conn, "u1", notes_per_digest=requested)
        if pro:
            f.subscription(conn, "u1", status="trialing")
        _docs(conn, "u1", 12)
        result = create_seed_digest_if_needed(conn, "u1", NOW, mode=mode)
    assert result.note_count == expected
    with engine.connect() as conn:
        assert len(_items(conn, result.digest_id or 0)) == expected


def test_nothing_without_documents_or_with_zero_notes(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.user(conn, "u2")
        f.settings(conn, "u2", notes_per_digest=0)
        _docs(conn, "u2", 2)
        assert create_seed_digest_if_needed(conn, "u1", NOW).outcome == "no_documents"
        assert create_seed_digest_if_needed(conn, "u2", NOW).outcome == "empty_selection"
        assert create_seed_digest_if_needed(conn, "nobody", NOW).outcome == "no_user"
        assert _digests(conn, "u1") == [] and _digests(conn, "u2") == []


def test_naive_now_is_rejected(engine: sa.Engine) -> None:
    with engine.begin() as conn, pytest.raises(ValueError, match="now"):
        create_seed_digest_if_needed(conn, "u1", datetime(2026, 2, 8, 9, 30))
