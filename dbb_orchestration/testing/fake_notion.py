"""A loopback fake of the Notion API (version 2025-09-03), good enough to drive the real notion-client 3.x.

Usage::

    with FakeNotion(tokens=["tok"]) as fake:
        fake.add_database("db1", data_source_ids=["ds1"], title="Study Notes")
        fake.add_page("ds1", "p1", "Hello", "2026-02-08T10:15:42Z",
                      blocks=[block("paragraph", "Hi", children=[block("paragraph", "nested")])])
        client = notion_client.Client(auth="tok", base_url=fake.base_url)
        client.data_sources.query("ds1", page_size=100)

Endpoints (all under ``/v1``; bodies and results in Notion's own shapes):

* ``GET /v1/databases/{id}`` → ``{"object": "database", "title", "data_sources": [{"id", "name"}], …}``.
* ``GET /v1/data_sources/{id}`` → ``{"object": "data_source", "properties": <schema>, "parent": …}``.
* ``POST /v1/data_sources/{id}/query`` with ``filter``, ``sorts``, ``start_cursor``, ``page_size`` →
  ``{"object": "list", "results": [page…], "has_more", "next_cursor", "type": "page_or_data_source"}``.
  Filters: timestamp filters on ``last_edited_time``/``created_time`` with ``after``, ``on_or_after``,
  ``before``, ``on_or_before``, ``equals``, and ``and``/``or`` compounds of them; sorts: timestamp sorts
  on the same two fields. Property filters and sorts are refused with 400 ``validation_error`` (the fake
  does not model them). Without sorts, pages come in insertion order. **Archived and trashed pages are
  returned** (the sync must skip them) unless ``FakeNotion(query_includes_trashed=False)``.
* ``GET /v1/pages/{id}`` → the page object (also for archived/trashed pages, as Notion does).
* ``GET /v1/blocks/{id}`` → one block; ``GET /v1/blocks/{id}/children`` (``start_cursor``, ``page_size``)
  → a page's or a block's children, paginated, each block with ``has_children``.
* ``GET /v1/users/me`` → the integration's bot user.

``page_size`` defaults to 100; outside 1–100 → 400 ``validation_error``. ``block_page_size`` /
``query_page_size`` cap the page size the fake serves so small data sets paginate. Cursors are the id
of the next item; an unknown cursor → 400 ``validation_error``.

Time: Notion rounds ``last_edited_time`` (and ``created_time``) down to the minute. The fake stores and
returns them truncated, formatted ``2026-02-08T10:15:00.000Z``, and filters on the truncated value, so a
page edited at 10:15:42 is reported as 10:15:00.

Errors: ``{"object": "error", "status", "code", "message", "request_id"}``:

* no ``Notion-Version`` header → 400 ``missing_version``; a version other than ``notion_version``
  (default ``2025-09-03``; ``None`` accepts any) → 400 ``validation_error`` (stricter than Notion, on
  purpose: the fake only models this version);
* missing, unknown or revoked bearer token → 401 ``unauthorized`` (``accept_any_token=True`` accepts every
  non-empty token);
* unknown object, or one the token cannot see (databases can be restricted to some tokens) → 404
  ``object_not_found``; unknown route or method → 400 ``invalid_request_url``;
* over ``rate_limit_per_second`` (per token; token bucket with ``rate_limit_burst``) → 429
  ``rate_limited`` with ``Retry-After: 1``;
* injected with :meth:`FakeNotion.fail_next`.

notion-client 3.1 turns every error body above into ``notion_client.APIResponseError`` with ``.code``
(an ``APIErrorCode``, a ``str`` enum equal to the code), ``.status``, ``.headers`` (``httpx.Headers``, so
``err.headers["retry-after"]`` works) and ``.body``; ``missing_version`` is not a code it knows, so that
one becomes ``UnknownHTTPResponseError`` (``.code == "notionhq_client_response_error"``).

IDs: a 32-hex-digit id (with or without dashes) is normalised to the dashed lower-case UUID form, like
Notion; any other string is kept as is so tests may use readable ids.
"""

from __future__ import annotations

import copy
import hashlib
import json
import operator
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from dbb_orchestration.testing._http import (
    DEFAULT_HOST,
    HttpRequest,
    HttpResponse,
    LoopbackServer,
    TokenBucket,
    parse_json_body,
)

NOTION_VERSION = "2025-09-03"
MAX_PAGE_SIZE = 100
BOT_USER_ID = "00000000-0000-4000-8000-00000000b075"
EPOCH_TIME = "2026-01-01T00:00:00.000Z"

_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_SLUG = re.compile(r"[^A-Za-z0-9]+")
_TIMESTAMP_FIELDS = ("last_edited_time", "created_time")
_DATE_OPERATORS = ("after", "on_or_after", "before", "on_or_before", "equals")

ERROR_CODES: dict[int, str] = {
    400: "validation_error",
    401: "unauthorized",
    403: "restricted_resource",
    404: "object_not_found",
    409: "conflict_error",
    429: "rate_limited",
    500: "internal_server_error",
    502: "internal_server_error",
    503: "service_unavailable",
    504: "gateway_timeout",
}

_RICH_TEXT_TYPES_WITH_TEXT = frozenset(
    {"paragraph", "bulleted_list_item", "numbered_list_item", "quote", "toggle", "to_do"}
)
_HEADINGS = frozenset({"heading_1", "heading_2", "heading_3"})


# --------------------------------------------------------------------------------------------------
# ids and times
# --------------------------------------------------------------------------------------------------
def normalize_id(value: str) -> str:
    """``0123…cdef`` or ``01234567-…`` (32 hex digits) → dashed lower-case UUID; other strings unchanged.
    A non-string raises ``TypeError``."""
    if not isinstance(value, str):
        raise TypeError(f"Notion ids are strings, got {type(value).__name__}")
    compact = value.replace("-", "")
    if _HEX32.match(compact):
        return str(uuid.UUID(compact))
    return value


