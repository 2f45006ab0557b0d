"""Who: the one home of the rules that say which users and sources a workflow acts on.

Each rule is written here once, as a Python predicate and, beside it, the SQL expression that means
the same thing, so a loader that filters in the database and a decision that checks a loaded row can
never disagree. Every workflow (digest generation, sending and seeding, the email sequences' due scan,
steps and upgrade discovery, the Notion ingest's note cap) asks this module.

- **Sendable user** (docs/behaviour.md §5, §9): ``email_verified`` and an address that is not blank
  once the :data:`BLANKS` (space, tab, newline, carriage return) around it are removed. The address
  handed to the provider is :func:`email_address` (the same trim).
- **Pro** (docs/behaviour.md §3): self-hosted (billing off) → everyone; in the cloud, any subscription
  whose status is exactly one of :data:`PRO_SUBSCRIPTION_STATUSES`.
- **Active source** (docs/behaviour.md §6, §9): an ``integration_connections`` row with status
  ``active``; a user's *latest* active source is the most recently created one (ties: highest id).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Final

import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.plans import DeploymentMode, PlanLimits, billing_enabled, plan_limits

__all__ = [
    "ACTIVE_SOURCE_STATUS",
    "BLANKS",
    "PRO_SUBSCRIPTION_STATUSES",
    "active_source_sql",
    "email_address",
    "has_pro_subscription_sql",
    "is_active_source",
    "is_pro",
    "is_sendable",
    "latest_active_source_id_sql",
    "latest_active_sources_select",
    "plan_for",
    "sendable_sql",
]

# --------------------------------------------------------------------------------------- sendable user

BLANKS: Final = " \t\n\r"


def email_address(email: str | None) -> str:
    """The address as it is sent: ``email`` without surrounding :data:`BLANKS` (``None`` → ``""``)."""
    return (email or "").strip(BLANKS)


def is_sendable(email: str | None, email_verified: bool | None) -> bool:
    """Whether a user can be emailed: verified, and the address is not blank."""
    return bool(email_verified) and email_address(email) != ""


def sendable_sql(user: sa.Table | Any = t.user) -> sa.ColumnElement[bool]:
    """:func:`is_sendable` on a ``user`` table (or alias) row: ``email_verified`` and the address with
    every blank removed is not empty (a NULL address is not sendable)."""
    stripped: sa.ColumnElement[Any] = user.c.email
    for blank in BLANKS:
        stripped = sa.func.replace(stripped, blank, "")
    return sa.and_(user.c.email_verified.is_(sa.true()), stripped != "")


# ------------------------------------------------------------------------------------------------- Pro

PRO_SUBSCRIPTION_STATUSES: Final[frozenset[str]] = frozenset({"active", "trialing"})


def is_pro(subscription_statuses: Iterable[str | None], mode: DeploymentMode | str) -> bool:
    """Whether a user is Pro.

    Self-hosted → always ``True``. In the cloud a user is Pro when any of their subscriptions has
    status exactly ``active`` or ``trialing`` (statuses are compared as stored; ``None`` entries and
    other statuses such as ``canceled`` or ``past_due`` do not count). No subscriptions → ``False``.
    """
    return _pro(any(status in PRO_SUBSCRIPTION_STATUSES for status in subscription_statuses), mode)


def _pro(has_pro_subscription: bool, mode: DeploymentMode | str) -> bool:
    """Billing off (self-hosted) → everyone is Pro; otherwise whoever has a Pro subscription."""
    return not billing_enabled(mode) or has_pro_subscription


def has_pro_subscription_sql(user_id: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """``EXISTS`` a subscription of ``user_id`` whose status counts for :func:`is_pro` (the cloud
    half of the rule; the deployment mode is applied by :func:`plan_for`)."""
    b = t.billing_subscriptions
    return sa.exists().where(b.c.user_id == user_id, b.c.status.in_(sorted(PRO_SUBSCRIPTION_STATUSES)))


@functools.lru_cache(maxsize=16)
def plan_for(has_pro_subscription: bool, mode: DeploymentMode | str) -> tuple[bool, PlanLimits]:
    """Pro flag and plan limits of a user whose :func:`has_pro_subscription_sql` is
    ``has_pro_subscription`` under deployment ``mode`` (four combinations: cached)."""
    pro = _pro(has_pro_subscription, mode)
    return pro, plan_limits(pro, mode)


# --------------------------------------------------------------------------------------- active source

ACTIVE_SOURCE_STATUS: Final = "active"


def is_active_source(status: str | None) -> bool:
    """Whether a connection with ``status`` is an active source."""
    return status == ACTIVE_SOURCE_STATUS


def active_source_sql(connections: sa.Table | Any = t.integration_connections) -> sa.ColumnElement[bool]:
    """:func:`is_active_source` on an ``integration_connections`` table (or alias) row."""
    return connections.c.status == ACTIVE_SOURCE_STATUS  # type: ignore[no-any-return]


def _latest_first(c: sa.Table | Any) -> tuple[Any, Any]:
    return c.c.created_at.desc(), c.c.id.desc()


def latest_active_source_id_sql(user_id: sa.ColumnElement[Any]) -> sa.ScalarSelect[Any]:
    """The id of ``user_id``'s latest active source, as a scalar subquery (NULL when none)."""
    c = t.integration_connections
    return (
        sa.select(c.c.id)
        .where(c.c.user_id == user_id, active_source_sql(c))
        .order_by(*_latest_first(c))
        .limit(1)
        .scalar_subquery()
    )


def latest_active_sources_select(user_filter: sa.ColumnElement[bool] | None = None) -> sa.Select[Any]:
    """``(user_id, kind, display_name)`` of every user's latest active source (``ROW_NUMBER()``: one
    statement for many users); ``user_filter`` (on ``integration_connections.user_id``) narrows it."""
    c = t.integration_connections
    rn = sa.func.row_number().over(partition_by=c.c.user_id, order_by=_latest_first(c)).label("rn")
    inner = sa.select(c.c.user_id, c.c.kind, c.c.display_name, rn).where(active_source_sql(c))
    if user_filter is not None:
        inner = inner.where(user_filter)
    sub = inner.subquery()
    return sa.select(sub.c.user_id, sub.c.kind, sub.c.display_name).where(sub.c.rn == 1)
