"""Reading a connection's Notion databases: the query, the cursor arithmetic and block trees (behaviour §11).

Cursor
------
``sync_state.cursor_json`` is ``{"since": "<ISO time>"}``, where ``since`` is the newest
``last_edited_time`` Notion reported for a page the sync handled (Notion's own clock, already rounded
down to the minute), never our clock, so skew between the two cannot hide a page. The next query asks
for ``last_edited_time on_or_after floor_to_minute(since) − 2 s``: the whole minute of the last page
seen is read again. A page edited later in that same minute reports the same rounded time, so it is
seen again; pages re-seen without a change are recognised as *unchanged* by ingest (same time, same
hash) and rewrite nothing. Without a cursor every page is read (a full sync). See
:func:`next_since` for how the cursor moves.

Blocks
------
:func:`fetch_block_tree` lists a page's children breadth first, every page of results (100 at a time),
and descends into blocks with ``has_children``, attaching each block's children under ``"children"``
as :func:`~dbb_orchestration.notion_sync.markdown.blocks_to_markdown` expects. It descends only into the
types whose children the markdown renders (list items, to-dos, quotes, callouts, toggles): the children
of every other type (``child_page`` subtrees, columns, tables, synced blocks, paragraphs) never reach the
markdown, so fetching them would cost requests and change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from dbb_orchestration.notion_sync.client import NotionApi
from dbb_orchestration.notion_sync.markdown import CONTAINER_TYPES, blocks_to_markdown
from dbb_orchestration.notion_sync.pages import parse_notion_time

__all__ = [
    "CURSOR_MARGIN",
    "QUERY_PAGE_SIZE",
    "DataSourceRef",
    "FetchedPage",
    "build_query_body",
    "cursor_json",
    "data_sources_of",
    "fetch_block_tree",
    "fetch_page",
    "floor_to_minute",
    "format_notion_time",
    "iter_query_results",
    "next_since",
    "parse_cursor",
    "query_start",
]

QUERY_PAGE_SIZE = 100
CURSOR_MARGIN = timedelta(seconds=2)


def floor_to_minute(value: datetime) -> datetime:
    """``value`` in UTC with seconds and microseconds dropped. A naive datetime raises ``ValueError``."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware time")
    return value.astimezone(UTC).replace(second=0, microsecond=0)


def format_notion_time(value: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z`` (``2026-02-08T10:15:00.000Z``), Notion's own format.
    A naive datetime raises ``ValueError``."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware time")
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_cursor(cursor: Any) -> datetime | None:
    """``since`` from ``sync_state.cursor_json`` as aware UTC.

    ``None``, a non-mapping, a missing/non-string ``since`` or an unparsable time (including one
    without an offset) give ``None``, i.e. the next sync reads everything: a bad cursor costs requests,
    never pages."""
    if not isinstance(cursor, Mapping):
        return None
    raw = cursor.get("since")
    if not isinstance(raw, str):
        return None
    try:
        return parse_notion_time(raw)
    except ValueError:
        return None


def cursor_json(since: datetime) -> dict[str, str]:
    """The ``cursor_json`` value for ``since``: ``{"since": "<ISO, ms, Z>"}``."""
    return {"since": format_notion_time(since)}


def query_start(since: datetime | None, margin: timedelta = CURSOR_MARGIN) -> datetime | None:
    """The ``on_or_after`` bound of the next query: ``floor_to_minute(since) − margin``; ``None`` (no
    cursor) stays ``None`` (no filter)."""
    if since is None:
        return None
    return floor_to_minute(since) - margin


def build_query_body(since: datetime | None, start_cursor: str | None = None) -> dict[str, Any]:
    """The ``data_sources.query`` body: newest edits first, 100 per page, filtered to
    ``last_edited_time on_or_after`` :func:`query_start` when there is a cursor."""
    body: dict[str, Any] = {
        "sorts": [{"timestamp": "last_edited_time", "direction": "descending"}],
        "page_size": QUERY_PAGE_SIZE,
    }
    start = query_start(since)
    if start is not None:
        body["filter"] = {
            "timestamp": "last_edited_time",
            "last_edited_time": {"on_or_after": format_notion_time(start)},
        }
    if start_cursor:
        body["start_cursor"] = start_cursor
    return body


