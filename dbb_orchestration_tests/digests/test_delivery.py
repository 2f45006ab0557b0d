"""The delivery engine under contention and outages: locked rows, lock timeouts, a hung provider,
concurrent runs for the same user, overlapping partitions, batch replay after a kill, per-email batch
errors and scrubbed provider errors."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import tables as t
from dbb_orchestration.digests.delivery import (
    ProviderUnavailableError,
    claim_key,
    in_flight_marker,
    superseded_by,
)
from dbb_orchestration.digests.queries import DigestRow
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.email.sender import BatchResult, OutgoingEmail, RecordingSender, SendResult
from dbb_orchestration.resources import resend_sender as settings_sender
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.digests.test_exactly_once import (
    KilledAfterAccept,
    SimulatedKill,
    provider_ids,
    require_postgres,
    statuses,
    user_with_pending,
)
from dbb_orchestration_tests.digests.test_generate import settings_for

NOW = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
DAY_START = datetime(2026, 2, 8, tzinfo=UTC)
KEYRING = ContentKeyring.from_keys({1: bytes(range(32))})


def clock() -> datetime:
    return NOW + timedelta(seconds=30)


def rows(engine: sa.Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.select(t.note_digests)).all()}


@contextmanager
def backend_lock(engine: sa.Engine, sql: str, **params: Any) -> Iterator[None]:
    """A backend transaction holding ``SELECT … FOR UPDATE`` locks until the block ends."""
    with engine.connect() as conn:
        txn = conn.begin()
        conn.execute(sa.text(sql), params)
        try:
            yield
        finally:
            txn.rollback()


def wait_for_first_request(fake: FakeResend, limit: float = 10.0) -> None:
    """Until the fake has a request in flight or an email accepted; at most ``limit`` seconds, so a run
    that (wrongly) never calls the provider fails the test instead of hanging it."""
    for _ in range(int(limit / 0.01)):
        if fake.in_flight_keys or fake.sent:
            return
        threading.Event().wait(0.01)
    raise AssertionError("no provider request was made")


def run_in_threads(*runs: Callable[[], SendReport]) -> list[SendReport]:
    reports: list[SendReport] = []
    errors: list[BaseException] = []

    def wrap(run: Callable[[], SendReport]) -> None:
        try:
            reports.append(run())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(run,)) for run in runs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    return reports


# ------------------------------------------------------------------------------------------ pure parts


def test_claim_keys_are_stable_int4() -> None:
    keys = {claim_key(f"user-{n}") for n in range(1000)}
    assert len(keys) == 1000
    assert all(-(2**31) <= k < 2**31 for k in keys)
    assert claim_key("user-1") == claim_key("user-1")


def test_in_flight_marker_expires_after_24_hours_and_ignores_junk() -> None:
    now = datetime(2026, 2, 8, 12, tzinfo=UTC)
    marker = {"batch_key": "k", "prepared_at": (now - timedelta(hours=23)).isoformat()}
    assert in_flight_marker({"delivery": marker}, now) == marker
    old = {"batch_key": "k", "prepared_at": (now - timedelta(hours=24)).isoformat()}
    assert in_flight_marker({"delivery": old}, now) is None
    for junk in (
        None,
        [],
        {"delivery": "x"},
        {"delivery": {"batch_key": 1}},
        {"delivery": {"batch_key": "k"}},
    ):
        assert in_flight_marker(junk, now) is None


def test_a_replayed_digest_supersedes_only_older_scheduled_digests() -> None:
    def row(i: int, day: int, status: str = "scheduled") -> DigestRow:
        at = datetime(2026, 2, day, tzinfo=UTC)
        return DigestRow(i, "u", status, at, at, None)

    oldest, old_failed, other_member, replayed, newest = (
        row(1, 5),
        row(2, 6, "failed"),
        row(3, 6),
        row(4, 7),
        row(5, 8),
    )
    pending = [oldest, old_failed, other_member, replayed, newest]
    assert superseded_by(replayed, pending) == [oldest, other_member]
    assert superseded_by(replayed, pending, keep=[other_member.id]) == [oldest]
    assert superseded_by(oldest, pending) == []


# ------------------------------------------------------------------------------------- locks and claims


def test_a_row_locked_by_the_backend_skips_that_user_and_serves_the_others(engine: sa.Engine) -> None:
    require_postgres(engine)
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(4)]
    s = settings_for(engine, keyring=KEYRING, digest_lock_timeout_seconds=2)
    sender = RecordingSender()
    # a waiting claim would block on this lock (held by this very thread: forever, or a lock timeout)
    with backend_lock(engine, "SELECT id FROM note_digests WHERE id = :id FOR UPDATE", id=ids[1]):
        report = send_due_digests(engine, sender, s, NOW, clock)
    assert (report.sent, report.skipped["locked_elsewhere"]) == (3, 1)
    assert sorted(e.to for e in sender.sent) == ["u0@example.test", "u2@example.test", "u3@example.test"]
    assert statuses(engine) == {ids[0]: "sent", ids[1]: "scheduled", ids[2]: "sent", ids[3]: "sent"}
    later = send_due_digests(engine, sender, s, NOW + timedelta(minutes=5), clock)
    assert later.sent == 1 and set(statuses(engine).values()) == {"sent"}


class LockAfterSend:
    """Lets a backend transaction lock one digest row while the batch is with the provider (after the
    claim committed, before the record)."""

    def __init__(self, inner: Any, engine: sa.Engine, digest_id: int) -> None:
        self.inner, self.provider = inner, inner.provider
        self.conn = engine.connect()
        self.txn = self.conn.begin()
        self.digest_id = digest_id

    def send(self, email: OutgoingEmail) -> SendResult:
        raise AssertionError("digests go through send_batch")

    def send_batch(self, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult:
        result = self.inner.send_batch(emails, idempotency_key)
        self.conn.execute(
            sa.text("SELECT id FROM note_digests WHERE id = :id FOR UPDATE"), {"id": self.digest_id}
        )
        return result

    def release(self) -> None:
        self.txn.rollback()
        self.conn.close()


def test_a_row_locked_during_the_send_times_out_and_only_that_user_is_deferred(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    require_postgres(engine)
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(3)]
    s = settings_for(engine, keyring=KEYRING, digest_lock_timeout_seconds=0.2)
    sender = LockAfterSend(resend_sender(fake_resend), engine, ids[1])
    try:
        report = send_due_digests(engine, sender, s, NOW, clock)
    finally:
        sender.release()
    assert (report.sent, report.skipped["record_deferred"]) == (2, 1)
    assert statuses(engine) == {ids[0]: "sent", ids[1]: "scheduled", ids[2]: "sent"}
    assert len(fake_resend.sent) == 3  # the deferred user's email did go out

    rerun = send_due_digests(engine, resend_sender(fake_resend), s, NOW + timedelta(minutes=5), clock)
    # its batch cannot be repeated identically (the others are recorded): the key's 409 proves delivery
    assert (rerun.sent, rerun.provider_duplicates) == (1, 1)
    assert len(fake_resend.sent) == 3 and set(statuses(engine).values()) == {"sent"}


def test_the_hourly_run_and_a_first_digest_run_for_the_same_user_send_one_email(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """The seed digest (scheduled a moment after the hour) is invisible to the hourly run, the daily
    one is the hourly run's: without a per-user claim and a re-check both went out."""
    require_postgres(engine)
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.settings(conn, "u1")
        conn_id = f.connection(conn, "u1")
        docs = [f.document(conn, "u1", conn_id, external_id=f"d{n}", keyring=KEYRING) for n in range(5)]
        f.digest(conn, "u1", scheduled_for=DAY_START, created_at=DAY_START, document_ids=docs)
        seed_at = NOW + timedelta(seconds=10)
        f.digest(conn, "u1", scheduled_for=seed_at, created_at=seed_at, document_ids=docs[:3])
    fake_resend.set_delay(0.3)  # the first run is still with the provider when the second one starts
    s = settings_for(engine, keyring=KEYRING)
    started = threading.Event()

    def hourly() -> SendReport:
        started.set()
        return send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)

    def first_digest() -> SendReport:
        started.wait()
        wait_for_first_request(fake_resend)
        return send_due_digests(
            engine, resend_sender(fake_resend), s, clock(), clock, only_user_id="u1", first_digest_bypass=True
        )

    reports = run_in_threads(hourly, first_digest)
    assert len(fake_resend.sent) == 1
    assert sum(r.sent for r in reports) == 1
    assert [st for st in statuses(engine).values()].count("sent") == 1