def notion_time(value: datetime | str) -> str:
    """The minute-truncated Notion timestamp string, e.g. ``2026-02-08T10:15:00.000Z``.

    Accepts an aware ``datetime`` or an ISO-8601 string with an offset (``Z`` included). A naive datetime
    or a string without offset raises ``ValueError`` (a fake must not guess the timezone)."""
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(parsed, datetime):
        raise TypeError(f"expected datetime or ISO string, got {type(value).__name__}")
    if parsed.tzinfo is None:
        raise ValueError(f"Notion times need a timezone, got naive {value!r}")
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:00.000Z")


def parse_notion_time(value: str) -> datetime:
    """A stored Notion timestamp string → aware UTC datetime."""
    return datetime.fromisoformat(value).astimezone(UTC)


def _parse_filter_time(value: Any) -> datetime:
    """A filter value: ISO date (→ 00:00 UTC) or datetime (naive → UTC). Raises ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(f"date filter values are ISO 8601 strings, got {value!r}")
    if len(value) == 10:
        day = date.fromisoformat(value)
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# --------------------------------------------------------------------------------------------------
# builders for test data (pure; the fake fills in ids and timestamps)
# --------------------------------------------------------------------------------------------------
def rich_text(
    text: str,
    *,
    bold: bool = False,
    italic: bool = False,
    strikethrough: bool = False,
    underline: bool = False,
    code: bool = False,
    color: str = "default",
    link: str | None = None,
) -> dict[str, Any]:
    """One ``text`` rich text item as Notion returns it (``plain_text``, ``href`` and all annotations)."""
    return {
        "type": "text",
        "text": {"content": text, "link": {"url": link} if link else None},
        "annotations": {
            "bold": bold,
            "italic": italic,
            "strikethrough": strikethrough,
            "underline": underline,
            "code": code,
            "color": color,
        },
        "plain_text": text,
        "href": link,
    }


def equation(expression: str) -> dict[str, Any]:
    """One ``equation`` rich text item."""
    return {
        "type": "equation",
        "equation": {"expression": expression},
        "annotations": _default_annotations(),
        "plain_text": expression,
        "href": None,
    }


RichTextInput = str | Mapping[str, Any] | Sequence[Mapping[str, Any] | str] | None


def _rich(value: RichTextInput) -> list[dict[str, Any]]:
    """``str`` → one plain item; one item → ``[item]``; a list of items (strings become plain items) →
    completed copies; ``None`` → ``[]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [rich_text(value)] if value else []
    if isinstance(value, Mapping):
        return [_complete_rich_text_item(value)]
    return [rich_text(item) if isinstance(item, str) else _complete_rich_text_item(item) for item in value]


def block(
    block_type: str,
    text: RichTextInput = None,
    *,
    children: Sequence[Mapping[str, Any]] | None = None,
    checked: bool | None = None,
    language: str | None = None,
    emoji: str | None = None,
    color: str = "default",
    block_id: str | None = None,
    payload: Mapping[str, Any] | None = None,
    has_children: bool | None = None,
) -> dict[str, Any]:
    """A block as input for :meth:`FakeNotion.add_page`: ``{"type", <type>: payload, "children"?, "id"?}``.

    ``text`` is a string, one rich text item or a list of them. Type payloads follow Notion:
    headings get ``is_toggleable``, ``to_do`` gets ``checked``, ``code`` gets ``language`` (default
    ``"plain text"``) and ``caption``, ``callout`` gets an emoji ``icon`` (``None`` without ``emoji``),
    ``divider`` is ``{}``. Any other type gets ``{"rich_text": …}`` only when ``text`` is given, else
    ``{}``. ``payload`` entries override the computed payload. ``has_children=True`` without
    ``children`` marks a block as having children the fake will list as none (e.g. a ``child_page``)."""
    rich = _rich(text)
    body: dict[str, Any]
    if block_type in _RICH_TEXT_TYPES_WITH_TEXT or block_type in _HEADINGS:
        body = {"rich_text": rich, "color": color}
        if block_type in _HEADINGS:
            body["is_toggleable"] = False
        if block_type == "to_do":
            body["checked"] = bool(checked)
    elif block_type == "code":
        body = {"caption": [], "rich_text": rich, "language": language or "plain text"}
    elif block_type == "callout":
        body = {
            "rich_text": rich,
            "icon": {"type": "emoji", "emoji": emoji} if emoji else None,
            "color": color if color != "default" else "gray_background",
        }
    elif block_type == "divider":
        body = {}
    else:
        body = {"rich_text": rich} if text is not None else {}
    if payload:
        body.update(copy.deepcopy(dict(payload)))
    result: dict[str, Any] = {"object": "block", "type": block_type, block_type: body}
    if children:
        result["children"] = [dict(child) for child in children]
    if block_id is not None:
        result["id"] = block_id
    if has_children is not None:
        result["has_children"] = has_children
    return result


def rich_text_property(text: RichTextInput) -> dict[str, Any]:
    return {"type": "rich_text", "rich_text": _rich(text)}


def select_property(name: str | None, *, color: str = "default") -> dict[str, Any]:
    return {"type": "select", "select": _option(name, color) if name is not None else None}


def multi_select_property(*names: str) -> dict[str, Any]:
    return {"type": "multi_select", "multi_select": [_option(name, "default") for name in names]}


def checkbox_property(value: bool) -> dict[str, Any]:
    return {"type": "checkbox", "checkbox": value}


def _option(name: str, color: str) -> dict[str, Any]:
    return {"id": hashlib.sha1(name.encode()).hexdigest()[:8], "name": name, "color": color}


