"""Notion blocks → markdown, byte-identical to the backend's converter (behaviour §11, "Exactly:").

The backend converts a page the same way when a user presses "sync now"; any difference in the
output changes the content hash and makes the two writers overwrite each other. The rules below are
therefore literal, including the odd corners. They are written so that a TypeScript implementation
following them produces the same bytes.

Input
-----
A *block node* (``BlockNode``) is a Notion block object exactly as ``blocks.children.list`` returns it
(``{"object": "block", "id", "type", "has_children", "<type>": {...}}``) with one addition made by
the fetching code: the block's own fetched children, in API order and across all result pages, as a
list under the key ``"children"``. A block without ``"children"`` (or with an empty list) is rendered
without children, whatever ``has_children`` says. Partial block objects (no string ``"type"``) and
non-mapping entries are ignored entirely, as if the API had not returned them (the backend drops
them at fetch time).

Rich text (``rich_text_to_markdown``)
-------------------------------------
Items are rendered one by one and joined with no separator.

* ``type == "text"``: start from ``text.content`` (not ``plain_text``). If ``text.link.url`` is a
  non-empty string the text becomes ``[content](url)``. ``href`` is never consulted (the backend
  ignores it; falling back to it would change bytes). Then the annotations wrap the result from the
  inside out in this order, each only when truthy: ``code`` → one backtick each side, ``bold`` → ``**x**``,
  ``italic`` → ``*x*``, ``strikethrough`` → ``~~x~~``, ``underline`` → ``<u>x</u>``. Colors are
  ignored. Wrapping happens even when the content is empty (``****`` for an empty bold item).
  Nothing is escaped.
* ``type == "equation"``: ``$`` + ``equation.expression`` + ``$``; annotations are ignored.
* any other item (``mention`` …): its ``plain_text``; annotations and links are ignored.
* Missing fields count as empty strings / no annotations; non-mapping items are ignored.

Blocks (``blocks_to_markdown``)
-------------------------------
``indent(d)`` is ``2·d`` spaces. "Prefix every non-empty line" means: split on ``\\n``, and prepend
``indent(d)`` to each line whose length is > 0 (a line of spaces counts as non-empty); at depth 0
nothing changes. ``T`` below is the block's rich text rendered as above.

==========================  ==========================================================================
paragraph                   ``T``, every non-empty line prefixed
heading_1 / _2 / _3         ``# T`` / ``## T`` / ``### T``, every non-empty line prefixed
bulleted_list_item          ``indent(d) + "- " + T``, right-trimmed (the "list line"), then children
numbered_list_item          ``indent(d) + "1. " + T``, right-trimmed, then children (always ``1.``)
to_do                       ``indent(d) + "- [x] " + T`` when ``checked`` else ``"- [ ] "``,
                            right-trimmed, then children
quote                       ``"> " + T``, every non-empty line prefixed, then children
callout                     ``"> " + E + T``, every non-empty line prefixed, then children; ``E`` is
                            the icon's ``emoji`` followed by one space when ``icon.type == "emoji"``,
                            otherwise empty (file/external/custom-emoji icons give no prefix)
code                        ``"```" + S + "\\n" + T + "\\n```"``, every non-empty line prefixed; ``S`` is
                            ``" " + language`` for any non-empty ``code.language`` string (taken
                            literally, so Notion's ``"plain text"`` gives ```` ``` plain text ````),
                            else empty. ``T`` is the code's rich text *with* annotations applied.
toggle                      ``T``, every non-empty line prefixed, then children
divider                     ``---``, prefixed
anything else               ``[Unsupported block: <type>]``, prefixed; children are NOT rendered
==========================  ==========================================================================

Only list items, to-dos, quotes, callouts and toggles render children. Children of every other type
(paragraphs, headings, unsupported types such as ``column_list``, ``synced_block``, ``table``,
``child_page``) are ignored.

Only the list line (the first line, marker included) of a list item or to-do is indented: when its
rich text contains ``\\n`` the continuation lines are emitted as they are, without indentation. In
quotes and callouts only the first line carries ``>``.

"Then children": the children are rendered as a block sequence at depth ``d + 1`` (each child indents
itself to its own absolute depth; the parent adds nothing). If that yields an empty string the block
is just its base text; otherwise it is ``base + "\\n" + children``, right-trimmed. The base text of a
quote/callout/toggle is not trimmed before the children are appended, so ``"> \\n  - child"`` keeps
the space after ``>``.

A block sequence (the page, or a block's children) is rendered like this: each block's markdown is
right-trimmed; a block whose markdown is then empty is dropped; kept blocks are joined with ``"\\n"``
when both the previous block and this one are list blocks (bulleted, numbered, to-do), otherwise with
``"\\n\\n"`` (a blank line) — so a list item followed by a paragraph, or a paragraph by a list item,
is separated by a blank line. "The previous block" is the previous block *in the input*, including a
dropped one: a dropped (empty) paragraph between two list items still ends the list, and the next
item is preceded by a blank line. The page (depth 0) is finally trimmed on both sides.

"Trim" / "right-trim" use JavaScript's ``String.prototype.trim``/``trimEnd`` set of whitespace
(:data:`JS_WHITESPACE`), not Python's ``str.strip()``, which differs on U+FEFF and U+001C–U+001F,
U+0085.

Bad input never raises: a block whose ``<type>`` payload is missing or not a mapping renders as if its
rich text were empty; a ``rich_text`` that is not a list counts as empty; a ``"children"`` value that
is not a list counts as no children.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

BlockNode = Mapping[str, Any]
"""A Notion block object plus ``"children"``: the list of its fetched child block nodes."""

RichTextItem = Mapping[str, Any]
"""One item of a Notion ``rich_text`` array."""

JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
"""Characters removed by JavaScript's ``trim``/``trimEnd`` (WhiteSpace and LineTerminator)."""

