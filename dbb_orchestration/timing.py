"""Per-user time rules (behaviour §4), as pure functions with an explicit ``now``.

Every function here takes timezone-aware datetimes and raises ``ValueError`` naming the argument when
given a naive one (a naive value would silently be read as the server's local time). Every datetime
returned is timezone-aware UTC. Timezones are IANA names resolved once per name through
:func:`resolve_timezone`, which never raises: bad names fall back to UTC and carry an error string
for the caller to report.
"""

from __future__ import annotations

import functools
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal

__all__ = [
    "UTC",
    "DueDecision",
    "DueReason",
    "ResolvedTimezone",
    "as_utc",
    "calendar_days_between",
    "due_decision",
    "in_send_window",
    "iso_utc_millis",
    "local_date",
    "local_hour",
    "require_aware",
    "resolve_timezone",
    "start_of_local_day",
    "valid_send_hour",
]

UTC_ZONE = zoneinfo.ZoneInfo("UTC")
# Keys the zone database lists that must not be used as a user's zone: ``localtime`` is the *server's*
# zone (a symlink in /usr/share/zoneinfo), ``posixrules`` is an internal template.
_EXCLUDED_KEYS = frozenset({"localtime", "posixrules"})
_MAX_NAME_IN_ERROR = 64


@dataclass(frozen=True)
class ResolvedTimezone:
    """A user's zone after validation.

    ``name`` is the IANA key actually used (``"UTC"`` after a fallback); ``error`` is ``None`` when the
    stored name was used as is, else a short message for operators, e.g.
    ``"invalid timezone 'Mars/Olympus'; using UTC"``.
    """

    tz: zoneinfo.ZoneInfo
    name: str
    error: str | None = None


@functools.cache
def _known_keys() -> dict[str, str]:
    """Lower-cased key → canonical key, for every zone the installed zone database lists (computed once)."""
    keys = sorted(k for k in zoneinfo.available_timezones() if k not in _EXCLUDED_KEYS)
    by_lower: dict[str, str] = {}
    for key in keys:
        by_lower.setdefault(key.lower(), key)
    return by_lower


@functools.lru_cache(maxsize=4096)
def resolve_timezone(name: str | None) -> ResolvedTimezone:
    """Resolve a stored timezone string to a :class:`ZoneInfo`; never raises.

    - ``None`` (user without a settings row) → UTC, no error (UTC is the documented default).
    - An IANA key of the installed zone database (``"America/New_York"``, ``"Asia/Kolkata"``, ``"UTC"``,
      links such as ``"US/Eastern"``) → that zone, no error. Surrounding whitespace is ignored, and a
      key differing only in letter case (``"europe/paris"``) resolves to the canonical key, as
      JavaScript's ``Intl`` APIs accept it too.
    - Anything else — empty or blank, unknown (``"Mars/Olympus"``), a path (``"../etc"``,
      ``"/etc/localtime"``), a directory (``"America"``), the server-local ``"localtime"`` — → UTC with
      ``error`` set, e.g. ``"invalid timezone 'Mars/Olympus'; using UTC"``. A non-string (hashable)
      value is treated the same way.

    Results are cached per distinct input (the hourly run resolves one zone per user).
    """
    if name is None:
        return ResolvedTimezone(UTC_ZONE, "UTC", None)
    if not isinstance(name, str):
        return ResolvedTimezone(UTC_ZONE, "UTC", f"invalid timezone of type {type(name).__name__}; using UTC")
    cleaned = name.strip()
    if cleaned == "":
        return ResolvedTimezone(UTC_ZONE, "UTC", "empty timezone; using UTC")
    key = _known_keys().get(cleaned.lower())
    if key is not None:
        try:
            return ResolvedTimezone(zoneinfo.ZoneInfo(key), key, None)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass  # listed but unreadable: fall through to the fallback
    shown = cleaned if len(cleaned) <= _MAX_NAME_IN_ERROR else cleaned[:_MAX_NAME_IN_ERROR] + "..."
    return ResolvedTimezone(UTC_ZONE, "UTC", f"invalid timezone {shown!r}; using UTC")


