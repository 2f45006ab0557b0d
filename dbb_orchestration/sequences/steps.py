"""The sequence step table and its time rules (behaviour §9), as pure functions.

| sequence   | step 1            | step 2 | step 3 | step 4 | step 5 |
|------------|-------------------|--------|--------|--------|--------|
| welcome    | +1 h              | +2 d   | +4 d   | +7 d   | —      |
| onboarding | first digest +2 h | +5 d   | +9 d   | +14 d  | —      |
| upgrade    | +0                | +3 d   | +7 d   | +14 d  | +21 d  |

Offsets count from the state's ``entered_at``, except onboarding's, which count from the user's first
sent digest (the smallest ``sent_at`` of their ``sent`` digests); without one an onboarding step is
*blocked*. A step is due at ``anchor + offset`` inclusive. A state whose ``current_step`` is beyond the
last step is due at once (the step job then marks it ``completed``); a step below 1 is never due.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from dbb_orchestration.email.sender import sanitize_tag
from dbb_orchestration.timing import require_aware

__all__ = [
    "IDEMPOTENCY_KEY_MAX",
    "SEQUENCE_NAMES",
    "STEPS",
    "SequenceName",
    "SequenceStep",
    "Step",
    "anchor_time",
    "email_id",
    "email_tags",
    "get_step",
    "idempotency_key",
    "is_due",
    "last_step",
    "mapping_key",
    "require_sequence",
    "step_due_at",
    "template_id",
]

SequenceName = Literal["welcome", "onboarding", "upgrade"]
SEQUENCE_NAMES: Final[tuple[SequenceName, ...]] = ("welcome", "onboarding", "upgrade")
IDEMPOTENCY_KEY_MAX: Final = 256


@dataclass(frozen=True)
class Step:
    """One email of a sequence: ``number`` is 1-based; ``offset`` counts from the sequence's anchor."""

    sequence: SequenceName
    number: int
    offset: timedelta
    purpose: str

    @property
    def email_id(self) -> str:
        """The backend's name of this email (``welcome-1``, ``onboarding-3``, ``upgrade-5``): the
        ``email_sends.email_name`` and the provider's ``step`` tag."""
        return email_id(self.sequence, self.number)

    @property
    def template(self) -> str:
        """``welcome_1`` … ``upgrade_5``: the template file and content key of this email."""
        return template_id(self.sequence, self.number)


def _steps(sequence: SequenceName, *rows: tuple[timedelta, str]) -> tuple[Step, ...]:
    return tuple(Step(sequence, n, offset, purpose) for n, (offset, purpose) in enumerate(rows, start=1))


_H = timedelta(hours=1)
_D = timedelta(days=1)

STEPS: Final[dict[SequenceName, tuple[Step, ...]]] = {
    "welcome": _steps(
        "welcome",
        (1 * _H, "welcome and connect Notion or Obsidian"),
        (2 * _D, "which source suits you"),
        (4 * _D, "privacy and data handling"),
        (7 * _D, "last nudge to connect"),
    ),
    "onboarding": _steps(
        "onboarding",
        (2 * _H, "did you find a forgotten gem: star and skip tips"),
        (5 * _D, "tune timing, frequency and sources"),
        (9 * _D, "community stats and testimonials"),
        (14 * _D, "check-in survey"),
    ),
    "upgrade": _steps(
        "upgrade",
        (timedelta(0), "your numbers so far and what Pro adds"),
        (3 * _D, "free vs Pro"),
        (7 * _D, "a user story"),
        (14 * _D, "answering 'I don't have time'"),
        (21 * _D, "last note about Pro"),
    ),
}


def require_sequence(sequence: str) -> SequenceName:
    """``sequence`` as a :data:`SequenceName`; anything else raises ``ValueError`` naming it."""
    for name in SEQUENCE_NAMES:
        if sequence == name:
            return name
    raise ValueError(f"unknown email sequence {sequence!r}; expected one of {', '.join(SEQUENCE_NAMES)}")


def last_step(sequence: str) -> int:
    """Number of the last step (welcome 4, onboarding 4, upgrade 5). Unknown name → ``ValueError``."""
    return len(STEPS[require_sequence(sequence)])


def get_step(sequence: str, number: int) -> Step | None:
    """The step ``number`` of ``sequence``, or ``None`` outside 1..last. Unknown name → ``ValueError``."""
    steps = STEPS[require_sequence(sequence)]
    return steps[number - 1] if 1 <= number <= len(steps) else None


# The backend numbers onboarding emails 3-6 (its onboarding flow has two earlier, non-email steps).
_EMAIL_NUMBER_OFFSET: Final[dict[str, int]] = {"onboarding": 2}


