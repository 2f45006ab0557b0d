"""Exactly once and isolation: concurrent runs, a process killed mid-send, bad data, provider errors."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.generate import generate_digests
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.email.sender import BatchResult, OutgoingEmail, ResendSender, SendResult
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.digests.test_generate import settings_for

NOW = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
DAY_START = datetime(2026, 2, 8, tzinfo=UTC)
KEYRING = ContentKeyring.from_keys({1: bytes(range(32))})


def clock() -> datetime:
    return NOW + timedelta(seconds=30)


def user_with_pending(conn: sa.Connection, uid: str, notes: int = 2) -> int:
    f.user(conn, uid)
    f.settings(conn, uid)
    conn_id = f.connection(conn, uid)
    docs = [
        f.document(conn, uid, conn_id, external_id=f"{uid}-{n}", title=f"{uid} note {n}", keyring=KEYRING)
        for n in range(notes)
    ]
    return f.digest(conn, uid, scheduled_for=DAY_START, created_at=DAY_START, document_ids=docs)


def statuses(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(t.note_digests.c.id, t.note_digests.c.status)).all())


def provider_ids(engine: sa.Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.note_digests.c.id, t.note_digests.c.payload_json)).all()
    return {r.id: (r.payload_json or {}).get("provider_id") for r in rows}


def require_postgres(engine: sa.Engine) -> None:
    if not is_postgres(engine):
        pytest.skip("row-lock claims are a Postgres feature; SQLite relies on idempotency keys alone")


def test_two_concurrent_runs_of_the_same_hour_send_each_digest_once(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    require_postgres(engine)
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(6)]
    fake_resend.set_delay(0.05)  # keep the first run's locks held while the second arrives
    s = settings_for(engine, keyring=KEYRING, email_max_concurrency=2)
    reports: list[SendReport] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            reports.append(send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    # Usually one run claims everything; the claims of two simultaneous claim statements may also
    # interleave and split the users. Either way each user is sent by exactly one run, and every user
    # a run did not send was claimed by the other, in flight with the other, or already sent by it:
    # skipped, never waited on.
    assert sum(r.sent for r in reports) == 6
    for r in reports:
        elsewhere = r.skipped["claimed_elsewhere"] + r.skipped["batch_in_flight_elsewhere"]
        assert r.sent + elsewhere + r.not_due["already_sent_today"] == 6, r
    assert len(fake_resend.sent) == 6
    assert fake_resend.requests_count == sum(r.sent > 0 for r in reports)  # one batch request per sender
    assert sorted(provider_ids(engine).values()) == sorted(d.id for d in fake_resend.sent)
    assert set(provider_ids(engine)) == set(ids)
    assert set(statuses(engine).values()) == {"sent"}


def test_two_concurrent_generations_make_one_digest_per_user(engine: sa.Engine) -> None:
    require_postgres(engine)
    with engine.begin() as conn:
        for n in range(20):
            f.user(conn, f"u{n:02d}")
            conn_id = f.connection(conn, f"u{n:02d}")
            for k in range(3):
                f.document(conn, f"u{n:02d}", conn_id, external_id=f"{n}-{k}")
    s = settings_for(engine, digest_batch_size=7)
    start = threading.Barrier(2)
    created: list[int] = []

    def run() -> None:
        start.wait()
        created.append(generate_digests(engine, NOW, s).digests_created)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert sum(created) == 20
    with engine.connect() as conn:
        per_user = conn.execute(
            sa.select(t.note_digests.c.user_id, sa.func.count()).group_by(t.note_digests.c.user_id)
        ).all()
    assert len(per_user) == 20 and {n for _u, n in per_user} == {1}


class SimulatedKill(BaseException):
    """What a SIGKILL looks like from inside: nothing after this line runs (not an ``Exception``)."""


class KilledAfterAccept:
    """Delivers through the real sender, then 'dies' before the caller can record anything (after the
    ``after``-th provider call, single or batch)."""

    def __init__(self, inner: ResendSender, after: int) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.after = after
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.calls += 1
            if self.calls >= self.after:
                raise SimulatedKill()

    def send(self, email: OutgoingEmail) -> SendResult:
        result = self.inner.send(email)
        self._count()
        return result

    def send_batch(self, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult:
        result = self.inner.send_batch(emails, idempotency_key)
        self._count()
        return result


def test_killed_after_the_provider_accepted_then_rerun_sends_nothing_new(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(3)]
    s = settings_for(engine, keyring=KEYRING, email_max_concurrency=1, email_batch_size=1)
    dying = KilledAfterAccept(resend_sender(fake_resend), after=2)
    with pytest.raises(SimulatedKill):
        send_due_digests(engine, dying, s, NOW, clock)
    # two (or, if the pool had already started the third, three) emails left the building…
    delivered_before = len(fake_resend.sent)
    requests_before = fake_resend.requests_count
    assert delivered_before >= 2
    assert set(statuses(engine).values()) == {"scheduled"}  # …and nothing was recorded
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.review_states)).scalar() == 0

    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW + timedelta(minutes=5), clock)
    assert report.sent == 3
    assert len(fake_resend.sent) == 3  # the earlier deliveries were replayed, not repeated
    assert fake_resend.requests_count == requests_before + 3
    by_key = {d.idempotency_key: d.id for d in fake_resend.sent}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.note_digests.c.id, t.note_digests.c.status, t.note_digests.c.payload_json)
        ).all()
    for row in rows:
        assert row.status == "sent"
        assert row.payload_json["provider_id"] == by_key[row.payload_json["delivery"]["batch_key"]]
    assert sorted(r.id for r in rows) == sorted(ids)


def test_rerun_with_a_changed_body_is_recorded_sent_without_a_second_email(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        digest_id = user_with_pending(conn, "u1")
    s = settings_for(engine, keyring=KEYRING)
    with pytest.raises(SimulatedKill):
        send_due_digests(engine, KilledAfterAccept(resend_sender(fake_resend), after=1), s, NOW, clock)
    with engine.begin() as conn:  # the note was renamed before the rerun: a different email body
        conn.execute(sa.update(t.documents).values(title="Renamed"))
    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)
    assert (report.sent, report.provider_duplicates, report.failed) == (1, 1, 0)
    assert len(fake_resend.sent) == 1
    with engine.connect() as conn:
        row = conn.execute(sa.select(t.note_digests).where(t.note_digests.c.id == digest_id)).one()
    assert row.status == "sent" and row.payload_json["provider_duplicate_key"] is True


def test_bad_data_is_handled_or_counted_while_every_other_user_is_served(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    other_key = ContentKeyring.from_keys({7: bytes(32)})
    with engine.begin() as conn:

        def person(
            uid: str, *, settings: dict[str, Any] | None, markdown: str = "Fine text", **doc: Any
        ) -> None:
            f.user(conn, uid)
            if settings is not None:
                f.settings(conn, uid, **settings)
            conn_id = f.connection(conn, uid)
            f.document(conn, uid, conn_id, external_id=f"{uid}-a", markdown=markdown, **doc)
            f.document(conn, uid, conn_id, external_id=f"{uid}-b", markdown="Second note", keyring=KEYRING)

        person("a-ok", settings={})
        person("b-bad-tz", settings={"timezone": "Mars/Olympus"})
        person("c-hour-25", settings={"preferred_send_hour": 25})
        person("d-corrupt", settings={}, keyring=KEYRING)
        person("e-missing-key", settings={}, keyring=other_key)  # key version 7 is not configured
        person("f-no-settings", settings=None)
        conn.execute(
            sa.update(t.documents)
            .where(t.documents.c.external_id == "d-corrupt-a")
            .values(content_ciphertext="!!not base64!!")
        )
    s = settings_for(engine, keyring=KEYRING)
    generated = generate_digests(engine, NOW, s)
    assert generated.digests_created == 6
    assert generated.data_issues == {"invalid_timezone": 1}
    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)
    assert report.sent == 5 and report.failed == 0
    assert dict(report.not_due) == {"invalid_send_hour": 1}
    assert report.data_issues == {
        "invalid_timezone": 1,
        "invalid_send_hour": 1,
        "content_bad_base64": 1,
        "content_missing_key_version": 1,
    }
    sent_to = sorted(d.to[0].split("@")[0] for d in fake_resend.sent)
    assert sent_to == ["a-ok", "b-bad-tz", "d-corrupt", "e-missing-key", "f-no-settings"]
    corrupt = next(d for d in fake_resend.sent if d.to[0].startswith("d-corrupt"))
    assert "No preview available." in (corrupt.text or "") and "Second note" in (corrupt.text or "")


def test_a_failing_user_does_not_stop_the_batch_and_is_retried_later(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(3)]
    s = settings_for(engine, keyring=KEYRING, email_max_concurrency=1, email_batch_size=1)
    fake_resend.fail_next(status=500, count=4)  # the first user's call and its three retries
    first = send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)
    assert (first.sent, first.failed, first.failed_digest_ids) == (2, 1, [ids[0]])
    assert statuses(engine)[ids[0]] == "failed"
    fake_resend.fail_next(status=429, count=2)  # transient: retried inside the sender
    second = send_due_digests(engine, resend_sender(fake_resend), s, NOW + timedelta(minutes=10), clock)
    assert (second.sent, second.failed) == (1, 0)
    assert set(statuses(engine).values()) == {"sent"}
    assert len(fake_resend.sent) == 3
