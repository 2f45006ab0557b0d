"""The Resend sender through the real SDK against the loopback fake."""

from __future__ import annotations

import json

import pytest

from dbb_orchestration.email.sender import (
    CircuitBreaker,
    DryRunSender,
    EmailSendError,
    OutgoingEmail,
    ProviderUnavailable,
    RecordingSender,
    ResendSender,
    sanitize_tag,
)
from dbb_orchestration.ratelimit import RateLimiter
from dbb_orchestration.testing.fake_resend import FakeResend


def _email(key: str = "note-digest-1", subject: str = "Hello") -> OutgoingEmail:
    return OutgoingEmail(
        to="ada@example.test",
        subject=subject,
        html="<p>hi</p>",
        text="hi",
        idempotency_key=key,
        tags={"category": "note_digest", "step": "welcome 1/2"},
    )


@pytest.fixture
def fake() -> FakeResend:
    with FakeResend() as server:
        yield server
        server.raise_server_errors()


def _sender(fake: FakeResend, sleeps: list[float] | None = None, **kw) -> ResendSender:
    return ResendSender(
        api_key="re_test",
        api_url=fake.base_url,
        from_address="digest@dbb.test",
        reply_to="help@dbb.test",
        sleep=(sleeps.append if sleeps is not None else lambda _s: None),
        **kw,
    )


def test_sends_with_key_tags_and_reply_to(fake: FakeResend) -> None:
    result = _sender(fake).send(_email())
    assert result.provider == "resend" and result.attempts == 1
    [delivery] = fake.sent
    assert delivery.id == result.provider_id
    assert delivery.idempotency_key == "note-digest-1"
    assert delivery.tags == {"category": "note_digest", "step": "welcome-1-2"}
    assert delivery.reply_to == ["help@dbb.test"]
    assert delivery.to == ["ada@example.test"] and delivery.text == "hi"


def test_repeated_key_returns_first_id_and_delivers_once(fake: FakeResend) -> None:
    sender = _sender(fake)
    first = sender.send(_email())
    again = sender.send(_email())
    assert again.provider_id == first.provider_id
    assert len(fake.sent) == 1


def test_same_key_different_payload_is_a_409_not_retried(fake: FakeResend) -> None:
    sender = _sender(fake)
    sender.send(_email())
    with pytest.raises(EmailSendError) as info:
        sender.send(_email(subject="Changed"))
    assert info.value.status == 409 and info.value.attempts == 1
    assert info.value.name == "invalid_idempotent_request"


@pytest.mark.parametrize("status", [429, 500])
def test_transient_errors_are_retried_with_doubling_backoff(fake: FakeResend, status: int) -> None:
    sleeps: list[float] = []
    fake.fail_next(status=status, count=2, retry_after=0)
    result = _sender(fake, sleeps).send(_email())
    assert result.attempts == 3
    assert sleeps == [1.0, 2.0]
    assert len(fake.sent) == 1


def test_retry_after_is_honoured_when_longer(fake: FakeResend) -> None:
    sleeps: list[float] = []
    fake.fail_next(status=429, count=1, retry_after=7)
    _sender(fake, sleeps).send(_email())
    assert sleeps == [7.0]


def test_persistent_failure_gives_up_after_three_retries(fake: FakeResend) -> None:
    sleeps: list[float] = []
    fake.fail_next(status=500, count=10)
    with pytest.raises(EmailSendError) as info:
        _sender(fake, sleeps).send(_email())
    assert info.value.status == 500 and info.value.attempts == 4
    assert sleeps == [1.0, 2.0, 4.0]
    assert fake.sent == []
    assert info.value.as_json()["attempts"] == 4


def test_connection_refused_is_an_email_send_error() -> None:
    with FakeResend() as server:
        url = server.base_url
    sender = ResendSender(api_key="re_test", api_url=url, from_address="a@b.test", sleep=lambda _s: None)
    with pytest.raises(EmailSendError):
        sender.send(_email())


def test_rate_limiter_paces_calls(fake: FakeResend) -> None:
    waits: list[float] = []

    class Spy(RateLimiter):
        def acquire(self) -> float:
            waits.append(super().acquire())
            return waits[-1]

    sender = _sender(fake, rate_limiter=Spy(1000))
    for i in range(3):
        sender.send(_email(key=f"k{i}"))
    assert len(waits) == 3 and len(fake.sent) == 3


def test_dry_run_sender_never_calls_the_provider() -> None:
    sender = DryRunSender()
    assert sender.send(_email()).provider_id == "dry-run-note-digest-1"
    assert len(sender.sent) == 1


