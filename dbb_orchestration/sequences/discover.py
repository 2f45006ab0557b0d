"""Enrolment into the ``upgrade`` sequence (behaviour §9, ``upgrade_sequence_discover_job``).

ONE statement inserts an ``upgrade`` state (step 1, ``active``, ``entered_at`` = the run's logical time)
for every user with at least 4 ``sent`` digests, who is not Pro (no subscription ``active`` or
``trialing``) and has no ``upgrade`` row yet: ``INSERT … SELECT … ON CONFLICT (user_id, sequence_name)
DO NOTHING``, so a concurrent or repeated run (or a row the backend inserted meanwhile) is harmless.
Nothing happens when billing is off (self-hosted: everyone is Pro).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

import sqlalchemy as sa

from dbb_orchestration.audience import has_pro_subscription_sql
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import dialect_insert
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.plans import DeploymentMode, billing_enabled
from dbb_orchestration.timing import require_aware

__all__ = ["MIN_SENT_DIGESTS", "DiscoverResult", "discover_upgrade_candidates", "enrol_statement"]

MIN_SENT_DIGESTS: Final = 4


@dataclass(frozen=True)
class DiscoverResult:
    inserted: int
    skipped_reason: str | None = None  # set when nothing was attempted (billing off)


def enrol_statement(entered_at: datetime, *, postgres: bool) -> sa.Insert:
    """The ``INSERT … SELECT … ON CONFLICT DO NOTHING`` (exposed for EXPLAIN and tests)."""
    d, s = t.note_digests, t.email_sequence_states
    engaged = (
        sa.select(d.c.user_id)
        .where(d.c.status == "sent")
        .group_by(d.c.user_id)
        .having(sa.func.count() >= MIN_SENT_DIGESTS)
        .subquery("engaged")
    )
    pro = has_pro_subscription_sql(engaged.c.user_id)
    enrolled = sa.exists().where(s.c.user_id == engaged.c.user_id, s.c.sequence_name == "upgrade")
    # The WHERE clause is also what SQLite needs to parse INSERT … SELECT … ON CONFLICT unambiguously.
    source = sa.select(
        engaged.c.user_id,
        sa.literal("upgrade", t.email_sequence_name),
        sa.literal(1),
        sa.literal("active", t.email_sequence_status),
        sa.literal(entered_at, s.c.entered_at.type),
    ).where(~pro, ~enrolled)
    insert = dialect_insert(postgres)
    return (
        insert(s)
        .from_select(["user_id", "sequence_name", "current_step", "status", "entered_at"], source)
        .on_conflict_do_nothing(index_elements=["user_id", "sequence_name"])
        .execution_options(preserve_rowcount=True)  # INSERT rowcount is only kept on request
    )


def discover_upgrade_candidates(
    engine: sa.Engine, *, entered_at: datetime, mode: DeploymentMode | str
) -> DiscoverResult:
    """Enrol eligible users; returns how many rows were inserted. Billing off → nothing, with a reason.
    Naive ``entered_at`` → ``ValueError``."""
    require_aware(entered_at, "entered_at")
    if not billing_enabled(mode):
        return DiscoverResult(0, "billing is off (self-hosted): upgrade discovery is disabled")
    with engine.begin() as conn:
        result = conn.execute(enrol_statement(entered_at, postgres=is_postgres(conn)))
        return DiscoverResult(max(0, result.rowcount))
