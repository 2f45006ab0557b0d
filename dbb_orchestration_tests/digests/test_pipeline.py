"""A batch step's generation and sending overlapped page by page (digests/pipeline.py): the same digests,
emails and counts as generating the whole range then sending it; errors on either side stop both."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from dbb_orchestration.config import Settings
from dbb_orchestration.db import create_db_engine
from dbb_orchestration.digests import pipeline
from dbb_orchestration.digests.delivery import ProviderUnavailableError
from dbb_orchestration.digests.generate import GenerateReport, generate_digests
from dbb_orchestration.digests.pipeline import GenerationProgress, GenerationStopped, generate_and_send
from dbb_orchestration.digests.send import send_due_digests
from dbb_orchestration.resources import resend_sender
from dbb_orchestration.testing import FakeResend
from dbb_orchestration_tests.conftest import BACKEND_DDL, PostgresDatabases
from dbb_orchestration_tests.digests.test_batches import USERS, _digests, _emails, _world
from dbb_orchestration_tests.digests.test_defs import env, seed

NOW = datetime(2026, 2, 8, 8, tzinfo=UTC)


def test_progress_gate_waits_for_a_committed_page_and_reports_the_end() -> None:
    progress = GenerationProgress(end="u-99")
    answers: list[tuple[str | None, bool]] = []
    waiting = threading.Thread(target=lambda: answers.append(progress.ready(None)))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not answers  # nothing committed yet: the sending side waits
    progress.page_committed("u-02")
    waiting.join(5)
    assert answers == [("u-02", False)]
    assert progress.ready("u-01") == ("u-02", False)  # more is ready than was sent
    progress.finished()
    assert progress.ready("u-02") == ("u-99", True)
    progress.stop()
    with pytest.raises(GenerationStopped):
        progress.page_committed("u-03")


def test_progress_gate_raises_a_generation_error() -> None:
    progress = GenerationProgress(end=None)
    progress.failed(ValueError("boom"))
    with pytest.raises(RuntimeError, match="generation failed") as info:
        progress.ready(None)
    assert isinstance(info.value.__cause__, ValueError)


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
    pages: list[str] = []

    def fails_after_the_first_page(*args: Any, **kwargs: Any) -> GenerateReport:
        report_page = kwargs["on_page"]

        def on_page(last_id: str) -> None:
            pages.append(last_id)
            report_page(last_id)
            raise RuntimeError("generation broke")

        return real(*args, **{**kwargs, "on_page": on_page})

    monkeypatch.setattr(pipeline, "generate_digests", fails_after_the_first_page)
    fake = FakeResend()
    fake.start()
    try:
        s = _settings(postgres_url, fake)
        engine = create_db_engine(postgres_url)
        with pytest.raises(RuntimeError, match="generation failed") as info:
            generate_and_send(engine, resend_sender(s), s, NOW, (None, None), clock=s.now)
        engine.dispose()
    finally:
        fake.stop()
        assert "generation broke" in str(info.value.__cause__)
    assert pages == ["u-02"]  # generation stopped at its error, after its first page
    assert len(fake.sent) <= 2  # only users of that page (2) can have been sent


@pytest.mark.postgres
def test_two_overlapped_runs_of_the_same_users_make_one_digest_and_send_one_email_each(
    postgres_url: str,
) -> None:
    """Two batch steps over the same users at once (a rerun racing the scheduled run): the per-user
    generation locks and the send claims still give every due user one digest and one email."""
    seed(postgres_url, _world)
    fake = FakeResend()
    fake.start()
    fake.set_delay(0.05)  # keep both runs in flight together
    try:
        s = _settings(postgres_url, fake)
        engine = create_db_engine(postgres_url)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                generate_and_send(engine, resend_sender(s), s, NOW, (None, None), clock=s.now)
            except BaseException as exc:
                errors.append(exc)

        runs = [threading.Thread(target=run) for _ in range(2)]
        for thread in runs:
            thread.start()
        for thread in runs:
            thread.join(60)
        engine.dispose()
    finally:
        fake.stop()
    assert errors == []
    digests = _digests(postgres_url)
    assert len(digests) == 7  # one per user for the day: 6 due + 1 never sent
    assert sorted(e[0] for e in _emails(fake)) == sorted({e[0] for e in _emails(fake)})  # nobody twice
    assert len(fake.sent) == 6
    assert [d[1] for d in digests].count("sent") == 6
