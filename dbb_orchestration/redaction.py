"""One scrubber for everything that leaves the process: error messages, ``error_json``,
``email_sends.payload_json``, run tags, event logs and stderr.

Provider and database errors can quote what they were given: a recipient address ("The address
…@… is on the suppression list"), an API key, a bearer token, a connection URL with its password.
:func:`scrub` removes all of them from a string; :func:`scrub_json` does the same for every string
(and key) inside a JSON-like value. Both are pure and idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SUMMARY_LIMIT", "scrub", "scrub_json"]

SUMMARY_LIMIT = 500

# scheme://user:password@host → scheme://[redacted]@host (before the address rule sees "password@host")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@:]+(?::[^\s/@]*)?@")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_BEARER = re.compile(r"\b(?:Bearer|Basic)\s+[^\s,;\"']+", re.IGNORECASE)
_SECRET = re.compile(
    r"\b(?:re_[A-Za-z0-9_]{6,}|secret_[A-Za-z0-9]{6,}|ntn_[A-Za-z0-9]{6,})"
    r"|(?i:\b(?:api[_-]?key|token|secret|password|passwd|authorization)\b\s*[=:]\s*)[^\s,;&\"']+"
)


def _secret(match: re.Match[str]) -> str:
    text = match.group(0)
    # keep the "name=" of a name=value pair so the message still says what was hidden
    found = re.match(r"(?i)\s*(api[_-]?key|token|secret|password|passwd|authorization)\s*[=:]\s*", text)
    return f"{found.group(0)}[redacted]" if found else "[redacted]"


# Every match of the four patterns above contains one of these (case-insensitively): "@" (URL
# credentials, addresses), "bearer"/"basic", "re_"/"secret"/"ntn_" or a secret's name. A string with
# none of them, no whitespace to collapse and within the limit is returned as it is without running them
# (most of a payload: ids, timestamps, statuses), which keeps scrubbing a page's payloads cheap.
_MAY_HOLD_SECRET = re.compile(r"@|bearer|basic|re_|secret|ntn_|api|token|passw|authorization", re.IGNORECASE)
_UNTIDY_SPACE = re.compile(r"^\s|\s$|\s\s|[^\S ]")


def _clean_as_is(value: str, limit: int | None) -> bool:
    """True when :func:`scrub` would return ``value`` unchanged (the fast path; see above)."""
    if limit is not None and len(value) > limit:
        return False
    return _MAY_HOLD_SECRET.search(value) is None and _UNTIDY_SPACE.search(value) is None


def scrub(text: object, limit: int | None = SUMMARY_LIMIT) -> str:
    """``text`` without email addresses (→ ``[email]``), API keys (``re_…``, ``ntn_…``, ``secret_…``),
    bearer tokens, ``key=value`` secrets and URL credentials (→ ``[redacted]``); whitespace collapsed;
    cut to ``limit`` characters (``None``: no cut)."""
    value = "" if text is None else str(text)
    if _clean_as_is(value, limit):
        return value
    return _scrub_slow(value, limit)


def _scrub_slow(value: str, limit: int | None) -> str:
    value = _URL_CREDENTIALS.sub(r"\g<scheme>[redacted]@", value)
    value = _BEARER.sub("[redacted]", value)
    value = _SECRET.sub(_secret, value)
    value = _EMAIL.sub("[email]", value)
    value = " ".join(value.split())
    if limit is not None and len(value) > limit:
        value = value[: limit - 3] + "..."
    return value


def scrub_json(value: Any, limit: int | None = SUMMARY_LIMIT) -> Any:
    """``value`` with :func:`scrub` applied to every string inside it (dict keys included); numbers,
    booleans and ``None`` unchanged; tuples become lists."""
    if isinstance(value, str):
        return scrub(value, limit)
    if isinstance(value, Mapping):
        return {scrub(k, None) if isinstance(k, str) else k: scrub_json(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_json(v, limit) for v in value]
    return value
