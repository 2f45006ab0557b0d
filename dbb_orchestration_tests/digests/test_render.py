"""The digest email (behaviour §8): subject, greeting, notes, first-digest extras, plain text, safety."""

from __future__ import annotations

import re
from datetime import date

import pytest

from dbb_orchestration.digests.render import (
    DigestEmailContext,
    DigestNote,
    digest_subject,
    format_digest_date,
    greeting_name,
    render_digest_email,
)
from dbb_orchestration.email.formatting import first_source_label, source_label

FRONTEND = "https://app.dbb.test"

MESSY = """---
title: Hidden front matter title
tags: [secret-tag]
---
tags:: leading-tag
status: draft

# Big idea

Read [[Deep Work|the deep work note]] and [[Atomic Habits]] today.
![cover image](https://img.dbb.test/cover.png) ![[scan.png]]
See [the essay](https://essays.dbb.test/focus) and <b>bold html</b> here.
mood:: curious
"""


def ctx(**overrides: object) -> DigestEmailContext:
    values: dict[str, object] = {
        "user_name": "  Ana Lovelace ",
        "digest_date": date(2026, 2, 8),
        "interval_days": 7,
        "is_first": False,
        "is_pro": False,
        "notes": [
            DigestNote("Focus", MESSY, "notion", "Study Notes"),
            DigestNote("Second note", "Visit https://example.com/path?x=1&y=2 soon.", "obsidian", None),
        ],
    }
    values.update(overrides)
    return DigestEmailContext(**values)  # type: ignore[arg-type]


def first_ctx(**overrides: object) -> DigestEmailContext:
    values: dict[str, object] = {
        "is_first": True,
        "total_synced_notes": 132,
        "first_source_label": "Notion (Study Notes)",
        "next_digest_phrase": "later this week",
        "reply_to": "hello@dbb.test",
    }
    values.update(overrides)
    return ctx(**values)


# ------------------------------------------------------------------------------------------ subject


@pytest.mark.parametrize(
    ("is_first", "interval", "count", "expected"),
    [
        (True, 7, 5, "Your first Brain Bits are ready! (5 notes)"),
        (True, 7, 1, "Your first Brain Bits are ready! (1 note)"),
        (False, 7, 5, "Every week Brain Bits (5 notes)"),
        (False, 1, 1, "Every day Brain Bits (1 note)"),
        (False, 14, 3, "Every 2 weeks Brain Bits (3 notes)"),
        (False, 30, 2, "Every month Brain Bits (2 notes)"),
        (False, 3, 5, "Every 3 days Brain Bits (5 notes)"),
    ],
)
def test_subject(is_first: bool, interval: int, count: int, expected: str) -> None:
    assert digest_subject(is_first=is_first, interval_days=interval, note_count=count) == expected


def test_rendered_subject_counts_the_notes() -> None:
    one = render_digest_email(ctx(notes=[DigestNote("Only", "x")]), FRONTEND)
    assert one.subject == "Every week Brain Bits (1 note)"
    assert render_digest_email(first_ctx(), FRONTEND).subject == "Your first Brain Bits are ready! (2 notes)"


# ---------------------------------------------------------------------------------------- small parts


def test_greeting_and_labels() -> None:
    assert greeting_name("  Ana Lovelace ") == "Ana Lovelace"
    assert greeting_name("   ") == "there"
    assert greeting_name(None) == "there"
    assert source_label("notion", "Study Notes") == "Notion · Study Notes"
    assert source_label("notion", None) == "Notion"
    assert source_label("obsidian", None) == "Obsidian"
    assert source_label("obsidian", "Work vault") == "Obsidian · Work vault"
    assert source_label(None, None) is None
    assert format_digest_date(date(2026, 2, 8)) == "Sunday, February 8, 2026"
    assert first_source_label("obsidian", "My vault") == "Obsidian"
    assert first_source_label("notion", " Study Notes ") == "Notion (Study Notes)"
    assert first_source_label("notion", None) == "Notion"
    assert first_source_label(None, "x") is None


def test_greeting_in_both_parts() -> None:
    email = render_digest_email(ctx(), FRONTEND)
    assert "Hi Ana Lovelace," in email.html and "Hi Ana Lovelace," in email.text
    anon = render_digest_email(ctx(user_name="  "), FRONTEND)
    assert "Hi there," in anon.html and "Hi there," in anon.text


# ----------------------------------------------------------------------------------------- content


def test_note_content_follows_the_excerpt_rules() -> None:
    email = render_digest_email(ctx(), FRONTEND)
    for part in (email.html, email.text):
        assert "Hidden front matter title" not in part
        assert "secret-tag" not in part and "leading-tag" not in part
        assert "mood" not in part and "curious" not in part
        assert "the deep work note" in part and "Atomic Habits" in part
        assert "[[" not in part
        assert "img.dbb.test" not in part and "scan.png" not in part
        assert "bold html" in part and "<b>bold" not in part
        assert "Big idea" in part
        assert "Sunday, February 8, 2026" in part
        assert "Notion · Study Notes" in part
    assert "the essay (https://essays.dbb.test/focus)" in email.text
    assert re.search(r'<a href="https://essays.dbb.test/focus"[^>]*>the essay</a>', email.html)


