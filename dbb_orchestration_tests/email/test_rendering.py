"""The shared email rendering pieces: environment, layout, CSS inlining, filters."""

from __future__ import annotations

import re

import pytest
from jinja2 import UndefinedError
from markupsafe import Markup

from dbb_orchestration.email.rendering import (
    RenderedEmail,
    get_environment,
    get_template,
    inline_css,
    join_url,
    linkify,
    nl2br,
    tidy_text,
)

CHILD = (
    '{% extends "email/base.html" %}{% from "email/macros.html" import button %}'
    "{% block content %}<h1>Hi {{ name }}</h1><p>{{ body | linkify }}</p>{{ button(url, 'Go') }}{% endblock %}"
)


def render_child(**values: object) -> str:
    defaults: dict[str, object] = {
        "subject": "Subject",
        "preview": "Preview text",
        "settings_url": "https://app.test/settings",
        "name": "Ana",
        "body": "hello",
        "url": "https://app.test/dash",
    }
    defaults.update(values)
    return inline_css(get_environment().from_string(CHILD).render(defaults))


def test_environment_is_built_once_and_strict() -> None:
    env = get_environment()
    assert env is get_environment()
    with pytest.raises(UndefinedError):
        env.from_string("{{ missing }}").render()
    with pytest.raises(UndefinedError):
        get_template("email/base.html").render(subject="s", preview="p")  # settings_url missing


def test_html_is_autoescaped_and_text_is_not() -> None:
    env = get_environment()
    assert env.from_string("{{ v }}").render(v="<b>&") == "&lt;b&gt;&amp;"
    text = get_template("email/base.txt").render(settings_url="https://app.test/settings?a=1&b=2")
    assert "https://app.test/settings?a=1&b=2" in text


def test_layout_is_inlined_600px_with_preheader_and_settings_footer() -> None:
    html = render_child(name="<script>alert(1)</script>", preview="Peek <here>")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    assert re.search(r"max-width:\s*600px", html)
    assert 'width="600"' in html
    # styles now live on the elements
    assert re.search(r'<h1 style="[^"]*font-size: 24px', html)
    assert re.search(r'<body style="[^"]*background-color', html)
    # the hidden preheader carries the preview, escaped
    assert re.search(r'<span class="preheader" style="display: none;[^"]*">Peek &lt;here&gt;', html)
    # footer settings link, button link
    assert 'href="https://app.test/settings"' in html
    assert 'href="https://app.test/dash"' in html
    # no external CSS, no scripts; only the @media rule stays in a style block
    assert "<link" not in html
    styles = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert styles and all(s.strip().startswith("@media") for s in styles)


def test_inliner_never_loads_remote_stylesheets() -> None:
    html = (
        '<html><head><link rel="stylesheet" href="http://127.0.0.1:9/never.css">'
        "<style>p { color: red; }</style></head><body><p>x</p></body></html>"
    )
    out = inline_css(html)
    assert "<link" not in out
    assert '<p style="color: red;">x</p>' in out


def test_filters() -> None:
    assert str(linkify("go https://a.test/x")) == (
        'go <a href="https://a.test/x" target="_blank" rel="noopener">https://a.test/x</a>'
    )
    assert linkify(None) == Markup("")
    assert str(nl2br("a<b\nc")) == "a&lt;b<br>\nc"
    assert str(nl2br(Markup("<i>x</i>\ny"))) == "<i>x</i><br>\ny"


def test_helpers() -> None:
    assert join_url("https://app.test/", "/dash") == "https://app.test/dash"
    assert join_url("https://app.test", "settings?tab=billing") == "https://app.test/settings?tab=billing"
    assert tidy_text("\n\nA  \n\n\n\nB\t\n") == "A\n\nB\n"


def test_rendered_email_is_a_frozen_value() -> None:
    email = RenderedEmail(subject="s", preview="p", html="<p>h</p>", text="t")
    with pytest.raises(AttributeError):
        email.subject = "other"  # type: ignore[misc]
