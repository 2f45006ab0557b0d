"""The audience rules: each Python predicate agrees with its SQL expression on a real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from dbb_orchestration.audience import (
    email_address,
    has_pro_subscription_sql,
    is_active_source,
    is_pro,
    is_sendable,
    latest_active_source_id_sql,
    latest_active_sources_select,
    plan_for,
    sendable_sql,
)
from dbb_orchestration.db import tables as t
from dbb_orchestration.plans import FREE_LIMITS, PRO_LIMITS, SELF_HOSTED_LIMITS, DeploymentMode
from dbb_orchestration.testing import factories as f

EMAILS = [
    ("a@example.test", True),
    ("  a@example.test \n", True),
    ("", True),
    ("   ", True),
    (" \t\r\n", True),
    ("a@example.test", False),
    ("  ", False),
]


@pytest.mark.parametrize(("email", "verified"), EMAILS)
def test_sendable_sql_agrees_with_python(engine: sa.Engine, email: str, verified: bool) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1", email=email, email_verified=verified)
        in_sql = conn.execute(sa.select(sendable_sql(t.user)).where(t.user.c.id == "u1")).scalar_one()
    assert bool(in_sql) is is_sendable(email, verified)


def test_sendable_python_rule() -> None:
    assert is_sendable(" a@example.test ", True)
    assert not is_sendable(" \t\n\r", True)
    assert not is_sendable(None, True)
    assert not is_sendable("a@example.test", False)
    assert email_address("  a@example.test\n") == "a@example.test"
    assert email_address(None) == ""


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [([], False), (["canceled"], False), (["active"], True), (["past_due", "trialing"], True)],
)
def test_pro_sql_agrees_with_python(engine: sa.Engine, statuses: list[str], expected: bool) -> None:
    with engine.begin() as conn:
        f.user(conn, "u1")
        for n, status in enumerate(statuses):
            f.subscription(conn, "u1", status=status, sub_id=f"s{n}")
        flag = bool(conn.execute(sa.select(has_pro_subscription_sql(sa.literal("u1")))).scalar_one())
    assert flag is expected
    assert is_pro(statuses, DeploymentMode.CLOUD) is expected
    assert plan_for(flag, DeploymentMode.CLOUD) == (expected, PRO_LIMITS if expected else FREE_LIMITS)
    assert plan_for(flag, DeploymentMode.SELF_HOSTED) == (True, SELF_HOSTED_LIMITS)


def test_latest_active_source_is_the_newest_active_connection(engine: sa.Engine) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        for uid in ("u1", "u2", "u3"):
            f.user(conn, uid)
        f.connection(conn, "u1", kind="obsidian", display_name="old", created_at=base)
        newest = f.connection(
            conn, "u1", kind="notion", display_name="new", created_at=base + timedelta(days=1),
            account_external_id="n1",
        )  # fmt: skip
        f.connection(
            conn, "u1", kind="notion", status="revoked", display_name="revoked",
            created_at=base + timedelta(days=2), account_external_id="n2",
        )  # fmt: skip
        f.connection(conn, "u2", status="paused")
        latest = conn.execute(sa.select(latest_active_source_id_sql(sa.literal("u1")))).scalar_one()
        none = conn.execute(sa.select(latest_active_source_id_sql(sa.literal("u2")))).scalar_one()
        rows = conn.execute(latest_active_sources_select()).all()
    assert latest == newest
    assert none is None
    assert {(r.user_id, r.kind, r.display_name) for r in rows} == {("u1", "notion", "new")}
    assert is_active_source("active") and not is_active_source("paused") and not is_active_source(None)