def test_recording_sender_dedupes_and_fails_on_demand() -> None:
    sender = RecordingSender()
    sender.fail_next(status=500)
    with pytest.raises(EmailSendError):
        sender.send(_email())
    a = sender.send(_email())
    b = sender.send(_email())
    assert a.provider_id == b.provider_id and len(sender.sent) == 1 and sender.calls == 3


@pytest.mark.parametrize(
    ("raw", "clean"), [("welcome-1", "welcome-1"), ("a b/c", "a-b-c"), ("", "-"), (7, "7"), ("é", "-")]
)
def test_sanitize_tag(raw: object, clean: str) -> None:
    assert sanitize_tag(raw) == clean


# ------------------------------------------------------------------- batch, timeout, breaker, scrubbing


def test_batch_maps_ids_and_per_email_errors_back_in_order(fake: FakeResend) -> None:
    emails = [
        _email(key="note-digest-1"),
        OutgoingEmail(to="broken", subject="x", html="<p>x</p>", text="x", idempotency_key="note-digest-2"),
        OutgoingEmail(
            to="c@example.test",
            subject="y",
            html="<p>y</p>",
            text="y",
            idempotency_key="note-digest-3",
            headers={"List-Unsubscribe": "<https://dbb.test/u>"},
        ),
    ]
    result = _sender(fake).send_batch(emails, "note-digest-batch-abc")
    first, second, third = result.items
    assert [d.id for d in fake.sent] == [first.provider_id, third.provider_id]
    assert second.provider_id is None and second.error is not None and "`to`" in second.error
    assert fake.sent[1].headers == {"List-Unsubscribe": "<https://dbb.test/u>"}
    assert {r.idempotency_key for r in fake.requests} == {"note-digest-batch-abc"}
    again = _sender(fake).send_batch(emails, "note-digest-batch-abc")
    assert again.items == result.items and len(fake.sent) == 2


def test_headers_go_with_single_sends(fake: FakeResend) -> None:
    email = OutgoingEmail(
        to="a@example.test",
        subject="s",
        html="<p>h</p>",
        text="t",
        idempotency_key="k",
        headers={"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    )
    _sender(fake).send(email)
    assert fake.sent[0].headers == {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def test_a_hung_provider_times_out_and_the_breaker_stops_calling_it(fake: FakeResend) -> None:
    fake.set_hang(True)
    sender = _sender(fake, request_timeout=0.1, max_retries=5, breaker=CircuitBreaker(3))
    with pytest.raises(ProviderUnavailable) as info:
        sender.send(_email())
    assert info.value.name == "provider_unavailable" and info.value.retryable
    assert fake.hung_requests == 3  # three timed-out attempts, then the breaker opened
    with pytest.raises(ProviderUnavailable):
        sender.send_batch([_email(key="other")], "batch-key")
    assert fake.hung_requests == 3  # an open breaker never calls the provider


def test_a_4xx_answer_resets_the_breaker_count(fake: FakeResend) -> None:
    breaker = CircuitBreaker(3)
    sender = _sender(fake, max_retries=0, breaker=breaker)
    for _ in range(2):
        fake.fail_next(status=503)
        with pytest.raises(EmailSendError):
            sender.send(_email())
    fake.fail_next(status=422, name="validation_error")
    with pytest.raises(EmailSendError):
        sender.send(_email())
    assert breaker.consecutive == 0 and not breaker.is_open
    assert sender.send(_email()).provider_id


def test_provider_errors_carry_no_address_key_or_sdk_cause(fake: FakeResend) -> None:
    fake.fail_next(
        status=422,
        name="validation_error",
        message="The address ada@example.test is on the suppression list (key re_live_abcdef123)",
    )
    with pytest.raises(EmailSendError) as info:
        _sender(fake).send(_email())
    error = info.value
    assert "ada@example.test" not in str(error) and "re_live_abcdef123" not in str(error)
    assert "[email]" in str(error)
    assert error.__cause__ is None and error.__context__ is None
    assert "ada@example.test" not in json.dumps(error.as_json())


def test_recording_sender_rejects_single_emails_of_a_batch() -> None:
    sender = RecordingSender()
    sender.reject("bad@example.test")
    emails = [_email(key="a"), OutgoingEmail("bad@example.test", "s", "h", "t", "b")]
    result = sender.send_batch(emails, "k")
    assert result.items[0].provider_id == "mem-1" and result.items[1].error
    assert [e.idempotency_key for e in sender.sent] == ["a"] and sender.batch_keys == ["k"]
