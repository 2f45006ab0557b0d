"""Plan limits and deployment mode (behaviour §3)."""

from __future__ import annotations

import dataclasses

import pytest

from dbb_orchestration.audience import PRO_SUBSCRIPTION_STATUSES, is_pro
from dbb_orchestration.plans import (
    DEFAULT_INTERVAL_DAYS,
    DEFAULT_NOTES_PER_DIGEST,
    DeploymentMode,
    PlanLimits,
    billing_enabled,
    digest_timing_phrase,
    effective_interval_days,
    effective_notes_per_digest,
    interval_label,
    parse_deployment_mode,
    plan_limits,
)

CLOUD = DeploymentMode.CLOUD
SELF = DeploymentMode.SELF_HOSTED


# --- deployment mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_missing_deployment_mode_is_cloud(raw: str | None) -> None:
    assert parse_deployment_mode(raw) is DeploymentMode.CLOUD


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cloud", DeploymentMode.CLOUD),
        ("self-hosted", DeploymentMode.SELF_HOSTED),
        (" Self-Hosted\n", DeploymentMode.SELF_HOSTED),
        ("CLOUD", DeploymentMode.CLOUD),
    ],
)
def test_parse_deployment_mode(raw: str, expected: DeploymentMode) -> None:
    assert parse_deployment_mode(raw) is expected


@pytest.mark.parametrize("raw", ["selfhosted", "self_hosted", "on-prem", "cloud2", "0"])
def test_invalid_deployment_mode_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_deployment_mode(raw)
    message = str(info.value)
    assert "DEPLOYMENT_MODE" in message
    assert repr(raw) in message
    assert "'cloud'" in message and "'self-hosted'" in message


def test_deployment_mode_values_are_the_env_strings() -> None:
    assert DeploymentMode.CLOUD.value == "cloud"
    assert DeploymentMode.SELF_HOSTED.value == "self-hosted"
    assert DeploymentMode("self-hosted") is DeploymentMode.SELF_HOSTED
    assert [m.value for m in DeploymentMode] == ["cloud", "self-hosted"]


def test_billing_enabled_only_in_cloud() -> None:
    assert billing_enabled(CLOUD) is True
    assert billing_enabled(SELF) is False
    # the plain string value works too
    assert billing_enabled("self-hosted") is False
    assert billing_enabled("cloud") is True


def test_unknown_mode_string_is_rejected_by_rule_functions() -> None:
    with pytest.raises(ValueError):
        billing_enabled("mars")
    with pytest.raises(ValueError):
        plan_limits(True, "mars")


# --- Pro -------------------------------------------------------------------------------------------


def test_pro_statuses() -> None:
    assert frozenset({"active", "trialing"}) == PRO_SUBSCRIPTION_STATUSES


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], False),
        (["active"], True),
        (["trialing"], True),
        (["canceled"], False),
        (["past_due", "incomplete", "unpaid", "revoked"], False),
        (["canceled", "active"], True),
        (["canceled", None, "trialing"], True),
        ([None], False),
        (["Active"], False),  # compared as stored
        (["active "], False),
    ],
)
def test_is_pro_in_cloud(statuses: list[str | None], expected: bool) -> None:
    assert is_pro(statuses, CLOUD) is expected


def test_is_pro_accepts_any_iterable_once() -> None:
    assert is_pro((s for s in ["canceled", "active"]), CLOUD) is True
    assert is_pro(iter([]), CLOUD) is False


@pytest.mark.parametrize("statuses", [[], ["canceled"], [None]])
def test_everyone_is_pro_when_self_hosted(statuses: list[str | None]) -> None:
    assert is_pro(statuses, SELF) is True
    assert is_pro(statuses, "self-hosted") is True


# --- limits ----------------------------------------------------------------------------------------


def test_free_limits() -> None:
    assert plan_limits(False, CLOUD) == PlanLimits(
        name="free",
        max_notes=500,
        max_sources=1,
        max_notes_per_digest=5,
        min_interval_days=3,
        max_interval_days=30,
    )