def require_aware(value: datetime, what: str = "datetime") -> datetime:
    """Return ``value`` unchanged if it is timezone-aware; raise ``ValueError`` naming ``what`` if naive."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{what} must be a timezone-aware datetime, got naive {value.isoformat()} "
            "(attach a tzinfo, e.g. datetime.UTC, before calling)"
        )
    return value


def as_utc(value: datetime, what: str = "datetime") -> datetime:
    """The same instant as an aware UTC datetime; naive input raises ``ValueError``."""
    return require_aware(value, what).astimezone(UTC)


def local_date(instant: datetime, tz: tzinfo) -> date:
    """Calendar date of ``instant`` in ``tz`` (the user's *local day*). Naive ``instant`` → ``ValueError``."""
    return require_aware(instant, "instant").astimezone(tz).date()


def local_hour(instant: datetime, tz: tzinfo) -> int:
    """Local wall-clock hour of ``instant`` in ``tz``, 0–23 (midnight is 0). Naive → ``ValueError``."""
    return require_aware(instant, "instant").astimezone(tz).hour


def valid_send_hour(hour: object) -> bool:
    """Whether ``hour`` is a usable preferred send hour: an ``int`` (not ``bool``) in 0..23."""
    return isinstance(hour, int) and not isinstance(hour, bool) and 0 <= hour <= 23


def in_send_window(now: datetime, tz: tzinfo, preferred_send_hour: int) -> bool:
    """Whether the local hour of ``now`` equals ``preferred_send_hour``.

    An invalid send hour (see :func:`valid_send_hour`) is never in the window. Naive ``now`` →
    ``ValueError``.
    """
    hour = local_hour(now, tz)
    return valid_send_hour(preferred_send_hour) and hour == preferred_send_hour


def calendar_days_between(earlier: datetime, later: datetime, tz: tzinfo) -> int:
    """Number of local calendar days from ``earlier``'s local date to ``later``'s local date in ``tz``.

    Counts dates, not elapsed hours: 23:59 → 00:01 the next local day is 1; 00:01 → 23:59 the same day
    is 0. Negative when ``earlier`` falls on a later local date than ``later``. Naive input →
    ``ValueError``.
    """
    start = local_date(require_aware(earlier, "earlier"), tz)
    end = local_date(require_aware(later, "later"), tz)
    return (end - start).days


def _wall(instant: datetime, tz: tzinfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def start_of_local_day(day: date, tz: tzinfo) -> datetime:
    """The UTC instant at which local date ``day`` begins in ``tz``.

    Normally local midnight with the offset in force at that midnight (which on a DST-change day can
    differ from the offset later that day: 2026-09-27 in Pacific/Auckland → 2026-09-26T12:00Z). When
    midnight occurs twice (clocks go back to midnight), the first occurrence. When local midnight does
    not exist (clocks jump forward across midnight, e.g. America/Santiago on 2026-09-06 or Asia/Beirut
    on the last Sunday of March), the first instant whose local date is ``day``, i.e. the moment of
    the jump. If ``day`` was skipped entirely (Pacific/Apia 2011-12-30), the moment the skip happens,
    which is the start of the following local day.
    """
    naive = datetime.combine(day, time.min)
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(first, tz) == naive:
        return first
    # Midnight is in a gap. The two folds give instants on either side of the jump; the local date
    # moves from before ``day`` to ``day`` (or later) exactly once between them: find it to the second.
    second = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    lo, hi = min(first, second), max(first, second)
    if lo.astimezone(tz).date() >= day:
        return lo
    if hi.astimezone(tz).date() < day:
        return hi
    lo_s, hi_s = 0, int((hi - lo).total_seconds())
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if (lo + timedelta(seconds=mid)).astimezone(tz).date() >= day:
            hi_s = mid
        else:
            lo_s = mid
    return lo + timedelta(seconds=hi_s)


DueReason = Literal["due", "not_send_hour", "already_sent_today", "interval_not_elapsed", "invalid_send_hour"]


@dataclass(frozen=True)
class DueDecision:
    """Whether a user's digest should be sent now, and why (``reason`` is ``"due"`` exactly when ``due``)."""

    due: bool
    reason: DueReason


def due_decision(
    now: datetime,
    tz: tzinfo,
    preferred_send_hour: int,
    last_sent_at: datetime | None,
    interval_days: int,
) -> DueDecision:
    """behaviour §4 *Due*, checked in this order (the first failing check is the reason):

    1. ``invalid_send_hour`` — ``preferred_send_hour`` is not an int in 0..23;
    2. ``not_send_hour`` — the local hour of ``now`` is not the send hour;
    3. ``already_sent_today`` — ``last_sent_at`` is on the same local date as ``now``;
    4. ``interval_not_elapsed`` — fewer than ``interval_days`` local calendar days between the local
       date of ``last_sent_at`` and that of ``now`` (also when ``last_sent_at`` is on a later local
       date than ``now``, as when an old hour is backfilled);
    5. otherwise ``due`` (including never sent: ``last_sent_at`` is ``None``).

    ``interval_days`` should already be the effective interval (see
    :func:`dbb_orchestration.plans.effective_interval_days`); values below 1 act as 1, since a send on
    the same local day always blocks. Naive datetimes → ``ValueError``.
    """
    require_aware(now, "now")
    if last_sent_at is not None:
        require_aware(last_sent_at, "last_sent_at")
    if not valid_send_hour(preferred_send_hour):
        return DueDecision(False, "invalid_send_hour")
    if not in_send_window(now, tz, preferred_send_hour):
        return DueDecision(False, "not_send_hour")
    if last_sent_at is not None:
        days = calendar_days_between(last_sent_at, now, tz)
        if days == 0:
            return DueDecision(False, "already_sent_today")
        if days < interval_days:
            return DueDecision(False, "interval_not_elapsed")
    return DueDecision(True, "due")


def iso_utc_millis(value: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, like JavaScript's ``Date.toISOString()``:
    ``2026-02-08T00:00:00.000Z``. Microseconds are truncated (not rounded) to milliseconds, as a
    JavaScript ``Date`` holds only milliseconds. Naive input → ``ValueError``."""
    utc = as_utc(value, "value")
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )
