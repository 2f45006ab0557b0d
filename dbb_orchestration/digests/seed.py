"""The seed digest made right after a source's first sync (behaviour §7).

:func:`create_seed_digest_if_needed` is called by the Notion sync (and mirrors what the backend does
after an Obsidian push). The first-digest sensor then sends the digest at once
(``digests/defs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa

from dbb_orchestration.audience import plan_for
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import insert_many
from dbb_orchestration.digests.queries import (
    load_latest_digests,
    load_user_batch,
    lock_users_for_generation,
)
from dbb_orchestration.plans import DeploymentMode, effective_notes_per_digest
from dbb_orchestration.timing import as_utc

__all__ = ["SEED_SOURCE", "SeedOutcome", "SeedResult", "create_seed_digest_if_needed"]

SEED_SOURCE = "seed_after_first_sync"

SeedOutcome = Literal[
    "created",  # a new scheduled digest
    "reused",  # the latest (skipped) digest was set back to scheduled with new items
    "has_digest",  # the user already has a digest whose latest is not skipped: nothing to do
    "sync_running",  # a sync of one of the user's connections is still running: the last one will seed
    "no_documents",  # no non-deleted document to show: nothing created
    "empty_selection",  # notes_per_digest is 0: nothing created
    "no_user",  # no such user
]


@dataclass(frozen=True)
class SeedResult:
    outcome: SeedOutcome
    digest_id: int | None = None
    note_count: int = 0

    @property
    def created(self) -> bool:
        """Whether a digest is now scheduled for the first-digest sensor (new or reused)."""
        return self.outcome in ("created", "reused")


def _has_running_sync(conn: sa.Connection, user_id: str) -> bool:
    sr, c = t.sync_runs, t.integration_connections
    stmt = sa.select(
        sa.select(sa.literal(1))
        .select_from(sr.join(c, c.c.id == sr.c.connection_id))
        .where(c.c.user_id == user_id, sr.c.status == "running")
        .exists()
    )
    return bool(conn.execute(stmt).scalar())


def _recent_documents(conn: sa.Connection, user_id: str, limit: int) -> list[tuple[int, str]]:
    doc = t.documents
    stmt = (
        sa.select(doc.c.id, doc.c.content_hash)
        .where(doc.c.user_id == user_id, doc.c.deleted_at_source.is_(None))
        .order_by(doc.c.last_synced_at.desc().nulls_last(), doc.c.id.desc())
        .limit(limit)
    )
    return [(int(r.id), str(r.content_hash)) for r in conn.execute(stmt).all()]


def create_seed_digest_if_needed(
    conn: sa.Connection,
    user_id: str,
    now: datetime,
    *,
    mode: DeploymentMode | str = DeploymentMode.CLOUD,
) -> SeedResult:
    """Create (or reuse) the user's seed digest when behaviour §7 asks for one; runs in the caller's
    transaction and commits nothing itself.

    A digest is made when the user has no digest yet, or their latest (by ``created_at``) is
    ``skipped``, and no ``sync_runs`` row of any of their connections is ``running``. It holds the
    ``notes_per_digest`` (the user's setting, default 5, clamped to the plan: pass the deployment
    ``mode`` so self-hosted users count as Pro) most recently synced non-deleted documents
    (``last_synced_at`` newest first, never-synced last, ties by id newest first), positions 1..n,
    ``content_hash_at_send`` = the current hash, status ``scheduled``, ``scheduled_for`` = ``now``,
    ``payload_json`` ``{"source": "seed_after_first_sync", "note_count": n}``. A latest ``skipped``
    digest is reused: set back to ``scheduled`` (``sent_at``/``error_json`` cleared) and its items
    replaced, so no second digest row appears; its payload is replaced by that same seed payload, so
    nothing of the skip (``reason``, ``superseded_by``, an old idempotency key …) stays on a digest that
    is then sent. No documents (or 0 notes per digest) → nothing is written.

    On Postgres it first takes the user's generation lock (a transaction-scoped advisory lock, see
    ``queries.GENERATION_LOCK_NAMESPACE``), so it never interleaves with the hourly generation's
    read-then-insert for the same user, and never waits on generation of other users. ``now`` must be
    timezone-aware (naive → ``ValueError``); it is also written to ``created_at``/``updated_at``.
    """
    now = as_utc(now, "now")
    lock_users_for_generation(conn, [user_id])
    latest = load_latest_digests(conn, [user_id]).get(user_id)
    if latest is not None and latest.status != "skipped":
        return SeedResult("has_digest", latest.id)
    if _has_running_sync(conn, user_id):
        return SeedResult("sync_running")
    users = load_user_batch(conn, after=None, limit=1, only_user_id=user_id)
    if not users:
        return SeedResult("no_user")
    user = users[0]
    _pro, limits = plan_for(user.has_pro_subscription, mode)
    count = effective_notes_per_digest(user.notes_per_digest if user.has_settings else None, limits)
    if count <= 0:
        return SeedResult("empty_selection")
    documents = _recent_documents(conn, user_id, count)
    if not documents:
        return SeedResult("no_documents")

    d = t.note_digests
    payload = {"source": SEED_SOURCE, "note_count": len(documents)}
    if latest is not None:
        digest_id = latest.id
        conn.execute(
            sa.update(d)
            .where(d.c.id == digest_id)
            .values(
                status="scheduled",
                scheduled_for=now,
                sent_at=None,
                error_json=None,
                payload_json=payload,
                updated_at=now,
            )
        )
        conn.execute(sa.delete(t.note_digest_items).where(t.note_digest_items.c.note_digest_id == digest_id))
        outcome: SeedOutcome = "reused"
    else:
        digest_id = int(
            conn.execute(
                sa.insert(d)
                .values(
                    user_id=user_id,
                    status="scheduled",
                    scheduled_for=now,
                    payload_json=payload,
                    created_at=now,
                    updated_at=now,
                )
                .returning(d.c.id)
            ).scalar_one()
        )
        outcome = "created"
    insert_many(
        conn,
        t.note_digest_items,
        [
            {
                "note_digest_id": digest_id,
                "document_id": doc_id,
                "position": position,
                "content_hash_at_send": content_hash,
                "created_at": now,
            }
            for position, (doc_id, content_hash) in enumerate(documents, start=1)
        ],
    )
    return SeedResult(outcome, digest_id, len(documents))