INDENT_UNIT = "  "
LIST_TYPES = frozenset({"bulleted_list_item", "numbered_list_item", "to_do"})
CONTAINER_TYPES = frozenset(
    {"bulleted_list_item", "numbered_list_item", "to_do", "quote", "callout", "toggle"}
)
HEADING_MARKERS = {"heading_1": "#", "heading_2": "##", "heading_3": "###"}

_ANNOTATION_WRAPPERS: tuple[tuple[str, str, str], ...] = (
    ("code", "`", "`"),
    ("bold", "**", "**"),
    ("italic", "*", "*"),
    ("strikethrough", "~~", "~~"),
    ("underline", "<u>", "</u>"),
)


def trim_end(text: str) -> str:
    """Right-trim ``text`` like JavaScript's ``String.prototype.trimEnd``."""
    return text.rstrip(JS_WHITESPACE)


def trim(text: str) -> str:
    """Trim ``text`` on both sides like JavaScript's ``String.prototype.trim``."""
    return text.strip(JS_WHITESPACE)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _rich_text_item_to_markdown(item: RichTextItem) -> str:
    item_type = item.get("type")
    if item_type == "text":
        text_obj = _mapping(item.get("text"))
        text = _string(text_obj.get("content"))
        url = _string(_mapping(text_obj.get("link")).get("url"))
        if url:
            text = f"[{text}]({url})"
        annotations = _mapping(item.get("annotations"))
        for key, before, after in _ANNOTATION_WRAPPERS:
            if annotations.get(key):
                text = f"{before}{text}{after}"
        return text
    if item_type == "equation":
        return f"${_string(_mapping(item.get('equation')).get('expression'))}$"
    return _string(item.get("plain_text"))


def rich_text_to_markdown(items: Sequence[RichTextItem] | None) -> str:
    """Render a Notion ``rich_text`` array as markdown (rules in the module docstring).

    ``None`` or a non-list gives ``""``; entries that are not mappings are ignored.
    """
    if not isinstance(items, Sequence) or isinstance(items, str):
        return ""
    return "".join(_rich_text_item_to_markdown(item) for item in items if isinstance(item, Mapping))


def _indent_lines(text: str, depth: int) -> str:
    """Prefix every non-empty line of ``text`` with ``2·depth`` spaces."""
    if depth == 0:
        return text
    prefix = INDENT_UNIT * depth
    return "\n".join(f"{prefix}{line}" if line else line for line in text.split("\n"))


def _block_text(block: BlockNode, block_type: str) -> str:
    return rich_text_to_markdown(_mapping(block.get(block_type)).get("rich_text"))


