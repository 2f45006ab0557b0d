"""SQLAlchemy Core tables mirroring the backend's Postgres schema (behaviour §2, ``backend_schema.sql``).

The backend owns this schema. These definitions let the code location query it, and let tests and
local runs create it (``dbb-orchestration init-db``); production databases are never altered.
Names of tables, columns, enum types and indexes match the backend's migrations exactly.
"""

from __future__ import annotations

import sqlalchemy as sa

from dbb_orchestration.db.types import JSONB, UTCDateTime

metadata = sa.MetaData()


def _enum(name: str, *values: str) -> sa.Enum:
    # native_enum: a real Postgres enum type of that name; a CHECK-free VARCHAR on SQLite.
    return sa.Enum(*values, name=name, create_constraint=False, validate_strings=True)


integration_kind = _enum("integration_kind", "obsidian", "notion")
integration_status = _enum("integration_status", "active", "paused", "revoked", "error")
integration_scope_type = _enum("integration_scope_type", "notion_database")
sync_run_kind = _enum("sync_run_kind", "initial", "incremental", "manual")
sync_run_status = _enum("sync_run_status", "running", "success", "failed", "partial")
review_status = _enum("review_status", "new", "reviewing", "suspended")
note_digest_status = _enum("note_digest_status", "scheduled", "sent", "failed", "skipped")
email_sequence_name = _enum("email_sequence_name", "welcome", "onboarding", "upgrade")
email_sequence_status = _enum("email_sequence_status", "active", "completed", "exited")

NOW = sa.func.now()


