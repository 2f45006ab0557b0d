"""behaviour §8 note content rules: markdown → blocks, the 900-character budget, linkify."""

from __future__ import annotations

import pytest
from markupsafe import Markup

from dbb_orchestration.digests.excerpt import NO_PREVIEW, Block, block_to_text, linkify, note_blocks


def texts(markdown: str, budget: int = 900) -> list[str]:
    return [b.text if b.kind != "list" else " | ".join(b.items) for b in note_blocks(markdown, budget)]


def test_crlf_front_matter_and_leading_metadata_are_dropped() -> None:
    md = (
        "---\r\ntitle: Secret\r\ntags: [x]\r\n---\r\n"
        "tags: alpha\r\naliases:: beta\r\nStatus: draft\r\ncreated: 2024-01-01\r\nupdated:: today\r\n"
        "publish: true\r\ndraft: false\r\ncssclass: wide\r\n\r\nReal content.\r\n"
    )
    assert note_blocks(md) == [Block("paragraph", text="Real content.")]


def test_leading_metadata_with_yaml_list_values() -> None:
    md = "tags:\n  - one\n  - two\nBody line"
    assert texts(md) == ["Body line"]


def test_metadata_keys_are_only_dropped_at_the_top() -> None:
    md = "Intro\n\nstatus: still here"
    assert texts(md) == ["Intro", "status: still here"]


def test_unclosed_front_matter_is_kept() -> None:
    assert texts("---\nnot front matter") == ["not front matter"]


def test_inline_fields_are_dropped_anywhere() -> None:
    md = "First line\nrating:: 5\nDue Date:: tomorrow\nLast line\n\nstd::vector stays"
    assert texts(md) == ["First line\nLast line", "std::vector stays"]


def test_wiki_links_both_forms() -> None:
    assert texts("See [[Target Note|the label]] and [[Other Note]].") == ["See the label and Other Note."]


def test_images_and_embeds_are_dropped() -> None:
    assert texts("Before ![alt text](https://x.test/a.png) middle ![[diagram.png]] after") == [
        "Before middle after"
    ]
    assert note_blocks("![[photo.jpg]]") == [Block("paragraph", text=NO_PREVIEW)]


def test_markdown_links_keep_text_and_url() -> None:
    assert texts("Read [the docs](https://example.com/docs) now") == [
        "Read the docs (https://example.com/docs) now"
    ]
    assert texts("[https://a.test](https://a.test) and [local](notes/x.md)") == ["https://a.test and local"]


def test_html_tags_dropped_entities_decoded_spaces_collapsed() -> None:
    md = 'Hello <span style="color:red">red</span>   world &amp; <b>friends</b>\t\tok<br>next <!-- hidden -->'
    assert texts(md) == ["Hello red world & friends ok\nnext"]


def test_at_most_one_blank_line_and_block_split() -> None:
    md = (
        "# Title\n\n\n\nPara one\nline two\n\n\n\n> quoted\n> more\n\n- a\n* b\n• c\n\n"
        "```python\nx = 1\n\n\ny = 2\n```\n\n## Sub heading ##"
    )
    blocks = note_blocks(md)
    assert [b.kind for b in blocks] == ["heading", "paragraph", "quote", "list", "code", "heading"]
    assert blocks[0] == Block("heading", text="Title", level=1)
    assert blocks[1].text == "Para one\nline two"
    assert blocks[2].text == "quoted\nmore"
    assert blocks[3].items == ("a", "b", "c")
    assert blocks[4].text == "x = 1\n\n\ny = 2"  # code is kept exactly
    assert blocks[5] == Block("heading", text="Sub heading", level=2)


def test_code_is_not_rewritten() -> None:
    md = "```\n<div>[[x]]  ![a](b)  key:: v</div>\n```"
    assert note_blocks(md) == [Block("code", text="<div>[[x]]  ![a](b)  key:: v</div>")]


def test_callouts_checkboxes_and_continuations() -> None:
    md = "> [!tip] Remember\n> this\n\n- [ ] open task\n- [x] done task\n  continues here"
    blocks = note_blocks(md)
    assert blocks[0] == Block("quote", text="Remember\nthis")
    assert blocks[1].items == ("☐ open task", "☑ done task continues here")