def _default_annotations() -> dict[str, Any]:
    return {
        "bold": False,
        "italic": False,
        "strikethrough": False,
        "underline": False,
        "code": False,
        "color": "default",
    }


def _complete_rich_text_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """Fill what Notion always returns (``annotations``, ``plain_text``, ``href``) into a partial item."""
    result = copy.deepcopy(dict(item))
    annotations = _default_annotations()
    annotations.update(result.get("annotations") or {})
    result["annotations"] = annotations
    if result.get("type") == "text":
        text = result.setdefault("text", {})
        text.setdefault("content", "")
        text.setdefault("link", None)
        result.setdefault("plain_text", text["content"])
        link = text.get("link")
        result.setdefault("href", link.get("url") if isinstance(link, Mapping) else None)
    elif result.get("type") == "equation":
        result.setdefault("plain_text", (result.get("equation") or {}).get("expression", ""))
        result.setdefault("href", None)
    else:
        result.setdefault("plain_text", "")
        result.setdefault("href", None)
    return result


# --------------------------------------------------------------------------------------------------
# stored state
# --------------------------------------------------------------------------------------------------
@dataclass
class _Database:
    id: str
    title: list[dict[str, Any]]
    data_source_ids: list[str]
    tokens: frozenset[str] | None
    created_time: str


@dataclass
class _DataSource:
    id: str
    database_id: str
    name: str


@dataclass
class _Page:
    id: str
    data_source_id: str
    properties: dict[str, Any]
    created_time: str
    last_edited_time: str
    archived: bool
    in_trash: bool
    child_ids: list[str] = field(default_factory=list)


@dataclass
class _Block:
    id: str
    page_id: str
    parent: dict[str, Any]
    type: str
    payload: dict[str, Any]
    child_ids: list[str]
    has_children: bool


@dataclass(frozen=True)
class NotionRequest:
    """One HTTP request the fake received (accepted or refused)."""

    method: str
    path: str
    """Full path, ``/v1/...``, without the query string."""
    query: dict[str, str]
    body: Any
    token: str | None
    notion_version: str | None
    status: int
    at: float
    """``time.monotonic()`` when the request arrived."""


@dataclass
class _Fault:
    prefix: str | None
    method: str | None
    status: int
    remaining: int
    retry_after: int | None
    code: str
    message: str


class _Unset:
    pass


UNSET: Any = _Unset()


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _not_found(kind: str, object_id: str) -> _ApiError:
    return _ApiError(
        404,
        "object_not_found",
        f"Could not find {kind} with ID: {object_id}. "
        "Make sure the relevant pages and databases are shared with your integration.",
    )


def _prefix_matches(prefix: str | None, path: str) -> bool:
    """``prefix`` matches the full path (``/v1/blocks/…``) or, when it does not start with ``/v1``, the
    path without its ``/v1`` (``/blocks/…``). ``None`` matches everything."""
    if prefix is None:
        return True
    return path.startswith(prefix) or (
        not prefix.startswith("/v1") and path.removeprefix("/v1").startswith(prefix)
    )


def _user() -> dict[str, str]:
    return {"object": "user", "id": BOT_USER_ID}


def _page_url(page_id: str, title: str) -> str:
    slug = _SLUG.sub("-", title).strip("-")
    compact = page_id.replace("-", "")
    return f"https://www.notion.so/{slug}-{compact}" if slug else f"https://www.notion.so/{compact}"


def _property_id(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:6]