def _append_children(base: str, block: BlockNode, depth: int) -> str:
    """``base`` followed by the block's children rendered at ``depth`` (already the child depth)."""
    children = block.get("children")
    if not isinstance(children, list) or not children:
        return base
    rendered = _render_sequence(children, depth)
    if not rendered:
        return base
    return trim_end(f"{base}\n{rendered}")


def _render_block(block: BlockNode, block_type: str, depth: int) -> str:
    """One block's markdown at ``depth`` (not yet right-trimmed)."""
    if block_type in HEADING_MARKERS:
        return _indent_lines(f"{HEADING_MARKERS[block_type]} {_block_text(block, block_type)}", depth)
    render = _BLOCK_RENDERERS.get(block_type)
    if render is None:
        return _indent_lines(f"[Unsupported block: {block_type}]", depth)
    return render(block, block_type, depth)


def _render_paragraph(block: BlockNode, block_type: str, depth: int) -> str:
    return _indent_lines(_block_text(block, block_type), depth)


def _render_list_item(block: BlockNode, block_type: str, depth: int) -> str:
    if block_type == "bulleted_list_item":
        marker = "-"
    elif block_type == "numbered_list_item":
        marker = "1."
    else:
        marker = "- [x]" if _mapping(block.get("to_do")).get("checked") else "- [ ]"
    line = trim_end(f"{INDENT_UNIT * depth}{marker} {_block_text(block, block_type)}")
    return _append_children(line, block, depth + 1)


def _render_quote(block: BlockNode, block_type: str, depth: int) -> str:
    base = _indent_lines(f"> {_block_text(block, block_type)}", depth)
    return _append_children(base, block, depth + 1)


def _render_callout(block: BlockNode, block_type: str, depth: int) -> str:
    icon = _mapping(_mapping(block.get("callout")).get("icon"))
    emoji = f"{_string(icon.get('emoji'))} " if icon.get("type") == "emoji" else ""
    base = _indent_lines(f"> {emoji}{_block_text(block, block_type)}", depth)
    return _append_children(base, block, depth + 1)


def _render_code(block: BlockNode, block_type: str, depth: int) -> str:
    language = _string(_mapping(block.get("code")).get("language"))
    suffix = f" {language}" if language else ""
    return _indent_lines(f"```{suffix}\n{_block_text(block, block_type)}\n```", depth)


def _render_toggle(block: BlockNode, block_type: str, depth: int) -> str:
    base = _indent_lines(_block_text(block, block_type), depth)
    return _append_children(base, block, depth + 1)


def _render_divider(block: BlockNode, block_type: str, depth: int) -> str:
    return _indent_lines("---", depth)


_BLOCK_RENDERERS: dict[str, Callable[[BlockNode, str, int], str]] = {
    "paragraph": _render_paragraph,
    "bulleted_list_item": _render_list_item,
    "numbered_list_item": _render_list_item,
    "to_do": _render_list_item,
    "quote": _render_quote,
    "callout": _render_callout,
    "code": _render_code,
    "toggle": _render_toggle,
    "divider": _render_divider,
}


def _render_sequence(blocks: Sequence[Any], depth: int) -> str:
    """Render sibling blocks at ``depth`` and join them (separator rules in the module docstring)."""
    parts: list[str] = []
    previous_was_list = False
    for block in blocks:
        if not isinstance(block, Mapping):
            continue
        block_type = block.get("type")
        if not isinstance(block_type, str):
            continue
        is_list = block_type in LIST_TYPES
        markdown = trim_end(_render_block(block, block_type, depth))
        if markdown:
            if parts:
                parts.append("\n" if previous_was_list and is_list else "\n\n")
            parts.append(markdown)
        previous_was_list = is_list
    return "".join(parts)


def blocks_to_markdown(blocks: Sequence[BlockNode]) -> str:
    """Render a page's top-level block nodes (with ``"children"`` attached) as the page's markdown.

    The result is trimmed on both sides; an empty or unrenderable page gives ``""``. Never raises on
    malformed blocks (see the module docstring).
    """
    if not isinstance(blocks, Sequence) or isinstance(blocks, str):
        return ""
    return trim(_render_sequence(blocks, 0))
