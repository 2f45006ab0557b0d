"""A note's markdown → the short list of content blocks shown in a digest email (SPEC §8).

Steps, in order:

1. CRLF and lone CR become LF (a leading byte-order mark is dropped).
2. A leading front-matter block (``---`` on the first line up to the next line that is ``---`` or
   ``...``) is dropped. An unclosed leading ``---`` is not front matter and stays (as a rule, see 7).
3. Leading metadata lines are dropped: blank lines and lines starting with ``tags:``, ``aliases:``,
   ``cssclass:``/``cssclasses:``, ``status:``, ``created:``, ``updated:``, ``publish:``, ``draft:`` (case
   does not matter; the ``key::`` forms too), plus indented ``- item`` lines right under such a key.
4. The text is split into fenced code (```` ``` ```` or ``~~~``, an unclosed fence runs to the end) and
   prose. Code keeps its text exactly (it is escaped when rendered, never interpreted). In prose:
   HTML comments and Obsidian ``%% comments %%`` are dropped; ``key:: value`` lines (Dataview inline
   fields, key up to 40 characters) are dropped anywhere; images ``![alt](url)`` and embeds ``![[x]]`` are
   dropped; ``[[Target|Label]]`` → ``Label``, ``[[Target]]`` → ``Target``; ``[text](https://url)`` →
   ``text (https://url)`` (only the URL when the text is empty or equals it; only the text for non-http
   links); ``<https://url>`` → the URL; ``<br>`` → line break; other HTML tags are dropped and HTML
   entities decoded; ``**bold**`` and ``==highlight==`` markers are dropped; runs of spaces
   and tabs become one space and lines are trimmed.
5. Prose is split into blocks: headings (``#`` to ``######`` then a space), quotes (consecutive ``>``
   lines; an Obsidian callout marker ``[!type]`` is dropped), bullet lists (consecutive lines starting
   with ``-``, ``*`` or ``•`` and a space; ``[ ]``/``[x]`` become ☐/☑; a following plain line continues
   the item), paragraphs (consecutive other lines, line breaks kept). Blank lines separate blocks, so at
   most one blank line ever shows. Thematic breaks (``---``, ``***``, ``___``) only separate blocks.
6. Budget (default 900): a block costs its length plus 2, where the length is ``len(text)`` or, for a
   list, the sum of ``len(item)``. Blocks are kept whole while the running total stays ≤ budget. The
   first block that does not fit is truncated so that the total is exactly ≤ budget: it keeps
   ``budget − used − 2 − 3`` characters (cut back to a word boundary when one lies within the last 20
   characters), then ``...``; for a list, whole items are kept and the first item that does not fit is
   truncated that way. Fewer than 4 characters of room → that block is left out. Then it stops.
7. Nothing left → one paragraph ``No preview available.``.

Bad input never raises: ``None`` or a non-string is treated as empty content.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from dbb_orchestration.email.rendering import linkify

__all__ = ["NO_PREVIEW", "Block", "BlockKind", "block_to_text", "clean_inline", "linkify", "note_blocks"]

BlockKind = Literal["code", "heading", "quote", "list", "paragraph"]

NO_PREVIEW = "No preview available."
DEFAULT_BUDGET = 900
BLOCK_OVERHEAD = 2
ELLIPSIS = "..."
_MIN_TRUNCATED = len(ELLIPSIS) + 1
_WORD_BOUNDARY_WINDOW = 20


@dataclass(frozen=True)
class Block:
    kind: BlockKind
    text: str = ""  # every kind but "list"
    items: tuple[str, ...] = ()  # "list" only
    level: int = 0  # "heading" only: 1..6

    @property
    def length(self) -> int:
        return sum(len(item) for item in self.items) if self.kind == "list" else len(self.text)


# ------------------------------------------------------------------------------------------ patterns

_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_META_KEYS = "tags|aliases|cssclass|cssclasses|status|created|updated|publish|draft"
_LEADING_META_RE = re.compile(rf"^\s*(?:{_META_KEYS})\s*::?(?:\s|$)", re.IGNORECASE)
_META_EMPTY_VALUE_RE = re.compile(rf"^\s*(?:{_META_KEYS})\s*::?\s*$", re.IGNORECASE)
_META_CONTINUATION_RE = re.compile(r"^\s+-\s")
_INLINE_FIELD_RE = re.compile(r"^\s*[A-Za-z][\w \-/]{0,39}::(?:\s|$)")

_HTML_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_OBSIDIAN_COMMENT_RE = re.compile(r"%%.*?(?:%%|$)", re.DOTALL)
_IMAGE_RE = re.compile(r"!\[[^\]\n]*\]\([^)\n]*\)")
_EMBED_RE = re.compile(r"!\[\[[^\]\n]*\]\]")
_WIKI_LABEL_RE = re.compile(r"\[\[([^\]|\n]*)\|([^\]\n]*)\]\]")
_WIKI_RE = re.compile(r"\[\[([^\]\n]*)\]\]")
_LINK_RE = re.compile(r"\[([^\]\n]*)\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^\"'\n]*[\"'])?\s*\)")
_AUTOLINK_RE = re.compile(r"<(https?://[^>\s]+)>", re.IGNORECASE)
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_EMPHASIS_RE = re.compile(r"(\*\*|==)(?=\S)(.+?)(?<=\S)\1")
_SPACES_RE = re.compile(r"[ \t\u00a0\u2007\u202f]+")

_THEMATIC_RE = re.compile(r"^([-*_])(?:\s*\1){2,}$")
_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)(?:\s+#+)?$")
_LIST_RE = re.compile(r"^[-*•]\s+(.*)$")
_CHECKBOX_RE = re.compile(r"^\[([ xX])\]\s*")
_CALLOUT_RE = re.compile(r"^\[![^\]]*\][+-]?\s*")
_QUOTE_PREFIX_RE = re.compile(r"^(?:>\s?)+")


# ---------------------------------------------------------------------------------------- pre-passes


def _strip_front_matter(lines: list[str]) -> list[str]:
    if not lines or lines[0].strip() != "---":
        return lines
    for index in range(1, len(lines)):
        if lines[index].strip() in ("---", "..."):
            return lines[index + 1 :]
    return lines


def _strip_leading_metadata(lines: list[str]) -> list[str]:
    index = 0
    in_key_list = False
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            in_key_list = False
        elif _LEADING_META_RE.match(line):
            in_key_list = bool(_META_EMPTY_VALUE_RE.match(line))
        elif not (in_key_list and _META_CONTINUATION_RE.match(line)):
            break
        index += 1
    return lines[index:]


def _split_code(lines: list[str]) -> Iterator[tuple[bool, list[str]]]:
    """Segments of (is_code, lines); fences themselves are not part of a code segment's lines."""
    prose: list[str] = []
    index = 0
    while index < len(lines):
        match = _FENCE_RE.match(lines[index]) if "`" in lines[index] or "~" in lines[index] else None
        if not match:
            prose.append(lines[index])
            index += 1
            continue
        fence = match.group(1)
        if prose:
            yield False, prose
            prose = []
        code: list[str] = []
        index += 1
        while index < len(lines):
            closing = _FENCE_RE.match(lines[index])
            if (
                closing
                and closing.group(1)[0] == fence[0]
                and len(closing.group(1)) >= len(fence)
                and not closing.group(2).strip()
            ):
                index += 1
                break
            code.append(lines[index])
            index += 1
        yield True, code
    if prose:
        yield False, prose


