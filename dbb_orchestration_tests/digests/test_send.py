"""Digest sending (behaviour §6) and the first-digest send (§7) on SQLite and Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.send import SUPERSEDED, send_due_digests
from dbb_orchestration.email.sender import DryRunSender, RecordingSender
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.digests.test_generate import count_statements, digests, settings_for

NOW = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)  # Sunday 08:00 UTC: the send hour of UTC users
REAL = datetime(2026, 2, 8, 8, 0, 42, tzinfo=UTC)
DAY_START = datetime(2026, 2, 8, tzinfo=UTC)
KEYRING = ContentKeyring.from_keys({1: bytes(range(32))})


def clock() -> datetime:
    return REAL


def make_user(
    conn: sa.Connection,
    uid: str,
    *,
    notes: list[tuple[str, str]] | None = None,
    timezone: str = "UTC",
    hour: int = 8,
    interval: int = 3,
    settings: bool = True,
    kind: str = "obsidian",
    source_name: str | None = "Vault",
    verified: bool = True,
    name: str = "Ada Lovelace",
) -> list[int]:
    """A verified user with settings, one source and the given notes (title, markdown)."""
    f.user(conn, uid, name=name, email_verified=verified)
    if settings:
        f.settings(conn, uid, timezone=timezone, preferred_send_hour=hour, digest_interval_days=interval)
    conn_id = f.connection(conn, uid, kind=kind, display_name=source_name)
    return [
        f.document(conn, uid, conn_id, external_id=f"{uid}-{n}", title=title, markdown=md, keyring=KEYRING)
        for n, (title, md) in enumerate(notes or [("First note", "Hello **world**"), ("", "Second body")])
    ]


def pending(conn: sa.Connection, uid: str, docs: list[int], **kw: Any) -> int:
    kw.setdefault("scheduled_for", DAY_START)
    kw.setdefault("created_at", DAY_START)
    return f.digest(conn, uid, status=kw.pop("status", "scheduled"), document_ids=docs, **kw)


def sent_before(conn: sa.Connection, uid: str, when: datetime) -> int:
    return f.digest(conn, uid, status="sent", scheduled_for=when, sent_at=when, created_at=when)


def digest_row(conn: sa.Connection, digest_id: int) -> Any:
    return conn.execute(sa.select(t.note_digests).where(t.note_digests.c.id == digest_id)).one()


def review(conn: sa.Connection, doc_id: int) -> Any:
    return conn.execute(
        sa.select(t.review_states).where(t.review_states.c.document_id == doc_id)
    ).one_or_none()


def test_sends_the_newest_pending_digest_and_records_everything(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1", interval=3)
        sent_before(conn, "u1", NOW - timedelta(days=5))
        older = pending(conn, "u1", docs[:1], scheduled_for=DAY_START - timedelta(days=2))
        old_failed = pending(
            conn, "u1", docs[:1], status="failed", scheduled_for=DAY_START - timedelta(days=1)
        )
        newest = pending(conn, "u1", docs, payload={"source": "daily_job"})
        future = pending(conn, "u1", docs, scheduled_for=NOW + timedelta(hours=1))
        # an existing review state keeps its status/ease/repetitions and a longer interval
        f.review_state(
            conn, docs[0], "u1", status="reviewing", interval_days=12, ease_factor=2.1, repetitions=3
        )
    sender = RecordingSender()
    report = send_due_digests(engine, sender, settings_for(engine, keyring=KEYRING), NOW, clock)

    assert (report.users_considered, report.due, report.sent, report.failed, report.superseded) == (
        1,
        1,
        1,
        0,
        1,
    )
    (email,) = sender.sent
    assert email.idempotency_key == f"note-digest-{newest}"
    assert email.tags == {"category": "note_digest", "interval_days": "3"}
    assert email.to == "u1@example.test"
    assert email.subject == "Every 3 days Brain Bits (2 notes)"
    assert "Hello" in email.text and "Second body" in email.text and "Untitled note" in email.text
    assert "Obsidian · Vault" in email.text
    with engine.connect() as conn:
        row = digest_row(conn, newest)
        assert (row.status, row.sent_at, row.updated_at) == ("sent", REAL, REAL)
        assert row.payload_json["provider"] == "memory"
        assert row.payload_json["provider_id"] == "mem-1"
        assert row.payload_json["idempotency_key"] == f"note-digest-{newest}"
        assert row.payload_json["source"] == "daily_job"  # the existing payload is kept
        marker = row.payload_json["delivery"]  # written before the provider call
        assert marker["batch_key"] == sender.batch_keys[0] and marker["batch_index"] == 0
        assert marker["batch_ids"] == [newest] and marker["prepared_at"] == REAL.isoformat()
        sup = digest_row(conn, older)
        assert sup.status == "skipped"
        assert sup.payload_json == {"reason": SUPERSEDED, "superseded_by": newest}
        assert digest_row(conn, old_failed).status == "failed"  # only scheduled ones are superseded
        assert digest_row(conn, future).status == "scheduled"  # not yet pending
        kept = review(conn, docs[0])
        assert (kept.status, kept.interval_days, kept.ease_factor, kept.repetitions) == (
            "reviewing",
            12,
            2.1,
            3,
        )
        # review scheduling counts from when the provider accepted the email (the real clock)
        assert kept.last_sent_at == REAL and kept.next_due_at == REAL + timedelta(days=12)
        fresh = review(conn, docs[1])
        assert (fresh.status, fresh.interval_days, fresh.ease_factor, fresh.repetitions) == ("new", 4, 2.5, 0)
        assert fresh.user_id == "u1" and fresh.next_due_at == REAL + timedelta(days=4)
        assert fresh.updated_at == REAL


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (dict(hour=9), "not_send_hour"),
        (dict(last=NOW - timedelta(hours=2)), "already_sent_today"),
        (dict(last=NOW - timedelta(days=2), interval=3), "interval_not_elapsed"),
        (dict(last=NOW - timedelta(days=1), interval=1), "interval_not_elapsed"),  # free: clamped to 3
        (dict(hour=25), "invalid_send_hour"),
    ],
)
def test_users_who_are_not_due_are_counted_by_reason(
    engine: sa.Engine, setup: dict[str, Any], reason: str
) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1", hour=setup.get("hour", 8), interval=setup.get("interval", 3))
        if "last" in setup:
            sent_before(conn, "u1", setup["last"])
        digest_id = pending(conn, "u1", docs)
    sender = RecordingSender()
    report = send_due_digests(engine, sender, settings_for(engine), NOW, clock)
    assert (report.due, report.sent, dict(report.not_due)) == (0, 0, {reason: 1})
    assert sender.calls == 0
    with engine.connect() as conn:
        assert digest_row(conn, digest_id).status == "scheduled"


def test_due_by_calendar_days_in_local_time_and_interval_clamp(engine: sa.Engine) -> None:
    """Pro interval 1: a send at 08:03 yesterday does not block 08:00 today; free interval 1 → 3."""
    with engine.begin() as conn:
        pro_docs = make_user(conn, "pro", interval=1)
        f.subscription(conn, "pro")
        sent_before(conn, "pro", NOW - timedelta(hours=23, minutes=57))
        pending(conn, "pro", pro_docs)
        free_docs = make_user(conn, "free", interval=1)
        sent_before(conn, "free", NOW - timedelta(days=3, minutes=-3))
        pending(conn, "free", free_docs)
        # New York user at 08:00 local = 13:00Z
        ny_docs = make_user(conn, "ny", timezone="America/New_York")
        pending(conn, "ny", ny_docs)
    sender = RecordingSender()
    report = send_due_digests(engine, sender, settings_for(engine), NOW, clock)
    assert report.sent == 2
    assert sorted((e.to, e.tags["interval_days"]) for e in sender.sent) == [
        ("free@example.test", "3"),
        ("pro@example.test", "1"),
    ]
    ny = send_due_digests(engine, sender, settings_for(engine), datetime(2026, 2, 8, 13, tzinfo=UTC), clock)
    assert ny.sent == 1 and sender.sent[-1].to == "ny@example.test"


def test_unverified_users_and_users_without_pending_digests(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "unverified", verified=False)
        pending(conn, "unverified", docs)
        make_user(conn, "nothing")
    sender = RecordingSender()
    report = send_due_digests(engine, sender, settings_for(engine), NOW, clock)
    assert (report.users_considered, report.due, report.sent) == (1, 1, 0)
    assert dict(report.skipped) == {"no_pending_digest": 1}
    assert sender.calls == 0


def test_empty_snapshot_is_skipped_without_an_email(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        make_user(conn, "u1")
        digest_id = pending(conn, "u1", [])
    sender = RecordingSender()
    report = send_due_digests(engine, sender, settings_for(engine), NOW, clock)
    assert dict(report.skipped) == {"empty_snapshot": 1} and sender.calls == 0
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
        assert (row.status, row.payload_json["reason"]) == ("skipped", "empty_snapshot")


def test_provider_failure_marks_failed_and_a_later_run_retries(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        older = pending(conn, "u1", docs[:1], scheduled_for=DAY_START - timedelta(days=1))
        digest_id = pending(conn, "u1", docs)
    sender = RecordingSender()
    sender.fail_next(status=500, message="provider down")
    report = send_due_digests(engine, sender, settings_for(engine), NOW, clock)
    assert (report.sent, report.failed, report.failed_digest_ids) == (0, 1, [digest_id])
    assert dict(report.provider_errors) == {"500": 1}
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
        assert row.status == "failed" and row.sent_at is None
        assert row.error_json["status"] == 500 and row.error_json["message"] == "provider down"
        assert row.payload_json["idempotency_key"] == f"note-digest-{digest_id}"
        assert digest_row(conn, older).status == "scheduled"  # nothing superseded on failure
        assert review(conn, docs[0]) is None  # no rescheduling on failure

    retry = send_due_digests(engine, sender, settings_for(engine), NOW + timedelta(minutes=20), clock)
    assert (retry.sent, retry.failed, retry.superseded) == (1, 0, 1)
    assert sender.sent[-1].idempotency_key == f"note-digest-{digest_id}"
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
        assert (row.status, row.error_json) == ("sent", None)
        assert digest_row(conn, older).status == "skipped"


def test_dry_run_exercises_everything_but_the_provider(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        digest_id = pending(conn, "u1", docs)
    sender = DryRunSender()
    report = send_due_digests(engine, sender, settings_for(engine), NOW, clock)
    assert report.dry_run and report.sent == 1 and len(sender.sent) == 1
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
        assert row.status == "sent"
        assert row.payload_json["provider_id"] == f"dry-run-note-digest-{digest_id}"
        assert row.payload_json["provider"] == "dry-run"


def test_first_digest_bypass_only_for_users_never_sent_one(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "new", kind="notion", source_name="Study Notes", hour=20)
        f.connection(conn, "new", kind="obsidian", status="revoked", created_at=NOW, display_name="x")
        seed_id = pending(conn, "new", docs, scheduled_for=NOW - timedelta(minutes=5))
        old_docs = make_user(conn, "old", hour=20)
        sent_before(conn, "old", NOW - timedelta(days=10))
        pending(conn, "old", old_docs)
    sender = RecordingSender()
    s = settings_for(engine, frontend_url="https://app.example.test", resend_reply_to="hello@dbb.test")
    for uid in ("new", "old"):
        send_due_digests(engine, sender, s, NOW, clock, only_user_id=uid, first_digest_bypass=True)
    (email,) = sender.sent
    assert email.to == "new@example.test"
    assert email.subject == "Your first Brain Bits are ready! (2 notes)"
    assert "Notion (Study Notes)" in email.text  # the most recent *active* connection
    assert "https://app.example.test/settings" in email.text
    assert email.reply_to == "hello@dbb.test"
    with engine.connect() as conn:
        row = digest_row(conn, seed_id)
        assert row.status == "sent" and row.payload_json["first_digest"] is True
    # a second first-digest run for the same user finds nothing pending
    again = send_due_digests(engine, sender, s, NOW, clock, only_user_id="new", first_digest_bypass=True)
    assert again.sent == 0 and len(sender.sent) == 1


def test_no_settings_row_uses_the_defaults(engine: sa.Engine) -> None:
    """Defaults: UTC, 08:00, 7 days (free)."""
    with engine.begin() as conn:
        docs = make_user(conn, "u1", settings=False)
        sent_before(conn, "u1", NOW - timedelta(days=6))
        pending(conn, "u1", docs)
    sender = RecordingSender()
    assert send_due_digests(engine, sender, settings_for(engine), NOW, clock).not_due == {
        "interval_not_elapsed": 1
    }
    report = send_due_digests(engine, sender, settings_for(engine), NOW + timedelta(days=1), clock)
    assert report.sent == 1 and sender.sent[0].subject == "Every week Brain Bits (2 notes)"


def test_sending_statements_do_not_grow_with_users(engine: sa.Engine) -> None:
    if not is_postgres(engine):
        pytest.skip("statement counts are measured as Postgres counts them")

    def run(users: int, prefix: str) -> int:
        with engine.begin() as conn:
            for n in range(users):
                uid = f"{prefix}-{n:03d}"
                docs = make_user(conn, uid, notes=[("a", "x"), ("b", "y"), ("c", "z")])
                pending(conn, uid, docs)
                pending(conn, uid, docs[:1], scheduled_for=DAY_START - timedelta(days=1))
            f.review_state(conn, docs[0], uid, status="reviewing", interval_days=9)
        with count_statements(engine) as counter:
            report = send_due_digests(engine, RecordingSender(), settings_for(engine), NOW, clock)
        assert report.sent == users and report.superseded == users and report.first_digests == users
        return counter.statements

    few = run(2, "a")
    many = run(40, "b")
    assert len(few) == len(many), many
    # session lock_timeout; the replay's look-up of digests in flight; the page (users, settings, Pro,
    # last sends, in-flight markers); claim; pending digests locked + held elsewhere + last sends again;
    # items with their documents; first-digest sources and note counts; batch keys; the record (digests
    # and review states); claims released and lock_timeout restored
    assert len(many) == 10, many
    assert sum("pg_try_advisory_lock" in sql for sql in many) == 1
    assert sum("SKIP LOCKED" in sql for sql in many) == 1
    assert sum("INSERT INTO review_states" in sql for sql in many) == 1


# -------------------------------------------------------------------------- through HTTP and the SDK


def test_http_retries_429_and_500_then_records_the_provider_id(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        digest_id = pending(conn, "u1", docs)
    fake_resend.fail_next(status=429, count=2)
    fake_resend.fail_next(status=500, count=1)
    report = send_due_digests(engine, resend_sender(fake_resend), settings_for(engine), NOW, clock)
    assert report.sent == 1
    (delivery,) = fake_resend.sent
    assert delivery.tags == {"category": "note_digest", "interval_days": "3"}
    assert fake_resend.requests_count == 4
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
        assert delivery.idempotency_key == row.payload_json["delivery"]["batch_key"]
        assert {r.idempotency_key for r in fake_resend.requests} == {delivery.idempotency_key}
        assert (row.status, row.payload_json["provider_id"], row.payload_json["provider"]) == (
            "sent",
            delivery.id,
            "resend",
        )


def test_http_persistent_failure_is_recorded_as_failed(engine: sa.Engine, fake_resend: FakeResend) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        digest_id = pending(conn, "u1", docs)
        docs2 = make_user(conn, "u2")
        pending(conn, "u2", docs2)
    fake_resend.fail_next(status=500, count=4)  # the first call and its 3 retries
    s = settings_for(engine, email_max_concurrency=1, email_batch_size=1)  # one request per user
    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)
    assert (report.sent, report.failed) == (1, 1)  # the other user is still served
    assert [d.to for d in fake_resend.sent] == [["u2@example.test"]]
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
        assert row.status == "failed"
        assert (row.error_json["status"], row.error_json["attempts"]) == (500, 4)


def test_sent_digest_items_are_never_changed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        digest_id = pending(conn, "u1", docs)
    send_due_digests(engine, RecordingSender(), settings_for(engine), NOW, clock)
    with engine.begin() as conn:
        before = conn.execute(
            sa.select(t.note_digest_items).where(t.note_digest_items.c.note_digest_id == digest_id)
        ).all()
    send_due_digests(engine, RecordingSender(), settings_for(engine), NOW + timedelta(days=3), clock)
    with engine.connect() as conn:
        after = conn.execute(
            sa.select(t.note_digest_items).where(t.note_digest_items.c.note_digest_id == digest_id)
        ).all()
        assert before == after and len(after) == 2
        assert [d.status for d in digests(conn, "u1")] == ["sent"]


def test_a_reused_skipped_digest_that_is_sent_keeps_no_skip_reason(engine: sa.Engine) -> None:
    """The backend reuses a skipped digest as the seed digest without touching its payload; once sent,
    the digest must not still say why it was once skipped."""
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        digest_id = pending(conn, "u1", docs, payload={"reason": "no_documents", "superseded_by": 7, "x": 1})
    report = send_due_digests(engine, DryRunSender(), settings_for(engine), NOW, clock=clock)
    assert report.sent == 1
    with engine.connect() as conn:
        row = digest_row(conn, digest_id)
    assert row.status == "sent"
    assert "reason" not in row.payload_json and "superseded_by" not in row.payload_json
    assert row.payload_json["x"] == 1 and row.payload_json["idempotency_key"] == f"note-digest-{digest_id}"