# --------------------------------------------------------------------------------------------------
# the fake
# --------------------------------------------------------------------------------------------------
class FakeNotion(LoopbackServer):
    """Loopback Notion API. All state sits behind one lock; every public method is thread-safe.

    ``tokens`` are the valid bearer tokens (more with :meth:`add_token`); ``accept_any_token`` accepts
    every non-empty token. ``block_page_size`` / ``query_page_size`` (``None`` = 100) cap how many
    items one response carries; both are plain attributes and may be changed at any time.
    """

    def __init__(
        self,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        tokens: Iterable[str] = (),
        accept_any_token: bool = False,
        notion_version: str | None = NOTION_VERSION,
        rate_limit_per_second: float | None = None,
        rate_limit_burst: float | None = None,
        block_page_size: int | None = None,
        query_page_size: int | None = None,
        query_includes_trashed: bool = True,
    ) -> None:
        super().__init__(host=host, port=port)
        self.accept_any_token = accept_any_token
        self.notion_version = notion_version
        self.rate_limit_per_second = rate_limit_per_second
        self.rate_limit_burst = rate_limit_burst
        self.block_page_size = block_page_size
        self.query_page_size = query_page_size
        self.query_includes_trashed = query_includes_trashed
        self._lock = threading.RLock()
        self._tokens: dict[str, bool] = {token: True for token in tokens}
        self._databases: dict[str, _Database] = {}
        self._data_sources: dict[str, _DataSource] = {}
        self._pages: dict[str, _Page] = {}
        self._page_order: list[str] = []
        self._blocks: dict[str, _Block] = {}
        self._block_seq = 0
        self._requests: list[NotionRequest] = []
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._buckets: dict[str, TokenBucket] = {}

    # -- tokens ----------------------------------------------------------------------------------
    def add_token(self, token: str, valid: bool = True) -> None:
        """Register ``token``; ``valid=False`` registers it revoked (401)."""
        if not token:
            raise ValueError("token must be non-empty")
        with self._lock:
            self._tokens[token] = valid

    def revoke_token(self, token: str) -> None:
        """Later requests with ``token`` get 401 ``unauthorized``."""
        with self._lock:
            self._tokens[token] = False

    def _token_valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            known = self._tokens.get(token)
        return known if known is not None else self.accept_any_token

    # -- data API ----------------------------------------------------------------------------------
    def add_database(
        self,
        database_id: str,
        data_source_ids: Sequence[str] | None = None,
        title: RichTextInput = "Untitled database",
        *,
        data_source_names: Sequence[str] | None = None,
        tokens: Iterable[str] | None = None,
        created_time: datetime | str = EPOCH_TIME,
    ) -> str:
        """Create a database with its data sources (default: one, id ``<database_id>-ds`` or a derived
        UUID for UUID ids) and return its normalised id. ``tokens`` restricts who can see it and its
        pages (others get 404); ``None`` = every valid token. ``data_source_names`` default to the title.
        A duplicate database or data source id raises ``ValueError``."""
        db_id = normalize_id(database_id)
        title_items = _rich(title)
        plain_title = "".join(item.get("plain_text", "") for item in title_items)
        if data_source_ids is None:
            data_source_ids = [_derived_id(db_id, "data-source")]
        ds_ids = [normalize_id(ds) for ds in data_source_ids]
        names = list(data_source_names or [])
        with self._lock:
            if db_id in self._databases:
                raise ValueError(f"database {db_id} already exists")
            for ds_id in ds_ids:
                if ds_id in self._data_sources:
                    raise ValueError(f"data source {ds_id} already exists")
            self._databases[db_id] = _Database(
                id=db_id,
                title=title_items,
                data_source_ids=ds_ids,
                tokens=frozenset(tokens) if tokens is not None else None,
                created_time=notion_time(created_time),
            )
            for index, ds_id in enumerate(ds_ids):
                name = names[index] if index < len(names) else plain_title
                self._data_sources[ds_id] = _DataSource(ds_id, db_id, name)
        return db_id

    def add_page(
        self,
        data_source_id: str,
        page_id: str,
        title: RichTextInput,
        last_edited_time: datetime | str,
        properties: Mapping[str, Any] | None = None,
        archived: bool = False,
        in_trash: bool = False,
        blocks: Sequence[Mapping[str, Any]] | None = None,
        *,
        created_time: datetime | str | None = None,
    ) -> str:
        """Add a page to a data source; returns its normalised id.

        ``title`` goes into the title-type property of ``properties`` (created as ``"Name"`` when there is
        none); ``None`` keeps whatever ``properties`` holds. ``properties`` maps names to Notion property
        values (see the ``*_property`` builders); missing ``id``s are filled in. ``last_edited_time`` and
        ``created_time`` (default: ``last_edited_time``) are truncated to the minute. ``blocks`` are block
        inputs (see :func:`block`) whose ``"children"`` nest. Unknown data source → ``KeyError``; an
        existing page or block id, or a naive time → ``ValueError``."""
        pid = normalize_id(page_id)
        ds_id = normalize_id(data_source_id)
        edited = notion_time(last_edited_time)
        created = notion_time(created_time) if created_time is not None else edited
        props = _build_properties(properties, title)
        with self._lock:
            if ds_id not in self._data_sources:
                raise KeyError(f"unknown data source {ds_id}")
            if pid in self._pages or pid in self._blocks:
                raise ValueError(f"page {pid} already exists")
            page = _Page(pid, ds_id, props, created, edited, archived, in_trash)
            self._pages[pid] = page
            self._page_order.append(pid)
            try:
                page.child_ids = self._store_blocks(
                    pid, {"type": "page_id", "page_id": pid}, blocks or [], edited
                )
            except Exception:
                del self._pages[pid]
                self._page_order.remove(pid)
                raise
        return pid

    def update_page(
        self,
        page_id: str,
        *,
        last_edited_time: datetime | str = UNSET,
        blocks: Sequence[Mapping[str, Any]] = UNSET,
        archived: bool = UNSET,
        in_trash: bool = UNSET,
        title: RichTextInput = UNSET,
        properties: Mapping[str, Any] = UNSET,
    ) -> None:
        """Change a page; only the given fields change. ``blocks`` replaces all of its content (old
        block ids disappear). The fake never bumps ``last_edited_time`` on its own: pass it. ``properties``
        replaces the properties (``title``, if also given, is applied on top). Unknown page → ``KeyError``."""
        pid = normalize_id(page_id)
        with self._lock:
            page = self._pages.get(pid)
            if page is None:
                raise KeyError(f"unknown page {pid}")
            if last_edited_time is not UNSET:
                page.last_edited_time = notion_time(last_edited_time)
            if archived is not UNSET:
                page.archived = bool(archived)
            if in_trash is not UNSET:
                page.in_trash = bool(in_trash)
            if properties is not UNSET:
                page.properties = _build_properties(properties, None if title is UNSET else title)
            elif title is not UNSET:
                page.properties = _build_properties(page.properties, title)
            if blocks is not UNSET:
                for child in page.child_ids:
                    self._drop_block(child)
                page.child_ids = self._store_blocks(
                    pid, {"type": "page_id", "page_id": pid}, blocks, page.last_edited_time
                )

    def remove_page(self, page_id: str) -> None:
        """Delete a page and its blocks for good: 404 afterwards, absent from queries. Unknown → ``KeyError``."""
        pid = normalize_id(page_id)
        with self._lock:
            page = self._pages.pop(pid)
            self._page_order.remove(pid)
            for child in page.child_ids:
                self._drop_block(child)

    def page_json(self, page_id: str) -> dict[str, Any]:
        """The page object the API would return. Unknown → ``KeyError``."""
        with self._lock:
            return self._page_object(self._pages[normalize_id(page_id)])

    def load_seed(self, seed: Mapping[str, Any]) -> None:
        """Load a JSON-shaped description (used by the CLI and the demo)::

            {"tokens": ["tok"],
             "databases": [{"id": "…", "title": "Study Notes", "tokens": null,
                            "data_sources": [{"id": "…", "name": "…",
                                              "pages": [{"id", "title", "last_edited_time",
                                                         "created_time"?, "archived"?, "in_trash"?,
                                                         "properties"?, "blocks"?}]}]}]}

        Blocks are :func:`block`-shaped dicts, or the shorthand ``{"type": "paragraph", "text": "…",
        "children": [...], "checked"?, "language"?, "emoji"?}``. Bad input raises ``KeyError`` /
        ``ValueError`` / ``TypeError``."""
        for token in seed.get("tokens") or []:
            self.add_token(str(token))
        for db in seed.get("databases") or []:
            sources = db.get("data_sources") or [{"id": _derived_id(normalize_id(db["id"]), "data-source")}]
            self.add_database(
                db["id"],
                [ds["id"] for ds in sources],
                db.get("title", "Untitled database"),
                data_source_names=[
                    ds.get("name") or (db.get("title") if isinstance(db.get("title"), str) else "")
                    for ds in sources
                ],
                tokens=db.get("tokens"),
            )
            for ds in sources:
                for page in ds.get("pages") or []:
                    self.add_page(
                        ds["id"],
                        page["id"],
                        page.get("title"),
                        page["last_edited_time"],
                        properties=page.get("properties"),
                        archived=bool(page.get("archived", False)),
                        in_trash=bool(page.get("in_trash", False)),
                        blocks=[_coerce_block(b) for b in page.get("blocks") or []],
                        created_time=page.get("created_time"),
                    )

    # -- faults, delay, log ------------------------------------------------------------------------
    def fail_next(
        self,
        path_prefix: str | None = None,
        status: int = 429,
        count: int = 1,
        retry_after: int | None = 1,
        *,
        method: str | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests whose path starts with ``path_prefix`` (``None`` = any; with
        or without the ``/v1``) and whose method is ``method`` (``None`` = any) with ``status``. The code
        defaults by status (429 ``rate_limited``, 401 ``unauthorized``, 404 ``object_not_found``, 500
        ``internal_server_error``, 503 ``service_unavailable`` …); a 429 carries ``Retry-After:
        <retry_after>`` (``None`` omits it). Faults are checked before everything else, in the order they
        were queued. ``count`` < 1 or a status < 400 raises ``ValueError``."""
        if count < 1 or status < 400:
            raise ValueError(f"fail_next needs count >= 1 and an error status, got {count=} {status=}")
        fault = _Fault(
            prefix=path_prefix,
            method=method.upper() if method else None,
            status=status,
            remaining=count,
            retry_after=retry_after,
            code=code
            or ERROR_CODES.get(status, "internal_server_error" if status >= 500 else "invalid_request"),
            message=message or f"Injected failure ({status}).",
        )
        with self._lock:
            self._faults.append(fault)

    def set_delay(self, seconds: float) -> None:
        """Hold every later response ``seconds`` (0 = off). Negative raises ``ValueError``."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds}")
        with self._lock:
            self._delay = float(seconds)

    @property
    def requests(self) -> list[NotionRequest]:
        with self._lock:
            return list(self._requests)

    def request_count(self, prefix: str | None = None, *, method: str | None = None) -> int:
        """How many requests matched ``prefix`` (as in :meth:`fail_next`) and ``method``."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if _prefix_matches(prefix, r.path) and (method is None or r.method == method.upper())
            )

    def reset_log(self) -> None:
        """Forget the request log (data, tokens and faults stay)."""
        with self._lock:
            self._requests.clear()

    # -- HTTP ----------------------------------------------------------------------------------------
    def handle(self, request: HttpRequest) -> HttpResponse:
        arrived = time.monotonic()
        ok, body = parse_json_body(request.body)
        token = request.bearer_token()
        version = request.header("Notion-Version")
        with self._lock:
            delay = self._delay
        if delay:
            time.sleep(delay)
        try:
            status, payload, headers = self._respond(request, ok, body, token, version)
        except _ApiError as exc:
            status, payload, headers = exc.status, self._error_body(exc), {}
        with self._lock:
            self._requests.append(
                NotionRequest(
                    method=request.method,
                    path=request.path,
                    query={k: v[-1] for k, v in request.query.items()},
                    body=body,
                    token=token,
                    notion_version=version,
                    status=status,
                    at=arrived,
                )
            )
        return HttpResponse.json(status, payload, headers)

    @staticmethod
    def _error_body(exc: _ApiError) -> dict[str, Any]:
        return {
            "object": "error",
            "status": exc.status,
            "code": exc.code,
            "message": exc.message,
            "request_id": str(uuid.uuid4()),
        }

    def _respond(
        self, request: HttpRequest, ok: bool, body: Any, token: str | None, version: str | None
    ) -> tuple[int, Any, dict[str, str]]:
        fault = self._take_fault(request)
        if fault is not None:
            headers = (
                {"Retry-After": str(fault.retry_after)}
                if fault.status == 429 and fault.retry_after is not None
                else {}
            )
            return fault.status, self._error_body(_ApiError(fault.status, fault.code, fault.message)), headers
        if not version:
            raise _ApiError(
                400,
                "missing_version",
                "Notion-Version header failed validation: Notion-Version header should be defined, "
                "instead was `undefined`.",
            )
        if self.notion_version is not None and version != self.notion_version:
            raise _ApiError(
                400,
                "validation_error",
                f"This fake only models Notion-Version {self.notion_version}, the request sent {version}.",
            )
        if not self._token_valid(token):
            raise _ApiError(401, "unauthorized", "API token is invalid.")
        assert token is not None
        if not self._take_rate_token(token):
            return (
                429,
                self._error_body(
                    _ApiError(
                        429, "rate_limited", "You have been rate limited. Please try again in a few minutes."
                    )
                ),
                {"Retry-After": "1"},
            )
        if not ok:
            raise _ApiError(400, "invalid_json", "Error parsing JSON body.")
        return 200, self._route(request, body, token), {}

    def _take_fault(self, request: HttpRequest) -> _Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if _prefix_matches(fault.prefix, request.path) and fault.method in (None, request.method):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del self._faults[index]
                    return fault
        return None

    def _take_rate_token(self, token: str) -> bool:
        if not self.rate_limit_per_second:
            return True
        with self._lock:
            bucket = self._buckets.get(token)
            if bucket is None:
                bucket = self._buckets[token] = TokenBucket(self.rate_limit_per_second, self.rate_limit_burst)
            return bucket.try_acquire()

    def _route(self, request: HttpRequest, body: Any, token: str) -> Any:
        parts = [p for p in request.path.split("/") if p]
        method = request.method
        if len(parts) < 2 or parts[0] != "v1":
            raise _ApiError(400, "invalid_request_url", "Invalid request URL.")
        resource, rest = parts[1], parts[2:]
        with self._lock:
            if resource == "databases" and len(rest) == 1 and method == "GET":
                return self._database_object(self._visible_database(normalize_id(rest[0]), token))
            if resource == "data_sources" and len(rest) == 1 and method == "GET":
                return self._data_source_object(self._visible_data_source(normalize_id(rest[0]), token))
            if resource == "data_sources" and len(rest) == 2 and rest[1] == "query" and method == "POST":
                source = self._visible_data_source(normalize_id(rest[0]), token)
                return self._query(source, body if body is not None else {})
            if resource == "pages" and len(rest) == 1 and method == "GET":
                return self._page_object(self._visible_page(normalize_id(rest[0]), token))
            if resource == "blocks" and len(rest) == 1 and method == "GET":
                return self._block_object(self._visible_block(normalize_id(rest[0]), token))
            if resource == "blocks" and len(rest) == 2 and rest[1] == "children" and method == "GET":
                return self._children(normalize_id(rest[0]), token, request)
            if resource == "users" and rest == ["me"] and method == "GET":
                return {
                    "object": "user",
                    "id": BOT_USER_ID,
                    "type": "bot",
                    "name": "DBB fake integration",
                    "avatar_url": None,
                    "bot": {"owner": {"type": "workspace", "workspace": True}, "workspace_name": "Fake"},
                }
        raise _ApiError(400, "invalid_request_url", "Invalid request URL.")

    # -- visibility (lock held) --------------------------------------------------------------------
    def _visible_database(self, db_id: str, token: str) -> _Database:
        db = self._databases.get(db_id)
        if db is None or (db.tokens is not None and token not in db.tokens):
            raise _not_found("database", db_id)
        return db

    def _visible_data_source(self, ds_id: str, token: str) -> _DataSource:
        source = self._data_sources.get(ds_id)
        if source is None:
            raise _not_found("data_source", ds_id)
        db = self._databases[source.database_id]
        if db.tokens is not None and token not in db.tokens:
            raise _not_found("data_source", ds_id)
        return source

    def _visible_page(self, page_id: str, token: str) -> _Page:
        page = self._pages.get(page_id)
        if page is None:
            raise _not_found("page", page_id)
        db = self._databases[self._data_sources[page.data_source_id].database_id]
        if db.tokens is not None and token not in db.tokens:
            raise _not_found("page", page_id)
        return page

    def _visible_block(self, block_id: str, token: str) -> _Block:
        stored = self._blocks.get(block_id)
        if stored is None:
            raise _not_found("block", block_id)
        try:
            self._visible_page(stored.page_id, token)
        except _ApiError:
            raise _not_found("block", block_id) from None
        return stored

    # -- JSON objects (lock held) --------------------------------------------------------------------
    def _database_object(self, db: _Database) -> dict[str, Any]:
        return {
            "object": "database",
            "id": db.id,
            "title": copy.deepcopy(db.title),
            "description": [],
            "parent": {"type": "workspace", "workspace": True},
            "is_inline": False,
            "archived": False,
            "in_trash": False,
            "is_locked": False,
            "created_time": db.created_time,
            "last_edited_time": db.created_time,
            "created_by": _user(),
            "last_edited_by": _user(),
            "data_sources": [{"id": ds, "name": self._data_sources[ds].name} for ds in db.data_source_ids],
            "icon": None,
            "cover": None,
            "url": f"https://www.notion.so/{db.id.replace('-', '')}",
            "public_url": None,
        }

    def _data_source_object(self, source: _DataSource) -> dict[str, Any]:
        schema: dict[str, Any] = {}
        for pid in self._page_order:
            page = self._pages[pid]
            if page.data_source_id != source.id:
                continue
            for name, value in page.properties.items():
                kind = value.get("type")
                schema.setdefault(name, {"id": value.get("id"), "name": name, "type": kind, kind: {}})
        if not any(p.get("type") == "title" for p in schema.values()):
            schema["Name"] = {"id": "title", "name": "Name", "type": "title", "title": {}}
        db = self._databases[source.database_id]
        return {
            "object": "data_source",
            "id": source.id,
            "created_time": db.created_time,
            "last_edited_time": db.created_time,
            "created_by": _user(),
            "last_edited_by": _user(),
            "properties": schema,
            "parent": {"type": "database_id", "database_id": db.id},
            "database_parent": {"type": "workspace", "workspace": True},
            "archived": False,
            "in_trash": False,
            "is_inline": False,
            "title": _rich(source.name),
            "description": [],
            "icon": None,
            "cover": None,
            "url": f"https://www.notion.so/{source.id.replace('-', '')}",
            "public_url": None,
        }

    def _page_object(self, page: _Page) -> dict[str, Any]:
        source = self._data_sources[page.data_source_id]
        title = next(
            (
                "".join(item.get("plain_text", "") for item in value.get("title") or [])
                for value in page.properties.values()
                if value.get("type") == "title"
            ),
            "",
        )
        return {
            "object": "page",
            "id": page.id,
            "created_time": page.created_time,
            "last_edited_time": page.last_edited_time,
            "created_by": _user(),
            "last_edited_by": _user(),
            "cover": None,
            "icon": None,
            "parent": {
                "type": "data_source_id",
                "data_source_id": source.id,
                "database_id": source.database_id,
            },
            "archived": page.archived,
            "in_trash": page.in_trash,
            "is_locked": False,
            "properties": copy.deepcopy(page.properties),
            "url": _page_url(page.id, title),
            "public_url": None,
        }

    def _block_object(self, stored: _Block) -> dict[str, Any]:
        edited = self._pages[stored.page_id].last_edited_time if stored.page_id in self._pages else EPOCH_TIME
        return {
            "object": "block",
            "id": stored.id,
            "parent": dict(stored.parent),
            "created_time": edited,
            "last_edited_time": edited,
            "created_by": _user(),
            "last_edited_by": _user(),
            "has_children": stored.has_children,
            "archived": False,
            "in_trash": False,
            "type": stored.type,
            stored.type: copy.deepcopy(stored.payload),
        }

    # -- listing (lock held) -----------------------------------------------------------------------
    def _query(self, source: _DataSource, body: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise _ApiError(400, "validation_error", "body failed validation: body should be an object.")
        pages = [self._pages[pid] for pid in self._page_order if self._pages[pid].data_source_id == source.id]
        if not self.query_includes_trashed:
            pages = [p for p in pages if not (p.archived or p.in_trash)]
        query_filter = body.get("filter")
        if query_filter is not None:
            pages = [p for p in pages if _matches(p, query_filter)]
        for attribute, descending in reversed(_check_sorts(body.get("sorts"))):
            pages.sort(key=operator.attrgetter(attribute), reverse=descending)
        size = _page_size(body.get("page_size"), self.query_page_size)
        ids = [p.id for p in pages]
        start = _cursor_index(body.get("start_cursor"), ids)
        chunk = pages[start : start + size]
        next_index = start + len(chunk)
        has_more = next_index < len(pages)
        return {
            "object": "list",
            "results": [self._page_object(p) for p in chunk],
            "next_cursor": ids[next_index] if has_more else None,
            "has_more": has_more,
            "type": "page_or_data_source",
            "page_or_data_source": {},
            "request_id": str(uuid.uuid4()),
        }

    def _children(self, parent_id: str, token: str, request: HttpRequest) -> dict[str, Any]:
        if parent_id in self._pages:
            child_ids = self._visible_page(parent_id, token).child_ids
        elif parent_id in self._blocks:
            child_ids = self._visible_block(parent_id, token).child_ids
        elif parent_id in self._databases:
            self._visible_database(parent_id, token)
            child_ids = []
        else:
            raise _not_found("block", parent_id)
        raw_size = request.query_value("page_size")
        try:
            requested = int(raw_size) if raw_size not in (None, "") else None
        except ValueError:
            raise _ApiError(
                400,
                "validation_error",
                f"query failed validation: page_size should be a number, got {raw_size}.",
            ) from None
        size = _page_size(requested, self.block_page_size)
        start = _cursor_index(request.query_value("start_cursor") or None, child_ids)
        chunk = child_ids[start : start + size]
        next_index = start + len(chunk)
        has_more = next_index < len(child_ids)
        return {
            "object": "list",
            "results": [self._block_object(self._blocks[b]) for b in chunk],
            "next_cursor": child_ids[next_index] if has_more else None,
            "has_more": has_more,
            "type": "block",
            "block": {},
            "request_id": str(uuid.uuid4()),
        }

    # -- block storage (lock held) -----------------------------------------------------------------
    def _store_blocks(
        self, page_id: str, parent: dict[str, Any], inputs: Sequence[Mapping[str, Any]], edited: str
    ) -> list[str]:
        ids: list[str] = []
        for raw in inputs:
            item = _coerce_block(raw)
            block_type = item.get("type")
            if not isinstance(block_type, str) or not block_type:
                raise ValueError(f"a block needs a string 'type': {raw!r}")
            payload = copy.deepcopy(dict(item.get(block_type) or {}))
            nested = payload.pop("children", None)
            children = list(item.get("children") or nested or [])
            for key in ("rich_text", "caption"):
                if isinstance(payload.get(key), list):
                    payload[key] = [_complete_rich_text_item(x) for x in payload[key]]
            if item.get("id"):
                block_id = normalize_id(str(item["id"]))
            else:
                self._block_seq += 1
                block_id = f"b10c0000-0000-4000-8000-{self._block_seq:012x}"
            if block_id in self._blocks or block_id in self._pages:
                raise ValueError(f"block id {block_id} is already used")
            stored = _Block(
                id=block_id,
                page_id=page_id,
                parent=parent,
                type=block_type,
                payload=payload,
                child_ids=[],
                has_children=bool(children) or bool(item.get("has_children")),
            )
            self._blocks[block_id] = stored
            ids.append(block_id)
            stored.child_ids = self._store_blocks(
                page_id, {"type": "block_id", "block_id": block_id}, children, edited
            )
        return ids

    def _drop_block(self, block_id: str) -> None:
        stored = self._blocks.pop(block_id, None)
        if stored is not None:
            for child in stored.child_ids:
                self._drop_block(child)


# --------------------------------------------------------------------------------------------------
# pure helpers for the query endpoint and the data API
# --------------------------------------------------------------------------------------------------
def _derived_id(base: str, salt: str) -> str:
    if _HEX32.match(base.replace("-", "")):
        return str(uuid.uuid5(uuid.UUID(base), salt))
    return f"{base}-ds"


def _coerce_block(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Expand the seed shorthand ``{"type", "text", …}`` into a :func:`block` dict; full blocks pass."""
    if not isinstance(raw, Mapping):
        raise TypeError(f"a block must be a mapping, got {type(raw).__name__}")
    block_type = raw.get("type")
    if isinstance(block_type, str) and block_type not in raw and "text" in raw:
        return block(
            block_type,
            raw.get("text"),
            children=[_coerce_block(c) for c in raw.get("children") or []],
            checked=raw.get("checked"),
            language=raw.get("language"),
            emoji=raw.get("emoji"),
            block_id=raw.get("id"),
        )
    result = dict(raw)
    if result.get("children"):
        result["children"] = [_coerce_block(c) for c in result["children"]]
    return result


