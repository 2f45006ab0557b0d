"""Notion blocks → markdown (behaviour §11 "Exactly:"): every expected string is written out by hand."""

from __future__ import annotations

from typing import Any

import pytest

from dbb_orchestration.notion_sync.markdown import blocks_to_markdown, rich_text_to_markdown, trim, trim_end

# --- builders for API-shaped objects ------------------------------------------------------------


def text(
    content: str,
    *,
    url: str | None = None,
    href: str | None = None,
    bold: bool = False,
    italic: bool = False,
    strikethrough: bool = False,
    underline: bool = False,
    code: bool = False,
) -> dict[str, Any]:
    return {
        "type": "text",
        "text": {"content": content, "link": {"url": url} if url is not None else None},
        "annotations": {
            "bold": bold,
            "italic": italic,
            "strikethrough": strikethrough,
            "underline": underline,
            "code": code,
            "color": "default",
        },
        "plain_text": content,
        "href": href if href is not None else url,
    }


def equation(expression: str, *, bold: bool = False) -> dict[str, Any]:
    item = text(expression, bold=bold)
    return {**item, "type": "equation", "equation": {"expression": expression}, "text": None}


def mention(plain: str) -> dict[str, Any]:
    return {
        "type": "mention",
        "mention": {"type": "page", "page": {"id": "p1"}},
        "annotations": {
            "bold": True,
            "italic": False,
            "strikethrough": False,
            "underline": False,
            "code": False,
        },
        "plain_text": plain,
        "href": "https://www.notion.so/p1",
    }


def block(
    block_type: str, *rich: dict[str, Any] | str, children: list[dict[str, Any]] | None = None, **extra: Any
):
    items = [text(r) if isinstance(r, str) else r for r in rich]
    node: dict[str, Any] = {
        "object": "block",
        "id": f"id-{block_type}",
        "type": block_type,
        "has_children": bool(children),
        block_type: {"rich_text": items, "color": "default", **extra},
    }
    if children is not None:
        node["children"] = children
    return node


def para(*rich: dict[str, Any] | str, **kw: Any):
    return block("paragraph", *rich, **kw)


def bullet(*rich: dict[str, Any] | str, **kw: Any):
    return block("bulleted_list_item", *rich, **kw)


def numbered(*rich: dict[str, Any] | str, **kw: Any):
    return block("numbered_list_item", *rich, **kw)


def todo(*rich: dict[str, Any] | str, checked: bool = False, **kw: Any):
    return block("to_do", *rich, checked=checked, **kw)


def divider() -> dict[str, Any]:
    return {"object": "block", "id": "d", "type": "divider", "has_children": False, "divider": {}}


# --- rich text -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (text("plain"), "plain"),
        (text("b", bold=True), "**b**"),
        (text("i", italic=True), "*i*"),
        (text("s", strikethrough=True), "~~s~~"),
        (text("u", underline=True), "<u>u</u>"),
        (text("c", code=True), "`c`"),
        (text("bi", bold=True, italic=True), "***bi***"),
        (text("x", url="https://e.com"), "[x](https://e.com)"),
        (text("x", url="https://e.com", code=True), "`[x](https://e.com)`"),
        (text("x", url="https://e.com", bold=True, underline=True), "<u>**[x](https://e.com)**</u>"),
        (
            text("all", code=True, bold=True, italic=True, strikethrough=True, underline=True),
            "<u>~~***`all`***~~</u>",
        ),
        (text("", bold=True), "****"),
        (equation("e=mc^2"), "$e=mc^2$"),
        (equation("x", bold=True), "$x$"),
        (mention("Some Page"), "Some Page"),
        (text("raw *md* [x]"), "raw *md* [x]"),
    ],
)
def test_rich_text_items(item: dict[str, Any], expected: str) -> None:
    assert rich_text_to_markdown([item]) == expected


def test_rich_text_joined_without_separators() -> None:
    items = [text("Hello "), text("world", bold=True), text("!"), equation("a"), mention(" @Bob")]
    assert rich_text_to_markdown(items) == "Hello **world**!$a$ @Bob"


def test_link_uses_text_link_url_and_ignores_href() -> None:
    # text.link.url wins over href; href alone (no text.link) does not create a link.
    assert rich_text_to_markdown([text("a", url="/abc", href="https://www.notion.so/abc")]) == "[a](/abc)"
    assert rich_text_to_markdown([text("a", href="https://only-href.example")]) == "a"
    empty_url = text("a")
    empty_url["text"]["link"] = {"url": ""}
    assert rich_text_to_markdown([empty_url]) == "a"