def next_since(
    previous: datetime | None,
    newest_seen: datetime | None,
    started_at: datetime,
    *,
    hold: datetime | None = None,
) -> datetime:
    """The cursor after a successful sync.

    The newer of ``previous`` and ``newest_seen`` (the newest ``last_edited_time`` among pages the sync
    handled); with neither (a first sync that found no page) the minute the sync started,
    ``floor_to_minute(started_at)``, so a page created in that minute is still read next time. ``hold``
    is the earliest ``last_edited_time`` of a page that was read but could not be stored: the cursor
    stays at or before it, so the next sync reads that page again. The cursor never moves backwards
    (a ``hold`` older than ``previous`` leaves ``previous``: the next query starts at its minute, which
    still includes that page). A failed sync does not call this: its cursor stays where it was.
    """
    candidates = [t for t in (previous, newest_seen) if t is not None]
    cursor = max(candidates) if candidates else floor_to_minute(started_at)
    if hold is not None and hold < cursor:
        cursor = hold if previous is None else max(hold, previous)
    return cursor


@dataclass(frozen=True)
class DataSourceRef:
    database_id: str
    data_source_id: str


def data_sources_of(database: Mapping[str, Any], database_id: str) -> list[DataSourceRef]:
    """The data sources a ``databases.retrieve`` result lists, in API order. Entries without a string
    ``id`` are ignored; a database without ``data_sources`` gives ``[]``."""
    refs: list[DataSourceRef] = []
    sources = database.get("data_sources")
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, Mapping) and isinstance(source.get("id"), str) and source["id"]:
            refs.append(DataSourceRef(database_id, source["id"]))
    return refs


def iter_query_results(
    api: NotionApi, data_source_id: str, since: datetime | None
) -> Iterator[list[dict[str, Any]]]:
    """Query ``data_source_id`` (see :func:`build_query_body`) and yield each response's pages, one list
    per response, following ``next_cursor`` until ``has_more`` is false. Results that are not pages
    (``"object" != "page"``) are dropped. API errors propagate (see :class:`NotionApi`)."""
    cursor: str | None = None
    while True:
        response = api.query_data_source(data_source_id, build_query_body(since, cursor))
        results = response.get("results")
        yield [r for r in (results if isinstance(results, list) else []) if _is_page(r)]
        cursor = response.get("next_cursor") if response.get("has_more") else None
        if not isinstance(cursor, str) or not cursor:
            return


def _is_page(value: Any) -> bool:
    return isinstance(value, dict) and value.get("object") == "page" and isinstance(value.get("id"), str)


def _list_all_children(api: NotionApi, block_id: str) -> list[dict[str, Any]]:
    children: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        response = api.list_block_children(block_id, cursor)
        results = response.get("results")
        children.extend(r for r in (results if isinstance(results, list) else []) if isinstance(r, dict))
        cursor = response.get("next_cursor") if response.get("has_more") else None
        if not isinstance(cursor, str) or not cursor:
            return children


def fetch_block_tree(api: NotionApi, page_id: str) -> list[dict[str, Any]]:
    """The page's blocks with nested ``"children"``, fetched breadth first (see the module docstring).

    A block whose children were fetched gets ``"children"`` (possibly ``[]``); others get none. Errors
    propagate: :class:`~dbb_orchestration.notion_sync.client.NotionNotFound` when the page or a block
    vanished meanwhile."""
    top: list[dict[str, Any]] = []
    level: list[tuple[str, list[dict[str, Any]]]] = [(page_id, top)]
    while level:
        next_level: list[tuple[str, list[dict[str, Any]]]] = []
        for parent_id, sink in level:
            for raw in _list_all_children(api, parent_id):
                node = dict(raw)
                block_id = node.get("id")
                if (
                    node.get("has_children")
                    and node.get("type") in CONTAINER_TYPES
                    and isinstance(block_id, str)
                ):
                    node["children"] = []
                    next_level.append((block_id, node["children"]))
                sink.append(node)
        level = next_level
    return top


@dataclass(frozen=True)
class FetchedPage:
    """A page object and its markdown (never logged)."""

    page: dict[str, Any]
    markdown: str = ""

    @property
    def page_id(self) -> str:
        return str(self.page["id"])


def fetch_page(api: NotionApi, page: dict[str, Any]) -> FetchedPage:
    """Fetch ``page``'s blocks and render its markdown."""
    return FetchedPage(page, blocks_to_markdown(fetch_block_tree(api, str(page["id"]))))
