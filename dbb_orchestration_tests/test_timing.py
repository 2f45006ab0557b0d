"""Per-user time rules (behaviour §4)."""

from __future__ import annotations

import io
import struct
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from dbb_orchestration.timing import (
    DueDecision,
    ResolvedTimezone,
    as_utc,
    calendar_days_between,
    due_decision,
    in_send_window,
    iso_utc_millis,
    local_date,
    local_hour,
    resolve_timezone,
    start_of_local_day,
    valid_send_hour,
)

NY = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
PARIS = ZoneInfo("Europe/Paris")
AUCKLAND = ZoneInfo("Pacific/Auckland")
HONOLULU = ZoneInfo("Pacific/Honolulu")
UTC_ZONE = ZoneInfo("UTC")


def z(text: str) -> datetime:
    """'2026-01-10T08:00' → aware UTC datetime (tests write instants in UTC)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- resolve_timezone ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("America/New_York", "America/New_York"),
        ("Asia/Kolkata", "Asia/Kolkata"),
        ("UTC", "UTC"),
        ("US/Eastern", "US/Eastern"),  # a link name is a valid IANA key
        ("  Europe/Paris\n", "Europe/Paris"),
        ("europe/paris", "Europe/Paris"),
        ("AMERICA/NEW_YORK", "America/New_York"),
        ("Etc/GMT+5", "Etc/GMT+5"),
    ],
)
def test_resolve_valid_timezone(raw: str, key: str) -> None:
    resolved = resolve_timezone(raw)
    assert resolved.error is None
    assert resolved.name == key
    assert isinstance(resolved.tz, ZoneInfo)
    assert resolved.tz.key == key


def test_resolve_none_is_utc_without_error() -> None:
    assert resolve_timezone(None) == ResolvedTimezone(ZoneInfo("UTC"), "UTC", None)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("Mars/Olympus", "invalid timezone 'Mars/Olympus'; using UTC"),
        ("", "empty timezone; using UTC"),
        ("   ", "empty timezone; using UTC"),
        ("America", "invalid timezone 'America'; using UTC"),  # a directory, not a zone
        ("../etc/passwd", "invalid timezone '../etc/passwd'; using UTC"),
        ("/etc/localtime", "invalid timezone '/etc/localtime'; using UTC"),
        ("localtime", "invalid timezone 'localtime'; using UTC"),  # the server's zone, never a user's
        ("posixrules", "invalid timezone 'posixrules'; using UTC"),
        ("America/New_York\x00", "invalid timezone 'America/New_York\\x00'; using UTC"),
        ("GMT+2", "invalid timezone 'GMT+2'; using UTC"),
        ("+05:30", "invalid timezone '+05:30'; using UTC"),
    ],
)
def test_resolve_invalid_timezone_falls_back_to_utc(raw: str, error: str) -> None:
    resolved = resolve_timezone(raw)
    assert resolved.name == "UTC"
    assert resolved.tz.key == "UTC"
    assert resolved.error == error


def test_resolve_non_string_falls_back_to_utc() -> None:
    resolved = resolve_timezone(42)  # type: ignore[arg-type]
    assert (resolved.name, resolved.error) == ("UTC", "invalid timezone of type int; using UTC")


def test_resolve_long_invalid_name_is_truncated_in_error() -> None:
    resolved = resolve_timezone("X" * 200)
    assert resolved.error == f"invalid timezone '{'X' * 64}...'; using UTC"


def test_resolve_is_cached_per_name() -> None:
    assert resolve_timezone("Asia/Kolkata") is resolve_timezone("Asia/Kolkata")
    assert resolve_timezone("Mars/Olympus") is resolve_timezone("Mars/Olympus")


def test_fallback_zone_behaves_as_utc() -> None:
    tz = resolve_timezone("Mars/Olympus").tz
    assert local_hour(z("2026-01-10T08:00"), tz) == 8
    assert due_decision(z("2026-01-10T08:00"), tz, 8, None, 7) == DueDecision(True, "due")


# --- naive datetimes -------------------------------------------------------------------------------

NAIVE = datetime(2026, 1, 10, 8, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: local_date(NAIVE, UTC_ZONE),
        lambda: local_hour(NAIVE, UTC_ZONE),
        lambda: in_send_window(NAIVE, UTC_ZONE, 8),
        lambda: calendar_days_between(NAIVE, z("2026-01-11T08:00"), UTC_ZONE),
        lambda: calendar_days_between(z("2026-01-09T08:00"), NAIVE, UTC_ZONE),
        lambda: due_decision(NAIVE, UTC_ZONE, 8, None, 1),
        lambda: due_decision(z("2026-01-10T08:00"), UTC_ZONE, 8, NAIVE, 1),
        lambda: due_decision(NAIVE, UTC_ZONE, 25, None, 1),  # checked before the send hour
        lambda: iso_utc_millis(NAIVE),
        lambda: as_utc(NAIVE),
    ],
)
def test_naive_datetimes_are_rejected(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="timezone-aware"):
        call()


def test_naive_error_names_the_argument() -> None:
    with pytest.raises(
        ValueError, match=r"^last_sent_at must be a timezone-aware datetime, got naive 2026-01-10T08:00:00"
    ):
        due_decision(z("2026-01-10T08:00"), UTC_ZONE, 8, NAIVE, 1)


# --- local date and hour ---------------------------------------------------------------------------


def test_paris_new_year_midnight_is_hour_zero() -> None:
    instant = z("2025-12-31T23:30")
    assert local_date(instant, PARIS) == date(2026, 1, 1)
    assert local_hour(instant, PARIS) == 0
    assert in_send_window(instant, PARIS, 0) is True
    assert in_send_window(instant, PARIS, 24) is False
    assert in_send_window(instant, PARIS, 23) is False


def test_auckland_and_honolulu_at_the_same_instant() -> None:
    instant = z("2026-02-08T00:00")
    assert (local_date(instant, AUCKLAND), local_hour(instant, AUCKLAND)) == (date(2026, 2, 8), 13)
    assert (local_date(instant, HONOLULU), local_hour(instant, HONOLULU)) == (date(2026, 2, 7), 14)


def test_local_functions_accept_non_utc_aware_input() -> None:
    instant = datetime(2026, 1, 15, 8, 0, tzinfo=timezone(timedelta(hours=-5)))  # = 13:00Z
    assert local_hour(instant, UTC_ZONE) == 13
    assert local_hour(instant, NY) == 8
    assert local_date(instant, KOLKATA) == date(2026, 1, 15)
    assert local_hour(instant, KOLKATA) == 18  # 13:00Z + 05:30 = 18:30


# --- send hour and window --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hour", "ok"), [(0, True), (8, True), (23, True), (24, False), (25, False), (-1, False)]
)
def test_valid_send_hour_range(hour: int, ok: bool) -> None:
    assert valid_send_hour(hour) is ok


@pytest.mark.parametrize("hour", [True, False, 8.0, "8", None])
def test_valid_send_hour_requires_int(hour: object) -> None:
    assert valid_send_hour(hour) is False


@pytest.mark.parametrize(
    ("instant", "in_window"),
    [
        ("2026-01-15T12:00", False),
        ("2026-01-15T13:00", True),
        ("2026-01-15T13:59:59", True),
        ("2026-01-15T14:00", False),
    ],
)
def test_new_york_winter_send_hour(instant: str, in_window: bool) -> None:
    # EST is UTC-5: local 08:00 is 13:00Z.
    assert in_send_window(z(instant), NY, 8) is in_window


@pytest.mark.parametrize(
    ("instant", "hour", "in_window"),
    [
        ("2026-01-15T02:29", 7, False),
        ("2026-01-15T02:30", 8, True),
        ("2026-01-15T03:29", 8, True),
        ("2026-01-15T03:30", 9, False),
    ],
)
def test_kolkata_half_hour_zone(instant: str, hour: int, in_window: bool) -> None:
    # IST is UTC+05:30: 02:30Z = 08:00 local, 03:30Z = 09:00 local.
    assert local_hour(z(instant), KOLKATA) == hour
    assert in_send_window(z(instant), KOLKATA, 8) is in_window


@pytest.mark.parametrize(
    ("instant", "in_window"),
    [
        # the day before the change: EST, 08:00 local = 13:00Z
        ("2026-03-07T12:00", False),
        ("2026-03-07T13:00", True),
        # spring-forward day 2026-03-08 (02:00 → 03:00 local): EDT, 08:00 local = 12:00Z
        ("2026-03-08T12:00", True),
        ("2026-03-08T13:00", False),
        # fall-back day 2026-11-01: EST again, 08:00 local = 13:00Z
        ("2026-11-01T12:00", False),
        ("2026-11-01T13:00", True),
    ],
)
def test_send_hour_stays_at_local_eight_across_dst(instant: str, in_window: bool) -> None:
    assert in_send_window(z(instant), NY, 8) is in_window


def test_invalid_send_hour_is_never_in_window() -> None:
    instant = z("2026-01-15T08:00")
    assert in_send_window(instant, UTC_ZONE, 25) is False
    assert in_send_window(instant, UTC_ZONE, -16) is False


# --- calendar days ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("earlier", "later", "days"),
    [
        ("2024-02-28T08:00", "2024-02-29T08:00", 1),
        ("2024-02-28T08:00", "2024-03-01T08:00", 2),  # leap day counted
        ("2023-02-28T08:00", "2023-03-01T08:00", 1),  # no leap day
        ("2024-02-29T23:59", "2024-03-01T00:01", 1),  # two minutes, one calendar day
        ("2024-02-29T00:01", "2024-02-29T23:59", 0),  # almost a day, same date
        ("2023-12-31T12:00", "2024-12-31T12:00", 366),
        ("2026-01-12T08:00", "2026-01-10T08:00", -2),  # reversed order is negative
    ],
)
def test_calendar_days_between_utc(earlier: str, later: str, days: int) -> None:
    assert calendar_days_between(z(earlier), z(later), UTC_ZONE) == days


def test_calendar_days_depend_on_the_zone() -> None:
    # 04:00Z on Jan 10 is 23:00 on Jan 9 in New York.
    assert calendar_days_between(z("2026-01-10T04:00"), z("2026-01-10T13:00"), NY) == 1
    assert calendar_days_between(z("2026-01-10T04:00"), z("2026-01-10T13:00"), UTC_ZONE) == 0
    # across the spring-forward night: 23 hours apart, still one local day
    assert calendar_days_between(z("2026-03-07T13:00"), z("2026-03-08T12:00"), NY) == 1


# --- due decision ----------------------------------------------------------------------------------


def due(now: str, tz: ZoneInfo, hour: int, last: str | None, interval: int) -> DueDecision:
    return due_decision(z(now), tz, hour, z(last) if last else None, interval)


def test_never_sent_user_is_due_in_window() -> None:
    assert due("2026-01-10T08:00", UTC_ZONE, 8, None, 7) == DueDecision(True, "due")
    assert due("2026-01-10T08:59:59", UTC_ZONE, 8, None, 30) == DueDecision(True, "due")


def test_never_sent_user_outside_window_is_not_due() -> None:
    assert due("2026-01-10T07:59:59", UTC_ZONE, 8, None, 7) == DueDecision(False, "not_send_hour")
    assert due("2026-01-10T09:00", UTC_ZONE, 8, None, 7) == DueDecision(False, "not_send_hour")


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2026-01-10T08:00", DueDecision(False, "already_sent_today")),
        ("2026-01-11T07:00", DueDecision(False, "not_send_hour")),
        ("2026-01-11T08:00", DueDecision(True, "due")),
        ("2026-01-12T08:00", DueDecision(True, "due")),
        ("2026-01-12T09:00", DueDecision(False, "not_send_hour")),
    ],
)
def test_daily_user_at_0800_utc(now: str, expected: DueDecision) -> None:
    assert due(now, UTC_ZONE, 8, "2026-01-10T08:00", 1) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2026-01-11T08:00", DueDecision(False, "interval_not_elapsed")),
        ("2026-01-12T08:00", DueDecision(False, "interval_not_elapsed")),
        ("2026-01-13T08:00", DueDecision(True, "due")),
        ("2026-01-13T10:00", DueDecision(False, "not_send_hour")),
        ("2026-01-14T08:00", DueDecision(True, "due")),  # a missed day: still due later
    ],
)
def test_three_day_user_at_0800_utc(now: str, expected: DueDecision) -> None:
    assert due(now, UTC_ZONE, 8, "2026-01-10T08:00", 3) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2026-01-11T08:00", DueDecision(False, "interval_not_elapsed")),
        ("2026-01-16T08:00", DueDecision(False, "interval_not_elapsed")),
        ("2026-01-17T08:00", DueDecision(True, "due")),
        ("2026-01-24T08:00", DueDecision(True, "due")),
    ],
)
def test_weekly_user_at_0800_utc(now: str, expected: DueDecision) -> None:
    assert due(now, UTC_ZONE, 8, "2026-01-10T08:00", 7) == expected


def test_sent_thirty_minutes_ago_is_already_sent_today() -> None:
    assert due("2026-01-10T08:30", UTC_ZONE, 8, "2026-01-10T08:00", 1) == DueDecision(
        False, "already_sent_today"
    )
    # sent early in the morning (e.g. a first digest), then the send hour comes round
    assert due("2026-01-10T08:00", UTC_ZONE, 8, "2026-01-10T07:30", 1) == DueDecision(
        False, "already_sent_today"
    )
    # same with a long interval: the same-day check comes first
    assert due("2026-01-10T08:30", UTC_ZONE, 8, "2026-01-10T08:00", 7) == DueDecision(
        False, "already_sent_today"
    )


def test_send_at_0803_yesterday_does_not_block_0800_today() -> None:
    # 23h57m elapsed, but a new local calendar day.
    assert due("2026-01-10T08:00", UTC_ZONE, 8, "2026-01-09T08:03", 1) == DueDecision(True, "due")
    assert due("2026-01-12T08:00", UTC_ZONE, 8, "2026-01-09T08:59", 3) == DueDecision(True, "due")


def test_early_utc_send_counts_on_previous_new_york_day() -> None:
    # 2026-01-10T04:00Z is 2026-01-09 23:00 EST; 2026-01-10T13:00Z is 08:00 EST on Jan 10.
    assert due("2026-01-10T13:00", NY, 8, "2026-01-10T04:00", 1) == DueDecision(True, "due")
    # In UTC the same two instants fall on the same day.
    assert due("2026-01-10T13:00", UTC_ZONE, 13, "2026-01-10T04:00", 1) == DueDecision(
        False, "already_sent_today"
    )


def test_new_york_daily_user_across_spring_forward() -> None:
    # Sent at 08:00 EST on Mar 7 (13:00Z); next 08:00 local is 12:00Z on Mar 8, only 23 hours later.
    assert due("2026-03-08T12:00", NY, 8, "2026-03-07T13:00", 1) == DueDecision(True, "due")
    assert due("2026-03-08T13:00", NY, 8, "2026-03-07T13:00", 1) == DueDecision(False, "not_send_hour")


def test_kolkata_user_due_at_0230_utc() -> None:
    assert due("2026-01-15T02:30", KOLKATA, 8, "2026-01-12T02:30", 3) == DueDecision(True, "due")
    assert due("2026-01-15T03:30", KOLKATA, 8, "2026-01-12T02:30", 3) == DueDecision(False, "not_send_hour")
    # 2026-01-14T19:00Z is 00:30 IST on Jan 15: already "today" for a Kolkata user
    assert due("2026-01-15T02:30", KOLKATA, 8, "2026-01-14T19:00", 1) == DueDecision(
        False, "already_sent_today"
    )


def test_leap_day_interval() -> None:
    # Sent Feb 28 2024; with a 2-day interval the next send is Mar 1 (Feb 29 exists).
    assert due("2024-02-29T08:00", UTC_ZONE, 8, "2024-02-28T08:00", 2) == DueDecision(
        False, "interval_not_elapsed"
    )
    assert due("2024-03-01T08:00", UTC_ZONE, 8, "2024-02-28T08:00", 2) == DueDecision(True, "due")
    # 2023 has no Feb 29: Feb 28 → Mar 1 is a single day
    assert due("2023-03-01T08:00", UTC_ZONE, 8, "2023-02-28T08:00", 2) == DueDecision(
        False, "interval_not_elapsed"
    )
    assert due("2023-03-02T08:00", UTC_ZONE, 8, "2023-02-28T08:00", 2) == DueDecision(True, "due")


@pytest.mark.parametrize("hour", [25, 24, -1])
def test_invalid_send_hour_decision(hour: int) -> None:
    assert due("2026-01-10T08:00", UTC_ZONE, hour, None, 1) == DueDecision(False, "invalid_send_hour")
    assert due("2026-01-10T08:00", UTC_ZONE, hour, "2026-01-01T08:00", 1) == DueDecision(
        False, "invalid_send_hour"
    )


def test_last_send_after_now_is_not_due() -> None:
    # a backfilled hour that is older than the last send
    assert due("2026-01-10T08:00", UTC_ZONE, 8, "2026-01-12T08:00", 1) == DueDecision(
        False, "interval_not_elapsed"
    )


@pytest.mark.parametrize("interval", [0, -3])
def test_interval_below_one_acts_as_one(interval: int) -> None:
    assert due("2026-01-10T08:30", UTC_ZONE, 8, "2026-01-10T08:00", interval) == DueDecision(
        False, "already_sent_today"
    )
    assert due("2026-01-11T08:00", UTC_ZONE, 8, "2026-01-10T08:00", interval) == DueDecision(True, "due")


def test_due_sweep_over_a_month_matches_the_interval() -> None:
    """A 3-day UTC user checked every hour for 30 days, 'sending' whenever due: sends land every 3rd day at 08:00."""
    now = z("2026-01-01T00:00")
    last: datetime | None = None
    sends: list[datetime] = []
    for _ in range(30 * 24):
        decision = due_decision(now, UTC_ZONE, 8, last, 3)
        assert decision.due is (decision.reason == "due")
        if decision.due:
            sends.append(now)
            last = now
        now += timedelta(hours=1)
    assert sends == [z(f"2026-01-{d:02d}T08:00") for d in range(1, 31, 3)]


def test_due_sweep_new_york_daily_keeps_local_eight_through_dst() -> None:
    now = z("2026-03-05T00:00")
    last: datetime | None = None
    local_times: list[str] = []
    for _ in range(6 * 24):
        if due_decision(now, NY, 8, last, 1).due:
            local_times.append(now.astimezone(NY).strftime("%m-%d %H:%M %Z"))
            last = now
        now += timedelta(hours=1)
    assert local_times == [
        "03-05 08:00 EST",
        "03-06 08:00 EST",
        "03-07 08:00 EST",
        "03-08 08:00 EDT",
        "03-09 08:00 EDT",
        "03-10 08:00 EDT",
    ]


# --- start of local day ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "day", "expected"),
    [
        ("Pacific/Auckland", date(2026, 9, 27), "2026-09-26T12:00"),  # DST starts 02:00 that day
        ("Pacific/Auckland", date(2026, 9, 28), "2026-09-27T11:00"),
        ("Pacific/Auckland", date(2026, 4, 5), "2026-04-04T11:00"),  # DST ends 03:00 that day
        ("Pacific/Auckland", date(2026, 4, 6), "2026-04-05T12:00"),
        ("Pacific/Auckland", date(2026, 2, 8), "2026-02-07T11:00"),
        ("UTC", date(2026, 2, 8), "2026-02-08T00:00"),
        ("America/New_York", date(2026, 3, 8), "2026-03-08T05:00"),
        ("America/New_York", date(2026, 3, 9), "2026-03-09T04:00"),
        ("Asia/Kolkata", date(2026, 2, 8), "2026-02-07T18:30"),
        ("Pacific/Honolulu", date(2026, 2, 7), "2026-02-07T10:00"),
        ("Europe/Paris", date(2024, 2, 29), "2024-02-28T23:00"),
        # midnight occurs twice (01:00 CDT → 00:00 CST): the first one
        ("America/Havana", date(2026, 11, 1), "2026-11-01T04:00"),
        # midnight does not exist (00:00 → 01:00): the moment of the jump, 01:00 local
        ("America/Santiago", date(2026, 9, 6), "2026-09-06T04:00"),
        ("Asia/Beirut", date(2026, 3, 29), "2026-03-28T22:00"),
        # the day that never happened: when the skip happens, 2011-12-31 00:00 +14
        ("Pacific/Apia", date(2011, 12, 30), "2011-12-30T10:00"),
        ("Pacific/Apia", date(2011, 12, 31), "2011-12-30T10:00"),
    ],
)
def test_start_of_local_day(zone: str, day: date, expected: str) -> None:
    result = start_of_local_day(day, ZoneInfo(zone))
    assert result == z(expected)
    assert result.tzinfo is UTC
    assert result.utcoffset() == timedelta(0)


def _tzif_from_posix_rule(rule: str, std_offset_seconds: int, abbr: bytes) -> ZoneInfo:
    """A zone with no transitions table, driven entirely by a POSIX TZ footer (TZif version 2)."""

    def block() -> bytes:
        header = b"TZif2" + b"\x00" * 15 + struct.pack(">6l", 0, 0, 0, 0, 1, len(abbr) + 1)
        return header + struct.pack(">lBB", std_offset_seconds, 0, 0) + abbr + b"\x00"

    data = block() + block() + b"\n" + rule.encode() + b"\n"
    return ZoneInfo.from_file(io.BytesIO(data), key="Test/GapAcrossMidnight")


def test_start_of_local_day_when_the_gap_straddles_midnight() -> None:
    # Clocks jump from 23:30 (UTC-3) to 00:30 (UTC-2) on the first Sunday of September.
    tz = _tzif_from_posix_rule("XST3XDT,M9.1.0/23:30,M4.1.0/3", -3 * 3600, b"XST")
    assert z("2026-09-07T02:29:59").astimezone(tz).replace(tzinfo=None) == datetime(2026, 9, 6, 23, 29, 59)
    assert z("2026-09-07T02:30").astimezone(tz).replace(tzinfo=None) == datetime(2026, 9, 7, 0, 30)
    # so Sep 7 starts at 00:30 local = 02:30Z (naive local midnight read as UTC-3 would give 03:00Z)
    assert start_of_local_day(date(2026, 9, 7), tz) == z("2026-09-07T02:30")
    assert start_of_local_day(date(2026, 9, 6), tz) == z("2026-09-06T03:00")


def test_start_of_local_day_with_fixed_offset_tzinfo() -> None:
    tz = timezone(timedelta(hours=5, minutes=45))
    assert start_of_local_day(date(2026, 2, 8), tz) == z("2026-02-07T18:15")


@pytest.mark.parametrize(
    "zone",
    [
        "America/New_York",
        "Pacific/Auckland",
        "Europe/London",
        "America/Santiago",
        "Asia/Beirut",
        "America/Havana",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "Pacific/Chatham",
        "Africa/Cairo",
        "America/St_Johns",
    ],
)
def test_start_of_local_day_is_the_first_instant_of_that_date(zone: str) -> None:
    tz = ZoneInfo(zone)
    day = date(2026, 1, 1)
    while day.year == 2026:
        start = start_of_local_day(day, tz)
        assert start.astimezone(tz).date() == day, day
        assert (start - timedelta(seconds=1)).astimezone(tz).date() < day, day
        day += timedelta(days=1)


# --- ISO formatting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 2, 8, tzinfo=UTC), "2026-02-08T00:00:00.000Z"),
        (datetime(2026, 2, 8, 13, 5, 9, 123999, tzinfo=UTC), "2026-02-08T13:05:09.123Z"),  # truncated
        (datetime(2026, 2, 8, 13, 5, 9, 999, tzinfo=UTC), "2026-02-08T13:05:09.000Z"),
        (datetime(2026, 2, 8, 13, 0, tzinfo=ZoneInfo("Pacific/Auckland")), "2026-02-08T00:00:00.000Z"),
        (
            datetime(2026, 2, 8, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2026-02-08T00:00:00.000Z",
        ),
        (datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "0999-01-02T03:04:05.000Z"),
    ],
)
def test_iso_utc_millis(value: datetime, text: str) -> None:
    assert iso_utc_millis(value) == text


def test_iso_utc_millis_of_start_of_day_seed() -> None:
    start = start_of_local_day(date(2026, 2, 8), UTC_ZONE)
    assert f"user_1:{iso_utc_millis(start)}" == "user_1:2026-02-08T00:00:00.000Z"


def test_as_utc() -> None:
    value = as_utc(datetime(2026, 1, 15, 8, 0, tzinfo=NY))
    assert value == z("2026-01-15T13:00")
    assert value.tzinfo is UTC