def email_id(sequence: str, number: int) -> str:
    """The backend's email name for step ``number``: ``welcome-1`` … ``welcome-4``, ``onboarding-3`` …
    ``onboarding-6`` (onboarding steps 1-4), ``upgrade-1`` … ``upgrade-5``. Written to
    ``email_sends.email_name`` and sent as the ``step`` tag. No validation of the number."""
    return f"{sequence}-{number + _EMAIL_NUMBER_OFFSET.get(sequence, 0)}"


def template_id(sequence: str, number: int) -> str:
    """``template_id("onboarding", 1) == "onboarding_1"``: the template and content key (step numbers,
    no validation)."""
    return f"{sequence}_{number}"


def anchor_time(
    sequence: str, *, entered_at: datetime, first_digest_sent_at: datetime | None
) -> datetime | None:
    """What the offsets count from: onboarding → the first sent digest (``None``: blocked), others →
    ``entered_at``. Naive datetimes → ``ValueError``; unknown sequence → ``ValueError``."""
    name = require_sequence(sequence)
    if name == "onboarding":
        return (
            None
            if first_digest_sent_at is None
            else require_aware(first_digest_sent_at, "first_digest_sent_at")
        )
    return require_aware(entered_at, "entered_at")


def step_due_at(
    sequence: str, number: int, *, entered_at: datetime, first_digest_sent_at: datetime | None
) -> datetime | None:
    """When step ``number`` becomes due: anchor + offset; ``None`` when onboarding is blocked.

    ``number`` outside 1..last → ``ValueError`` (use :func:`is_due`, which handles those). Naive
    datetimes → ``ValueError``.
    """
    step = get_step(sequence, number)
    if step is None:
        raise ValueError(f"{sequence} has no step {number}")
    anchor = anchor_time(sequence, entered_at=entered_at, first_digest_sent_at=first_digest_sent_at)
    return None if anchor is None else anchor + step.offset


def is_due(
    sequence: str,
    number: int,
    *,
    now: datetime,
    entered_at: datetime,
    first_digest_sent_at: datetime | None,
) -> bool:
    """Whether the state at step ``number`` should be processed at ``now``.

    Steps 1..last: ``now >= due time`` (blocked onboarding → ``False``). Beyond the last step → ``True``
    (completion is due at once). Below 1 → ``False``. Naive datetimes → ``ValueError``.
    """
    require_aware(now, "now")
    if number > last_step(sequence):
        return True
    if number < 1:
        return False
    due_at = step_due_at(sequence, number, entered_at=entered_at, first_digest_sent_at=first_digest_sent_at)
    return due_at is not None and now >= due_at


def idempotency_key(sequence: str, user_id: str, number: int) -> str:
    """``sequence-<sequence>-<userId>-<step>``, cut to 256 characters (Resend's limit)."""
    return f"sequence-{sequence}-{user_id}-{number}"[:IDEMPOTENCY_KEY_MAX]


def email_tags(sequence: str, number: int) -> dict[str, str]:
    """Provider tags ``email_type=sequence``, ``sequence=<name>``, ``step=<email id>``; values keep only
    ``A-Za-z0-9_-`` (anything else becomes ``-``)."""
    return {
        "email_type": "sequence",
        "sequence": sanitize_tag(sequence),
        "step": sanitize_tag(email_id(sequence, number)),
    }


_NOT_MAPPING: Final = re.compile(r"[^A-Za-z0-9]")
_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9-]*-[0-9]+")


def mapping_key(key: str, state_id: int) -> str:
    """The dynamic-step key of a step in a run: its idempotency key with every character outside
    ``A-Za-z0-9`` as ``_`` (``sequence_welcome_u1_2``). That is one-to-one for keys made of letters,
    digits and ``-`` that end in ``-<step>``; any other key (another character in the user id, or cut
    to 256 characters) gets ``_s<state id>`` appended. A plain key's last part is all digits, a
    suffixed one's starts with ``s``, so the two forms never meet."""
    plain = _NOT_MAPPING.sub("_", key)
    return plain if _PLAIN_KEY.fullmatch(key) else f"{plain}_s{state_id}"


@dataclass(frozen=True)
class SequenceStep:
    """One step of one sequence state: the identity the due scan finds, a run's config carries
    (``sequences.defs.SequenceStepConfig`` has exactly these fields) and a step run processes."""

    state_id: int
    user_id: str
    sequence_name: str
    step: int

    @property
    def key(self) -> str:
        """The step's provider idempotency key."""
        return idempotency_key(self.sequence_name, self.user_id, self.step)

    @property
    def mapping_key(self) -> str:
        """Its dynamic-step key inside a run (:func:`mapping_key`)."""
        return mapping_key(self.key, self.state_id)