def _build_properties(properties: Mapping[str, Any] | None, title: RichTextInput | _Unset) -> dict[str, Any]:
    """Complete property values (``type`` inferred from the single value key, ``id`` filled in) and set
    the title property's text to ``title`` unless it is ``None``/``UNSET``."""
    result: dict[str, Any] = {}
    for name, raw in (properties or {}).items():
        if not isinstance(raw, Mapping):
            raise TypeError(f"property {name!r} must be a mapping, got {type(raw).__name__}")
        value = copy.deepcopy(dict(raw))
        kind = value.get("type")
        if not isinstance(kind, str):
            keys = [k for k in value if k != "id"]
            if len(keys) != 1:
                raise ValueError(f"property {name!r} needs a 'type'")
            kind = value["type"] = keys[0]
        if kind in ("title", "rich_text") and isinstance(value.get(kind), list):
            value[kind] = [_complete_rich_text_item(x) for x in value[kind]]
        value.setdefault("id", "title" if kind == "title" else _property_id(name))
        result[name] = value
    if title is not None and not isinstance(title, _Unset):
        title_name = next((n for n, v in result.items() if v.get("type") == "title"), "Name")
        result[title_name] = {"id": "title", "type": "title", "title": _rich(title)}
    elif not any(v.get("type") == "title" for v in result.values()):
        result["Name"] = {"id": "title", "type": "title", "title": []}
    return result


