"""Replay of a recorded batch after a kill, whatever the pages and ranges of the next run.

A process killed between send and record leaves its digests pending with a ``delivery`` marker. The
next run resends that batch under the recorded key before anything else (the pre-pass): its members are
claimed by digest id, so new users that move page or range boundaries do not split the batch into
groups that each wait for the other until the key expires (and the digest then goes out under a new
key: a second email)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.digests.defs import SUMMARY_OP
from dbb_orchestration.digests.generate import generate_digests
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.email.sender import RecordingSender
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.digests.test_batches import PARTITION, _world, reconstructable_hourly_job
from dbb_orchestration_tests.digests.test_defs import env, query, seed
from dbb_orchestration_tests.digests.test_exactly_once import (
    KEYRING,
    NOW,
    KilledAfterAccept,
    SimulatedKill,
    provider_ids,
    require_postgres,
    statuses,
    user_with_pending,
)
from dbb_orchestration_tests.digests.test_generate import count_statements, settings_for


def clock() -> datetime:
    return NOW + timedelta(seconds=30)


def killed_batch(engine: sa.Engine, fake: FakeResend, users: list[str]) -> tuple[list[int], str]:
    """One page, one Resend batch of every user's digest, accepted by the provider, then a kill before
    the record: the digest ids and the batch key written into their markers."""
    with engine.begin() as conn:
        ids = [user_with_pending(conn, uid) for uid in users]
    s = settings_for(engine, keyring=KEYRING, digest_batch_size=len(users))
    with pytest.raises(SimulatedKill):
        send_due_digests(engine, KilledAfterAccept(resend_sender(fake), after=1), s, NOW, clock)
    with engine.connect() as conn:
        payloads = conn.execute(sa.select(t.note_digests.c.payload_json)).scalars().all()
    keys = {p["delivery"]["batch_key"] for p in payloads}
    assert len(keys) == 1 and len(fake.sent) == len(users)
    assert set(statuses(engine).values()) == {"scheduled"}
    return ids, keys.pop()


def new_users(engine: sa.Engine, *uids: str) -> None:
    """Users created after the kill (verified, with settings, nothing pending): they shift the pages."""
    with engine.begin() as conn:
        for uid in uids:
            f.user(conn, uid)
            f.settings(conn, uid)


def assert_replayed_once(engine: sa.Engine, fake: FakeResend, ids: list[int], key: str) -> None:
    """Every member recorded ``sent`` with the id the provider gave it the first time; the provider
    accepted each email once and saw the batch key twice (the killed request, one replay)."""
    assert set(statuses(engine).values()) == {"sent"}
    assert len(fake.sent) == len(ids)
    assert [r.idempotency_key for r in fake.requests] == [key, key]
    assert sorted(i for i in provider_ids(engine).values() if i) == sorted(d.id for d in fake.sent)
    assert sorted(provider_ids(engine)) == sorted(ids)


def test_a_batch_straddling_two_pages_is_replayed_once_under_its_key(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    ids, key = killed_batch(engine, fake_resend, ["u1", "u3", "u5"])
    new_users(engine, "u0", "u2")  # pages of 3 are now [u0 u1 u2] [u3 u5]: the batch spans both
    s = settings_for(engine, keyring=KEYRING, digest_batch_size=3)
    report = send_due_digests(engine, resend_sender(fake_resend), s, NOW + timedelta(minutes=5), clock)
    assert (report.sent, report.provider_duplicates) == (3, 0)
    assert report.skipped["batch_in_flight_elsewhere"] == 0
    assert_replayed_once(engine, fake_resend, ids, key)
    # the key has long expired a day later: nothing is pending any more, so nothing goes out again
    later = NOW + timedelta(hours=25)
    again = send_due_digests(engine, resend_sender(fake_resend), s, later, lambda: later)
    assert again.sent == 0 and len(fake_resend.sent) == 3


def test_a_batch_straddling_two_user_ranges_is_replayed_by_the_first_range(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    ids, key = killed_batch(engine, fake_resend, ["u1", "u3", "u5"])
    s = settings_for(engine, keyring=KEYRING)
    later = NOW + timedelta(minutes=5)
    first = send_due_digests(engine, resend_sender(fake_resend), s, later, clock, user_range=(None, "u3"))
    assert first.sent == 3  # u5 is outside the range but a member of the recorded batch
    second = send_due_digests(engine, resend_sender(fake_resend), s, later, clock, user_range=("u3", None))
    assert second.sent == 0
    assert_replayed_once(engine, fake_resend, ids, key)


def test_two_batch_steps_replaying_at_once_send_the_batch_once(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """Both steps of one hourly run find the straddling batch in their pre-pass: the batch claim decides
    which one replays it; the other skips it (counted) and never sends its members under a new key."""
    require_postgres(engine)
    ids, key = killed_batch(engine, fake_resend, ["u1", "u3", "u5", "u7"])
    new_users(engine, "u2", "u6")
    fake_resend.set_delay(0.2)  # the replay is still with the provider when the other step arrives
    s = settings_for(engine, keyring=KEYRING, digest_batch_size=2)
    later = NOW + timedelta(minutes=5)
    start = threading.Barrier(2)
    reports: list[SendReport] = []
    errors: list[BaseException] = []

    def step(user_range: tuple[str | None, str | None]) -> None:
        try:
            start.wait()
            reports.append(
                send_due_digests(engine, resend_sender(fake_resend), s, later, clock, user_range=user_range)
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=step, args=(r,)) for r in ((None, "u3"), ("u3", None))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert sorted(r.sent for r in reports) == [0, 4]
    loser = next(r for r in reports if r.sent == 0)
    skipped = loser.skipped["batch_in_flight_elsewhere"] + loser.skipped["claimed_elsewhere"]
    assert skipped + loser.not_due["already_sent_today"] >= 1
    assert_replayed_once(engine, fake_resend, ids, key)


def test_a_member_locked_by_the_backend_holds_its_batch_back(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """A batch is replayed whole or not at all: a partial replay would differ from the recorded request
    (409) and lose the per-email answers."""
    require_postgres(engine)
    ids, key = killed_batch(engine, fake_resend, ["u1", "u3"])
    s = settings_for(engine, keyring=KEYRING, digest_lock_timeout_seconds=1)
    later = NOW + timedelta(minutes=5)
    with engine.connect() as conn:
        txn = conn.begin()
        conn.execute(sa.text("SELECT id FROM note_digests WHERE id = :id FOR UPDATE"), {"id": ids[1]})
        try:
            held = send_due_digests(engine, resend_sender(fake_resend), s, later, clock)
        finally:
            txn.rollback()
    assert held.sent == 0 and held.skipped["locked_elsewhere"] >= 1
    assert len(fake_resend.requests) == 1 and set(statuses(engine).values()) == {"scheduled"}
    report = send_due_digests(engine, resend_sender(fake_resend), s, later, clock)
    assert report.sent == 2
    assert_replayed_once(engine, fake_resend, ids, key)


def test_the_replay_pre_pass_costs_one_statement_when_nothing_is_in_flight(engine: sa.Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("statement counts are measured as Postgres counts them")
    with engine.begin() as conn:
        for uid in ("u1", "u2"):
            f.user(conn, uid)
            f.settings(conn, uid, preferred_send_hour=9)  # not due at 08:00: nothing to claim
    with count_statements(engine) as counter:
        report = send_due_digests(
            engine, RecordingSender(), settings_for(engine, keyring=KEYRING), NOW, clock
        )
    assert (report.users_considered, report.due) == (2, 0)
    # session set-up, the replay's look-up, the page, session reset: no claim, prepare or record
    setup, replay, page, reset = counter.statements
    assert "set_config('lock_timeout'" in setup and "set_config('lock_timeout'" in reset
    assert 'FROM note_digests JOIN "user"' in replay and "pg_advisory_unlock_all" in reset
    assert page.startswith('SELECT "user".id')


def test_replays_go_in_pages_each_batch_under_its_recorded_key(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    """Two recorded batches, replayed in pages of at most DIGEST_BATCH_SIZE members: each batch goes
    out once more under its own key, and nothing is delivered twice."""
    with engine.begin() as conn:
        ids = [user_with_pending(conn, f"u{n}") for n in range(4)]
    s = settings_for(engine, keyring=KEYRING, email_batch_size=2, email_max_concurrency=1)
    with pytest.raises(SimulatedKill):
        send_due_digests(engine, KilledAfterAccept(resend_sender(fake_resend), after=1), s, NOW, clock)
    delivered, requests = len(fake_resend.sent), fake_resend.requests_count
    assert delivered >= 2 and set(statuses(engine).values()) == {"scheduled"}
    with engine.connect() as conn:
        payloads = conn.execute(sa.select(t.note_digests.c.payload_json)).scalars().all()
    keys = {p["delivery"]["batch_key"] for p in payloads}
    assert len(keys) == 2

    replay = settings_for(engine, keyring=KEYRING, digest_batch_size=2)
    report = send_due_digests(engine, resend_sender(fake_resend), replay, NOW + timedelta(minutes=5), clock)
    assert (report.sent, report.provider_duplicates) == (4, 0)
    replayed = [r.idempotency_key for r in fake_resend.requests[requests:]]
    assert sorted(replayed) == sorted(keys)  # one request per batch, under its recorded key
    assert len(fake_resend.sent) == 4 and set(statuses(engine).values()) == {"sent"}
    assert sorted(i for i in provider_ids(engine).values() if i) == sorted(d.id for d in fake_resend.sent)
    assert sorted(provider_ids(engine)) == sorted(ids)


@pytest.mark.postgres
def test_the_hourly_job_replays_a_batch_spanning_its_batch_steps_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """Through Dagster, batch steps of 2 users in child processes: the killed run's one batch of 6
    digests spans three steps, whose replays race; the batch claim lets exactly one resend it."""
    seed(postgres_url, _world)
    fake = FakeResend()
    fake.start()
    try:
        values = {**env(postgres_url, fake), "DIGEST_USERS_PER_STEP": "2"}
        settings = Settings.from_env(values)
        engine = create_db_engine(postgres_url, poolclass=sa.pool.NullPool)
        try:
            generate_digests(engine, NOW, settings)
            with pytest.raises(SimulatedKill):
                dying = KilledAfterAccept(resend_sender(fake), after=1)
                send_due_digests(engine, dying, settings, NOW, settings.now)
            (key,) = {r.idempotency_key for r in fake.requests}
            assert len(fake.sent) == 6
        finally:
            engine.dispose()
        fake.set_delay(0.2)  # the winning step is still with the provider while the others look
        with (
            dg.instance_for_test(temp_dir=str(tmp_path)) as instance,
            dg.execute_job(
                reconstructable_hourly_job(values),  # settings travel with the job, not os.environ
                instance=instance,
                run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 3}}}},
                tags={"dagster/partition": PARTITION},
            ) as result,
        ):
            assert result.success
            sent = result.output_for_node(SUMMARY_OP, "sent")
    finally:
        fake.stop()
    assert sent == 6
    assert [r.idempotency_key for r in fake.requests] == [key, key]  # the killed request, one replay
    assert len(fake.sent) == 6 and len({d.to[0] for d in fake.sent}) == 6
    statuses_ = [r.status for r in query(postgres_url, sa.select(t.note_digests.c.status))]
    assert statuses_.count("sent") == 6
