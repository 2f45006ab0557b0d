"""The thirteen sequence emails (behaviour §9): template values, subjects, previews and rendering.

Rendering is pure: a :class:`SequenceEmailValues` (loaded for one user by ``process.load_user_facts``)
and an email id (``welcome_1`` … ``upgrade_5``) in, a :class:`RenderedEmail` out. Templates live in
``sequences/templates/<email id>.html`` / ``.txt`` and extend ``_layout.*``, which extends the shared
layout ``email/base.*``. Everything that comes from the user (their name, a source's display name) is
HTML-escaped by the environment's autoescaping; subjects and previews are plain text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from dbb_orchestration.email.formatting import first_source_label, plural
from dbb_orchestration.email.rendering import RenderedEmail, join_url, render_email
from dbb_orchestration.plans import FREE_LIMITS, PRO_LIMITS, digest_timing_phrase, interval_label
from dbb_orchestration.sequences.steps import STEPS, get_step, require_sequence

__all__ = [
    "COMMUNITY_QUOTES",
    "COMMUNITY_STATS",
    "EMAIL_IDS",
    "LINK_PATHS",
    "SequenceEmailValues",
    "email_preview",
    "email_subject",
    "first_name",
    "render_sequence_email",
    "source_name",
    "template_context",
]

# Template ids (``welcome_1`` … ``upgrade_5``, step numbers); the backend's email names are
# ``steps.email_id``.
EMAIL_IDS: Final[tuple[str, ...]] = tuple(step.template for steps in STEPS.values() for step in steps)

LINK_PATHS: Final[Mapping[str, str]] = {
    "choose_source_url": "/onboarding/choose-source",
    "dash_url": "/dash",
    "settings_url": "/settings",
    "feedback_url": "/feedback",
    "billing_url": "/settings?tab=billing",
}

_SERIES_LABEL: Final[Mapping[str, str]] = {
    "welcome": "welcome",
    "onboarding": "getting-started",
    "upgrade": "Pro",
}

# Onboarding 3 ("community stats and testimonials"). Copy to be confirmed by the product team with
# real figures and real, consented quotes before launch; kept here so it is changed in one place.
COMMUNITY_STATS: Final[tuple[str, ...]] = (
    "The most popular rhythm is a digest every 3 days, at 8 in the morning.",
    "Starred notes come back sooner, so a few stars go a long way.",
    "Notes written years ago get starred as often as last month's.",
)
COMMUNITY_QUOTES: Final[tuple[tuple[str, str], ...]] = (
    (
        "I found a book summary I wrote years ago that answered a question I had this week.",
        "a reader who connected Notion",
    ),
    ("It's the one newsletter I look forward to, because I wrote it.", "an Obsidian user"),
)


@dataclass(frozen=True)
class SequenceEmailValues:
    """Everything a sequence email may show about one user (behaviour §9 template values).

    ``interval_days`` and ``notes_per_digest`` are the *effective* values (plan-clamped);
    ``source_kind``/``source_display_name`` describe the user's most recently created active connection
    (``None`` when there is none).
    """

    user_name: str | None
    is_pro: bool
    interval_days: int
    notes_per_digest: int
    digests_received: int = 0
    notes_received: int = 0
    source_kind: str | None = None
    source_display_name: str | None = None


def first_name(name: str | None) -> str:
    """First word of the trimmed name (split on any whitespace), or ``there`` when missing or blank."""
    words = (name or "").split()
    return words[0] if words else "there"


def source_name(kind: str | None, display_name: str | None) -> str:
    """``Obsidian``, ``Notion (Study Notes)`` (``Notion`` without a display name), or ``your notes`` when
    the user has no active source."""
    return first_source_label(kind, display_name) or "your notes"


def _name_suffix(values: SequenceEmailValues, sep: str = ", ") -> str:
    name = first_name(values.user_name)
    return "" if name == "there" else f"{sep}{name}"


_SUBJECTS: Final[Mapping[str, Callable[[SequenceEmailValues], str]]] = {
    "welcome_1": lambda v: f"Welcome to Daily Brain Bits{_name_suffix(v)}",
    "welcome_2": lambda v: "Notion or Obsidian: which one suits you?",
    "welcome_3": lambda v: "Your notes stay yours",
    "welcome_4": lambda v: "One last nudge to bring your notes back",
    "onboarding_1": lambda v: f"Did you find a forgotten gem{_name_suffix(v)}?",
    "onboarding_2": lambda v: "Make your Brain Bits fit your week",
    "onboarding_3": lambda v: "How other readers use their Brain Bits",
    "onboarding_4": lambda v: "Two weeks in: how is it going?",
    "upgrade_1": lambda v: (
        f"Your Brain Bits so far: {plural(v.digests_received, 'digest')}, {plural(v.notes_received, 'note')}"
    ),
    "upgrade_2": lambda v: "Free vs Pro, side by side",
    "upgrade_3": lambda v: "From scattered notes to a finished draft",
    "upgrade_4": lambda v: '"I don\'t have time for this"',
    "upgrade_5": lambda v: "A last word about Pro",
}

_PREVIEWS: Final[Mapping[str, Callable[[SequenceEmailValues], str]]] = {
    "welcome_1": lambda v: "One step left: connect Notion or Obsidian and your first notes are on their way.",
    "welcome_2": lambda v: "A one-minute guide to choosing where your Brain Bits come from.",
    "welcome_3": lambda v: "What happens to your notes, in plain words.",
    "welcome_4": lambda v: "Two minutes to connect your notes, or let this be our last reminder.",
    "onboarding_1": lambda v: "Star what you want to see again, skip what you're done with.",
    "onboarding_2": lambda v: "Change when your digest arrives, how often, and where it draws from.",
    "onboarding_3": lambda v: "A few numbers and a few words from people who reread their notes.",
    "onboarding_4": lambda v: "A two-minute survey: tell us what works and what doesn't.",
    "upgrade_1": lambda v: "A look back at what you've rediscovered, and what Pro adds.",
    "upgrade_2": lambda v: "What the free plan gives you, and what changes with Pro.",
    "upgrade_3": lambda v: "What happens when old notes keep coming back.",
    "upgrade_4": lambda v: "Fair. Here's why Brain Bits takes less time than you think.",
    "upgrade_5": lambda v: "No more Pro emails after this one. Your digests carry on as usual.",
}


def _require_email_id(email_id: str) -> tuple[str, int]:
    sequence, _, number = email_id.rpartition("_")
    try:
        step = get_step(require_sequence(sequence), int(number))
    except ValueError:
        step = None
    if step is None:
        raise ValueError(f"unknown sequence email {email_id!r}; expected one of {', '.join(EMAIL_IDS)}")
    return step.sequence, step.number


def email_subject(email_id: str, values: SequenceEmailValues) -> str:
    """The subject line (plain text). Unknown ``email_id`` → ``ValueError``."""
    _require_email_id(email_id)
    return _SUBJECTS[email_id](values)


def email_preview(email_id: str, values: SequenceEmailValues) -> str:
    """The hidden preheader (plain text). Unknown ``email_id`` → ``ValueError``."""
    _require_email_id(email_id)
    return _PREVIEWS[email_id](values)


def template_context(email_id: str, values: SequenceEmailValues, frontend_url: str) -> dict[str, Any]:
    """The values every sequence template receives (links are absolute, built on ``frontend_url``)."""
    sequence, number = _require_email_id(email_id)
    base = frontend_url.rstrip("/")
    interval = max(1, values.interval_days)
    digests = max(0, values.digests_received)
    notes = max(0, values.notes_received)
    return {
        "first_name": first_name(values.user_name),
        "source_name": source_name(values.source_kind, values.source_display_name),
        "has_source": bool(values.source_kind),
        "timing_phrase": digest_timing_phrase(interval),
        "rhythm": interval_label(interval).lower(),
        "interval_days": interval,
        "notes_per_digest": values.notes_per_digest,
        "notes_per_digest_phrase": plural(values.notes_per_digest, "note"),
        "digests_received": digests,
        "notes_received": notes,
        "digests_phrase": plural(digests, "digest"),
        "notes_phrase": plural(notes, "note"),
        "is_pro": values.is_pro,
        "free": FREE_LIMITS,
        "pro": PRO_LIMITS,
        "free_max_notes": f"{FREE_LIMITS.max_notes:,}",
        "pro_max_notes": f"{PRO_LIMITS.max_notes:,}",
        "community_stats": COMMUNITY_STATS,
        "community_quotes": COMMUNITY_QUOTES,
        "step_number": number,
        "step_total": len(STEPS[require_sequence(sequence)]),
        "series_label": _SERIES_LABEL[sequence],
        **{name: join_url(base, path) for name, path in LINK_PATHS.items() if name != "settings_url"},
    }


def render_sequence_email(email_id: str, values: SequenceEmailValues, frontend_url: str) -> RenderedEmail:
    """Subject, preheader, inlined HTML and plain text of one sequence email.

    Unknown ``email_id`` → ``ValueError``. ``frontend_url`` may end with a slash. Template errors (a bug,
    not bad data) raise Jinja exceptions.
    """
    return render_email(
        f"sequences/{email_id}",
        subject=email_subject(email_id, values),
        preview=email_preview(email_id, values),
        frontend_url=frontend_url,
        context=template_context(email_id, values, frontend_url),
    )
