"""A batch step's generation and sending overlapped page by page (digests/pipeline.py): the same digests,
emails and counts as generating the whole range then sending it; errors on either side stop both."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db import create_db_engine
from dbb_orchestration.digests import pipeline
from dbb_orchestration.digests.batches import user_ranges
from dbb_orchestration.digests.delivery import ProviderUnavailableError
from dbb_orchestration.digests.generate import GenerateReport, generate_digests
from dbb_orchestration.digests.pipeline import generate_and_send, merge_reports
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.resources import resend_sender
from dbb_orchestration.testing import FakeResend
from dbb_orchestration_tests.conftest import BACKEND_DDL, PostgresDatabases
from dbb_orchestration_tests.digests.test_batches import USERS, _digests, _emails, _world
from dbb_orchestration_tests.digests.test_defs import env, seed

NOW = datetime(2026, 2, 8, 8, tzinfo=UTC)


def test_merge_reports_adds_counts_joins_lists_and_keeps_the_rest() -> None:
    a = SendReport(logical_time=NOW, users_considered=2, sent=1, not_due=Counter(not_send_hour=1))
    a.failed_digest_ids.append(7)
    b = SendReport(logical_time=NOW, users_considered=3, sent=2, not_due=Counter(not_send_hour=2, interval=1))
    b.failed_digest_ids.append(9)
    merged = merge_reports([a, b])
    assert (merged.users_considered, merged.sent, merged.logical_time) == (5, 3, NOW)
    assert merged.not_due == Counter(not_send_hour=3, interval=1)
    assert merged.failed_digest_ids == [7, 9]
    g = merge_reports([GenerateReport(logical_time=NOW, digests_created=2), GenerateReport(logical_time=NOW)])
    assert g.digests_created == 2 and g.outside_catch_up_window is False
    with pytest.raises(ValueError):
        merge_reports([])


@pytest.mark.parametrize(
    ("within", "expected"),
    [
        ((None, None), [(None, "u-02"), ("u-02", "u-04"), ("u-04", "u-06"), ("u-06", None)]),
        (("u-01", "u-06"), [("u-01", "u-03"), ("u-03", "u-05"), ("u-05", "u-06")]),
        (("u-02", "u-04"), [("u-02", "u-04")]),
        (("u-07", None), [("u-07", None)]),  # nobody left: one empty range, still covering the end
    ],
)
def test_user_ranges_within_a_range(within: Any, expected: Any, db_url: str) -> None:
    seed(db_url, _world)
    engine = create_db_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert user_ranges(conn, 2, within=within) == expected
    engine.dispose()


def _settings(url: str, fake: FakeResend, **extra: str) -> Settings:
    return Settings.from_env(env(url, fake, DIGEST_BATCH_SIZE="2", **extra))


@pytest.mark.postgres
def test_overlapped_pages_make_the_same_digests_emails_and_counts_as_one_pass(
    postgres_databases: PostgresDatabases,
) -> None:
    outcomes = []
    for overlapped in (False, True):
        url = postgres_databases.create(ddl=BACKEND_DDL.read_text())
        seed(url, _world)
        fake = FakeResend()
        fake.start()
        try:
            s = _settings(url, fake)
            engine = create_db_engine(url)
            if overlapped:
                gen, sent = generate_and_send(engine, resend_sender(s), s, NOW, (None, None), clock=s.now)
            else:
                gen = generate_digests(engine, NOW, s, clock=s.now)
                sent = send_due_digests(engine, resend_sender(s), s, NOW, clock=s.now)
            engine.dispose()
            counts = (gen.users_considered, gen.rows_created, dict(gen.created_for), sent.due, sent.sent)
            outcomes.append((_digests(url), _emails(fake), counts))
        finally:
            fake.stop()
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][2] == (len(USERS), 7, {"due": 6, "never_sent": 1}, 6, 6)


@pytest.mark.postgres
def test_a_provider_outage_stops_generation_and_leaves_no_worker_running(postgres_url: str) -> None:
    seed(postgres_url, _world)
    fake = FakeResend()
    fake.start()
    fake.set_hang(True)
    try:
        s = _settings(
            postgres_url,
            fake,
            EMAIL_REQUEST_TIMEOUT_SECONDS="0.2",
            EMAIL_MAX_RETRIES="0",
            EMAIL_CIRCUIT_BREAKER_FAILURES="1",
        )
        engine = create_db_engine(postgres_url)
        with pytest.raises(ProviderUnavailableError):
            generate_and_send(engine, resend_sender(s), s, NOW, (None, None), clock=s.now)
        assert not [t for t in threading.enumerate() if t.name == "digest-generation"]
        engine.dispose()
    finally:
        fake.set_hang(False)
        fake.stop()
    assert fake.sent == []


@pytest.mark.postgres
def test_a_generation_error_is_raised_and_stops_the_sending(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(postgres_url, _world)
    real = pipeline.generate_digests
    calls: list[Any] = []

    def fails_on_the_second_page(*args: Any, **kwargs: Any) -> GenerateReport:
        calls.append(kwargs["user_range"])
        if len(calls) == 2:
            raise RuntimeError("generation broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate_digests", fails_on_the_second_page)
    fake = FakeResend()
    fake.start()
    try:
        s = _settings(postgres_url, fake)
        engine = create_db_engine(postgres_url)
        with pytest.raises(RuntimeError, match="generation broke"):
            generate_and_send(engine, resend_sender(s), s, NOW, (None, None), clock=s.now)
        engine.dispose()
    finally:
        fake.stop()
    assert len(calls) == 2  # the worker stopped at its error
    assert len(fake.sent) <= 2  # at most the first page (2 users) was sent
