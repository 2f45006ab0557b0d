"""The step table and its time rules (behaviour §9), at the boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dbb_orchestration.sequences.steps import (
    STEPS,
    email_id,
    email_tags,
    get_step,
    idempotency_key,
    is_due,
    last_step,
    require_sequence,
    step_due_at,
    template_id,
)

ENTERED = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
FIRST_DIGEST = datetime(2026, 3, 4, 8, 0, 12, tzinfo=UTC)
US = timedelta(microseconds=1)

# (sequence, step, hours after the anchor), written out from the table in docs/behaviour.md §9, not from STEPS.
TABLE = [
    ("welcome", 1, 1),
    ("welcome", 2, 48),
    ("welcome", 3, 96),
    ("welcome", 4, 168),
    ("onboarding", 1, 2),
    ("onboarding", 2, 120),
    ("onboarding", 3, 216),
    ("onboarding", 4, 336),
    ("upgrade", 1, 0),
    ("upgrade", 2, 72),
    ("upgrade", 3, 168),
    ("upgrade", 4, 336),
    ("upgrade", 5, 504),
]


def test_table_has_the_spec_steps_and_nothing_else() -> None:
    assert {(s, n) for s, n, _ in TABLE} == {(st.sequence, st.number) for v in STEPS.values() for st in v}
    assert (last_step("welcome"), last_step("onboarding"), last_step("upgrade")) == (4, 4, 5)
    assert get_step("welcome", 0) is None
    assert get_step("welcome", 5) is None
    assert get_step("upgrade", 5) is not None


@pytest.mark.parametrize(("sequence", "step", "hours"), TABLE)
def test_due_exactly_at_the_offset_and_not_a_microsecond_before(sequence: str, step: int, hours: int) -> None:
    anchor = FIRST_DIGEST if sequence == "onboarding" else ENTERED
    due_at = anchor + timedelta(hours=hours)
    assert step_due_at(sequence, step, entered_at=ENTERED, first_digest_sent_at=FIRST_DIGEST) == due_at
    common = {"entered_at": ENTERED, "first_digest_sent_at": FIRST_DIGEST}
    assert is_due(sequence, step, now=due_at, **common) is True
    assert is_due(sequence, step, now=due_at - US, **common) is False
    assert is_due(sequence, step, now=due_at + timedelta(days=400), **common) is True


def test_onboarding_counts_from_the_first_digest_not_from_entry() -> None:
    # entered long ago: still not due until 2 h after the first digest
    now = FIRST_DIGEST + timedelta(hours=1, minutes=59)
    assert not is_due("onboarding", 1, now=now, entered_at=ENTERED, first_digest_sent_at=FIRST_DIGEST)


def test_onboarding_without_a_first_digest_is_blocked() -> None:
    far = ENTERED + timedelta(days=365)
    assert step_due_at("onboarding", 1, entered_at=ENTERED, first_digest_sent_at=None) is None
    for step in range(1, 5):
        assert not is_due("onboarding", step, now=far, entered_at=ENTERED, first_digest_sent_at=None)
    # other sequences ignore the digest entirely
    assert is_due(
        "welcome", 1, now=ENTERED + timedelta(hours=1), entered_at=ENTERED, first_digest_sent_at=None
    )


def test_upgrade_step_one_is_due_on_entry() -> None:
    assert is_due("upgrade", 1, now=ENTERED, entered_at=ENTERED, first_digest_sent_at=None)


def test_steps_beyond_the_last_are_due_at_once_and_below_one_never() -> None:
    assert is_due("welcome", 5, now=ENTERED, entered_at=ENTERED, first_digest_sent_at=None)
    assert is_due("upgrade", 6, now=ENTERED, entered_at=ENTERED, first_digest_sent_at=None)
    assert is_due("onboarding", 9, now=ENTERED, entered_at=ENTERED, first_digest_sent_at=None)
    assert not is_due(
        "welcome", 0, now=ENTERED + timedelta(days=99), entered_at=ENTERED, first_digest_sent_at=None
    )
    with pytest.raises(ValueError, match="has no step 5"):
        step_due_at("welcome", 5, entered_at=ENTERED, first_digest_sent_at=None)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown email sequence 'newsletter'"):
        require_sequence("newsletter")
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        is_due("welcome", 1, now=datetime(2026, 3, 1), entered_at=ENTERED, first_digest_sent_at=None)
    with pytest.raises(ValueError, match="entered_at"):
        step_due_at("welcome", 1, entered_at=datetime(2026, 3, 1), first_digest_sent_at=None)


def test_idempotency_key_format_and_cut() -> None:
    assert idempotency_key("welcome", "user_42", 3) == "sequence-welcome-user_42-3"
    long_id = "u" * 300
    key = idempotency_key("onboarding", long_id, 2)
    assert len(key) == 256
    assert key == ("sequence-onboarding-" + long_id)[:256]


def test_tags_are_sanitized() -> None:
    assert email_tags("upgrade", 5) == {"email_type": "sequence", "sequence": "upgrade", "step": "upgrade-5"}
    assert email_tags("we lcome", 1)["sequence"] == "we-lcome"


def test_email_names_are_the_backends() -> None:
    names = [step.email_id for steps in STEPS.values() for step in steps]
    assert names == [
        *(f"welcome-{n}" for n in range(1, 5)),
        *(f"onboarding-{n}" for n in range(3, 7)),
        *(f"upgrade-{n}" for n in range(1, 6)),
    ]
    assert [email_tags(s.sequence, s.number)["step"] for steps in STEPS.values() for s in steps] == names
    assert email_id("onboarding", 4) == "onboarding-6"
    assert template_id("onboarding", 4) == "onboarding_4"
    assert STEPS["onboarding"][0].template == "onboarding_1"