def test_overlapping_partitions_send_one_digest(engine: sa.Engine, fake_resend: FakeResend) -> None:
    """A backfill of yesterday's hour and today's hour run together for a user due in both."""
    require_postgres(engine)
    today = NOW + timedelta(days=1)
    with engine.begin() as conn:
        f.user(conn, "u1")
        f.settings(conn, "u1")
        conn_id = f.connection(conn, "u1")
        docs = [f.document(conn, "u1", conn_id, external_id=f"d{n}", keyring=KEYRING) for n in range(3)]
        f.digest(conn, "u1", scheduled_for=DAY_START, created_at=DAY_START, document_ids=docs)
        f.digest(
            conn, "u1", scheduled_for=DAY_START + timedelta(days=1), created_at=today, document_ids=docs[:2]
        )
    fake_resend.set_delay(0.3)
    s = settings_for(engine, keyring=KEYRING)

    def real() -> datetime:
        # Before today's send hour by the location's clock: yesterday's missed hour is still the user's
        # newest send hour (catch-up rule), so both partitions consider the user due and race.
        return today - timedelta(minutes=1)

    def backfill() -> SendReport:
        return send_due_digests(engine, resend_sender(fake_resend), s, NOW, real)

    def current() -> SendReport:
        wait_for_first_request(fake_resend)
        return send_due_digests(engine, resend_sender(fake_resend), s, today, real)

    reports = run_in_threads(backfill, current)
    assert len(fake_resend.sent) == 1
    assert sum(r.sent for r in reports) == 1


