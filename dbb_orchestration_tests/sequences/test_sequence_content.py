"""The thirteen sequence emails: every id renders for a free and a Pro user, with the right links."""

from __future__ import annotations

import html
import re

import pytest

from dbb_orchestration.sequences.content import (
    EMAIL_IDS,
    SequenceEmailValues,
    email_subject,
    first_name,
    render_sequence_email,
    source_name,
    template_context,
)

BASE = "https://app.example.test"
FREE = SequenceEmailValues(
    user_name="  Ada Lovelace ",
    is_pro=False,
    interval_days=3,
    notes_per_digest=5,
    digests_received=4,
    notes_received=19,
    source_kind="notion",
    source_display_name="Study Notes",
)
PRO = SequenceEmailValues(
    user_name="Grace Hopper",
    is_pro=True,
    interval_days=1,
    notes_per_digest=20,
    digests_received=12,
    notes_received=240,
    source_kind="obsidian",
    source_display_name="Vault",
)

# The link each email exists to deliver (behaviour §9), written out independently of the code.
PRIMARY = {
    "welcome_1": "/onboarding/choose-source",
    "welcome_2": "/onboarding/choose-source",
    "welcome_3": "/onboarding/choose-source",
    "welcome_4": "/onboarding/choose-source",
    "onboarding_1": "/dash",
    "onboarding_2": "/settings",
    "onboarding_3": "/dash",
    "onboarding_4": "/feedback",
    "upgrade_1": "/settings?tab=billing",
    "upgrade_2": "/settings?tab=billing",
    "upgrade_3": "/settings?tab=billing",
    "upgrade_4": "/settings?tab=billing",
    "upgrade_5": "/settings?tab=billing",
}

SUBJECTS_FREE = {
    "welcome_1": "Welcome to Daily Brain Bits, Ada",
    "welcome_2": "Notion or Obsidian: which one suits you?",
    "welcome_3": "Your notes stay yours",
    "welcome_4": "One last nudge to bring your notes back",
    "onboarding_1": "Did you find a forgotten gem, Ada?",
    "onboarding_2": "Make your Brain Bits fit your week",
    "onboarding_3": "How other readers use their Brain Bits",
    "onboarding_4": "Two weeks in: how is it going?",
    "upgrade_1": "Your Brain Bits so far: 4 digests, 19 notes",
    "upgrade_2": "Free vs Pro, side by side",
    "upgrade_3": "From scattered notes to a finished draft",
    "upgrade_4": '"I don\'t have time for this"',
    "upgrade_5": "A last word about Pro",
}


def hrefs(html: str) -> set[str]:
    return set(re.findall(r'href="([^"]+)"', html))


def test_there_are_thirteen_emails() -> None:
    assert list(EMAIL_IDS) == list(PRIMARY)


@pytest.mark.parametrize("values", [FREE, PRO], ids=["free", "pro"])
@pytest.mark.parametrize("email_id", list(PRIMARY))
def test_every_email_renders_with_its_links(email_id: str, values: SequenceEmailValues) -> None:
    email = render_sequence_email(email_id, values, BASE + "/")
    name = first_name(values.user_name)
    assert email.subject.strip() and email.preview.strip()
    title = re.search(r"<title>(.*?)</title>", email.html)
    assert title is not None and html.unescape(title.group(1)) == email.subject
    assert f"Hi {name}" in email.text or f"Welcome, {name}!" in email.text
    links = hrefs(email.html)
    assert f"{BASE}/settings" in links  # footer of the shared layout
    primary = PRIMARY[email_id]
    if values.is_pro and email_id.startswith("upgrade_"):
        assert f"{BASE}/settings?tab=billing" not in links  # no upsell to a Pro user
        assert links & {f"{BASE}/settings", f"{BASE}/dash"}
    else:
        assert f"{BASE}{primary}" in links
        assert f"{BASE}{primary}" in email.text
    assert "<script" not in email.html.lower()
    assert 'style="' in email.html  # CSS inlined
    assert "{{" not in email.html and "{{" not in email.text


def test_subjects_for_a_free_user() -> None:
    assert {e: email_subject(e, FREE) for e in EMAIL_IDS} == SUBJECTS_FREE


