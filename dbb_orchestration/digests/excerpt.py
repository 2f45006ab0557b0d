"""A note's markdown → the short list of content blocks shown in a digest email (behaviour §8).

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
   entities decoded; runs of spaces and tabs become one space and lines are trimmed.
   Inline markdown becomes formatting (:class:`~dbb_orchestration.email.rendering.Span`):
   ``***both***``, ``**bold**``/``__bold__``, ``*italic*``/``_italic_`` (not inside a word, so
   ``snake_case_name`` stays), ``~~strike~~``, ``==highlight==``, `` `code` `` (its text is literal) and
   link labels. Each block's ``text`` (and each list item) is the visible text without the markers,
   which is what the plain-text part shows and what the budget counts; ``spans`` carry the formatting
   for the HTML part. A marker without its closing partner stays as typed.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from dbb_orchestration.email.rendering import Span, linkify

__all__ = [
    "NO_PREVIEW",
    "Block",
    "BlockKind",
    "Span",
    "block_to_text",
    "clean_inline",
    "inline_spans",
    "linkify",
    "note_blocks",
]

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
    text: str = ""  # every kind but "list": the visible text, markers removed
    items: tuple[str, ...] = ()  # "list" only
    level: int = 0  # "heading" only: 1..6
    # Formatting of ``text`` (or of each item): rendering detail, not part of a block's identity.
    spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)
    item_spans: tuple[tuple[Span, ...], ...] = field(default=(), compare=False, repr=False)

    @property
    def text_spans(self) -> tuple[Span, ...]:
        """``spans``, or the plain text as one span (blocks built by hand, code, the placeholder)."""
        return self.spans or (Span(self.text),)

    @property
    def items_spans(self) -> tuple[tuple[Span, ...], ...]:
        if len(self.item_spans) == len(self.items):
            return self.item_spans
        return tuple((Span(item),) for item in self.items)

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
# The destination may hold balanced parentheses one level deep, as CommonMark allows
# (``https://en.wikipedia.org/wiki/Mercury_(planet)``).
_LINK_RE = re.compile(r"\[([^\]\n]*)\]\(\s*<?((?:[^()\s>]|\([^()\s>]*\))*)>?(?:\s+[\"'][^\"'\n]*[\"'])?\s*\)")
_AUTOLINK_RE = re.compile(r"<(https?://[^>\s]+)>", re.IGNORECASE)
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_INLINE_RE = re.compile(
    r"(?P<code>(?P<ticks>`+)(?P<code_text>[^`\n]|[^`\n].*?[^`\n])(?P=ticks)(?!`))"
    r"|(?P<link>\ue000(?P<label>[^\ue001]*)\ue001(?P<url>[^\ue002]*)\ue002)"
    r"|(?P<both>\*\*\*(?=\S)(?P<both_text>.+?)(?<=\S)\*\*\*)"
    r"|(?P<bold>\*\*(?=\S)(?P<bold_text>.+?)(?<=\S)\*\*(?!\*))"
    r"|(?P<bold_u>(?<![\w_])__(?=\S)(?P<bold_u_text>.+?)(?<=\S)__(?![\w_]))"
    r"|(?P<strike>~~(?=\S)(?P<strike_text>.+?)(?<=\S)~~)"
    r"|(?P<mark>==(?=\S)(?P<mark_text>.+?)(?<=\S)==)"
    r"|(?P<em>(?<![\w*])\*(?=[^\s*])(?P<em_text>.+?)(?<=[^\s*])\*(?![\w*]))"
    r"|(?P<em_u>(?<![\w_])_(?=[^\s_])(?P<em_u_text>.+?)(?<=[^\s_])_(?![\w_]))"
)
_INLINE_HINT_RE = re.compile("[`*_~=\ue000]")
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
        code, index = _fenced_code(lines, index + 1, fence)
        yield True, code
    if prose:
        yield False, prose


def _fenced_code(lines: list[str], index: int, fence: str) -> tuple[list[str], int]:
    """The code lines from ``index`` up to the fence closing ``fence`` (or the end), and the index after."""
    code: list[str] = []
    while index < len(lines):
        if _closes(_FENCE_RE.match(lines[index]), fence):
            return code, index + 1
        code.append(lines[index])
        index += 1
    return code, index


def _closes(closing: re.Match[str] | None, fence: str) -> bool:
    """A closing fence: the opening's character, at least as long, nothing after it."""
    return bool(
        closing
        and closing.group(1)[0] == fence[0]
        and len(closing.group(1)) >= len(fence)
        and not closing.group(2).strip()
    )


# A link with a label is kept as LINK_OPEN label LINK_MID url LINK_CLOSE until the block's spans are
# parsed (private-use characters, removed from the note's own text first).
_LINK_OPEN, _LINK_MID, _LINK_CLOSE = "\ue000", "\ue001", "\ue002"
_PRIVATE_RE = re.compile("[\ue000-\ue002]")


