"""Exactly once and isolation: concurrent runs, a process killed mid-send, bad data, provider errors."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.generate import generate_digests
from dbb_orchestration.digests.queries import GENERATION_LOCK_NAMESPACE
from dbb_orchestration.digests.seed import create_seed_digest_if_needed
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


def _users_with_notes(engine: sa.Engine, ids: Sequence[str]) -> None:
    with engine.begin() as conn:
        for uid in ids:
            f.user(conn, uid)
            conn_id = f.connection(conn, uid)
            for k in range(2):
                f.document(conn, uid, conn_id, external_id=f"{uid}-{k}")


def _digests_per_user(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        d = t.note_digests
        return dict(conn.execute(sa.select(d.c.user_id, sa.func.count()).group_by(d.c.user_id)).all())


def _waiting_generation_locks(engine: sa.Engine) -> int:
    """Generation locks (advisory, two-int namespace) that a session of this database waits for."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND objsubid = 2 AND classid = :ns "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"ns": GENERATION_LOCK_NAMESPACE},
            ).scalar_one()
        )


class PausedBeforeInsert:
    """Runs ``generate_digests`` in a thread that stops right before its batch's insert (its users' locks
    held, its "already has a digest?" read done) until :meth:`release`: a real transaction held open at
    the worst moment for a concurrent generator. No SQL is faked: the statement just waits to be sent."""

    def __init__(
        self, engine: sa.Engine, settings: Settings, user_range: tuple[str | None, str | None]
    ) -> None:
        self.engine = engine
        self.at_insert = threading.Event()
        self._release = threading.Event()
        self.created: list[int] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(settings, user_range))
        sa.event.listen(engine, "before_cursor_execute", self._pause)

    def _pause(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.current_thread() is self.thread and "INSERT INTO note_digests" in statement:
            self.at_insert.set()
            self._release.wait(timeout=60)

    def _run(self, settings: Settings, user_range: tuple[str | None, str | None]) -> None:
        try:
            self.created.append(
                generate_digests(self.engine, NOW, settings, user_range=user_range).rows_created
            )
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()
        assert self.at_insert.wait(timeout=60), "the paused generation never reached its insert"

    def release(self) -> None:
        self._release.set()
        self.thread.join(timeout=60)
        sa.event.remove(self.engine, "before_cursor_execute", self._pause)
        assert not self.errors


def _generate_in_thread(
    engine: sa.Engine, settings: Settings, user_range: tuple[str | None, str | None]
) -> tuple[threading.Thread, threading.Event, list[Any]]:
    done = threading.Event()
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(generate_digests(engine, NOW, settings, user_range=user_range).rows_created)
        except BaseException as exc:  # surfaced by the test
            out.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, done, out


def test_overlapping_generations_wait_per_user_and_make_one_digest_each(engine: sa.Engine) -> None:
    """Generator A stops between its read and its insert; B, over users that overlap A's, must wait for
    A's commit and then see A's digests. Without a per-user lock B reads "no digest yet", inserts,
    and A's insert then duplicates the overlap (u03…u07)."""
    require_postgres(engine)
    ids = [f"u{n:02d}" for n in range(10)]
    _users_with_notes(engine, ids)
    s = settings_for(engine, digest_batch_size=100)
    a = PausedBeforeInsert(engine, s, (None, "u07"))  # u00…u07
    a.start()
    thread, done, out = _generate_in_thread(engine, s, ("u02", None))  # u03…u09
    while not done.is_set() and _waiting_generation_locks(engine) == 0:
        done.wait(timeout=0.05)
    b_waited = not done.is_set()
    a.release()
    thread.join(timeout=60)
    assert b_waited  # B was waiting on a lock of the overlap while A held it
    assert a.created == [8] and out == [2]  # B made only the two users A does not cover
    assert _digests_per_user(engine) == dict.fromkeys(ids, 1)


def test_generations_over_disjoint_ranges_never_wait_on_each_other(engine: sa.Engine) -> None:
    """The batch steps of one run: A holds its range's locks (stopped before its insert) while B
    generates the next range to the end, then A finishes."""
    require_postgres(engine)
    ids = [f"u{n:02d}" for n in range(10)]
    _users_with_notes(engine, ids)
    s = settings_for(engine, digest_batch_size=100)
    a = PausedBeforeInsert(engine, s, (None, "u04"))  # u00…u04
    a.start()
    thread, done, out = _generate_in_thread(engine, s, ("u04", None))  # u05…u09
    finished_while_a_held_its_locks = done.wait(timeout=60)
    a.release()
    thread.join(timeout=60)
    assert finished_while_a_held_its_locks and out == [5]
    assert a.created == [5]
    assert _digests_per_user(engine) == dict.fromkeys(ids, 1)


def test_a_seed_digest_waits_only_for_a_generation_of_its_own_user(engine: sa.Engine) -> None:
    """A seed (the first sync) for a user whose generation batch is in flight waits for it and then
    finds its digest; a seed for a user outside that batch goes ahead."""
    require_postgres(engine)
    ids = [f"u{n:02d}" for n in range(4)]
    _users_with_notes(engine, ids)
    s = settings_for(engine, digest_batch_size=100)
    a = PausedBeforeInsert(engine, s, (None, "u01"))  # u00, u01
    a.start()
    with engine.begin() as conn:  # another user: no wait
        assert create_seed_digest_if_needed(conn, "u03", clock()).outcome == "created"
    results: list[Any] = []
    done = threading.Event()

    def seed_u01() -> None:
        try:
            with engine.begin() as conn:
                results.append(create_seed_digest_if_needed(conn, "u01", clock()).outcome)
        except BaseException as exc:  # surfaced below
            results.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=seed_u01)
    thread.start()
    while not done.is_set() and _waiting_generation_locks(engine) == 0:
        done.wait(timeout=0.05)
    seed_waited = not done.is_set()
    a.release()
    thread.join(timeout=60)
    assert seed_waited and results == ["has_digest"]  # it saw the generation's digest once it committed
    assert _digests_per_user(engine) == {"u00": 1, "u01": 1, "u03": 1}


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