# ----------------------------------------------------------------------------------- bounded provider


def test_a_provider_that_never_answers_ends_with_every_due_user_failed(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n:02d}") for n in range(12)]
    fake_resend.set_hang(True)
    s = settings_for(
        engine,
        keyring=KEYRING,
        resend_api_key="re_test",
        resend_api_url=fake_resend.base_url,
        email_rate_limit_per_second=0,
        email_request_timeout_seconds=0.2,
        email_max_retries=1,
        email_circuit_breaker_failures=2,
        email_batch_size=2,
        email_max_concurrency=1,
    )
    with pytest.raises(ProviderUnavailableError, match="circuit breaker opened") as info:
        send_due_digests(engine, settings_sender(s), s, NOW, clock)
    fake_resend.set_hang(False)
    assert info.value.report.failed == 12 and info.value.report.provider_unavailable == 12
    assert fake_resend.hung_requests == 2  # two timed-out attempts, then no further call
    assert fake_resend.sent == []
    for digest_id, row in rows(engine).items():
        assert digest_id in ids and row.status == "failed"
        assert row.error_json["reason"] == "provider_unavailable" and row.error_json["retryable"] is True
        assert row.payload_json["delivery"]["batch_key"]  # kept: the rerun reuses the key

    rerun = send_due_digests(engine, resend_sender(fake_resend), s, NOW + timedelta(minutes=10), clock)
    assert rerun.sent == 12 and len(fake_resend.sent) == 12
    assert fake_resend.requests_count == 2 + 6  # the hung attempts, then one request per batch


# ------------------------------------------------------------------------------------ batches


