"""The digest lifecycle on logical time: one digest per user per local day, made only where it is sent
or seen, and backfills that catch up instead of piling up (generation + sending, SQLite and Postgres)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.config import Settings, SettingsError
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import shared_engine
from dbb_orchestration.definitions import build_resources
from dbb_orchestration.digests.defs import SUMMARY_OP, digest_hourly_job
from dbb_orchestration.digests.generate import (
    GenerateReport,
    UserPlan,
    generate_digests,
    generation_decision,
    outside_catch_up_window,
    user_plan,
)
from dbb_orchestration.digests.queries import GenerationFacts, UserRow
from dbb_orchestration.digests.send import SUPERSEDED, SendReport, due_check, send_due_digests
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration.timing import resolve_timezone, start_of_local_day
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.digests.test_generate import settings_for

TODAY = datetime(2026, 2, 15, tzinfo=UTC)  # a Sunday; every user below is in UTC unless said
WALL = TODAY + timedelta(hours=8, minutes=30)  # the location's clock: today 08:30


def hour(day_offset: int, h: int) -> datetime:
    return TODAY + timedelta(days=day_offset, hours=h)


# ------------------------------------------------------------------------------------------ pure rules


def plan_for(tz: str = "UTC", send_hour: int = 8, interval: int | None = None) -> UserPlan:
    row = UserRow(
        id="u",
        name=None,
        email="u@example.test",
        email_verified=True,
        has_settings=True,
        digest_interval_days=interval or 1,
        notes_per_digest=5,
        timezone=tz,
        preferred_send_hour=send_hour,
        has_pro_subscription=True,  # interval 1 allowed
    )
    return user_plan(row, "cloud")


def test_catch_up_window_counts_from_the_end_of_the_partitions_hour() -> None:
    now = hour(-1, 8)  # yesterday 08:00-09:00
    assert not outside_catch_up_window(now, hour(0, 9), 24)  # ended exactly 24 h ago
    assert outside_catch_up_window(now, hour(0, 9) + timedelta(seconds=1), 24)
    assert not outside_catch_up_window(
        hour(0, 8),
        hour(
            0,
            8,
        )
        + timedelta(minutes=59),
        0,
    )  # hour in progress
    assert outside_catch_up_window(
        hour(0, 7),
        hour(
            0,
            8,
        )
        + timedelta(seconds=1),
        0,
    )
    assert not outside_catch_up_window(hour(0, 9), hour(0, 8), 0)  # a future hour is never outside
    with pytest.raises(ValueError, match="now"):
        outside_catch_up_window(datetime(2026, 2, 15), WALL, 24)


def test_due_check_with_the_clock_serves_only_the_newest_missed_send_hour() -> None:
    plan = plan_for()
    last = hour(-10, 8)
    assert due_check(plan, last, hour(0, 8)).due  # no clock: the plain rule
    # today 08:30: the 08:00 hours of earlier days are stale catch-ups, today's is due
    assert due_check(plan, last, hour(-1, 8), wall=WALL).reason == "later_send_hour_passed"
    assert due_check(plan, last, hour(-7, 8), wall=WALL).reason == "later_send_hour_passed"
    assert due_check(plan, last, hour(0, 8), wall=WALL).due
    # at 07:30 today the newest send hour that has begun is yesterday's: that one is due
    early = hour(0, 7) + timedelta(minutes=30)
    assert due_check(plan, last, hour(-1, 8), wall=early).due
    assert due_check(plan, last, hour(-2, 8), wall=early).reason == "later_send_hour_passed"
    # a send later than the logical day always blocks (never an older day after a newer one)
    assert due_check(plan, hour(0, 8), hour(-1, 8), wall=WALL).reason == "interval_not_elapsed"
    # the first-digest bypass is unaffected
    assert due_check(plan, None, hour(-1, 3), wall=WALL, first_digest_bypass=True).reason == "first_digest"


def test_a_send_hour_missing_on_a_dst_day_does_not_supersede_the_day_before() -> None:
    """02:00 does not exist in New York on 2026-03-08 (spring forward): at 05:00 local that day, the
    newest 02:00 that began is on March 7, so March 7's 02:00 hour is still the one to catch up."""
    plan = plan_for("America/New_York", send_hour=2)
    mar7_2am = datetime(2026, 3, 7, 7, tzinfo=UTC)  # 02:00 EST
    wall = datetime(2026, 3, 8, 9, tzinfo=UTC)  # 05:00 EDT on March 8
    assert due_check(plan, None, mar7_2am, wall=wall).due
    wall_next = datetime(2026, 3, 9, 6, 30, tzinfo=UTC)  # 02:30 EDT on March 9
    assert due_check(plan, None, mar7_2am, wall=wall_next).reason == "later_send_hour_passed"


