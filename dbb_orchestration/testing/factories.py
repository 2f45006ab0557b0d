"""Row factories for tests, benchmarks and the demo: insert backend-shaped rows with sane defaults.

Each function takes an open connection and returns the new row's id. Timestamps must be aware
(UTC); the ``user``/``account`` tables use the backend's naive timestamps and get naive UTC values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.ingest import document_row

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def _naive(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


def _insert(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> Any:
    pk = list(table.primary_key.columns)[0]
    return conn.execute(sa.insert(table).values(**values).returning(pk)).scalar_one()


def user(
    conn: sa.Connection,
    user_id: str,
    *,
    name: str = "Test User",
    email: str | None = None,
    email_verified: bool = True,
    created_at: datetime = EPOCH,
) -> str:
    return str(
        _insert(
            conn,
            t.user,
            {
                "id": user_id,
                "name": name,
                "email": email if email is not None else f"{user_id}@example.test",
                "email_verified": email_verified,
                "created_at": _naive(created_at),
                "updated_at": _naive(created_at),
            },
        )
    )


def settings(
    conn: sa.Connection,
    user_id: str,
    *,
    digest_interval_days: int = 3,
    notes_per_digest: int = 5,
    timezone: str = "UTC",
    preferred_send_hour: int = 8,
) -> str:
    return str(
        _insert(
            conn,
            t.user_settings,
            {
                "user_id": user_id,
                "digest_interval_days": digest_interval_days,
                "notes_per_digest": notes_per_digest,
                "timezone": timezone,
                "preferred_send_hour": preferred_send_hour,
            },
        )
    )


def subscription(
    conn: sa.Connection, user_id: str, *, status: str = "active", sub_id: str | None = None
) -> str:
    return str(
        _insert(
            conn,
            t.billing_subscriptions,
            {"id": sub_id or f"sub_{user_id}", "user_id": user_id, "status": status},
        )
    )


def connection(
    conn: sa.Connection,
    user_id: str,
    *,
    kind: str = "obsidian",
    status: str = "active",
    display_name: str | None = "My Vault",
    account_external_id: str | None = None,
    created_at: datetime = EPOCH,
) -> int:
    return int(
        _insert(
            conn,
            t.integration_connections,
            {
                "user_id": user_id,
                "kind": kind,
                "status": status,
                "display_name": display_name,
                "account_external_id": account_external_id or f"{kind}-{user_id}",
                "created_at": created_at,
                "updated_at": created_at,
            },
        )
    )


def notion_account(conn: sa.Connection, user_id: str, *, account_id: str, access_token: str | None) -> str:
    return str(
        _insert(
            conn,
            t.account,
            {
                "id": f"acc_{user_id}_{account_id}",
                "account_id": account_id,
                "provider_id": "notion",
                "user_id": user_id,
                "access_token": access_token,
                "created_at": _naive(EPOCH),
                "updated_at": _naive(EPOCH),
            },
        )
    )


def scope_item(conn: sa.Connection, connection_id: int, database_id: str, *, enabled: bool = True) -> int:
    return int(
        _insert(
            conn,
            t.integration_scope_items,
            {
                "connection_id": connection_id,
                "scope_type": "notion_database",
                "scope_value": database_id,
                "enabled": enabled,
            },
        )
    )


def document(
    conn: sa.Connection,
    user_id: str,
    connection_id: int,
    *,
    external_id: str,
    title: str | None = "A note",
    markdown: str = "Some note text.",
    keyring: ContentKeyring | None = None,
    updated_at_source: datetime = EPOCH,
    last_synced_at: datetime | None = None,
    deleted_at_source: datetime | None = None,
) -> int:
    row = document_row(
        user_id=user_id,
        connection_id=connection_id,
        external_id=external_id,
        title=title,  # type: ignore[arg-type]  # the backend allows a NULL title
        markdown=markdown,
        keyring=keyring or ContentKeyring.empty(),
        metadata={},
        created_at_source=updated_at_source,
        updated_at_source=updated_at_source,
        deleted_at_source=deleted_at_source,
        now=last_synced_at or updated_at_source,
    )
    row["metadata_json"] = None
    return int(_insert(conn, t.documents, row))


def review_state(conn: sa.Connection, document_id: int, user_id: str, **fields: Any) -> int:
    values = {"document_id": document_id, "user_id": user_id, "status": "new", **fields}
    return int(_insert(conn, t.review_states, values))


def digest(
    conn: sa.Connection,
    user_id: str,
    *,
    status: str = "scheduled",
    scheduled_for: datetime | None = EPOCH,
    sent_at: datetime | None = None,
    created_at: datetime = EPOCH,
    payload: dict[str, Any] | None = None,
    document_ids: list[int] | None = None,
) -> int:
    digest_id = int(
        _insert(
            conn,
            t.note_digests,
            {
                "user_id": user_id,
                "status": status,
                "scheduled_for": scheduled_for,
                "sent_at": sent_at,
                "created_at": created_at,
                "updated_at": created_at,
                "payload_json": payload,
            },
        )
    )
    if document_ids:
        hashes = dict(
            conn.execute(
                sa.select(t.documents.c.id, t.documents.c.content_hash).where(
                    t.documents.c.id.in_(document_ids)
                )
            ).all()
        )
        conn.execute(
            sa.insert(t.note_digest_items),
            [
                {
                    "note_digest_id": digest_id,
                    "document_id": doc_id,
                    "position": pos,
                    "content_hash_at_send": hashes[doc_id],
                }
                for pos, doc_id in enumerate(document_ids, start=1)
            ],
        )
    return digest_id


def sequence_state(
    conn: sa.Connection,
    user_id: str,
    sequence_name: str,
    *,
    current_step: int = 1,
    status: str = "active",
    entered_at: datetime = EPOCH,
    last_email_sent_at: datetime | None = None,
) -> int:
    return int(
        _insert(
            conn,
            t.email_sequence_states,
            {
                "user_id": user_id,
                "sequence_name": sequence_name,
                "current_step": current_step,
                "status": status,
                "entered_at": entered_at,
                "last_email_sent_at": last_email_sent_at,
            },
        )
    )
