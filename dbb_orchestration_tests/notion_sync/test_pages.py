"""Notion page helpers: title, property summary, metadata, skip rule, time parsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from dbb_orchestration.notion_sync.pages import (
    is_skippable_page,
    page_metadata,
    page_title,
    parse_notion_time,
    summarize_properties,
)


def rt(content: str, *, bold: bool = False, url: str | None = None) -> dict[str, Any]:
    return {
        "type": "text",
        "text": {"content": content, "link": {"url": url} if url else None},
        "annotations": {
            "bold": bold,
            "italic": False,
            "strikethrough": False,
            "underline": False,
            "code": False,
        },
        "plain_text": content,
        "href": url,
    }


def title_prop(*items: dict[str, Any]) -> dict[str, Any]:
    return {"id": "title", "type": "title", "title": list(items)}


def page(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "object": "page",
        "id": "page-1",
        "created_time": "2024-01-02T03:04:00.000Z",
        "last_edited_time": "2024-05-06T07:08:00.000Z",
        "archived": False,
        "in_trash": False,
        "url": "https://www.notion.so/Page-1",
        "properties": properties,
        **extra,
    }


# --- page_title ----------------------------------------------------------------------------------


def test_title_joined_and_trimmed() -> None:
    p = page(
        {
            "Tags": {"type": "multi_select", "multi_select": []},
            "Name": title_prop(rt("  Hello "), rt("world  ")),
        }
    )
    assert page_title(p) == "Hello world"


def test_title_renders_rich_text_like_the_backend() -> None:
    p = page({"Name": title_prop(rt("Big", bold=True), rt(" idea "), rt("link", url="https://x.io"))})
    assert page_title(p) == "**Big** idea [link](https://x.io)"


@pytest.mark.parametrize(
    "properties",
    [
        {"Name": title_prop()},
        {"Name": title_prop(rt("   "), rt("\ufeff"))},
        {"Name": {"type": "title", "title": None}},
        {"Other": {"type": "rich_text", "rich_text": [rt("not a title")]}},
        {},
    ],
)
def test_title_empty_is_untitled(properties: dict[str, Any]) -> None:
    assert page_title(page(properties)) == "Untitled"


def test_title_drops_characters_a_text_column_cannot_hold() -> None:
    assert page_title(page({"Name": title_prop(rt("Ti\x00tle"), rt(" \ud800"))})) == "Title \ufffd"
    assert page_title(page({"Name": title_prop(rt(" \x00 "))})) == "Untitled"


def test_title_without_properties_key() -> None:
    assert page_title({"object": "page"}) == "Untitled"


# --- summarize_properties ------------------------------------------------------------------------

LONG = "x" * 250

PROPERTIES: dict[str, Any] = {
    "Name": title_prop(rt(" Title "), rt("text", bold=True)),
    "Notes": {"type": "rich_text", "rich_text": [rt(LONG)]},
    "Kind": {"type": "select", "select": {"id": "1", "name": "Book", "color": "red"}},
    "NoKind": {"type": "select", "select": None},
    "Tags": {"type": "multi_select", "multi_select": [{"name": "a"}, {"name": "b"}]},
    "Due": {"type": "date", "date": {"start": "2024-02-01", "end": "2024-02-03", "time_zone": None}},
    "NoDue": {"type": "date", "date": None},
    "Done": {"type": "checkbox", "checkbox": True},
    "Score": {"type": "number", "number": 4.5},
    "Empty number": {"type": "number", "number": None},
    "Site": {"type": "url", "url": "https://example.com"},
    "Mail": {"type": "email", "email": "a@b.c"},
    "Phone": {"type": "phone_number", "phone_number": None},
    "State": {"type": "status", "status": {"name": "In progress"}},
    "Owners": {"type": "people", "people": [{"id": "u1", "name": "Ann"}, {"id": "u2"}]},
    "Links": {"type": "relation", "relation": [{"id": "r1"}, {"id": "r2"}, {"id": "r3"}], "has_more": False},
    "Attachments": {"type": "files", "files": [{"type": "external", "external": {"url": "https://f"}}]},
    "Calc": {"type": "formula", "formula": {"type": "number", "number": 42}},
    "CalcDate": {
        "type": "formula",
        "formula": {"type": "date", "date": {"start": "2024-01-01", "end": None}},
    },
    "CalcText": {"type": "formula", "formula": {"type": "string", "string": None}},
    "Roll": {"type": "rollup", "rollup": {"type": "array", "array": [{}, {}]}},
    "Created": {"type": "created_time", "created_time": "2024-01-02T03:04:00.000Z"},
    "Edited": {"type": "last_edited_time", "last_edited_time": "2024-05-06T07:08:00.000Z"},
    "Creator": {"type": "created_by", "created_by": {"object": "user", "id": "u9"}},
    "ID": {"type": "unique_id", "unique_id": {"prefix": "TASK", "number": 12}},
    "Plain ID": {"type": "unique_id", "unique_id": {"prefix": None, "number": 7}},
    "Verified": {"type": "verification", "verification": {"state": "verified"}},
    "Press": {"type": "button", "button": {}},
    "Broken": "not a property",
    "No type": {"id": "x"},
}


def test_summarize_properties_values_by_type() -> None:
    assert summarize_properties(PROPERTIES) == {
        "Name": {"type": "title", "value": "Title text"},
        "Notes": {"type": "rich_text", "value": "x" * 200},
        "Kind": {"type": "select", "value": "Book"},
        "NoKind": {"type": "select", "value": None},
        "Tags": {"type": "multi_select", "value": ["a", "b"]},
        "Due": {"type": "date", "value": {"start": "2024-02-01", "end": "2024-02-03"}},
        "NoDue": {"type": "date", "value": None},
        "Done": {"type": "checkbox", "value": True},
        "Score": {"type": "number", "value": 4.5},
        "Empty number": {"type": "number", "value": None},
        "Site": {"type": "url", "value": "https://example.com"},
        "Mail": {"type": "email", "value": "a@b.c"},
        "Phone": {"type": "phone_number", "value": None},
        "State": {"type": "status", "value": "In progress"},
        "Owners": {"type": "people", "value": 2},
        "Links": {"type": "relation", "value": 3},
        "Attachments": {"type": "files", "value": 1},
        "Calc": {"type": "formula", "value": 42},
        "CalcDate": {"type": "formula", "value": {"start": "2024-01-01", "end": None}},
        "CalcText": {"type": "formula", "value": None},
        "Roll": {"type": "rollup", "value": 2},
        "Created": {"type": "created_time", "value": "2024-01-02T03:04:00.000Z"},
        "Edited": {"type": "last_edited_time", "value": "2024-05-06T07:08:00.000Z"},
        "Creator": {"type": "created_by", "value": "u9"},
        "ID": {"type": "unique_id", "value": "TASK-12"},
        "Plain ID": {"type": "unique_id", "value": "7"},
        "Verified": {"type": "verification", "value": "verified"},
        "Press": {"type": "button"},
    }


def test_summary_is_json_safe() -> None:
    summary = summarize_properties(PROPERTIES)
    assert json.loads(json.dumps(summary)) == summary


def test_summary_malformed_payloads() -> None:
    assert summarize_properties(None) == {}
    assert summarize_properties(
        {
            "a": {"type": "multi_select", "multi_select": None},
            "b": {"type": "people"},
            "c": {"type": "checkbox"},
            "d": {"type": "number", "number": {"nested": 1}},
            "e": {"type": "rich_text", "rich_text": "oops"},
            "f": {"type": "unique_id", "unique_id": {"number": None}},
        }
    ) == {
        "a": {"type": "multi_select", "value": []},
        "b": {"type": "people", "value": 0},
        "c": {"type": "checkbox", "value": False},
        "d": {"type": "number", "value": None},
        "e": {"type": "rich_text", "value": ""},
        "f": {"type": "unique_id", "value": None},
    }


# --- page_metadata -------------------------------------------------------------------------------


def test_page_metadata() -> None:
    p = page({"Name": title_prop(rt("T")), "Done": {"type": "checkbox", "checkbox": False}})
    assert page_metadata(p, "db-1", "ds-1") == {
        "databaseId": "db-1",
        "dataSourceId": "ds-1",
        "url": "https://www.notion.so/Page-1",
        "propertiesSummary": {"Name": "T", "Done": False},
    }


def test_page_metadata_values_by_type_and_valueless_types() -> None:
    metadata = page_metadata(page(PROPERTIES), "db-1", None)
    summary = metadata["propertiesSummary"]
    assert summary["Tags"] == ["a", "b"]
    assert summary["Due"] == {"start": "2024-02-01", "end": "2024-02-03"}
    assert summary["Owners"] == 2
    assert summary["ID"] == "TASK-12"
    assert summary["Press"] is None  # a button has no value
    assert "Broken" not in summary and "No type" not in summary
    assert json.loads(json.dumps(metadata)) == metadata


def test_page_metadata_missing_fields() -> None:
    assert page_metadata({"object": "page"}, "db-2", None) == {
        "databaseId": "db-2",
        "dataSourceId": None,
        "url": None,
        "propertiesSummary": {},
    }


# --- is_skippable_page ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, False),
        ({"archived": True}, True),
        ({"in_trash": True}, True),
        ({"archived": True, "in_trash": True}, True),
    ],
)
def test_is_skippable_page(extra: dict[str, Any], expected: bool) -> None:
    assert is_skippable_page(page({}, **extra)) is expected


def test_is_skippable_page_without_flags() -> None:
    assert is_skippable_page({"object": "page"}) is False


# --- parse_notion_time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-03-10T09:15:00.000Z", datetime(2024, 3, 10, 9, 15, tzinfo=UTC)),
        ("2024-03-10T09:15:00Z", datetime(2024, 3, 10, 9, 15, tzinfo=UTC)),
        ("2024-03-10T11:15:00+02:00", datetime(2024, 3, 10, 9, 15, tzinfo=UTC)),
        ("2024-03-09T23:45:30.250-09:30", datetime(2024, 3, 10, 9, 15, 30, 250000, tzinfo=UTC)),
    ],
)
def test_parse_notion_time(raw: str, expected: datetime) -> None:
    parsed = parse_notion_time(raw)
    assert parsed == expected
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "raw", ["", "yesterday", "2024-13-01T00:00:00Z", "2024-03-10", "2024-03-10T09:15:00"]
)
def test_parse_notion_time_rejects_garbage(raw: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_notion_time(raw)
    assert repr(raw) in str(excinfo.value)


def test_parse_notion_time_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="12345"):
        parse_notion_time(12345)  # type: ignore[arg-type]