def _ts(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column:
    return sa.Column(name, UTCDateTime(), nullable=nullable, server_default=NOW if default_now else None)


user = sa.Table(
    "user",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("email_verified", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("show_onboarding", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("image", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=False), nullable=False),
    sa.UniqueConstraint("email", name="user_email_unique"),
)

account = sa.Table(
    "account",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("account_id", sa.Text, nullable=False),
    sa.Column("provider_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("access_token", sa.Text),
    sa.Column("refresh_token", sa.Text),
    sa.Column("id_token", sa.Text),
    sa.Column("access_token_expires_at", sa.DateTime(timezone=False)),
    sa.Column("refresh_token_expires_at", sa.DateTime(timezone=False)),
    sa.Column("scope", sa.Text),
    sa.Column("password", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=False), nullable=False),
    sa.Index("account_userId_idx", "user_id"),
)

integration_connections = sa.Table(
    "integration_connections",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", integration_kind, nullable=False),
    sa.Column("status", integration_status, nullable=False),
    sa.Column("display_name", sa.Text),
    sa.Column("account_external_id", sa.Text, nullable=False),
    sa.Column("config_json", JSONB),
    sa.Column("secrets_json_encrypted", sa.Text),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    _ts("last_seen_at"),
    sa.Index(
        "integration_connections_user_kind_external_idx",
        "user_id",
        "kind",
        "account_external_id",
        unique=True,
    ),
    sa.Index("integration_connections_user_kind_status_idx", "user_id", "kind", "status"),
    sa.Index("integration_connections_user_last_seen_idx", "user_id", "last_seen_at"),
)

integration_scope_items = sa.Table(
    "integration_scope_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "connection_id",
        sa.Integer,
        sa.ForeignKey("integration_connections.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("scope_type", integration_scope_type, nullable=False),
    sa.Column("scope_value", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("metadata_json", JSONB),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index(
        "integration_scope_items_connection_type_value_idx",
        "connection_id",
        "scope_type",
        "scope_value",
        unique=True,
    ),
    sa.Index("integration_scope_items_connection_enabled_idx", "connection_id", "enabled"),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column(
        "connection_id",
        sa.Integer,
        sa.ForeignKey("integration_connections.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("external_id", sa.Text, nullable=False),
    sa.Column("title", sa.Text),
    sa.Column("content_ciphertext", sa.Text, nullable=False),
    sa.Column("content_iv", sa.Text, nullable=False),
    sa.Column("content_alg", sa.Text, nullable=False),
    sa.Column("content_key_version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("content_size_bytes", sa.Integer, nullable=False),
    sa.Column("metadata_json", JSONB),
    _ts("created_at_source"),
    _ts("updated_at_source"),
    _ts("deleted_at_source"),
    _ts("last_synced_at"),
    sa.Index(
        "documents_user_connection_external_idx", "user_id", "connection_id", "external_id", unique=True
    ),
    sa.Index("documents_connection_updated_at_source_idx", "connection_id", "updated_at_source"),
    sa.Index("documents_user_deleted_at_source_idx", "user_id", "deleted_at_source"),
    sa.Index("documents_user_last_synced_at_idx", "user_id", "last_synced_at"),
)

sync_state = sa.Table(
    "sync_state",
    metadata,
    sa.Column(
        "connection_id",
        sa.Integer,
        sa.ForeignKey("integration_connections.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    _ts("last_full_sync_at"),
    _ts("last_incremental_sync_at"),
    sa.Column("cursor_json", JSONB),
    _ts("backoff_until"),
    sa.Column("health_json", JSONB),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index("sync_state_backoff_until_idx", "backoff_until"),
)

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "connection_id",
        sa.Integer,
        sa.ForeignKey("integration_connections.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("kind", sync_run_kind, nullable=False),
    sa.Column("status", sync_run_status, nullable=False),
    sa.Column("stats_json", JSONB),
    sa.Column("error_json", JSONB),
    _ts("started_at"),
    _ts("finished_at"),
    _ts("created_at", nullable=False, default_now=True),
    sa.Index("sync_runs_connection_started_at_idx", "connection_id", "started_at"),
    sa.Index("sync_runs_status_started_at_idx", "status", "started_at"),
)

review_states = sa.Table(
    "review_states",
    metadata,
    sa.Column(
        "document_id",
        sa.Integer,
        sa.ForeignKey("documents.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("status", review_status, nullable=False),
    sa.Column("priority_weight", sa.Double),
    _ts("deprioritized_until"),
    _ts("last_sent_at"),
    _ts("last_reviewed_at"),
    _ts("next_due_at"),
    sa.Column("scheduling_json", JSONB),
    sa.Column("interval_days", sa.Integer),
    sa.Column("ease_factor", sa.Double),
    sa.Column("repetitions", sa.Integer),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index("review_states_user_next_due_idx", "user_id", "next_due_at"),
    sa.Index("review_states_user_status_idx", "user_id", "status"),
)

review_events = sa.Table(
    "review_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("document_id", sa.Integer, sa.ForeignKey("documents.id", ondelete="CASCADE"), nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("payload_json", JSONB),
    _ts("created_at", nullable=False, default_now=True),
    sa.Index("review_events_document_created_at_idx", "document_id", "created_at"),
    sa.Index("review_events_user_created_at_idx", "user_id", "created_at"),
)

user_settings = sa.Table(
    "user_settings",
    metadata,
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("digest_interval_days", sa.Integer, nullable=False, server_default=sa.text("3")),
    sa.Column("notes_per_digest", sa.Integer, nullable=False, server_default=sa.text("5")),
    sa.Column("quiz_enabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("timezone", sa.Text, nullable=False, server_default=sa.text("'UTC'")),
    sa.Column("preferred_send_hour", sa.Integer, nullable=False, server_default=sa.text("8")),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index("user_settings_digest_interval_idx", "digest_interval_days"),
    sa.Index("user_settings_timezone_send_hour_idx", "timezone", "preferred_send_hour"),
)

billing_customers = sa.Table(
    "billing_customers",
    metadata,
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("polar_customer_id", sa.Text, nullable=False),
    sa.Column("email", sa.Text),
    sa.Column("metadata_json", JSONB),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index("billing_customers_polar_customer_id_idx", "polar_customer_id", unique=True),
)

billing_subscriptions = sa.Table(
    "billing_subscriptions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("polar_customer_id", sa.Text),
    sa.Column("product_id", sa.Text),
    sa.Column("price_id", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    _ts("current_period_start"),
    _ts("current_period_end"),
    sa.Column("cancel_at_period_end", sa.Boolean),
    _ts("canceled_at"),
    _ts("ended_at"),
    sa.Column("metadata_json", JSONB),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index("billing_subscriptions_customer_idx", "polar_customer_id"),
    sa.Index("billing_subscriptions_status_idx", "status"),
    sa.Index("billing_subscriptions_user_id_idx", "user_id"),
)

note_digests = sa.Table(
    "note_digests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    _ts("scheduled_for"),
    _ts("sent_at"),
    sa.Column("status", note_digest_status, nullable=False),
    sa.Column("payload_json", JSONB),
    sa.Column("error_json", JSONB),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    sa.Index("note_digests_user_scheduled_for_idx", "user_id", "scheduled_for"),
    sa.Index("note_digests_status_scheduled_for_idx", "status", "scheduled_for"),
)

note_digest_items = sa.Table(
    "note_digest_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "note_digest_id", sa.Integer, sa.ForeignKey("note_digests.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("document_id", sa.Integer, sa.ForeignKey("documents.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("content_hash_at_send", sa.Text, nullable=False),
    _ts("created_at", nullable=False, default_now=True),
    sa.Index("note_digest_items_digest_document_idx", "note_digest_id", "document_id", unique=True),
    sa.Index("note_digest_items_digest_position_idx", "note_digest_id", "position"),
)

email_sequence_states = sa.Table(
    "email_sequence_states",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("sequence_name", email_sequence_name, nullable=False),
    sa.Column("current_step", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("status", email_sequence_status, nullable=False, server_default=sa.text("'active'")),
    _ts("entered_at", nullable=False, default_now=True),
    _ts("last_email_sent_at"),
    _ts("completed_at"),
    sa.Column("exit_reason", sa.Text),
    sa.Index("email_sequence_states_user_sequence_idx", "user_id", "sequence_name", unique=True),
    sa.Index("email_sequence_states_status_sequence_idx", "status", "sequence_name"),
    sa.Index("email_sequence_states_last_sent_idx", "last_email_sent_at"),
)

email_sends = sa.Table(
    "email_sends",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Text, sa.ForeignKey("user.id", ondelete="CASCADE"), nullable=False),
    sa.Column("sequence_name", email_sequence_name),
    sa.Column("email_name", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("provider", sa.Text, nullable=False, server_default=sa.text("'resend'")),
    sa.Column("resend_id", sa.Text),
    _ts("sent_at", nullable=False, default_now=True),
    _ts("opened_at"),
    _ts("clicked_at"),
    sa.Column("payload_json", JSONB),
    sa.Index("email_sends_idempotency_idx", "idempotency_key", unique=True),
    sa.Index("email_sends_email_name_idx", "email_name"),
    sa.Index("email_sends_resend_id_idx", "resend_id"),
    sa.Index("email_sends_user_sequence_idx", "user_id", "sequence_name"),
)
