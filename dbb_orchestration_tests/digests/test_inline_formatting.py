"""Inline markdown in a note becomes formatting in the HTML part and clean text in the plain part."""

from __future__ import annotations

import re
from datetime import date

import pytest

from dbb_orchestration.digests.excerpt import Span, inline_spans, note_blocks
from dbb_orchestration.digests.render import (
    DigestEmailContext,
    DigestNote,
    render_digest_email,
)
from dbb_orchestration.email.formatting import first_source_label, source_label
from dbb_orchestration.email.rendering import display_width, spans_html

ALL_MARKUP = (
    "Ask *what is in my control today?* and _why it matters_, then **act**, "
    "~~worry~~, ==breathe==, run `make test` and read [the guide](https://example.com/g?a=1&b=2)."
)


def render(markdown: str, title: str = "Stoic notes", kind: str | None = "obsidian", name: str | None = None):
    ctx = DigestEmailContext(
        user_name="Ada",
        digest_date=date(2026, 2, 8),
        interval_days=7,
        is_first=False,
        is_pro=False,
        notes=[DigestNote(title=title, markdown=markdown, source_kind=kind, source_name=name)],
    )
    return render_digest_email(ctx, "https://app.example")


def note_html(html: str) -> str:
    """The note's paragraph(s) without the inlined style attributes."""
    start = html.index('class="note-title"')
    end = html.index("</table>", start)
    return re.sub(r' style="[^"]*"', "", html[start:end])


def test_every_inline_markup_renders_as_formatting_and_as_clean_text() -> None:
    email = render(ALL_MARKUP)
    html = note_html(email.html)
    assert "<em>what is in my control today?</em>" in html
    assert "<em>why it matters</em>" in html
    assert "<strong>act</strong>" in html
    assert "<s>worry</s>" in html
    assert '<span class="highlight">breathe</span>' in html
    assert '<code class="inline-code">make test</code>' in html
    assert '<a href="https://example.com/g?a=1&amp;b=2" target="_blank" rel="noopener">the guide</a>.' in html
    assert "*" not in html and "~~" not in html and "==" not in html and "`" not in html
    assert (
        "Ask what is in my control today? and why it matters, then act, worry, breathe, run make test and "
        "read the guide (https://example.com/g?a=1&b=2)."
    ) in email.text
    (paragraph,) = [line for line in email.text.splitlines() if line.startswith("Ask ")]
    for marker in ("*", "_", "~~", "==", "`", "["):
        assert marker not in paragraph


def test_formatting_inside_lists_quotes_and_headings() -> None:
    email = render("# A **bold** idea\n\n- *one*\n- `two`\n\n> ==keep== this")
    html = note_html(email.html)
    assert "A <strong>bold</strong> idea" in html
    assert "<li><em>one</em></li>" in html and '<li><code class="inline-code">two</code></li>' in html
    assert '<span class="highlight">keep</span> this' in html
    assert "A bold idea" in email.text and "- one\n- two" in email.text and "> keep this" in email.text


def test_bold_italic_and_nesting() -> None:
    assert inline_spans("***both***") == (Span("both", bold=True, italic=True),)
    assert inline_spans("**bold *and italic***") == (
        Span("bold ", bold=True),
        Span("and italic", bold=True, italic=True),
    )
    assert spans_html(inline_spans("**a _b_ c**")) == (
        "<strong>a </strong><strong><em>b</em></strong><strong> c</strong>"
    )


@pytest.mark.parametrize(
    "text",
    [
        "snake_case_name and file_2_final.md",
        "2*3*4 = 24",
        "a lone * star and a lone _ underscore",
        "unclosed **bold and ~~strike",
        "== not a highlight ==",
    ],
)
def test_markers_that_are_not_formatting_stay_as_typed(text: str) -> None:
    (block,) = note_blocks(text)
    assert block.text == text
    assert block.spans == (Span(text),)


def test_code_spans_are_literal_and_everything_is_escaped() -> None:
    email = render("`**not bold** <b> [[x]]` and *&lt;script&gt;alert(1)&lt;/script&gt;*")
    html = note_html(email.html)
    assert '<code class="inline-code">**not bold** &lt;b&gt; [[x]]</code>' in html
    assert "<em>&lt;script&gt;alert(1)&lt;/script&gt;</em>" in html
    assert "<script>" not in email.html
    assert "**not bold** <b> [[x]] and <script>alert(1)</script>" in email.text


def test_non_http_link_labels_are_plain_and_private_markers_in_notes_are_dropped() -> None:
    email = render("[local](notes/x.md) and [js](javascript:alert(1)) \ue000x\ue001https://evil\ue002")
    html = note_html(email.html)
    assert "<a " not in html and "javascript" not in html
    assert "local and js xhttps://evil" in email.text  # the destination's balanced "(1)" is part of it


def test_a_link_whose_url_holds_parentheses_is_linked_whole() -> None:
    """Wikipedia-style destinations keep their balanced parentheses (one level, as CommonMark allows)."""
    email = render(
        "See [Mercury](https://en.wikipedia.org/wiki/Mercury_(planet)) and [b](https://b.test/x) (c)."
    )
    html = note_html(email.html)
    url = "https://en.wikipedia.org/wiki/Mercury_(planet)"
    assert f'<a href="{url}" target="_blank" rel="noopener">Mercury</a> and ' in html
    assert '<a href="https://b.test/x" target="_blank" rel="noopener">b</a> (c).' in html
    assert f"See Mercury ({url}) and b (https://b.test/x) (c)." in email.text


def test_budget_counts_visible_text_and_truncation_keeps_formatting() -> None:
    markdown = "**" + " ".join(["word"] * 300) + "**"
    (block,) = note_blocks(markdown)
    assert block.text.endswith("word...") and "*" not in block.text
    assert len(block.text) <= 898
    assert all(span.bold for span in block.spans[:-1]) and block.spans[-1] == Span("...")
    assert "".join(span.text for span in block.spans) == block.text


def test_source_label_never_repeats_the_kind() -> None:
    assert source_label("obsidian", "Obsidian Vault") == "Obsidian Vault"
    assert source_label("notion", "My Notion workspace") == "My Notion workspace"
    assert source_label("notion", "Notional ideas") == "Notion · Notional ideas"  # a word, not a prefix
    assert source_label("obsidian", "Work vault") == "Obsidian · Work vault"
    assert first_source_label("notion", "Notion Team Wiki") == "Notion Team Wiki"
    assert first_source_label("notion", "Study Notes") == "Notion (Study Notes)"
    email = render("text", kind="obsidian", name="Obsidian Vault")
    assert "Obsidian · Obsidian" not in email.text and "Obsidian &middot; Obsidian" not in email.html
    assert "1 of 1 · Obsidian Vault" in email.text


def test_text_underline_matches_the_title_width_for_wide_characters() -> None:
    assert display_width("日本語のノート") == 14
    assert display_width("Café") == 4
    email = render("text", title="日本語のノート")
    lines = email.text.splitlines()
    underline = lines[lines.index("日本語のノート") + 1]
    assert underline == "=" * 14
    long_title = "x" * 80
    lines = render("text", title=long_title).text.splitlines()
    assert lines[lines.index(long_title) + 1] == "=" * 60