def test_urls_become_links_and_titles_are_escaped() -> None:
    hostile = DigestNote(
        "<script>alert('x')</script> & co", "<script>bad()</script> text", "obsidian", "<i>v</i>"
    )
    email = render_digest_email(ctx(notes=[hostile, *ctx().notes]), FRONTEND)
    assert "<script" not in email.html.lower()
    assert "&lt;script&gt;alert(" in email.html
    assert "&lt;i&gt;v&lt;/i&gt;" in email.html
    assert re.search(
        r'<a href="https://example.com/path\?x=1&amp;y=2"[^>]*>https://example.com/path', email.html
    )
    assert "https://example.com/path?x=1&y=2" in email.text


def test_budget_and_placeholder_in_email() -> None:
    long_note = DigestNote("Long", "word " * 400)
    empty = DigestNote("   ", "---\ntags: x\n---\n")
    email = render_digest_email(ctx(notes=[long_note, empty]), FRONTEND)
    assert "word..." in email.html and "word..." in email.text
    assert "No preview available." in email.html and "No preview available." in email.text
    assert "Untitled note" in email.html and "Untitled note" in email.text
    assert email.text.count("word") < 200


# ---------------------------------------------------------------------------------------- sections


def test_regular_digest_has_no_first_digest_sections() -> None:
    email = render_digest_email(ctx(), FRONTEND)
    for part in (email.html, email.text):
        assert f"{FRONTEND}/dash" in part
        assert f"{FRONTEND}/settings" in part  # footer
        assert "What happens next" not in part and "WHAT HAPPENS NEXT" not in part
        assert "settings?tab=billing" not in part
        assert "132" not in part
        assert "Hit reply" not in part


def test_first_digest_sections_for_a_free_user() -> None:
    email = render_digest_email(first_ctx(), FRONTEND)
    for part in (email.html, email.text):
        assert "2 notes" in part
        assert "Notion (Study Notes)" in part
        assert "132 notes you've synced" in part
        assert "later this week" in part
        assert "every week" in part
        assert "star the notes" in part
        assert f"{FRONTEND}/settings?tab=billing" in part
        assert "Hit reply" in part and "hello@dbb.test" in part
        assert f"{FRONTEND}/dash" in part
    assert "What happens next" in email.html
    assert 'href="mailto:hello@dbb.test"' in email.html
    assert f'href="{FRONTEND}/settings"' in email.html


def test_first_digest_for_pro_has_no_pro_mention() -> None:
    email = render_digest_email(first_ctx(is_pro=True), FRONTEND)
    for part in (email.html, email.text):
        assert "settings?tab=billing" not in part
        assert "Pro" not in part.replace("Preview", "")
        assert "What happens next" in part or "WHAT HAPPENS NEXT" in part


def test_first_digest_without_source_or_phrase_falls_back() -> None:
    email = render_digest_email(
        first_ctx(
            first_source_label=None,
            next_digest_phrase="",
            total_synced_notes=0,
            reply_to=None,
            interval_days=3,
        ),
        FRONTEND,
    )
    assert "from your notes." in email.text  # no "out of 0 notes"
    assert "in a few days" in email.text  # plans.digest_timing_phrase(3)
    assert "mailto:" not in email.html
    assert "Hit reply and tell us" in email.text


def test_singular_wording_for_one_note() -> None:
    email = render_digest_email(ctx(notes=[DigestNote("Only", "x")]), FRONTEND)
    assert "Here is 1 note" in email.text and "Here is <strong>1 note</strong>" in email.html


# ------------------------------------------------------------------------------------------ format


def test_html_format_for_email_clients() -> None:
    email = render_digest_email(first_ctx(), FRONTEND + "/")
    html = email.html
    assert "<script" not in html.lower()
    assert '<link rel="stylesheet"' not in html and "<link" not in html
    assert re.search(r"max-width:\s*600px", html) or 'width="600"' in html
    assert 'class="note-title" style="' in html  # styles inlined
    assert f'href="{FRONTEND}/dash"' in html  # no double slash from the trailing "/"
    assert "//dash" not in html and "//dash" not in email.text
    assert email.preview in html.replace("&#39;", "'")


def test_preview_text() -> None:
    regular = render_digest_email(ctx(), FRONTEND)
    assert regular.preview == "2 notes worth a second look: Focus, Second note"
    first = render_digest_email(first_ctx(), FRONTEND)
    assert first.preview.startswith("2 notes from Notion (Study Notes)")
    many = render_digest_email(ctx(notes=[DigestNote("T" * 60, "x")] * 5), FRONTEND)
    assert len(many.preview) <= 140 and many.preview.endswith("...")