def _replace_link(match: re.Match[str]) -> str:
    text, url = match.group(1).strip(), match.group(2).strip()
    if re.match(r"https?://", url, re.IGNORECASE):
        if not text or text == url:
            return url
        return f"{text} ({url})"
    return text


def clean_inline(line: str) -> str:
    """The per-line prose rules of step 4 (images, wiki links, links, tags, entities, emphasis, spaces).

    Each rule runs only when its marker character is present (this is the hot path of rendering).
    """
    if "[" in line:
        if "![" in line:
            line = _EMBED_RE.sub("", _IMAGE_RE.sub("", line))
        if "[[" in line:
            line = _WIKI_LABEL_RE.sub(lambda m: m.group(2).strip(), line)
            line = _WIKI_RE.sub(lambda m: m.group(1).strip(), line)
        if "](" in line:
            line = _LINK_RE.sub(_replace_link, line)
    if "<" in line:
        line = _TAG_RE.sub("", _AUTOLINK_RE.sub(r"\1", line))
    if "&" in line:
        line = html.unescape(line)
    if "**" in line or "==" in line:
        line = _EMPHASIS_RE.sub(r"\2", line)
    if "  " in line or "\t" in line or "\u00a0" in line or "\u2007" in line or "\u202f" in line:
        line = _SPACES_RE.sub(" ", line)
    return line.strip()


def _clean_prose(lines: list[str]) -> Iterator[str]:
    text = "\n".join(lines)
    if "<!--" in text:
        text = _HTML_COMMENT_RE.sub("", text)
    if "%%" in text:
        text = _OBSIDIAN_COMMENT_RE.sub("", text)
    if "<" in text:
        text = _BR_RE.sub("\n", text)
    for line in text.split("\n"):
        if "::" in line and _INLINE_FIELD_RE.match(line):
            continue
        yield clean_inline(line)


# ------------------------------------------------------------------------------------------- blocks