def test_budget_keeps_whole_blocks_then_truncates_the_last() -> None:
    first = "a" * 500  # costs 502
    second = "b" * 500  # 398 left: 398 - 2 = 396 room → 393 chars + "..."
    blocks = note_blocks(f"{first}\n\n{second}\n\nthird")
    assert [b.text for b in blocks] == [first, "b" * 393 + "..."]
    used = sum(len(b.text) + 2 for b in blocks)
    assert used == 900


def test_budget_single_long_paragraph() -> None:
    blocks = note_blocks("x" * 2000)
    assert blocks == [Block("paragraph", text="x" * 895 + "...")]


def test_budget_exact_fit_is_not_truncated() -> None:
    text = "y" * 898  # 898 + 2 = 900
    assert note_blocks(text + "\n\nnext") == [Block("paragraph", text=text)]


def test_budget_truncates_on_a_word_boundary_nearby() -> None:
    words = " ".join(["word"] * 300)  # 1499 chars
    (block,) = note_blocks(words)
    assert block.text.endswith("word...")
    assert len(block.text) <= 898
    assert len(block.text) >= 898 - 20


def test_budget_counts_list_items() -> None:
    items = [f"{i:02d}" + "z" * 98 for i in range(12)]  # 100 chars each
    blocks = note_blocks("\n".join(f"- {item}" for item in items))
    (block,) = blocks
    # room 898: eight whole items (800), the ninth gets 98 − 3 = 95 chars + "..."
    assert block.items[:8] == tuple(items[:8])
    assert block.items[8] == items[8][:95] + "..."
    assert len(block.items) == 9


def test_budget_with_custom_value_and_tiny_room() -> None:
    assert texts("abcdefgh", budget=10) == ["abcdefgh"]  # 8 + 2 = 10 fits exactly
    assert note_blocks("abcdefghijkl", budget=10) == [Block("paragraph", text="abcde...")]
    assert note_blocks("one\n\ntwo", budget=7) == [Block("paragraph", text="one")]  # 2 left: too small


def test_empty_content_gives_placeholder() -> None:
    for md in ("", "   \n\n", "---\ntags: x\n---\n", "tags:: a\n", "<br>", None):
        assert note_blocks(md) == [Block("paragraph", text=NO_PREVIEW)]  # type: ignore[arg-type]


def test_block_to_text() -> None:
    assert block_to_text(Block("list", items=("a", "b"))) == "- a\n- b"
    assert block_to_text(Block("quote", text="x\n\ny")) == "> x\n>\n> y"
    assert block_to_text(Block("code", text="def f():\n    pass")) == "    def f():\n        pass"
    assert block_to_text(Block("heading", text="H", level=2)) == "H"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain <b>text</b> & more", "plain &lt;b&gt;text&lt;/b&gt; &amp; more"),
        (
            "see https://example.com/a?b=1&c=2.",
            'see <a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener">'
            "https://example.com/a?b=1&amp;c=2</a>.",
        ),
        (
            "(docs https://x.test/p)",
            '(docs <a href="https://x.test/p" target="_blank" rel="noopener">https://x.test/p</a>)',
        ),
        ("javascript:alert(1)", "javascript:alert(1)"),
        (
            '"https://q.test/"><script>',
            '&#34;<a href="https://q.test/" target="_blank" rel="noopener">https://q.test/</a>'
            "&#34;&gt;&lt;script&gt;",
        ),
        ("http://", "http://"),
    ],
)
def test_linkify(raw: str, expected: str) -> None:
    result = linkify(raw)
    assert isinstance(result, Markup)
    assert str(result) == expected


def test_linkify_never_emits_a_raw_tag_from_input() -> None:
    hostile = "<img src=x onerror=alert(1)> https://ok.test/<script>alert(1)</script>"
    out = str(linkify(hostile))
    assert "<img" not in out and "<script" not in out
    assert '<a href="https://ok.test/"' in out
