"""Notion page helpers for the weekly sync (behaviour §11): title, property summary, metadata, skip rule, times.

All functions are pure and take page objects as the Notion API returns them (``pages.retrieve`` or a
``data_sources.query`` result).

Choices made here (documented because the backend writes the same ``documents`` rows):

* **Title** — the backend stores ``richTextToMarkdown(title).trim() || "Untitled"``, i.e. the title
  property's rich text rendered with the same rules as block text (links become ``[t](url)``, bold
  becomes ``**t**`` …), trimmed with JavaScript's whitespace set. :func:`page_title` does exactly that,
  so a document keeps the same title whichever side synced it last. For plain titles (the usual case)
  this equals the plain text.
* **Property summary** — :func:`summarize_properties` gives ``{name: {"type": <type>, "value": <simple
  JSON value>}}`` for every property, title included (as its plain text); unknown or value-less types
  give ``{"type": <type>}`` only. The per-type values are listed there. People, relations and files are
  summarised as counts so no names, e-mails or signed file URLs end up in metadata.
* **Metadata** — :func:`page_metadata` stores the backend's shape, ``{"databaseId", "dataSourceId",
  "url", "propertiesSummary": {name: value}}`` (values as above, ``None`` for value-less types).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from dbb_orchestration.content import storable_text
from dbb_orchestration.notion_sync.markdown import rich_text_to_markdown, trim

UNTITLED = "Untitled"
TEXT_SUMMARY_MAX_CHARS = 200

JsonScalar = str | int | float | bool | None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _scalar(value: Any) -> JsonScalar:
    """``value`` if it is a JSON scalar (str/int/float/bool/None), else ``None``."""
    return value if value is None or isinstance(value, str | int | float | bool) else None


def _string_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _plain_text(items: Any, limit: int | None = None) -> str:
    """Concatenated ``plain_text`` of a rich text array, trimmed, cut to ``limit`` characters."""
    if not isinstance(items, list):
        return ""
    text = trim(
        "".join(
            item["plain_text"]
            for item in items
            if isinstance(item, Mapping) and isinstance(item.get("plain_text"), str)
        )
    )
    return text if limit is None else text[:limit]


def _date_value(value: Any) -> dict[str, str | None] | None:
    date = _mapping(value)
    if not date:
        return None
    return {"start": _string_or_none(date.get("start")), "end": _string_or_none(date.get("end"))}


def _named(value: Any) -> str | None:
    return _string_or_none(_mapping(value).get("name"))


def _typed_union_value(value: Any) -> Any:
    """Value of a formula or rollup result ``{"type": t, t: v}``: scalars as is, dates as start/end,
    rollup arrays as their length; anything else ``None``."""
    union = _mapping(value)
    inner_type = union.get("type")
    if not isinstance(inner_type, str):
        return None
    inner = union.get(inner_type)
    if inner_type == "date":
        return _date_value(inner)
    if inner_type == "array":
        return _count(inner)
    return _scalar(inner)


def _unique_id_value(value: Any) -> str | None:
    unique = _mapping(value)
    number = unique.get("number")
    if not isinstance(number, int) or isinstance(number, bool):
        return None
    prefix = unique.get("prefix")
    return f"{prefix}-{number}" if isinstance(prefix, str) and prefix else str(number)


def _title_text(payload: Any) -> str:
    return _plain_text(payload, TEXT_SUMMARY_MAX_CHARS)


def _option_names(payload: Any) -> list[str]:
    names = [_named(option) for option in payload] if isinstance(payload, list) else []
    return [name for name in names if name is not None]


def _user_id(payload: Any) -> str | None:
    return _string_or_none(_mapping(payload).get("id"))


def _verification_state(payload: Any) -> str | None:
    return _string_or_none(_mapping(payload).get("state"))


# How each known property type's payload is summarised (see :func:`summarize_properties`).
_PROPERTY_READERS: dict[str, Callable[[Any], Any]] = {
    "title": _title_text,
    "rich_text": _title_text,
    "select": _named,
    "status": _named,
    "multi_select": _option_names,
    "date": _date_value,
    "checkbox": bool,
    "number": _scalar,
    "url": _scalar,
    "email": _scalar,
    "phone_number": _scalar,
    "created_time": _scalar,
    "last_edited_time": _scalar,
    "people": _count,
    "relation": _count,
    "files": _count,
    "formula": _typed_union_value,
    "rollup": _typed_union_value,
    "created_by": _user_id,
    "last_edited_by": _user_id,
    "unique_id": _unique_id_value,
    "verification": _verification_state,
}


def _property_value(prop_type: str, payload: Any) -> tuple[bool, Any]:
    """``(known, value)`` for one property's type payload."""
    reader = _PROPERTY_READERS.get(prop_type)
    if reader is None:
        return False, None
    return True, reader(payload)