def _prose_blocks(lines: Iterable[str], limit: int) -> Iterator[Block]:
    """Blocks of cleaned prose lines, produced lazily so the budget stops the work early. A block whose
    text passes ``limit`` characters is emitted at once (it is truncated anyway), so a huge note without
    blank lines is not read to its end."""
    pending = 0
    paragraph: list[str] = []
    quote: list[str] = []
    items: list[str] = []

    def flush() -> list[Block]:
        nonlocal pending
        pending = 0
        out: list[Block] = []
        if paragraph:
            out.append(Block("paragraph", text="\n".join(paragraph)))
            paragraph.clear()
        if quote:
            text = re.sub(r"\n{2,}", "\n\n", "\n".join(quote)).strip("\n")
            if text.strip():
                out.append(Block("quote", text=text))
            quote.clear()
        if items:
            kept = tuple(item for item in items if item)
            if kept:
                out.append(Block("list", items=kept))
            items.clear()
        return out

    for line in lines:
        if pending > limit:
            yield from flush()
        if not line or _THEMATIC_RE.match(line):
            yield from flush()
            continue
        pending += len(line)
        if line.startswith(">"):
            if not quote:
                yield from flush()
            body = _QUOTE_PREFIX_RE.sub("", line).strip()
            quote.append(_CALLOUT_RE.sub("", body) if body.startswith("[!") else body)
            continue
        if line.startswith("#"):
            heading = _HEADING_RE.match(line)
            if heading:
                yield from flush()
                if heading.group(2).strip():
                    yield Block("heading", text=heading.group(2).strip(), level=len(heading.group(1)))
                continue
        bullet = _LIST_RE.match(line) if line[0] in "-*•" else None
        if bullet:
            if not items:
                yield from flush()
            item = bullet.group(1).strip()
            checkbox = _CHECKBOX_RE.match(item)
            if checkbox:
                item = ("☐ " if checkbox.group(1) == " " else "☑ ") + item[checkbox.end() :]
            items.append(item.strip())
            continue
        if items:  # a plain line right under an item continues it
            items[-1] = f"{items[-1]} {line}".strip()
            continue
        if quote:
            yield from flush()
        paragraph.append(line)
    yield from flush()


def _all_blocks(markdown: str, limit: int) -> Iterator[Block]:
    text = markdown.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = _strip_leading_metadata(_strip_front_matter(text.split("\n")))
    for is_code, segment in _split_code(lines):
        if is_code:
            code = "\n".join(segment).strip("\n")
            if code.strip():
                yield Block("code", text=code)
        else:
            yield from _prose_blocks(_clean_prose(segment), limit)


def _truncate(text: str, room: int) -> str:
    """``text`` cut to ``room`` characters including the trailing ``...`` (``room`` ≥ 4)."""
    keep = room - len(ELLIPSIS)
    cut = text[:keep]
    if keep < len(text) and not text[keep].isspace():
        space = max(cut.rfind(" "), cut.rfind("\n"))
        if space > 0 and space >= keep - _WORD_BOUNDARY_WINDOW:
            cut = cut[:space]
    cut = cut.rstrip()
    return (cut or text[:keep]) + ELLIPSIS


def _apply_budget(blocks: Iterable[Block], budget: int) -> list[Block]:
    kept: list[Block] = []
    used = 0
    for block in blocks:
        cost = block.length + BLOCK_OVERHEAD
        if used + cost <= budget:
            kept.append(block)
            used += cost
            continue
        room = budget - used - BLOCK_OVERHEAD
        if block.kind == "list":
            items: list[str] = []
            for item in block.items:
                if len(item) <= room:
                    items.append(item)
                    room -= len(item)
                    continue
                if room >= _MIN_TRUNCATED:
                    items.append(_truncate(item, room))
                break
            if items:
                kept.append(Block("list", items=tuple(items)))
        elif room >= _MIN_TRUNCATED:
            kept.append(Block(block.kind, text=_truncate(block.text, room), level=block.level))
        break
    return kept


def note_blocks(markdown: str | None, budget: int = DEFAULT_BUDGET) -> list[Block]:
    """The blocks of ``markdown`` to show in an email, within ``budget`` characters (see module doc).

    ``None``/non-string content or content with nothing left → ``[Block("paragraph", "No preview
    available.")]``. A budget below 6 leaves nothing and gives that placeholder too.
    """
    if not isinstance(markdown, str):
        markdown = ""
    kept = _apply_budget(_all_blocks(markdown, budget), budget)
    return kept or [Block("paragraph", text=NO_PREVIEW)]


def block_to_text(block: Block) -> str:
    """Plain-text form of a block: headings as is, ``> `` before quote lines, ``- `` before list items,
    code indented by four spaces, paragraphs as is."""
    if block.kind == "list":
        return "\n".join(f"- {item}" for item in block.items)
    if block.kind == "quote":
        return "\n".join(f"> {line}".rstrip() for line in block.text.split("\n"))
    if block.kind == "code":
        return "\n".join(f"    {line}".rstrip() for line in block.text.split("\n"))
    return block.text
