"""Shared email rendering: one Jinja environment, one base layout, CSS inlining, and the result type.

Templates live next to the workflow that owns them, in ``dbb_orchestration/<package>/templates/``, and
are named ``"<package>/<file>"``: ``email/base.html`` (the layout), ``digests/digest.html``,
``sequences/...``. Every ``.html`` template (and any template without a name) is autoescaped; ``.txt``
templates are plain text and are not escaped. Undefined variables raise (``StrictUndefined``).

An email is rendered from a pair of templates, ``<name>.html`` and ``<name>.txt``, by
:func:`render_email`. The HTML layout keeps its styles in a ``<style>`` block; ``css_inline`` moves them
into ``style=""`` attributes on every render (one inliner, created once; remote stylesheets are never
fetched), and only ``@media`` rules stay behind in a ``<style>`` block for clients that honour them.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import css_inline
from jinja2 import BaseLoader, Environment, FileSystemLoader, PrefixLoader, StrictUndefined, Template
from markupsafe import Markup, escape

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# http(s) URLs inside *already escaped* text: stop at whitespace and at the entities escape() produces
# for < > " ' (a URL may keep "&amp;", the escaped form of a literal "&").
_ESCAPED_URL_RE = re.compile(r"\bhttps?://(?:(?!&lt;|&gt;|&#34;|&#39;|&quot;)[^\s<>\"'])+", re.IGNORECASE)
_TRAILING_PUNCT = ".,;:!?*_"
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    preview: str  # the hidden preheader text most clients show next to the subject
    html: str  # a complete document with inline styles
    text: str  # the plain-text alternative


# ------------------------------------------------------------------------------------------- filters


def _trim_url(url: str) -> tuple[str, str]:
    """Split trailing punctuation (and unbalanced closing parentheses) off a matched URL."""
    tail = ""
    while url:
        last = url[-1]
        if last in _TRAILING_PUNCT or (last == ")" and url.count(")") > url.count("(")):
            tail = last + tail
            url = url[:-1]
        else:
            break
    return url, tail


def linkify(text: object) -> Markup:
    """HTML-escape ``text``, then turn every ``http://`` / ``https://`` URL into ``<a href>``.

    Escaping comes first, so nothing from ``text`` can open a tag or an attribute; only http(s) URLs are
    linked (``javascript:`` and other schemes stay plain text). Trailing punctuation and an unbalanced
    ``)`` are left outside the link. ``None`` renders as an empty string; ``Markup`` input is kept as is.
    """
    if text is None:
        return Markup("")
    escaped = str(escape(text))

    def to_link(match: re.Match[str]) -> str:
        url, tail = _trim_url(match.group(0))
        if not url or url.lower() in ("http://", "https://"):
            return match.group(0)
        return f'<a href="{url}" target="_blank" rel="noopener">{url}</a>{tail}'

    return Markup(_ESCAPED_URL_RE.sub(to_link, escaped))


@dataclass(frozen=True)
class Span:
    """A run of note text with its inline formatting (``digests/excerpt.py`` parses markdown into these).

    ``href`` marks a link's label; ``link_suffix`` marks the `` (url)`` the plain-text part shows after
    a label (left out of the HTML, where the label itself is the link).
    """

    text: str
    bold: bool = False
    italic: bool = False
    strike: bool = False
    highlight: bool = False
    code: bool = False
    href: str | None = None
    link_suffix: bool = False


_SPAN_TAGS = (
    ("code", '<code class="inline-code">', "</code>"),
    ("highlight", '<span class="highlight">', "</span>"),
    ("strike", "<s>", "</s>"),
    ("italic", "<em>", "</em>"),
    ("bold", "<strong>", "</strong>"),
)


def spans_html(spans: object) -> Markup:
    """HTML for a sequence of :class:`Span`: every piece escaped, formatting as ``<strong>``, ``<em>``,
    ``<s>``, ``<span class="highlight">`` and ``<code class="inline-code">``, link labels as ``<a href>``
    (http(s) only), bare URLs in plain text linked, newlines as ``<br>``. A plain string is rendered
    like a single plain span."""
    if isinstance(spans, str):
        spans = (Span(spans),)
    parts = [_span_html(span) for span in spans if span.text and not span.link_suffix]  # type: ignore[attr-defined]
    return Markup("".join(parts).replace("\n", "<br>\n"))


def _span_html(span: Span) -> str:
    if span.code:
        inner = str(escape(span.text))
    elif span.href and re.match(r"https?://", span.href, re.IGNORECASE):
        inner = f'<a href="{escape(span.href)}" target="_blank" rel="noopener">{escape(span.text)}</a>'
    else:
        inner = str(linkify(span.text))
    if span.code or span.highlight or span.strike or span.italic or span.bold:
        return _wrap_formatting(span, inner)
    return inner


def _wrap_formatting(span: Span, inner: str) -> str:
    for attr, opening, closing in _SPAN_TAGS:
        if getattr(span, attr):
            inner = f"{opening}{inner}{closing}"
    return inner


def nl2br(value: object) -> Markup:
    """Escape (unless already ``Markup``) and turn newlines into ``<br>``."""
    return Markup(str(escape(value)).replace("\n", "<br>\n"))


def display_width(text: object) -> int:
    """Columns ``text`` takes in a monospace plain-text view: wide (CJK) and fullwidth characters count
    2, combining marks 0, everything else 1 (used to size ``====`` underlines in text emails)."""
    width = 0
    for char in str(text):
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def join_url(base: str, path: str) -> str:
    """``join_url("https://app.example/", "/dash") == "https://app.example/dash"``."""
    return base.rstrip("/") + "/" + path.lstrip("/")


# ---------------------------------------------------------------------------------------- environment


def _template_loader() -> BaseLoader:
    """``"<package>/<file>"`` → ``dbb_orchestration/<package>/templates/<file>``."""
    mapping: dict[str, BaseLoader] = {
        folder.parent.name: FileSystemLoader(str(folder))
        for folder in sorted(PACKAGE_ROOT.glob("*/templates"))
        if folder.is_dir()
    }
    return PrefixLoader(mapping, delimiter="/")


def _autoescape(template_name: str | None) -> bool:
    return not (template_name or "").endswith(".txt")


@functools.cache
def get_environment() -> Environment:
    """The one Jinja environment (built on first use, then reused)."""
    env = Environment(
        loader=_template_loader(),
        autoescape=_autoescape,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        auto_reload=False,
        cache_size=400,
    )
    env.filters["linkify"] = linkify
    env.filters["nl2br"] = nl2br
    env.filters["spans_html"] = spans_html
    env.filters["display_width"] = display_width
    return env


def get_template(name: str) -> Template:
    return get_environment().get_template(name)


@functools.cache
def _inliner() -> css_inline.CSSInliner:
    return css_inline.CSSInliner(
        inline_style_tags=True,
        keep_style_tags=False,
        keep_link_tags=False,
        keep_at_rules=True,  # @media rules cannot be inlined; they stay in a <style> block
        load_remote_stylesheets=False,
    )


def inline_css(html: str) -> str:
    """Move ``<style>`` rules into ``style`` attributes. ``css_inline.InlineError`` on unusable CSS."""
    return _inliner().inline(html)


def tidy_text(text: str) -> str:
    """Plain-text clean-up: no trailing spaces, at most one blank line in a row, one final newline."""
    text = _TRAILING_WS_RE.sub("\n", text.replace("\r\n", "\n"))
    return _BLANK_LINES_RE.sub("\n\n", text).strip("\n") + "\n"


def render_email(
    name: str,
    *,
    subject: str,
    preview: str,
    frontend_url: str,
    context: Mapping[str, Any],
) -> RenderedEmail:
    """Render ``<name>.html`` (through the CSS inliner) and ``<name>.txt`` into a :class:`RenderedEmail`.

    Both templates receive ``context`` plus ``subject``, ``preview``, ``frontend_url`` (without a
    trailing slash) and ``settings_url`` (used by the base layout's footer). A missing template raises
    ``jinja2.TemplateNotFound``; a variable the template needs but ``context`` lacks raises
    ``jinja2.UndefinedError``.
    """
    base = frontend_url.rstrip("/")
    values: dict[str, Any] = {
        **context,
        "subject": subject,
        "preview": preview,
        "frontend_url": base,
        "settings_url": join_url(base, "/settings"),
    }
    html = inline_css(get_template(f"{name}.html").render(values))
    text = tidy_text(get_template(f"{name}.txt").render(values))
    return RenderedEmail(subject=subject, preview=preview, html=html, text=text)
