"""The digest email (behaviour §8): a :class:`DigestEmailContext` in, a :class:`RenderedEmail` out.

Rendering is pure: no database, no clock, no provider. Templates: ``digests/templates/digest.html`` and
``digest.txt`` on the shared layout (``email/templates/base.*``). Everything that comes from a note or a
user (titles, content, names, source names) is HTML-escaped; URLs in note content become links.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from dbb_orchestration.digests.excerpt import DEFAULT_BUDGET, Block, block_to_text, note_blocks
from dbb_orchestration.email.formatting import plural, source_label
from dbb_orchestration.email.rendering import RenderedEmail, join_url, render_email
from dbb_orchestration.plans import digest_timing_phrase, interval_label

UNTITLED = "Untitled note"
_PREVIEW_MAX = 140
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


@dataclass(frozen=True)
class DigestNote:
    title: str | None
    markdown: str  # decrypted content; "" when it could not be decoded
    source_kind: str | None = None  # "notion" | "obsidian" | None
    source_name: str | None = None  # the connection's display name


@dataclass(frozen=True)
class DigestEmailContext:
    user_name: str | None
    digest_date: date  # the local day the digest stands for
    interval_days: int  # effective interval
    is_first: bool  # the user's first sent digest
    is_pro: bool
    notes: Sequence[DigestNote] = field(default_factory=tuple)
    # First digest only:
    total_synced_notes: int = 0
    first_source_label: str | None = None  # "Obsidian" or "Notion (Study Notes)": see first_source_label()
    next_digest_phrase: str = ""  # plans.digest_timing_phrase(interval_days); "" → derived from it
    reply_to: str | None = None  # RESEND_REPLY_TO, shown as a mailto link when set


# ----------------------------------------------------------------------------------------- pure parts


def digest_subject(*, is_first: bool, interval_days: int, note_count: int) -> str:
    """``Your first Brain Bits are ready! (5 notes)`` or ``Every week Brain Bits (1 note)``."""
    notes = plural(note_count, "note")
    if is_first:
        return f"Your first Brain Bits are ready! ({notes})"
    return f"{interval_label(interval_days)} Brain Bits ({notes})"


def greeting_name(user_name: str | None) -> str:
    """The name trimmed, or ``there`` when missing or blank."""
    return (user_name or "").strip() or "there"


def note_title(title: str | None) -> str:
    """The title trimmed, or ``Untitled note`` when missing or blank."""
    return (title or "").strip() or UNTITLED


def format_digest_date(day: date) -> str:
    """``Sunday, February 8, 2026`` (English, whatever the process locale)."""
    return f"{_WEEKDAYS[day.weekday()]}, {_MONTHS[day.month - 1]} {day.day}, {day.year}"


def _next_phrase(ctx: DigestEmailContext) -> str:
    if ctx.next_digest_phrase.strip():
        return ctx.next_digest_phrase.strip()
    return digest_timing_phrase(ctx.interval_days)


def digest_preview(ctx: DigestEmailContext, titles: Sequence[str]) -> str:
    """The hidden preheader: what the digest holds, at most 140 characters."""
    count = plural(len(titles), "note")
    if ctx.is_first:
        source = ctx.first_source_label or "your notes"
        text = f"{count} from {source} to start with. Here's how Daily Brain Bits works."
    else:
        text = f"{count} worth a second look: " + ", ".join(titles)
    return text if len(text) <= _PREVIEW_MAX else text[: _PREVIEW_MAX - 3].rstrip(" ,") + "..."


@dataclass(frozen=True)
class _NoteView:
    title: str
    source_label: str | None
    blocks: list[Block]
    text_blocks: list[str]


def _note_view(note: DigestNote, budget: int) -> _NoteView:
    blocks = note_blocks(note.markdown, budget)
    return _NoteView(
        title=note_title(note.title),
        source_label=source_label(note.source_kind, note.source_name),
        blocks=blocks,
        text_blocks=[block_to_text(block) for block in blocks],
    )


def render_digest_email(
    ctx: DigestEmailContext, frontend_url: str, *, budget: int = DEFAULT_BUDGET
) -> RenderedEmail:
    """Subject, preheader, inlined HTML and plain text of one digest email.

    ``frontend_url`` may end with a slash. An empty ``notes`` list still renders (the sender is expected
    to skip such digests first). Template errors (a bug, not bad data) raise Jinja exceptions.
    """
    notes = [_note_view(note, budget) for note in ctx.notes]
    base = frontend_url.rstrip("/")
    context: dict[str, Any] = {
        "ctx": ctx,
        "notes": notes,
        "note_count": len(notes),
        "notes_phrase": plural(len(notes), "note"),
        "synced_phrase": plural(max(ctx.total_synced_notes, 0), "note"),
        "name": greeting_name(ctx.user_name),
        "date_label": format_digest_date(ctx.digest_date),
        "rhythm": interval_label(ctx.interval_days).lower(),
        "next_phrase": _next_phrase(ctx),
        "source": ctx.first_source_label.strip() if ctx.first_source_label else None,
        "dash_url": join_url(base, "/dash"),
        "billing_url": join_url(base, "/settings?tab=billing"),
        "show_pro": ctx.is_first and not ctx.is_pro,
        "reply_to": (ctx.reply_to or "").strip() or None,
    }
    subject = digest_subject(is_first=ctx.is_first, interval_days=ctx.interval_days, note_count=len(notes))
    preview = digest_preview(ctx, [note.title for note in notes])
    return render_email(
        "digests/digest", subject=subject, preview=preview, frontend_url=base, context=context
    )