def test_text_item_uses_content_not_plain_text() -> None:
    item = text("content")
    item["plain_text"] = "plain"
    assert rich_text_to_markdown([item]) == "content"


def test_rich_text_bad_input() -> None:
    assert rich_text_to_markdown(None) == ""
    assert rich_text_to_markdown([]) == ""
    assert rich_text_to_markdown(["junk", 3, {"type": "text"}, {"type": "mention"}, text("ok")]) == "ok"  # type: ignore[list-item]


# --- single blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (para("Hello"), "Hello"),
        (block("heading_1", "One"), "# One"),
        (block("heading_2", "Two"), "## Two"),
        (block("heading_3", "Three"), "### Three"),
        (bullet("item"), "- item"),
        (numbered("first"), "1. first"),
        (todo("open"), "- [ ] open"),
        (todo("done", checked=True), "- [x] done"),
        (block("quote", "wise words"), "> wise words"),
        (block("callout", "Note this", icon={"type": "emoji", "emoji": "💡"}), "> 💡 Note this"),
        (
            block("callout", "No emoji", icon={"type": "external", "external": {"url": "https://i"}}),
            "> No emoji",
        ),
        (block("callout", "No icon", icon=None), "> No icon"),
        (block("code", "print(1)\nprint(2)", language="python"), "``` python\nprint(1)\nprint(2)\n```"),
        (block("code", "x = 1", language=""), "```\nx = 1\n```"),
        (block("code", "x = 1"), "```\nx = 1\n```"),
        (block("code", "ls", language="plain text"), "``` plain text\nls\n```"),
        (block("code", text("bold", bold=True), language="js"), "``` js\n**bold**\n```"),
        (block("toggle", "Click me"), "Click me"),
        (divider(), "---"),
        (
            {"object": "block", "id": "i", "type": "image", "has_children": False, "image": {}},
            "[Unsupported block: image]",
        ),
        (block("table", children=[block("table_row")]), "[Unsupported block: table]"),
        (block("heading_1"), "#"),
        (bullet(), "-"),
        (todo(checked=True), "- [x]"),
        (block("quote"), ">"),
    ],
)
def test_single_block(node: dict[str, Any], expected: str) -> None:
    assert blocks_to_markdown([node]) == expected


def test_paragraph_with_inline_formatting() -> None:
    node = para(
        text("Read "), text("this", url="https://x.io", italic=True), text(" now", strikethrough=True)
    )
    assert blocks_to_markdown([node]) == "Read *[this](https://x.io)*~~ now~~"


# --- nesting -------------------------------------------------------------------------------------


def test_lists_nested_three_levels() -> None:
    page = [
        bullet(
            "a",
            children=[
                numbered(
                    "b",
                    children=[
                        todo("c", checked=True, children=[bullet("d")]),
                        todo("c2"),
                    ],
                ),
                numbered("b2"),
            ],
        ),
        bullet("e"),
    ]
    assert blocks_to_markdown(page) == ("- a\n  1. b\n    - [x] c\n      - d\n    - [ ] c2\n  1. b2\n- e")


def test_toggle_with_children() -> None:
    page = [block("toggle", "Details", children=[para("hidden line"), bullet("x"), bullet("y")])]
    assert blocks_to_markdown(page) == "Details\n  hidden line\n\n  - x\n  - y"


def test_quote_and_callout_children() -> None:
    page = [
        block("quote", "Q", children=[para("more")]),
        block(
            "callout", "C", icon={"type": "emoji", "emoji": "⚠️"}, children=[block("code", "x", language="sh")]
        ),
    ]
    assert blocks_to_markdown(page) == "> Q\n  more\n\n> ⚠️ C\n  ``` sh\n  x\n  ```"


def test_children_of_non_container_blocks_are_ignored() -> None:
    page = [
        para("parent", children=[para("child")]),
        block("heading_2", "H", children=[para("hidden")]),
        block("column_list", children=[block("column", children=[para("in column")])]),
    ]
    assert blocks_to_markdown(page) == "parent\n\n## H\n\n[Unsupported block: column_list]"


def test_nested_blocks_of_every_kind_are_indented_by_depth() -> None:
    page = [
        bullet(
            "top",
            children=[
                block("heading_3", "h"),
                divider(),
                block("image"),
                block("quote", "q", children=[bullet("deep")]),
            ],
        )
    ]
    assert blocks_to_markdown(page) == (
        "- top\n  ### h\n\n  ---\n\n  [Unsupported block: image]\n\n  > q\n    - deep"
    )