def _matches(page: _Page, query_filter: Any) -> bool:
    """Evaluate a (supported) filter against a page; unsupported shapes raise ``_ApiError`` 400."""
    if not isinstance(query_filter, Mapping):
        raise _ApiError(400, "validation_error", "body failed validation: body.filter should be an object.")
    if "and" in query_filter or "or" in query_filter:
        kind = "and" if "and" in query_filter else "or"
        parts = query_filter[kind]
        if not isinstance(parts, list):
            raise _ApiError(
                400, "validation_error", f"body failed validation: body.filter.{kind} should be an array."
            )
        results = [_matches(page, part) for part in parts]
        return all(results) if kind == "and" else any(results)
    timestamp = query_filter.get("timestamp")
    if timestamp not in _TIMESTAMP_FIELDS:
        raise _ApiError(
            400,
            "validation_error",
            "This fake supports only timestamp filters on last_edited_time/created_time "
            f"(and/or compounds of them), got {json.dumps(query_filter)[:200]}.",
        )
    condition = query_filter.get(timestamp)
    if not isinstance(condition, Mapping) or len(condition) != 1:
        raise _ApiError(
            400, "validation_error", f"body failed validation: body.filter.{timestamp} needs one condition."
        )
    op, raw_value = next(iter(condition.items()))
    if op not in _DATE_OPERATORS:
        raise _ApiError(400, "validation_error", f"This fake does not support the date condition {op!r}.")
    try:
        value = _parse_filter_time(raw_value)
    except ValueError as exc:
        raise _ApiError(400, "validation_error", f"body failed validation: {exc}") from None
    stamp = parse_notion_time(getattr(page, timestamp))
    if op == "after":
        return stamp > value
    if op == "on_or_after":
        return stamp >= value
    if op == "before":
        return stamp < value
    if op == "on_or_before":
        return stamp <= value
    return stamp == value