def summarize_properties(properties: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A JSON-safe summary of a page's properties: ``{name: {"type": t, "value": v}}``.

    Values by type:

    * ``title``, ``rich_text``: concatenated ``plain_text``, trimmed, first 200 characters
    * ``select``, ``status``: option name or ``None``; ``multi_select``: list of option names
    * ``date``: ``{"start": s, "end": e}`` (strings as Notion sends them, ``end`` may be ``None``) or
      ``None`` when empty
    * ``checkbox``: bool; ``number``, ``url``, ``email``, ``phone_number``: the value or ``None``
    * ``created_time``, ``last_edited_time``: the ISO string
    * ``people``, ``relation``, ``files``: how many entries the page object lists (a relation with
      more than 25 entries is capped by Notion's ``has_more``)
    * ``formula``, ``rollup``: the result — string/number/boolean as is, date as ``{"start", "end"}``,
      rollup array as its length, anything else ``None``
    * ``created_by``, ``last_edited_by``: the user id
    * ``unique_id``: ``"<prefix>-<number>"``, or ``"<number>"`` without a prefix
    * ``verification``: its ``state``
    * any other type (``button``, ``place``, future types): ``{"type": t}`` with no ``value`` key

    Bad input: ``None`` or a non-mapping gives ``{}``; a property that is not a mapping or has no
    string ``type`` is left out; a malformed payload gives the type's empty value (``None``, ``""``,
    ``[]``, ``0`` or ``False``). Never raises.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name, prop in _mapping(properties).items():
        if not isinstance(prop, Mapping):
            continue
        prop_type = prop.get("type")
        if not isinstance(prop_type, str):
            continue
        known, value = _property_value(prop_type, prop.get(prop_type))
        summary[str(name)] = {"type": prop_type, "value": value} if known else {"type": prop_type}
    return summary


def page_title(page: Mapping[str, Any]) -> str:
    """The page's title as the backend stores it; ``"Untitled"`` when empty.

    Takes the first property whose ``type`` is ``"title"``, renders its rich text with
    :func:`~dbb_orchestration.notion_sync.markdown.rich_text_to_markdown` and trims it (JavaScript
    whitespace set). Characters a database text column cannot hold are dropped first
    (:func:`~dbb_orchestration.content.storable_text`). No title property, a malformed one, or only
    whitespace (or NULs) → ``"Untitled"``.
    """
    for prop in _mapping(page.get("properties")).values():
        if isinstance(prop, Mapping) and prop.get("type") == "title":
            return trim(storable_text(rich_text_to_markdown(prop.get("title")))) or UNTITLED
    return UNTITLED


def property_values(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{name: value}`` from :func:`summarize_properties`: each property's summarised value, ``None`` for
    types without one (``button``, unknown future types). Same bad-input rules as
    :func:`summarize_properties` (never raises)."""
    return {name: entry.get("value") for name, entry in summarize_properties(properties).items()}


def page_metadata(page: Mapping[str, Any], database_id: str, data_source_id: str | None) -> dict[str, Any]:
    """The ``documents.metadata_json`` for a synced page, in the backend's shape (camelCase keys), so a
    row looks the same whichever side wrote it::

        {"databaseId": ..., "dataSourceId": ..., "url": ..., "propertiesSummary": {name: value}}

    ``dataSourceId`` is ``None`` when unknown; a missing or non-string ``url`` becomes ``None``;
    ``propertiesSummary`` is :func:`property_values`.
    """
    return {
        "databaseId": database_id,
        "dataSourceId": data_source_id,
        "url": _string_or_none(page.get("url")),
        "propertiesSummary": property_values(page.get("properties")),
    }


def is_skippable_page(page: Mapping[str, Any]) -> bool:
    """True when the page is archived or in the trash (``archived`` or ``in_trash`` truthy)."""
    return bool(page.get("archived")) or bool(page.get("in_trash"))


def parse_notion_time(value: str) -> datetime:
    """Parse a Notion ISO 8601 timestamp into an aware UTC datetime.

    Accepts ``Z`` and numeric offsets, with or without fractional seconds
    (``2024-03-10T09:15:00.000Z``, ``2024-03-10T11:15:00+02:00``). Raises ``ValueError`` naming the value
    for anything else: non-strings, garbage, dates without a time, and times without an offset (a naive
    time is ambiguous, and Notion never sends one).
    """
    if not isinstance(value, str):
        raise ValueError(f"Notion time must be an ISO 8601 string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"Invalid Notion time: {value!r}") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"Notion time has no UTC offset: {value!r}")
    return parsed.astimezone(UTC)