def _replace_link(match: re.Match[str]) -> str:
    text, url = match.group(1).strip(), match.group(2).strip()
    if re.match(r"https?://", url, re.IGNORECASE):
        if not text or text == url:
            return url
        return f"{_LINK_OPEN}{text}{_LINK_MID}{url}{_LINK_CLOSE}"
    return text


_CODE_SPAN_RE = re.compile(r"(`+)(?:[^`\n]|[^`\n].*?[^`\n])\1(?!`)")


def clean_inline(line: str) -> str:
    """The per-line prose rules of step 4; inline code spans (`` `...` ``) are left exactly as typed."""
    if "`" not in line:
        return _clean_inline(line)
    parts: list[str] = []
    pos = 0
    for match in _CODE_SPAN_RE.finditer(line):
        parts.append(_clean_inline(line[pos : match.start()], strip=False))
        parts.append(match.group(0))
        pos = match.end()
    parts.append(_clean_inline(line[pos:], strip=False))
    return "".join(parts).strip()


def _clean_inline(line: str, *, strip: bool = True) -> str:
    """The per-line prose rules of step 4 (images, wiki links, links, tags, entities, emphasis, spaces).

    Each rule runs only when its marker character is present (this is the hot path of rendering).
    Inline markdown markers are kept here; :func:`inline_spans` turns them into formatting.
    """
    if "\ue000" in line or "\ue001" in line or "\ue002" in line:
        line = _PRIVATE_RE.sub("", line)
    if "[" in line:
        line = _clean_brackets(line)
    if "<" in line:
        line = _TAG_RE.sub("", _AUTOLINK_RE.sub(r"\1", line))
    if "&" in line:
        line = html.unescape(line)
    line = _collapse_spaces(line)
    return line.strip() if strip else line


def _clean_brackets(line: str) -> str:
    """Images and embeds removed, wiki links to their label, links to their text (see :func:`_replace_link`)."""
    if "![" in line:
        line = _EMBED_RE.sub("", _IMAGE_RE.sub("", line))
    if "[[" in line:
        line = _WIKI_LABEL_RE.sub(lambda m: m.group(2).strip(), line)
        line = _WIKI_RE.sub(lambda m: m.group(1).strip(), line)
    if "](" in line:
        line = _LINK_RE.sub(_replace_link, line)
    return line


def _collapse_spaces(line: str) -> str:
    if "  " in line or "\t" in line or "\u00a0" in line or "\u2007" in line or "\u202f" in line:
        return _SPACES_RE.sub(" ", line)
    return line


_PLAIN = Span("")


def _styled(style: Span, text: str) -> Span:
    return Span(text) if style is _PLAIN else replace(style, text=text)


def inline_spans(markup: str, style: Span = _PLAIN) -> tuple[Span, ...]:
    """The formatted spans of one cleaned block text (see the module doc); ``style`` is inherited.

    Unmatched markers are kept as text. Adjacent spans with the same formatting are merged.
    """
    if not _INLINE_HINT_RE.search(markup):
        return (_styled(style, markup),) if markup else ()
    out: list[Span] = []
    pos = 0
    for match in _INLINE_RE.finditer(markup):
        if match.start() > pos:
            out.append(_styled(style, markup[pos : match.start()]))
        pos = match.end()
        out.extend(_SPAN_BUILDERS[str(match.lastgroup)](match, style))
    if pos < len(markup):
        out.append(_styled(style, markup[pos:]))
    return _merge(out)


def _code_spans(match: re.Match[str], style: Span) -> tuple[Span, ...]:
    text = match.group("code_text")
    return (replace(style, text=text.strip() or text, code=True),)


def _link_spans(match: re.Match[str], style: Span) -> tuple[Span, ...]:
    url = match.group("url")
    label = inline_spans(match.group("label"), replace(style, href=url))
    return (*label, replace(style, text=f" ({url})", link_suffix=True))


def _nested(group: str, **formatting: Any) -> Callable[[re.Match[str], Span], tuple[Span, ...]]:
    """Spans of the text inside a pair of markers, with the markers' formatting added to ``style``."""
    return lambda match, style: inline_spans(match.group(group), replace(style, **formatting))


# What each alternative of ``_INLINE_RE`` (its outer group, ``match.lastgroup``) becomes.
_SPAN_BUILDERS: dict[str, Callable[[re.Match[str], Span], tuple[Span, ...]]] = {
    "code": _code_spans,
    "link": _link_spans,
    "both": _nested("both_text", bold=True, italic=True),
    "bold": _nested("bold_text", bold=True),
    "bold_u": _nested("bold_u_text", bold=True),
    "strike": _nested("strike_text", strike=True),
    "mark": _nested("mark_text", highlight=True),
    "em": _nested("em_text", italic=True),
    "em_u": _nested("em_u_text", italic=True),
}


