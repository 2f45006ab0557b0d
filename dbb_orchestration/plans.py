"""Plan limits and deployment mode (behaviour §3), as pure functions.

Nothing here reads the environment or the database: callers pass the deployment mode (parsed once by
the settings object) and whether the user is Pro (decided in ``dbb_orchestration.audience``), and get
numbers back.

- Free: at most 500 notes, 1 source, 5 notes per digest, digest interval 3–30 days.
- Pro: at most 10,000 notes, unlimited sources, 50 notes per digest, interval 1–30 days.
- Self-hosted: billing is off, every user is Pro, no note or source cap, 50 per digest, 1–30 days.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "DEFAULT_INTERVAL_DAYS",
    "DEFAULT_NOTES_PER_DIGEST",
    "FREE_LIMITS",
    "PRO_LIMITS",
    "SELF_HOSTED_LIMITS",
    "DeploymentMode",
    "PlanLimits",
    "billing_enabled",
    "digest_timing_phrase",
    "effective_interval_days",
    "effective_notes_per_digest",
    "interval_label",
    "parse_deployment_mode",
    "plan_limits",
]


class DeploymentMode(StrEnum):
    """Where the code location runs: ``cloud`` (billing on) or ``self-hosted`` (everyone is Pro)."""

    CLOUD = "cloud"
    SELF_HOSTED = "self-hosted"


def parse_deployment_mode(value: str | None) -> DeploymentMode:
    """Parse ``DEPLOYMENT_MODE``.

    ``None``, an empty or all-blank string → :attr:`DeploymentMode.CLOUD` (the default). Surrounding
    whitespace and letter case are ignored (``" Self-Hosted "`` is self-hosted). Anything else raises
    ``ValueError`` whose message names ``DEPLOYMENT_MODE`` and the rejected value.
    """
    if value is None:
        return DeploymentMode.CLOUD
    cleaned = str(value).strip().lower()
    if cleaned == "":
        return DeploymentMode.CLOUD
    for mode in DeploymentMode:
        if cleaned == mode.value:
            return mode
    allowed = " or ".join(repr(m.value) for m in DeploymentMode)
    raise ValueError(f"DEPLOYMENT_MODE must be {allowed}, got {value!r}")


def _mode(mode: DeploymentMode | str) -> DeploymentMode:
    """Accept the enum or its plain string value; an unknown string raises ``ValueError``."""
    return mode if isinstance(mode, DeploymentMode) else DeploymentMode(mode)


def billing_enabled(mode: DeploymentMode | str) -> bool:
    """Billing exists only in the cloud; self-hosted → ``False``."""
    return _mode(mode) is DeploymentMode.CLOUD


@dataclass(frozen=True)
class PlanLimits:
    """What a plan allows. ``None`` caps mean unlimited."""

    name: str
    max_notes: int | None
    max_sources: int | None
    max_notes_per_digest: int
    min_interval_days: int
    max_interval_days: int


FREE_LIMITS = PlanLimits(
    name="free",
    max_notes=500,
    max_sources=1,
    max_notes_per_digest=5,
    min_interval_days=3,
    max_interval_days=30,
)
PRO_LIMITS = PlanLimits(
    name="pro",
    max_notes=10_000,
    max_sources=None,
    max_notes_per_digest=50,
    min_interval_days=1,
    max_interval_days=30,
)
SELF_HOSTED_LIMITS = PlanLimits(
    name="self-hosted",
    max_notes=None,
    max_sources=None,
    max_notes_per_digest=50,
    min_interval_days=1,
    max_interval_days=30,
)

DEFAULT_INTERVAL_DAYS = 7
DEFAULT_NOTES_PER_DIGEST = 5


def plan_limits(is_pro: bool, mode: DeploymentMode | str) -> PlanLimits:
    """Limits for a user: self-hosted → :data:`SELF_HOSTED_LIMITS` whatever ``is_pro`` says;
    cloud → :data:`PRO_LIMITS` or :data:`FREE_LIMITS`."""
    if _mode(mode) is DeploymentMode.SELF_HOSTED:
        return SELF_HOSTED_LIMITS
    return PRO_LIMITS if is_pro else FREE_LIMITS


def effective_interval_days(requested: int | None, limits: PlanLimits) -> int:
    """The digest interval actually used: ``requested`` clamped to ``[min_interval_days, max_interval_days]``.

    ``None`` (user without a settings row) → :data:`DEFAULT_INTERVAL_DAYS` (7), then clamped. Zero or
    negative requests clamp up to the plan minimum; e.g. a free user asking for 1 day gets 3.
    """
    days = DEFAULT_INTERVAL_DAYS if requested is None else int(requested)
    return max(limits.min_interval_days, min(limits.max_interval_days, days))


def effective_notes_per_digest(requested: int | None, limits: PlanLimits) -> int:
    """Notes per digest actually used: ``requested`` clamped to ``[0, max_notes_per_digest]``.

    ``None`` (no settings row) → :data:`DEFAULT_NOTES_PER_DIGEST` (5), then clamped. The lower bound is
    0, not 1: a stored 0 (or a negative value, which becomes 0) means an empty selection, and the
    digest is then skipped with reason ``empty_selection`` (behaviour §5 step 7).
    """
    count = DEFAULT_NOTES_PER_DIGEST if requested is None else int(requested)
    return max(0, min(limits.max_notes_per_digest, count))


def interval_label(days: int) -> str:
    """Subject label for an interval: 1 → "Every day", 7 → "Every week", 14 → "Every 2 weeks",
    30 → "Every month", any other value n → "Every n days" (not expected below 1, but not rejected)."""
    special = {1: "Every day", 7: "Every week", 14: "Every 2 weeks", 30: "Every month"}
    return special.get(days, f"Every {days} days")


def digest_timing_phrase(interval_days: int) -> str:
    """When the next digest arrives, in words (behaviour §9): ≤1 "tomorrow morning", ≤3 "in a few days",
    ≤7 "later this week", ≤14 "next week", otherwise "this month". Values ≤ 0 read as "tomorrow morning"."""
    if interval_days <= 1:
        return "tomorrow morning"
    if interval_days <= 3:
        return "in a few days"
    if interval_days <= 7:
        return "later this week"
    if interval_days <= 14:
        return "next week"
    return "this month"
