"""Cursor arithmetic, the query body, and block trees fetched through the real SDK from FakeNotion."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dbb_orchestration.notion_sync.client import NotionApi, NotionNotFound, make_sdk_client
from dbb_orchestration.notion_sync.fetch import (
    DataSourceRef,
    build_query_body,
    cursor_json,
    data_sources_of,
    fetch_block_tree,
    fetch_page,
    floor_to_minute,
    format_notion_time,
    iter_query_results,
    next_since,
    parse_cursor,
    query_start,
)
from dbb_orchestration.testing import FakeNotion
from dbb_orchestration.testing.fake_notion import block

TOKEN = "secret_fetch_tok"
T0 = datetime(2026, 2, 8, 10, 0, tzinfo=UTC)


# --- cursor and query body -----------------------------------------------------------------------


def test_floor_and_format() -> None:
    moment = datetime(2026, 2, 8, 11, 15, 42, 987654, tzinfo=timezone(timedelta(hours=1)))
    assert floor_to_minute(moment) == datetime(2026, 2, 8, 10, 15, tzinfo=UTC)
    assert format_notion_time(moment) == "2026-02-08T10:15:42.987Z"
    with pytest.raises(ValueError, match="naive"):
        floor_to_minute(datetime(2026, 2, 8, 10, 15))
    with pytest.raises(ValueError, match="naive"):
        format_notion_time(datetime(2026, 2, 8, 10, 15))


def test_cursor_round_trip() -> None:
    since = datetime(2026, 2, 8, 10, 15, tzinfo=UTC)
    assert cursor_json(since) == {"since": "2026-02-08T10:15:00.000Z"}
    assert parse_cursor(cursor_json(since)) == since
    assert parse_cursor({"since": "2026-02-08T11:15:00+01:00"}) == since


@pytest.mark.parametrize(
    "bad", [None, "2026-02-08T10:15:00Z", [], {}, {"since": None}, {"since": 5}, {"since": "soon"},
            {"since": "2026-02-08T10:15:00"}],
)  # fmt: skip
def test_bad_cursor_means_full_sync(bad: object) -> None:
    assert parse_cursor(bad) is None


def test_query_start_rereads_the_cursors_whole_minute_minus_2s() -> None:
    assert query_start(None) is None
    assert query_start(datetime(2026, 2, 8, 10, 15, tzinfo=UTC)) == datetime(
        2026, 2, 8, 10, 14, 58, tzinfo=UTC
    )
    # A cursor inside a minute (not from Notion) still covers the minute's start.
    assert query_start(datetime(2026, 2, 8, 10, 15, 40, tzinfo=UTC)) == datetime(
        2026, 2, 8, 10, 14, 58, tzinfo=UTC
    )


def test_query_body_with_and_without_cursor() -> None:
    full = build_query_body(None)
    assert full == {"sorts": [{"timestamp": "last_edited_time", "direction": "descending"}], "page_size": 100}
    incremental = build_query_body(datetime(2026, 2, 8, 10, 15, tzinfo=UTC), "next-id")
    assert incremental["filter"] == {
        "timestamp": "last_edited_time",
        "last_edited_time": {"on_or_after": "2026-02-08T10:14:58.000Z"},
    }
    assert incremental["start_cursor"] == "next-id"
    assert incremental["page_size"] == 100


def test_next_since() -> None:
    started = datetime(2026, 2, 9, 3, 0, 41, tzinfo=UTC)
    old = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)
    seen = datetime(2026, 2, 8, 10, 15, tzinfo=UTC)
    assert next_since(old, seen, started) == seen
    assert next_since(seen, old, started) == seen  # never backwards
    assert next_since(old, None, started) == old  # nothing seen: unchanged
    assert next_since(None, seen, started) == seen
    assert next_since(None, None, started) == datetime(2026, 2, 9, 3, 0, tzinfo=UTC)  # the start's minute


def test_next_since_never_passes_a_page_that_was_not_stored() -> None:
    old = datetime(2026, 2, 1, 10, 0, tzinfo=UTC)
    failed = datetime(2026, 2, 5, 9, 0, tzinfo=UTC)
    seen = datetime(2026, 2, 8, 9, 0, tzinfo=UTC)
    started = datetime(2026, 2, 9, 3, 0, 41, tzinfo=UTC)
    assert next_since(old, seen, started, hold=failed) == failed
    assert next_since(None, seen, started, hold=failed) == failed  # first sync
    assert next_since(old, seen, started, hold=seen) == seen
    assert next_since(old, failed, started, hold=seen) == failed  # a hold after the newest: no effect
    assert next_since(failed, seen, started, hold=old) == failed  # never backwards
    assert next_since(old, seen, started, hold=None) == seen


def test_data_sources_of() -> None:
    database = {"data_sources": [{"id": "a", "name": "A"}, {"name": "no id"}, "junk", {"id": "b"}]}
    assert data_sources_of(database, "db") == [DataSourceRef("db", "a"), DataSourceRef("db", "b")]
    assert data_sources_of({}, "db") == []


# --- against the fake ----------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeNotion]:
    with FakeNotion(tokens=[TOKEN]) as server:
        server.add_database("db", ["ds"], "Fetch tests")
        yield server
    server.raise_server_errors()


@pytest.fixture
def api(fake: FakeNotion) -> Iterator[NotionApi]:
    with NotionApi(make_sdk_client(TOKEN, fake.base_url)) as notion:
        yield notion


NESTED = [
    block("heading_2", "Plan"),
    block(
        "bulleted_list_item",
        "level 1",
        children=[
            block("bulleted_list_item", "level 2 a", children=[block("to_do", "level 3", checked=True)]),
            block("bulleted_list_item", "level 2 b"),
            block("numbered_list_item", "level 2 c"),
        ],
    ),
    block("toggle", "Details", children=[block("paragraph", "inside"), block("quote", "q")]),
    block("paragraph", "Tail"),
]
EXPECTED = (
    "## Plan\n\n"
    "- level 1\n"
    "  - level 2 a\n"
    "    - [x] level 3\n"
    "  - level 2 b\n"
    "  1. level 2 c\n\n"
    "Details\n"
    "  inside\n\n"
    "  > q\n\n"
    "Tail"
)


def test_nested_blocks_across_several_pages_of_children(fake: FakeNotion, api: NotionApi) -> None:
    fake.block_page_size = 2  # every list of children is split over several responses
    page_id = fake.add_page("ds", "page-nested", "Nested", T0, blocks=NESTED)
    page = fake.page_json(page_id)

    fetched = fetch_page(api, page)

    assert fetched.markdown == EXPECTED
    children_calls = [r for r in fake.requests if r.path.endswith("/children")]
    # page: 4 blocks → 2 responses; "level 1": 3 children → 2; "level 2 a": 1; toggle: 2 → 1.
    assert len(children_calls) == 6
    assert sum(1 for r in children_calls if r.query.get("start_cursor")) == 2
    # Breadth first: every top-level response before any grandchild.
    parents = [r.path.split("/")[3] for r in children_calls]
    assert parents[:2] == [page_id, page_id]


def test_children_of_non_rendered_types_are_not_fetched(fake: FakeNotion, api: NotionApi) -> None:
    page_id = fake.add_page(
        "ds",
        "page-mixed",
        "Mixed",
        T0,
        blocks=[
            block("paragraph", "parent paragraph", children=[block("paragraph", "ignored by markdown")]),
            block("column_list", children=[block("column", children=[block("paragraph", "in a column")])]),
            block("child_page", payload={"title": "Sub page"}, has_children=True),
            block("bulleted_list_item", "item", children=[block("paragraph", "child")]),
        ],
    )

    tree = fetch_block_tree(api, page_id)

    assert [node["type"] for node in tree] == ["paragraph", "column_list", "child_page", "bulleted_list_item"]
    assert [("children" in node) for node in tree] == [False, False, False, True]
    children_calls = [r.path for r in fake.requests if r.path.endswith("/children")]
    assert len(children_calls) == 2  # the page and the list item


def test_missing_page_raises_not_found(api: NotionApi) -> None:
    with pytest.raises(NotionNotFound):
        fetch_block_tree(api, "gone")


def test_query_results_follow_cursors_and_filter(fake: FakeNotion, api: NotionApi) -> None:
    fake.query_page_size = 2
    for n in range(5):
        fake.add_page("ds", f"p{n}", f"Page {n}", T0 + timedelta(minutes=n))

    batches = list(iter_query_results(api, "ds", None))
    recent = list(iter_query_results(api, "ds", T0 + timedelta(minutes=3, seconds=30)))

    assert [[p["id"] for p in b] for b in batches] == [["p4", "p3"], ["p2", "p1"], ["p0"]]
    assert [[p["id"] for p in b] for b in recent] == [["p4", "p3"]]  # p3's minute is read again
