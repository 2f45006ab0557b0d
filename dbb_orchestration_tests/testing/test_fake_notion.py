# notion-client types every call as ``Any | Awaitable[Any]`` (one signature for sync and async clients)
# mypy: disable-error-code="index"
"""Contract tests for FakeNotion, driven through the real notion-client (3.1, API 2025-09-03) over 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from notion_client import APIErrorCode, APIResponseError, Client
from notion_client.client import RetryOptions
from notion_client.errors import UnknownHTTPResponseError
from notion_client.helpers import collect_paginated_api

from dbb_orchestration.notion_sync.markdown import blocks_to_markdown
from dbb_orchestration.testing import FakeNotion
from dbb_orchestration.testing.fake_notion import (
    block,
    checkbox_property,
    equation,
    multi_select_property,
    notion_time,
    rich_text,
    select_property,
)

TOKEN = "secret_tok"
DB = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
DB_DASHED = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
DS = "1a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
T0 = datetime(2026, 2, 8, 10, 0, tzinfo=UTC)


def page_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


@pytest.fixture
def fake() -> Iterator[FakeNotion]:
    with FakeNotion(tokens=[TOKEN]) as server:
        server.add_database(DB, [DS], "Study Notes")
        yield server
    server.raise_server_errors()


@pytest.fixture
def client(fake: FakeNotion) -> Iterator[Client]:
    notion = Client(auth=TOKEN, base_url=fake.base_url, retry=False)
    yield notion
    notion.close()


def api_error(call: Any, *args: Any, **kwargs: Any) -> APIResponseError:
    with pytest.raises(APIResponseError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_retrieve_database_lists_its_data_sources(fake: FakeNotion, client: Client) -> None:
    second = fake.add_database("db-two", ["ds-a", "ds-b"], "Two", data_source_names=["A", "B"])

    database = client.databases.retrieve(DB_DASHED)  # dashed or not, ids are normalised
    two = client.databases.retrieve(second)

    assert database["object"] == "database"
    assert database["id"] == DB_DASHED
    assert database["title"][0]["plain_text"] == "Study Notes"
    assert database["data_sources"] == [{"id": DS, "name": "Study Notes"}]
    assert two["data_sources"] == [{"id": "ds-a", "name": "A"}, {"id": "ds-b", "name": "B"}]
    source = client.data_sources.retrieve(DS)
    assert source["object"] == "data_source"
    assert source["parent"] == {"type": "database_id", "database_id": DB_DASHED}
    assert source["properties"]["Name"]["type"] == "title"


def test_query_filters_sorts_and_paginates_150_pages(fake: FakeNotion, client: Client) -> None:
    for n in range(150):
        fake.add_page(DS, page_id(n), f"Note {n}", T0 + timedelta(minutes=n))
    since = T0 + timedelta(minutes=20) - timedelta(seconds=2)  # page 20 and newer

    results = collect_paginated_api(
        client.data_sources.query,
        data_source_id=DS,
        filter={"timestamp": "last_edited_time", "last_edited_time": {"after": since.isoformat()}},
        sorts=[{"timestamp": "last_edited_time", "direction": "descending"}],
        page_size=100,
    )

    assert [r["id"] for r in results] == [page_id(n) for n in range(149, 19, -1)]
    assert fake.request_count("/data_sources/") == 2
    first, second = [r.body for r in fake.requests]
    assert first["page_size"] == 100 and "start_cursor" not in first
    assert second["start_cursor"] == page_id(49)
    assert results[0]["last_edited_time"] == "2026-02-08T12:29:00.000Z"
    assert results[0]["parent"] == {"type": "data_source_id", "data_source_id": DS, "database_id": DB_DASHED}


def test_one_query_response_shape(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "Only", T0)

    response = client.data_sources.query(DS)

    assert response["object"] == "list"
    assert response["type"] == "page_or_data_source"
    assert (response["has_more"], response["next_cursor"]) == (False, None)
    assert [r["object"] for r in response["results"]] == ["page"]


def test_last_edited_time_is_truncated_to_the_minute(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "Edited", "2026-02-08T10:15:42.123+00:00")

    def ids(condition: dict[str, str]) -> list[str]:
        body = {"timestamp": "last_edited_time", "last_edited_time": condition}
        return [r["id"] for r in client.data_sources.query(DS, filter=body)["results"]]

    assert client.pages.retrieve(page_id(1))["last_edited_time"] == "2026-02-08T10:15:00.000Z"
    assert ids({"after": "2026-02-08T10:15:00Z"}) == []  # edited 10:15:42, reported 10:15:00
    assert ids({"on_or_after": "2026-02-08T10:15:00Z"}) == [page_id(1)]
    assert ids({"after": "2026-02-08T10:14:58Z"}) == [page_id(1)]
    assert ids({"before": "2026-02-08T10:15:30Z"}) == [page_id(1)]


def test_ascending_sort_compound_filter_and_created_time(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "a", T0 + timedelta(minutes=5), created_time=T0)
    fake.add_page(DS, page_id(2), "b", T0 + timedelta(minutes=1), created_time=T0 + timedelta(minutes=1))
    fake.add_page(DS, page_id(3), "c", T0 + timedelta(minutes=9), created_time=T0 + timedelta(minutes=2))

    ascending = client.data_sources.query(
        DS, sorts=[{"timestamp": "last_edited_time", "direction": "ascending"}]
    )
    compound = client.data_sources.query(
        DS,
        filter={
            "and": [
                {"timestamp": "created_time", "created_time": {"on_or_after": "2026-02-08T10:01:00Z"}},
                {
                    "timestamp": "last_edited_time",
                    "last_edited_time": {"on_or_before": "2026-02-08T10:05:00Z"},
                },
            ]
        },
    )

    assert [r["id"] for r in ascending["results"]] == [page_id(2), page_id(1), page_id(3)]
    assert [r["id"] for r in compound["results"]] == [page_id(2)]


def test_archived_and_trashed_pages_stay_in_query_results(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "live", T0)
    fake.add_page(DS, page_id(2), "archived", T0, archived=True)
    fake.add_page(DS, page_id(3), "trashed", T0, in_trash=True)

    results = client.data_sources.query(DS)["results"]

    assert [(r["id"], r["archived"], r["in_trash"]) for r in results] == [
        (page_id(1), False, False),
        (page_id(2), True, False),
        (page_id(3), False, True),
    ]


def test_block_children_paginate_and_nest(fake: FakeNotion, client: Client) -> None:
    fake.block_page_size = 2
    fake.add_page(
        DS,
        page_id(1),
        "Blocks",
        T0,
        blocks=[
            block("heading_1", "Title"),
            block(
                "bulleted_list_item",
                "parent",
                children=[
                    block(
                        "bulleted_list_item", "child 1", children=[block("to_do", "grandchild", checked=True)]
                    ),
                    block("bulleted_list_item", "child 2"),
                    block("numbered_list_item", "child 3"),
                ],
            ),
            block(
                "paragraph",
                [rich_text("bold", bold=True), rich_text(" and "), rich_text("link", link="https://x.y")],
            ),
            block("code", "print('hi')", language="python"),
            block("divider"),
        ],
    )

    top = collect_paginated_api(client.blocks.children.list, block_id=page_id(1), page_size=100)

    assert [b["type"] for b in top] == ["heading_1", "bulleted_list_item", "paragraph", "code", "divider"]
    assert fake.request_count("/blocks/") == 3  # 5 blocks, 2 per response
    assert [b["has_children"] for b in top] == [False, True, False, False, False]
    assert top[0]["parent"] == {"type": "page_id", "page_id": page_id(1)}
    assert top[3]["code"]["language"] == "python"
    assert top[2]["paragraph"]["rich_text"][2]["href"] == "https://x.y"
    children = collect_paginated_api(client.blocks.children.list, block_id=top[1]["id"])
    assert [b["bulleted_list_item"]["rich_text"][0]["plain_text"] for b in children[:2]] == [
        "child 1",
        "child 2",
    ]
    assert children[0]["parent"] == {"type": "block_id", "block_id": top[1]["id"]}
    [grandchild] = client.blocks.children.list(children[0]["id"])["results"]
    assert (grandchild["type"], grandchild["to_do"]["checked"], grandchild["has_children"]) == (
        "to_do",
        True,
        False,
    )
    assert client.blocks.retrieve(grandchild["id"])["id"] == grandchild["id"]


def test_fetched_blocks_feed_the_markdown_converter(fake: FakeNotion, client: Client) -> None:
    fake.block_page_size = 1
    fake.add_page(
        DS,
        page_id(1),
        "Markdown",
        T0,
        blocks=[
            block("heading_2", "Plan"),
            block("to_do", "write", checked=True, children=[block("bulleted_list_item", "tests")]),
            block("callout", ["Remember ", equation("e^x")], emoji="💡"),
            block("image", payload={"type": "external", "external": {"url": "https://x.y/i.png"}}),
        ],
    )

    def fetch(parent: str) -> list[dict[str, Any]]:
        nodes = collect_paginated_api(client.blocks.children.list, block_id=parent)
        return [dict(b, children=fetch(b["id"])) if b["has_children"] else b for b in nodes]

    markdown = blocks_to_markdown(fetch(page_id(1)))

    assert (
        markdown == "## Plan\n\n- [x] write\n  - tests\n\n> 💡 Remember $e^x$\n\n[Unsupported block: image]"
    )


def test_parallel_page_fetches_share_one_client(fake: FakeNotion, client: Client) -> None:
    fake.block_page_size = 3
    for n in range(8):
        fake.add_page(
            DS, page_id(n), f"p{n}", T0, blocks=[block("paragraph", f"page {n} block {i}") for i in range(7)]
        )

    def texts(n: int) -> list[str]:
        blocks = collect_paginated_api(client.blocks.children.list, block_id=page_id(n))
        return [b["paragraph"]["rich_text"][0]["plain_text"] for b in blocks]

    with ThreadPoolExecutor(max_workers=4) as pool:
        fetched = list(pool.map(texts, range(8)))

    assert fetched == [[f"page {n} block {i}" for i in range(7)] for n in range(8)]
    assert fake.request_count("/blocks/") == 8 * 3  # 7 blocks, 3 per response


def test_page_retrieve_returns_properties_and_url(fake: FakeNotion, client: Client) -> None:
    fake.add_page(
        DS,
        page_id(7),
        "Linear algebra",
        T0,
        properties={
            "Tags": multi_select_property("math", "exam"),
            "Done": checkbox_property(True),
            "Kind": {"select": {"name": "lecture"}},  # type inferred from the single key
        },
    )

    page = client.pages.retrieve(page_id(7))

    assert page["object"] == "page"
    assert page["properties"]["Name"]["type"] == "title"
    assert page["properties"]["Name"]["title"][0]["plain_text"] == "Linear algebra"
    assert [o["name"] for o in page["properties"]["Tags"]["multi_select"]] == ["math", "exam"]
    assert page["properties"]["Done"] == {
        "type": "checkbox",
        "checkbox": True,
        "id": page["properties"]["Done"]["id"],
    }
    assert page["properties"]["Kind"]["type"] == "select"
    assert page["url"] == "https://www.notion.so/Linear-algebra-00000000000040008000000000000007"
    assert select_property(None) == {"type": "select", "select": None}


def test_update_and_remove_page(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "Draft", T0, blocks=[block("paragraph", "old")])
    old_block = client.blocks.children.list(page_id(1))["results"][0]["id"]

    fake.update_page(
        page_id(1),
        last_edited_time=T0 + timedelta(hours=1),
        blocks=[block("paragraph", "new")],
        title="Final",
    )

    page = client.pages.retrieve(page_id(1))
    assert page["last_edited_time"] == "2026-02-08T11:00:00.000Z"
    assert page["properties"]["Name"]["title"][0]["plain_text"] == "Final"
    [new_block] = client.blocks.children.list(page_id(1))["results"]
    assert new_block["paragraph"]["rich_text"][0]["plain_text"] == "new"
    assert api_error(client.blocks.retrieve, old_block).code == APIErrorCode.ObjectNotFound

    fake.remove_page(page_id(1))

    error = api_error(client.pages.retrieve, page_id(1))
    assert (error.code, error.status) == (APIErrorCode.ObjectNotFound, 404)
    assert json.loads(error.body)["object"] == "error"
    assert api_error(client.blocks.children.list, page_id(1)).status == 404
    assert client.data_sources.query(DS)["results"] == []


def test_unknown_revoked_and_injected_401(fake: FakeNotion, client: Client) -> None:
    with Client(auth="nope", base_url=fake.base_url, retry=False) as stranger:
        assert api_error(stranger.databases.retrieve, DB).code == APIErrorCode.Unauthorized

    fake.add_token("tok-2")
    other = Client(auth="tok-2", base_url=fake.base_url, retry=False)
    assert other.databases.retrieve(DB)["id"] == DB_DASHED
    fake.revoke_token("tok-2")
    error = api_error(other.databases.retrieve, DB)
    assert (error.code, error.status) == (APIErrorCode.Unauthorized, 401)

    fake.fail_next("/v1/data_sources", status=401)
    assert client.databases.retrieve(DB)["id"] == DB_DASHED  # other paths are unaffected
    assert api_error(client.data_sources.query, DS).code == APIErrorCode.Unauthorized
    assert client.data_sources.query(DS)["results"] == []
    assert [r.token for r in fake.requests][:2] == ["nope", "tok-2"]


def test_404_for_unknown_and_unshared_objects(fake: FakeNotion, client: Client) -> None:
    fake.add_token("other")
    fake.add_database("private-db", ["private-ds"], "Private", tokens=["other"])

    assert api_error(client.databases.retrieve, "missing-db").code == APIErrorCode.ObjectNotFound
    assert api_error(client.databases.retrieve, "private-db").code == APIErrorCode.ObjectNotFound
    assert api_error(client.data_sources.query, "private-ds").code == APIErrorCode.ObjectNotFound
    with Client(auth="other", base_url=fake.base_url, retry=False) as owner:
        assert owner.data_sources.query("private-ds")["results"] == []


def test_injected_429_carries_retry_after(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "p", T0)
    fake.fail_next("/blocks/", status=429, count=1, retry_after=7)

    assert client.pages.retrieve(page_id(1))["id"] == page_id(1)  # prefix does not match
    error = api_error(client.blocks.children.list, page_id(1))

    assert (error.code, error.status) == (APIErrorCode.RateLimited, 429)
    assert error.headers["retry-after"] == "7"
    assert client.blocks.children.list(page_id(1))["results"] == []
    assert [r.status for r in fake.requests] == [200, 429, 200]


def test_client_retry_honours_the_fakes_retry_after(fake: FakeNotion) -> None:
    fake.fail_next(None, status=429, count=2, retry_after=0)
    retry = RetryOptions(max_retries=2, initial_retry_delay_ms=1, max_retry_delay_ms=10)

    with Client(auth=TOKEN, base_url=fake.base_url, retry=retry) as notion:
        assert notion.databases.retrieve(DB)["id"] == DB_DASHED

    assert [r.status for r in fake.requests] == [429, 429, 200]


def test_injected_500_and_503_codes(fake: FakeNotion, client: Client) -> None:
    fake.fail_next(status=500)
    fake.fail_next(status=503)

    assert api_error(client.databases.retrieve, DB).code == APIErrorCode.InternalServerError
    assert api_error(client.databases.retrieve, DB).code == APIErrorCode.ServiceUnavailable


def test_rate_limit_per_token(fake: FakeNotion) -> None:
    with FakeNotion(tokens=["a", "b"], rate_limit_per_second=0.01) as limited:
        limited.add_database("d", ["s"], "D")
        with Client(auth="a", base_url=limited.base_url, retry=False) as first:
            first.databases.retrieve("d")
            error = api_error(first.databases.retrieve, "d")
        with Client(auth="b", base_url=limited.base_url, retry=False) as second:
            second.databases.retrieve("d")  # another token has its own bucket

    assert (error.code, error.headers["retry-after"]) == (APIErrorCode.RateLimited, "1")


def test_notion_version_header_is_sent_and_checked(fake: FakeNotion, client: Client) -> None:
    client.databases.retrieve(DB)
    with Client(auth=TOKEN, base_url=fake.base_url, retry=False, notion_version="2022-06-28") as old:
        error = api_error(old.databases.retrieve, DB)
    raw = httpx.get(f"{fake.base_url}/v1/databases/{DB}", headers={"Authorization": f"Bearer {TOKEN}"})

    assert fake.requests[0].notion_version == "2025-09-03"
    assert (error.code, error.status) == (APIErrorCode.ValidationError, 400)
    assert raw.status_code == 400
    assert raw.json()["code"] == "missing_version"


def test_missing_version_is_an_unknown_error_for_the_client(fake: FakeNotion) -> None:
    with (
        Client(auth=TOKEN, base_url=fake.base_url, retry=False, notion_version="") as notion,
        pytest.raises(UnknownHTTPResponseError) as caught,
    ):
        notion.databases.retrieve(DB)

    assert caught.value.status == 400


def test_bad_query_bodies_are_validation_errors(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "p", T0)

    too_big = api_error(client.data_sources.query, DS, page_size=101)
    bad_cursor = api_error(client.data_sources.query, DS, start_cursor="nope")
    property_filter = api_error(
        client.data_sources.query, DS, filter={"property": "Done", "checkbox": {"equals": True}}
    )
    property_sort = api_error(
        client.data_sources.query, DS, sorts=[{"property": "Name", "direction": "ascending"}]
    )

    assert {e.code for e in (too_big, bad_cursor, property_filter, property_sort)} == {
        APIErrorCode.ValidationError
    }
    assert {e.status for e in (too_big, bad_cursor, property_filter, property_sort)} == {400}


def test_request_log_counts_and_orders(fake: FakeNotion, client: Client) -> None:
    fake.add_page(DS, page_id(1), "p", T0)
    client.databases.retrieve(DB)
    client.data_sources.query(DS)
    client.pages.retrieve(page_id(1))

    assert fake.request_count() == 3
    assert fake.request_count("/v1/pages/") == 1
    assert fake.request_count("/pages/") == 1
    assert fake.request_count(method="post") == 1
    stamps = [r.at for r in fake.requests]
    assert stamps == sorted(stamps)
    fake.reset_log()
    assert fake.requests == []


def test_data_api_rejects_bad_input(fake: FakeNotion) -> None:
    with pytest.raises(ValueError):
        fake.add_page(DS, page_id(1), "naive", datetime(2026, 2, 8, 10, 0))
    with pytest.raises(KeyError):
        fake.add_page("no-such-source", page_id(1), "x", T0)
    fake.add_page(DS, page_id(1), "x", T0)
    with pytest.raises(ValueError):
        fake.add_page(DS, page_id(1), "again", T0)
    with pytest.raises(KeyError):
        fake.remove_page(page_id(99))
    assert notion_time("2026-02-08T23:59:59.999-01:00") == "2026-02-09T00:59:00.000Z"


def test_cli_serves_a_seed_until_sigterm(tmp_path: Path) -> None:
    seed = {
        "tokens": ["seed-token"],
        "databases": [
            {
                "id": DB,
                "title": "Seeded",
                "data_sources": [
                    {
                        "id": DS,
                        "name": "Seeded",
                        "pages": [
                            {
                                "id": page_id(1),
                                "title": "Hello",
                                "last_edited_time": "2026-02-08T10:15:42Z",
                                "blocks": [{"type": "paragraph", "text": "from the seed"}],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    seed_path = tmp_path / "seed.json"
    seed_path.write_text(json.dumps(seed), encoding="utf-8")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dbb_orchestration.testing",
            "notion",
            "--port",
            "0",
            "--seed",
            str(seed_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        with Client(auth="seed-token", base_url=base_url, retry=False) as notion:
            [page] = notion.data_sources.query(DS)["results"]
            [paragraph] = notion.blocks.children.list(page["id"])["results"]
        assert page["last_edited_time"] == "2026-02-08T10:15:00.000Z"
        assert paragraph["paragraph"]["rich_text"][0]["plain_text"] == "from the seed"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    assert code == 0