def test_multiline_text_at_depth() -> None:
    # Paragraphs: every non-empty line is indented (empty lines stay empty).
    # List items: only the list line is indented; continuation lines are left as they are.
    # Quotes: only the first line carries ">".
    page = [
        bullet(
            "item\ncontinued",
            children=[para("p1\n\np2"), block("quote", "q1\nq2")],
        )
    ]
    assert blocks_to_markdown(page) == "- item\ncontinued\n  p1\n\n  p2\n\n  > q1\n  q2"


def test_quote_with_empty_text_keeps_space_before_children() -> None:
    page = [block("quote", children=[bullet("x")])]
    assert blocks_to_markdown(page) == "> \n  - x"


def test_empty_toggle_with_children_starts_with_newline_inside_page() -> None:
    page = [para("before"), block("toggle", children=[para("kid")])]
    assert blocks_to_markdown(page) == "before\n\n\n  kid"


def test_children_that_render_empty_leave_the_parent_alone() -> None:
    page = [bullet("solo", children=[para(""), para("   ")])]
    assert blocks_to_markdown(page) == "- solo"


# --- separators, dropping, trimming --------------------------------------------------------------


def test_separators_between_list_items_and_other_blocks() -> None:
    page = [
        block("heading_1", "Title"),
        bullet("a"),
        numbered("b"),
        todo("c"),
        para("text"),
        bullet("d"),
        divider(),
        todo("e"),
    ]
    assert blocks_to_markdown(page) == "# Title\n\n- a\n1. b\n- [ ] c\n\ntext\n\n- d\n\n---\n\n- [ ] e"


def test_empty_paragraph_dropped() -> None:
    page = [para("one"), para(), para("   "), block("toggle"), para("two")]
    assert blocks_to_markdown(page) == "one\n\ntwo"


def test_dropped_block_between_list_items_ends_the_list() -> None:
    page = [bullet("a"), para(), bullet("b")]
    assert blocks_to_markdown(page) == "- a\n\n- b"


def test_every_block_right_trimmed_and_page_trimmed() -> None:
    page = [para("\n  first  "), para("mid  \t"), bullet("item   "), para("  last")]
    assert blocks_to_markdown(page) == "first\n\nmid\n\n- item\n\n  last"


def test_inner_trailing_spaces_kept_only_last_line_trimmed() -> None:
    assert blocks_to_markdown([para("a  \nb  ")]) == "a  \nb"


def test_trim_uses_javascript_whitespace() -> None:
    # U+FEFF is JS whitespace (trimmed); U+001C and U+0085 are Python-only whitespace (kept).
    assert blocks_to_markdown([para("x\ufeff"), para("y\x1c"), para("z\x85")]) == "x\n\ny\x1c\n\nz\x85"
    assert trim_end("a \u00a0\u3000\ufeff") == "a"
    assert trim("\ufeff a \x1c") == "a \x1c"


def test_empty_and_malformed_pages() -> None:
    assert blocks_to_markdown([]) == ""
    assert blocks_to_markdown([para(), divider()]) == "---"
    malformed: list[Any] = [
        "junk",
        {"object": "block", "id": "partial"},  # partial block object: ignored
        {"type": "paragraph", "paragraph": None},
        {"type": "bulleted_list_item"},
        {"type": "to_do", "to_do": {"rich_text": "not a list"}, "children": "nope"},
        {"type": "code", "code": {"rich_text": [text("c")], "language": None}},
    ]
    assert blocks_to_markdown(malformed) == "-\n- [ ]\n\n```\nc\n```"


def test_full_page() -> None:
    page = [
        block("heading_1", "Study Notes"),
        para("Intro with ", text("bold", bold=True), " and ", text("code", code=True), "."),
        para(),
        block("callout", "Remember", icon={"type": "emoji", "emoji": "📌"}),
        numbered("Step", children=[numbered("Sub-step")]),
        numbered("Next"),
        block("code", "SELECT 1;", language="sql"),
        block("toggle", "More", children=[block("quote", "nested quote")]),
        divider(),
        block("image"),
    ]
    assert blocks_to_markdown(page) == (
        "# Study Notes\n\n"
        "Intro with **bold** and `code`.\n\n"
        "> 📌 Remember\n\n"
        "1. Step\n"
        "  1. Sub-step\n"
        "1. Next\n\n"
        "``` sql\nSELECT 1;\n```\n\n"
        "More\n"
        "  > nested quote\n\n"
        "---\n\n"
        "[Unsupported block: image]"
    )