def test_generation_decision() -> None:
    plan = plan_for(send_hour=8, interval=3)
    now = hour(0, 8)
    never = GenerationFacts()
    sent_long_ago = GenerationFacts(last_sent_at=hour(-5, 8))
    sent_yesterday = GenerationFacts(last_sent_at=hour(-1, 8))
    has_today = GenerationFacts(last_sent_at=hour(-5, 8), near_stamps=(TODAY,))
    decide = generation_decision
    assert decide(plan, emailable=True, facts=sent_long_ago, now=now, wall=WALL) == (True, "due")
    assert decide(plan, emailable=True, facts=has_today, now=now, wall=WALL) == (False, "already_generated")
    assert decide(plan, emailable=True, facts=sent_yesterday, now=now, wall=WALL) == (
        False,
        "interval_not_elapsed",
    )
    assert decide(plan, emailable=True, facts=sent_long_ago, now=hour(0, 3), wall=WALL) == (
        False,
        "not_send_hour",
    )
    assert decide(plan, emailable=False, facts=sent_long_ago, now=now, wall=WALL) == (False, "not_emailable")
    # never sent: one a day for the dashboard, for the current day only
    assert decide(plan, emailable=False, facts=never, now=hour(0, 0), wall=WALL) == (True, "never_sent")
    assert decide(plan, emailable=True, facts=never, now=hour(0, 3), wall=WALL) == (True, "never_sent")
    assert decide(plan, emailable=False, facts=never, now=hour(-3, 0), wall=WALL) == (False, "past_day")
    # a digest stamped yesterday (UTC) is on today's local day in Auckland
    akl = plan_for("Pacific/Auckland")
    yesterday_late = GenerationFacts(near_stamps=(hour(-1, 12),))  # 01:00 Feb 15 in Auckland
    assert decide(akl, emailable=True, facts=yesterday_late, now=hour(0, 1), wall=WALL) == (
        False,
        "already_generated",
    )


# ------------------------------------------------------------------------------------------ the world


def person(
    conn: sa.Connection,
    uid: str,
    *,
    tz: str = "UTC",
    send_hour: int = 8,
    interval: int = 1,
    verified: bool = True,
    last_sent: datetime | None = None,
    notes: int = 3,
) -> None:
    f.user(conn, uid, email_verified=verified)
    f.settings(
        conn,
        uid,
        timezone=tz,
        preferred_send_hour=send_hour,
        digest_interval_days=interval,
        notes_per_digest=2,
    )
    f.subscription(conn, uid)  # Pro: interval 1 allowed
    if notes:
        conn_id = f.connection(conn, uid)
        for n in range(notes):
            f.document(conn, uid, conn_id, external_id=f"{uid}-{n}", markdown=f"note {n}")
    if last_sent is not None:
        f.digest(conn, uid, status="sent", scheduled_for=last_sent, created_at=last_sent, sent_at=last_sent)


def rows(engine: sa.Engine, uid: str | None = None) -> list[Any]:
    d = t.note_digests
    stmt = sa.select(d.c.id, d.c.user_id, d.c.status, d.c.scheduled_for, d.c.payload_json).order_by(d.c.id)
    if uid is not None:
        stmt = stmt.where(d.c.user_id == uid)
    with engine.connect() as conn:
        return list(conn.execute(stmt))