def _style(span: Span) -> tuple[object, ...]:
    return (span.bold, span.italic, span.strike, span.highlight, span.code, span.href, span.link_suffix)


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    merged: list[Span] = []
    for span in spans:
        if not span.text:
            continue
        if merged and _style(merged[-1]) == _style(span):
            merged[-1] = replace(span, text=merged[-1].text + span.text)
        else:
            merged.append(span)
    return tuple(merged)


def _visible(spans: Iterable[Span]) -> str:
    return "".join(span.text for span in spans)


def _cut_spans(spans: Iterable[Span], keep: int) -> tuple[Span, ...]:
    """The first ``keep`` visible characters of ``spans``."""
    out: list[Span] = []
    for span in spans:
        if keep <= 0:
            break
        out.append(span if len(span.text) <= keep else replace(span, text=span.text[:keep]))
        keep -= len(span.text)
    return tuple(out)


def _formatted(kind: BlockKind, markup: str, level: int = 0) -> Block:
    spans = inline_spans(markup)
    return Block(kind, text=_visible(spans), level=level, spans=spans)


def _formatted_list(markups: Iterable[str]) -> Block:
    item_spans = tuple(inline_spans(markup) for markup in markups)
    return Block("list", items=tuple(_visible(s) for s in item_spans), item_spans=item_spans)


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
    prose = _OpenProse()
    for line in lines:
        if prose.pending > limit:
            yield from prose.flush()
        if not line or _THEMATIC_RE.match(line):
            yield from prose.flush()
            continue
        prose.pending += len(line)
        yield from prose.add(line)
    yield from prose.flush()


class _OpenProse:
    """The paragraph, quote or list being read by :func:`_prose_blocks`, and its length so far."""

    def __init__(self) -> None:
        self.pending = 0
        self.paragraph: list[str] = []
        self.quote: list[str] = []
        self.items: list[str] = []

    def add(self, line: str) -> list[Block]:
        """Take one non-blank line; returns the blocks it closes."""
        if line.startswith(">"):
            return self._add_quote_line(line)
        heading = _HEADING_RE.match(line) if line.startswith("#") else None
        if heading:
            return self._heading(heading)
        bullet = _LIST_RE.match(line) if line[0] in "-*•" else None
        if bullet:
            return self._add_item(bullet.group(1).strip())
        if self.items:  # a plain line right under an item continues it
            self.items[-1] = f"{self.items[-1]} {line}".strip()
            return []
        closed = self.flush() if self.quote else []
        self.paragraph.append(line)
        return closed

    def _add_quote_line(self, line: str) -> list[Block]:
        closed = [] if self.quote else self.flush()
        body = _QUOTE_PREFIX_RE.sub("", line).strip()
        self.quote.append(_CALLOUT_RE.sub("", body) if body.startswith("[!") else body)
        return closed

    def _heading(self, heading: re.Match[str]) -> list[Block]:
        closed = self.flush()
        if heading.group(2).strip():
            closed.append(_formatted("heading", heading.group(2).strip(), level=len(heading.group(1))))
        return closed

    def _add_item(self, item: str) -> list[Block]:
        closed = [] if self.items else self.flush()
        checkbox = _CHECKBOX_RE.match(item)
        if checkbox:
            item = ("☐ " if checkbox.group(1) == " " else "☑ ") + item[checkbox.end() :]
        self.items.append(item.strip())
        return closed

    def flush(self) -> list[Block]:
        """Close whatever is open: the blocks it makes (blank ones are dropped)."""
        self.pending = 0
        closed: list[Block] = []
        if self.paragraph:
            block = _formatted("paragraph", "\n".join(self.paragraph))
            if block.text.strip():
                closed.append(block)
            self.paragraph.clear()
        if self.quote:
            text = re.sub(r"\n{2,}", "\n\n", "\n".join(self.quote)).strip("\n")
            if text.strip():
                closed.append(_formatted("quote", text))
            self.quote.clear()
        if self.items:
            kept = tuple(item for item in self.items if item)
            if kept:
                closed.append(_formatted_list(kept))
            self.items.clear()
        return closed


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
            spans: list[tuple[Span, ...]] = []
            for item, item_spans in zip(block.items, block.items_spans, strict=True):
                if len(item) <= room:
                    items.append(item)
                    spans.append(item_spans)
                    room -= len(item)
                    continue
                if room >= _MIN_TRUNCATED:
                    cut = _truncate(item, room)
                    items.append(cut)
                    spans.append(_cut_spans(item_spans, len(cut) - len(ELLIPSIS)) + (Span(ELLIPSIS),))
                break
            if items:
                kept.append(Block("list", items=tuple(items), item_spans=tuple(spans)))
        elif room >= _MIN_TRUNCATED:
            cut = _truncate(block.text, room)
            spans_cut = _cut_spans(block.text_spans, len(cut) - len(ELLIPSIS)) + (Span(ELLIPSIS),)
            kept.append(Block(block.kind, text=cut, level=block.level, spans=spans_cut))
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