def test_subject_without_a_name_has_no_dangling_comma() -> None:
    nameless = SequenceEmailValues(user_name="   ", is_pro=False, interval_days=3, notes_per_digest=5)
    assert email_subject("welcome_1", nameless) == "Welcome to Daily Brain Bits"
    assert email_subject("onboarding_1", nameless) == "Did you find a forgotten gem?"
    assert "Hi there" in render_sequence_email("welcome_2", nameless, BASE).text


def test_singular_counts_in_upgrade_subject() -> None:
    one = SequenceEmailValues(
        user_name="X", is_pro=False, interval_days=3, notes_per_digest=1, digests_received=1, notes_received=1
    )
    assert email_subject("upgrade_1", one) == "Your Brain Bits so far: 1 digest, 1 note"


def test_names_are_escaped_in_html_but_not_in_text_or_subject() -> None:
    eve = SequenceEmailValues(
        user_name="<b>Eve</b> Smith",
        is_pro=False,
        interval_days=3,
        notes_per_digest=5,
        source_kind="notion",
        source_display_name='<img src=x onerror="alert(1)">',
    )
    for email_id in EMAIL_IDS:
        email = render_sequence_email(email_id, eve, BASE)
        assert "<b>Eve</b>" not in email.html, email_id
        assert "<img" not in email.html, email_id
        assert "&lt;b&gt;Eve&lt;/b&gt;" in email.html, email_id
        assert "<b>Eve</b>" in email.text, email_id  # plain text is not HTML
    onboarding = render_sequence_email("onboarding_1", eve, BASE)
    assert "Notion (&lt;img src=x onerror=" in onboarding.html
    assert email_subject("welcome_1", eve) == "Welcome to Daily Brain Bits, <b>Eve</b>"


def test_template_values() -> None:
    assert first_name("  Ada   Lovelace ") == "Ada"
    assert first_name("Ada\tLovelace") == "Ada"
    assert first_name("") == "there"
    assert first_name(None) == "there"
    assert source_name("obsidian", "Vault") == "Obsidian"
    assert source_name("notion", "Study Notes") == "Notion (Study Notes)"
    assert source_name("notion", "  ") == "Notion"
    assert source_name(None, None) == "your notes"
    ctx = template_context("onboarding_1", FREE, BASE + "/")
    assert ctx["timing_phrase"] == "in a few days"
    assert ctx["rhythm"] == "every 3 days"
    assert ctx["digests_phrase"] == "4 digests"
    assert ctx["notes_phrase"] == "19 notes"
    assert ctx["billing_url"] == f"{BASE}/settings?tab=billing"
    assert ctx["feedback_url"] == f"{BASE}/feedback"
    assert (ctx["step_number"], ctx["step_total"]) == (1, 4)
    pro = template_context("upgrade_2", PRO, BASE)
    assert pro["timing_phrase"] == "tomorrow morning"
    assert pro["rhythm"] == "every day"
    assert (pro["step_number"], pro["step_total"]) == (2, 5)


def test_values_reach_the_emails() -> None:
    onboarding_1 = render_sequence_email("onboarding_1", FREE, BASE)
    assert "your first Brain Bits from Notion (Study Notes) have landed" in onboarding_1.text
    assert "The next one arrives in a few days." in onboarding_1.text
    free_2 = render_sequence_email("onboarding_2", FREE, BASE).text
    assert "right now you get 5 notes every 3 days" in free_2
    assert "anywhere from every 3 days to every 30 days" in free_2
    pro_2 = render_sequence_email("onboarding_2", PRO, BASE).text
    assert "right now you get 20 notes every day" in pro_2
    assert "from every day to once a month, with up to 50 notes" in pro_2
    upgrade_1 = render_sequence_email("upgrade_1", FREE, BASE)
    assert "- 4 digests received" in upgrade_1.text and "- 19 notes resurfaced" in upgrade_1.text
    assert "Room for 10,000 notes instead of 500" in upgrade_1.text
    assert "Email 1 of 5 in your Pro series" in upgrade_1.text


def test_unknown_email_id_is_rejected() -> None:
    for bad in ("welcome_5", "welcome_0", "upgrade", "newsletter_1", "upgrade_x"):
        with pytest.raises(ValueError, match="unknown sequence email"):
            render_sequence_email(bad, FREE, BASE)