def count_rows(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        digests = conn.execute(sa.select(sa.func.count()).select_from(t.note_digests)).scalar_one()
        items = conn.execute(sa.select(sa.func.count()).select_from(t.note_digest_items)).scalar_one()
    return int(digests), int(items)


class Location:
    """Runs hourly partitions (generation, then sending through the real SDK to the fake) with the
    location's clock pinned to ``wall``."""

    def __init__(self, engine: sa.Engine, fake: FakeResend, wall: datetime, catch_up_hours: int = 24):
        self.engine = engine
        self.fake = fake
        self.wall = wall
        self.settings = settings_for(engine, now_override=wall, digest_catch_up_hours=catch_up_hours)

    def run(self, now: datetime) -> tuple[GenerateReport, SendReport | None]:
        clock = lambda: self.wall  # noqa: E731
        gen = generate_digests(self.engine, now, self.settings, clock=clock)
        if gen.outside_catch_up_window:
            return gen, None
        sent = send_due_digests(self.engine, resend_sender(self.fake), self.settings, now, clock=clock)
        return gen, sent


# ------------------------------------------------------------------------------------------ lifecycle


def test_rerunning_every_hour_of_a_day_creates_nothing(engine: sa.Engine, fake_resend: FakeResend) -> None:
    with engine.begin() as conn:
        person(conn, "due8", last_sent=hour(-3, 8))
        person(conn, "due20", send_hour=20, last_sent=hour(-3, 20))
        person(conn, "fresh", send_hour=15)  # never sent
        person(conn, "unverified", verified=False, notes=0)
        person(conn, "veteran", interval=7, last_sent=hour(-2, 8))  # not due today
    loc = Location(engine, fake_resend, wall=hour(0, 23) + timedelta(minutes=30))
    for h in range(24):
        loc.run(hour(0, h))
    first = count_rows(engine)
    emails = len(fake_resend.sent)
    reruns = [loc.run(hour(0, h))[0] for h in range(24)]
    assert sum(r.rows_created for r in reruns) == 0
    assert count_rows(engine) == first and len(fake_resend.sent) == emails
    today = [r for r in rows(engine) if r.scheduled_for == TODAY]
    assert sorted(r.user_id for r in today) == ["due20", "due8", "fresh", "unverified"]
    assert {r.user_id: r.status for r in today} == {
        "due8": "sent",
        "due20": "sent",
        "fresh": "sent",  # its 15:00 send hour
        "unverified": "skipped",  # no documents: the dashboard's skipped digest
    }
    assert sorted(d.to[0].split("@")[0] for d in fake_resend.sent) == ["due20", "due8", "fresh"]


def test_backfill_of_a_week_back_then_today_leaves_one_digest_for_today(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        person(conn, "due", last_sent=hour(-10, 8))
        person(conn, "fresh", send_hour=11)  # never sent, not due at 08:00 or 09:00
    loc = Location(engine, fake_resend, wall=WALL, catch_up_hours=24 * 8)
    week_back, _ = loc.run(hour(-7, 8))
    assert week_back.rows_created == 0
    assert dict(week_back.not_needed) == {"later_send_hour_passed": 1, "past_day": 1}
    loc.run(hour(0, 8))
    loc.run(hour(0, 9))
    for uid in ("due", "fresh"):
        mine = [r for r in rows(engine, uid) if r.status != "sent" or r.scheduled_for >= TODAY]
        assert [r.scheduled_for for r in mine] == [TODAY], uid
    assert [d.to[0] for d in fake_resend.sent] == ["due@example.test"]


def test_a_missed_week_backfilled_sends_the_newest_digest_once_and_leaves_nothing_stale(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """The location was down for a week; an operator backfills it (within a wide catch-up window), in
    order, then today's hours run. Each user gets one email, today's, and no older digest stays
    pending."""
    with engine.begin() as conn:
        person(conn, "veteran", last_sent=hour(-9, 8))
        person(conn, "weekly", interval=7, last_sent=hour(-20, 8))
        person(conn, "fresh")  # never sent, with a digest left pending from before the outage
        f.digest(conn, "fresh", scheduled_for=hour(-8, 0), created_at=hour(-8, 0))
        person(conn, "stuck", last_sent=hour(-9, 8))  # a failed-looking leftover: scheduled, pre-outage
        f.digest(conn, "stuck", scheduled_for=hour(-8, 0), created_at=hour(-8, 0))
    loc = Location(engine, fake_resend, wall=WALL, catch_up_hours=24 * 8)
    for day in range(-7, 0):
        for h in (0, 8, 12):
            gen, sent = loc.run(hour(day, h))
            assert gen.rows_created == 0, (day, h)
            assert sent is not None and sent.sent == 0, (day, h)
    loc.run(hour(0, 0))
    loc.run(hour(0, 8))
    assert sorted(d.to[0].split("@")[0] for d in fake_resend.sent) == ["fresh", "stuck", "veteran", "weekly"]
    subjects = {d.to[0].split("@")[0]: d.subject for d in fake_resend.sent}
    assert subjects["fresh"].startswith("Your first Brain Bits")
    assert not any(subjects[u].startswith("Your first") for u in ("veteran", "weekly", "stuck"))
    for uid in ("veteran", "weekly", "fresh", "stuck"):
        sent_now = [r for r in rows(engine, uid) if r.status == "sent" and r.scheduled_for >= hour(-8, 0)]
        assert [r.scheduled_for for r in sent_now] == [TODAY], uid
    pending = [r for r in rows(engine) if r.status in ("scheduled", "failed")]
    assert pending == []
    superseded = [r for r in rows(engine) if r.status == "skipped"]
    assert sorted(r.user_id for r in superseded) == ["fresh", "stuck"]
    assert all(r.payload_json["reason"] == SUPERSEDED for r in superseded)


def test_outside_the_catch_up_window_nothing_is_created_or_sent(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        person(conn, "due", last_sent=hour(-10, 8))
        person(conn, "fresh", verified=False)
    loc = Location(engine, fake_resend, wall=WALL)
    gen, sent = loc.run(hour(-2, 8))
    assert gen.outside_catch_up_window and sent is None
    assert gen.metadata()["outside_catch_up_window"] is True and gen.users_considered == 0
    assert rows(engine, "fresh") == [] and len(rows(engine, "due")) == 1
    assert fake_resend.sent == []


def test_never_sent_users_still_get_a_digest_a_day_for_the_dashboard(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        person(conn, "unverified", verified=False)
        person(conn, "empty", verified=False, notes=0)
        person(conn, "veteran", send_hour=20, last_sent=hour(-3, 20))  # not due at 00:00: nothing
    loc = Location(engine, fake_resend, wall=hour(0, 0) + timedelta(minutes=1))
    gen, _ = loc.run(hour(0, 0))
    assert dict(gen.created_for) == {"never_sent": 2}
    assert dict(gen.not_needed) == {"not_send_hour": 1}
    assert (gen.rows_created, gen.digests_created, dict(gen.skipped)) == (2, 1, {"no_documents": 1})
    assert [(r.status, r.scheduled_for) for r in rows(engine, "unverified")] == [("scheduled", TODAY)]
    (empty,) = rows(engine, "empty")
    assert (empty.status, empty.payload_json["reason"]) == ("skipped", "no_documents")
    assert len(rows(engine, "veteran")) == 1  # only the old sent one
    # the next day: one more each
    loc.wall = hour(1, 0) + timedelta(minutes=1)
    gen, _ = loc.run(hour(1, 0))
    assert gen.rows_created == 2


def test_rows_created_per_run_are_the_due_and_never_sent_users(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        for n in range(6):
            person(conn, f"not-due-{n}", send_hour=9, last_sent=hour(-3, 9))
        for n in range(2):
            person(conn, f"due-{n}", last_sent=hour(-3, 8))
        person(conn, "fresh", send_hour=9)
    loc = Location(engine, fake_resend, wall=hour(0, 8) + timedelta(minutes=1))
    gen, sent = loc.run(hour(0, 8))
    assert (gen.users_considered, gen.rows_created) == (9, 3)
    assert dict(gen.created_for) == {"due": 2, "never_sent": 1}
    assert dict(gen.not_needed) == {"not_send_hour": 6}
    assert gen.metadata()["rows_created"] == 3 and gen.metadata()["items_created"] == 6
    assert sent is not None and sent.sent == 2


@pytest.mark.parametrize(
    ("tz", "day"),
    [
        ("America/New_York", date(2026, 3, 8)),  # spring forward: 02:00 → 03:00, a 23-hour day
        ("America/New_York", date(2026, 11, 1)),  # fall back: 02:00 → 01:00, a 25-hour day
        ("Europe/London", date(2026, 3, 29)),
        ("Europe/London", date(2026, 10, 25)),
    ],
)
def test_dst_days_get_one_digest_sent_at_the_local_send_hour(
    engine: sa.Engine, fake_resend: FakeResend, tz: str, day: date
) -> None:
    with engine.begin() as conn:
        person(
            conn, "due", tz=tz, last_sent=datetime.combine(day, datetime.min.time(), UTC) - timedelta(days=3)
        )
        person(conn, "fresh", tz=tz, verified=False)
    zone = resolve_timezone(tz).tz
    start, end = start_of_local_day(day, zone), start_of_local_day(day + timedelta(days=1), zone)
    hours = []
    at = start
    while at < end:
        hours.append(at)
        at += timedelta(hours=1)
    assert len(hours) in (23, 25)
    loc = Location(engine, fake_resend, wall=start)
    for h in hours:
        loc.wall = h + timedelta(minutes=5)
        loc.run(h)
    for h in hours:  # the whole day again, later the same day
        gen, _ = loc.run(h)
        assert gen.rows_created == 0
    for uid in ("due", "fresh"):
        on_day = [r for r in rows(engine, uid) if r.scheduled_for >= start]
        assert [r.scheduled_for for r in on_day] == [start], uid
    (email,) = fake_resend.sent
    assert email.to == ["due@example.test"]
    sent_at = [r for r in rows(engine, "due") if r.scheduled_for == start][0]
    assert sent_at.status == "sent"


# ------------------------------------------------------------------------------------------ Dagster


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def test_the_job_outside_the_window_creates_and_sends_nothing(
    instance: dg.DagsterInstance, db_url: str, fake_resend: FakeResend
) -> None:
    engine = shared_engine(db_url)
    with engine.begin() as conn:
        person(conn, "due", last_sent=hour(-10, 8))
    env = {
        "DATABASE_URL": db_url,
        "DBB_NOW": WALL.isoformat(),
        "RESEND_API_KEY": "re_test",
        "RESEND_API_URL": fake_resend.base_url,
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
    }
    result = digest_hourly_job.execute_in_process(
        partition_key="2026-02-13-08:00", instance=instance, resources=build_resources(env)
    )
    assert result.success
    meta = {
        e.step_output_data.output_name: {k: v.value for k, v in e.step_output_data.metadata.items()}
        for e in result.all_events
        if e.event_type_value == "STEP_OUTPUT" and e.step_output_data is not None and e.step_key == SUMMARY_OP
    }
    assert meta["generated"]["outside_catch_up_window"] is True
    assert meta["sent"]["outside_catch_up_window"] is True and meta["sent"]["sent"] == 0
    assert len(rows(engine)) == 1 and fake_resend.sent == []
    # within the window (DIGEST_CATCH_UP_HOURS=72) the same hour is a stale catch-up: still nothing sent
    wide = build_resources({**env, "DIGEST_CATCH_UP_HOURS": "72"})
    result = digest_hourly_job.execute_in_process(
        partition_key="2026-02-13-08:00", instance=instance, resources=wide
    )
    assert result.success and result.output_for_node(SUMMARY_OP, "generated") == 0 and fake_resend.sent == []
    result = digest_hourly_job.execute_in_process(
        partition_key="2026-02-15-08:00", instance=instance, resources=wide
    )
    assert result.success and result.output_for_node(SUMMARY_OP, "sent") == 1
    engine.dispose()


def test_catch_up_hours_setting() -> None:
    base = {"DATABASE_URL": "sqlite:///x.sqlite"}
    assert Settings.from_env(base).digest_catch_up_hours == 24
    assert Settings.from_env({**base, "DIGEST_CATCH_UP_HOURS": "72"}).digest_catch_up_hours == 72
    assert Settings.from_env({**base, "DIGEST_CATCH_UP_HOURS": "0"}).digest_catch_up_hours == 0
    for bad in ("-1", "1.5", "a day"):
        with pytest.raises(SettingsError, match="DIGEST_CATCH_UP_HOURS"):
            Settings.from_env({**base, "DIGEST_CATCH_UP_HOURS": bad})