def _check_sorts(sorts: Any) -> list[tuple[str, bool]]:
    """``[(attribute, descending)]`` for timestamp sorts; anything else raises ``_ApiError`` 400."""
    if sorts is None:
        return []
    if not isinstance(sorts, list):
        raise _ApiError(400, "validation_error", "body failed validation: body.sorts should be an array.")
    result: list[tuple[str, bool]] = []
    for sort in sorts:
        if not isinstance(sort, Mapping) or sort.get("timestamp") not in _TIMESTAMP_FIELDS:
            raise _ApiError(
                400,
                "validation_error",
                f"This fake supports only timestamp sorts on last_edited_time/created_time, got {sort!r}.",
            )
        direction = sort.get("direction", "ascending")
        if direction not in ("ascending", "descending"):
            raise _ApiError(
                400, "validation_error", f"body failed validation: bad sort direction {direction!r}."
            )
        result.append((str(sort["timestamp"]), direction == "descending"))
    return result


def _page_size(requested: Any, cap: int | None) -> int:
    if requested is None:
        requested = MAX_PAGE_SIZE
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= MAX_PAGE_SIZE:
        raise _ApiError(
            400,
            "validation_error",
            f"body failed validation: page_size should be an integer between 1 and {MAX_PAGE_SIZE}, "
            f"instead was `{requested}`.",
        )
    return min(requested, cap) if cap else requested


def _cursor_index(cursor: Any, ids: list[str]) -> int:
    if cursor is None:
        return 0
    if not isinstance(cursor, str):
        raise _ApiError(400, "validation_error", "body failed validation: start_cursor should be a string.")
    normalized = normalize_id(cursor)
    if normalized not in ids:
        raise _ApiError(400, "validation_error", f"start_cursor provided is invalid: {cursor}")
    return ids.index(normalized)