def test_pro_limits() -> None:
    assert plan_limits(True, CLOUD) == PlanLimits(
        name="pro",
        max_notes=10_000,
        max_sources=None,
        max_notes_per_digest=50,
        min_interval_days=1,
        max_interval_days=30,
    )


@pytest.mark.parametrize("pro", [True, False])
def test_self_hosted_limits_ignore_pro_flag(pro: bool) -> None:
    assert plan_limits(pro, SELF) == PlanLimits(
        name="self-hosted",
        max_notes=None,
        max_sources=None,
        max_notes_per_digest=50,
        min_interval_days=1,
        max_interval_days=30,
    )


def test_limits_are_immutable() -> None:
    limits = plan_limits(False, CLOUD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_notes = 1  # type: ignore[misc]


def test_defaults() -> None:
    assert DEFAULT_INTERVAL_DAYS == 7
    assert DEFAULT_NOTES_PER_DIGEST == 5


# --- effective interval ----------------------------------------------------------------------------

FREE = plan_limits(False, CLOUD)
PRO = plan_limits(True, CLOUD)
SELF_LIMITS = plan_limits(True, SELF)


@pytest.mark.parametrize(
    ("requested", "limits", "expected"),
    [
        (None, FREE, 7),
        (None, PRO, 7),
        (None, SELF_LIMITS, 7),
        (1, FREE, 3),
        (2, FREE, 3),
        (3, FREE, 3),
        (4, FREE, 4),
        (30, FREE, 30),
        (31, FREE, 30),
        (365, FREE, 30),
        (0, FREE, 3),
        (-5, FREE, 3),
        (1, PRO, 1),
        (0, PRO, 1),
        (-1, PRO, 1),
        (14, PRO, 14),
        (45, PRO, 30),
        (1, SELF_LIMITS, 1),
        (99, SELF_LIMITS, 30),
    ],
)
def test_effective_interval_days(requested: int | None, limits: PlanLimits, expected: int) -> None:
    assert effective_interval_days(requested, limits) == expected


def test_default_interval_is_clamped_by_a_custom_plan() -> None:
    narrow = PlanLimits("x", None, None, 5, min_interval_days=10, max_interval_days=12)
    assert effective_interval_days(None, narrow) == 10
    wide_low = PlanLimits("y", None, None, 5, min_interval_days=1, max_interval_days=5)
    assert effective_interval_days(None, wide_low) == 5


# --- effective notes per digest --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "limits", "expected"),
    [
        (None, FREE, 5),
        (None, PRO, 5),
        (None, SELF_LIMITS, 5),
        (3, FREE, 3),
        (5, FREE, 5),
        (6, FREE, 5),
        (50, FREE, 5),
        (0, FREE, 0),
        (-3, FREE, 0),
        (0, PRO, 0),
        (20, PRO, 20),
        (50, PRO, 50),
        (51, PRO, 50),
        (1000, SELF_LIMITS, 50),
        (1, SELF_LIMITS, 1),
    ],
)
def test_effective_notes_per_digest(requested: int | None, limits: PlanLimits, expected: int) -> None:
    assert effective_notes_per_digest(requested, limits) == expected


# --- labels and phrases ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "label"),
    [
        (1, "Every day"),
        (2, "Every 2 days"),
        (3, "Every 3 days"),
        (6, "Every 6 days"),
        (7, "Every week"),
        (8, "Every 8 days"),
        (13, "Every 13 days"),
        (14, "Every 2 weeks"),
        (21, "Every 21 days"),
        (28, "Every 28 days"),
        (29, "Every 29 days"),
        (30, "Every month"),
    ],
)
def test_interval_label(days: int, label: str) -> None:
    assert interval_label(days) == label


@pytest.mark.parametrize(
    ("days", "phrase"),
    [
        (-1, "tomorrow morning"),
        (0, "tomorrow morning"),
        (1, "tomorrow morning"),
        (2, "in a few days"),
        (3, "in a few days"),
        (4, "later this week"),
        (7, "later this week"),
        (8, "next week"),
        (14, "next week"),
        (15, "this month"),
        (30, "this month"),
    ],
)
def test_digest_timing_phrase(days: int, phrase: str) -> None:
    assert digest_timing_phrase(days) == phrase