def test_a_killed_batch_is_replayed_identically(engine: sa.Engine, fake_resend: FakeResend) -> None:
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(5)]
    s = settings_for(engine, keyring=KEYRING)
    with pytest.raises(SimulatedKill):
        send_due_digests(engine, KilledAfterAccept(resend_sender(fake_resend), after=1), s, NOW, clock)
    first_ids = [d.id for d in fake_resend.sent]
    assert len(first_ids) == 5 and set(statuses(engine).values()) == {"scheduled"}
    keys = {r.payload_json["delivery"]["batch_key"] for r in rows(engine).values()}
    assert len(keys) == 1  # recorded before the call

    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW + timedelta(minutes=5), clock)
    assert (report.sent, report.provider_duplicates) == (5, 0)
    assert [d.id for d in fake_resend.sent] == first_ids  # nothing new delivered
    assert [r.idempotency_key for r in fake_resend.requests] == [keys.pop()] * 2
    assert sorted(i for i in provider_ids(engine).values() if i) == sorted(first_ids)
    assert sorted(provider_ids(engine)) == sorted(ids)


def test_batches_respect_the_size_and_map_ids_back(engine: sa.Engine, fake_resend: FakeResend) -> None:
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(7)]
    s = settings_for(engine, keyring=KEYRING, email_batch_size=3)
    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)
    assert (report.sent, report.requests) == (7, 3)
    assert sorted((len(r.body) for r in fake_resend.requests), reverse=True) == [3, 3, 1]
    delivered = {d.id: d.to[0] for d in fake_resend.sent}
    for digest_id, row in rows(engine).items():
        assert delivered[row.payload_json["provider_id"]] == f"u{ids.index(digest_id)}@example.test"


def test_a_per_email_batch_error_fails_only_that_digest(engine: sa.Engine, fake_resend: FakeResend) -> None:
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(3)]
        conn.execute(sa.update(t.user).where(t.user.c.id == "u1").values(email="u1 at example.test"))
    s = settings_for(engine, keyring=KEYRING)
    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW, clock)
    assert (report.sent, report.failed, report.failed_digest_ids) == (2, 1, [ids[1]])
    assert dict(report.provider_errors) == {"rejected": 1}
    failed = rows(engine)[ids[1]]
    assert failed.status == "failed" and failed.error_json["reason"] == "rejected"
    assert "`to`" in failed.error_json["message"]
    assert "delivery" not in failed.payload_json  # not accepted: the next attempt is a new batch
    assert sorted(d.to[0] for d in fake_resend.sent) == ["u0@example.test", "u2@example.test"]


def test_provider_error_text_is_scrubbed_before_error_json(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        digest_id = user_with_pending(conn, "u1")
    sender = RecordingSender()
    sender.fail_next(
        status=422, message="The address u1@example.test is on the suppression list (re_key1234567)"
    )
    report = send_due_digests(engine, sender, settings_for(engine, keyring=KEYRING), NOW, clock)
    assert report.failed == 1
    row = rows(engine)[digest_id]
    text = str(row.error_json) + str(row.payload_json)
    assert "u1@example.test" not in text and "re_key1234567" not in text
    assert "[email]" in row.error_json["message"]
    assert "u1@example.test" not in str(report.metadata())


def test_an_unrecorded_batch_is_resolved_by_the_next_hour_without_a_second_email(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """The op was killed after the provider accepted and never retried: the 09:00 run (where these
    users are not due) proves the 08:00 delivery under its key instead of leaving it to be re-sent
    under a new key once the key has expired."""
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(3)]
        f.user(conn, "other")  # not due at 09:00 and nothing in flight: untouched
    s = settings_for(engine, keyring=KEYRING)
    with pytest.raises(SimulatedKill):
        send_due_digests(engine, KilledAfterAccept(resend_sender(fake_resend), after=1), s, NOW, clock)
    assert len(fake_resend.sent) == 3 and set(statuses(engine).values()) == {"scheduled"}

    later = NOW + timedelta(hours=1)
    report = send_due_digests(engine, resend_sender(fake_resend), s, later, lambda: later)
    assert report.sent == 3 and len(fake_resend.sent) == 3
    assert set(statuses(engine).values()) == {"sent"}
    assert sorted(i for i in provider_ids(engine).values() if i) == sorted(d.id for d in fake_resend.sent)
    assert sorted(provider_ids(engine)) == sorted(ids)
    # and nothing is in flight any more: the hour after sends nothing
    again = send_due_digests(engine, resend_sender(fake_resend), s, later + timedelta(hours=1), clock)
    assert (again.sent, again.due) == (0, 0) and fake_resend.requests_count == 2
