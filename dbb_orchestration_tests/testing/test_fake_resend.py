"""Contract tests for FakeResend, driven through the real resend SDK (2.52) over 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import resend
import resend.exceptions as rex

from dbb_orchestration.testing import FakeResend

KEY = "note-digest-42"


def params(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "from": "Daily Brain Bits <digest@dbb.notionist.app>",
        "to": ["ada@example.com"],
        "subject": "Your first Brain Bits are ready! (2 notes)",
        "html": "<p>Hello <b>Ada</b></p>",
        "text": "Hello Ada",
        "reply_to": "hello@dbb.notionist.app",
        "tags": [{"name": "category", "value": "note_digest"}, {"name": "interval_days", "value": "3"}],
    }
    base.update(overrides)
    return base


@pytest.fixture
def fake() -> Iterator[FakeResend]:
    with FakeResend() as server:
        yield server
    server.raise_server_errors()


@pytest.fixture
def sdk(fake: FakeResend) -> Iterator[None]:
    saved = resend.api_key, resend.api_url
    resend.api_key = "re_test"
    resend.api_url = fake.base_url
    try:
        yield
    finally:
        resend.api_key, resend.api_url = saved


def send(payload: dict[str, Any], key: str | None = KEY) -> Any:
    options: Any = {"idempotency_key": key} if key is not None else None
    return resend.Emails.send(payload, options)  # type: ignore[arg-type]


def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], Any]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def test_send_returns_an_id_and_records_the_delivery(fake: FakeResend, sdk: None) -> None:
    response = send(params())

    assert str(uuid.UUID(response["id"])) == response["id"]
    [delivery] = fake.sent
    assert delivery.id == response["id"]
    assert delivery.payload == params()
    assert delivery.idempotency_key == KEY
    assert delivery.to == ["ada@example.com"]
    assert delivery.subject == "Your first Brain Bits are ready! (2 notes)"
    assert delivery.tags == {"category": "note_digest", "interval_days": "3"}
    assert delivery.reply_to == ["hello@dbb.notionist.app"]
    assert delivery.received_at.tzinfo is not None
    [request] = fake.requests
    assert (request.method, request.path, request.status) == ("POST", "/emails", 200)
    assert request.idempotency_key == KEY  # the SDK sends options["idempotency_key"] as Idempotency-Key
    assert request.token == "re_test"


def test_same_key_same_payload_returns_the_first_id_without_a_new_delivery(
    fake: FakeResend, sdk: None
) -> None:
    first = send(params())
    second = send(params())

    assert second["id"] == first["id"]
    assert [d.id for d in fake.sent] == [first["id"]]
    assert fake.requests_count == 2


def test_same_key_different_payload_is_a_409_resend_error(fake: FakeResend, sdk: None) -> None:
    send(params())

    with pytest.raises(rex.ResendError) as caught:
        send(params(subject="Another subject"))

    error = caught.value
    assert type(error) is rex.ResendError  # 409 has no dedicated class in the SDK
    assert error.code == 409
    assert error.error_type == "invalid_idempotent_request"
    assert len(fake.sent) == 1


def test_without_key_every_call_is_a_new_delivery(fake: FakeResend, sdk: None) -> None:
    first = send(params(), key=None)
    second = send(params(), key=None)

    assert first["id"] != second["id"]
    assert [d.idempotency_key for d in fake.sent] == [None, None]


def test_injected_429_raises_rate_limit_error_with_retry_after(fake: FakeResend, sdk: None) -> None:
    fake.fail_next(status=429, count=1, retry_after=2)

    with pytest.raises(rex.RateLimitError) as caught:
        send(params())

    assert caught.value.code == 429
    assert caught.value.error_type == "rate_limit_exceeded"
    assert caught.value.headers["retry-after"] == "2"
    assert fake.sent == []
    assert send(params())["id"] == fake.sent[0].id  # only one failure was queued


def test_injected_500s_then_a_retry_with_the_same_key_delivers_once(fake: FakeResend, sdk: None) -> None:
    fake.fail_next(status=500, count=2)
    errors = []
    for _ in range(2):
        with pytest.raises(rex.ResendError) as caught:
            send(params())
        errors.append((type(caught.value), caught.value.code, caught.value.error_type))

    response = send(params())
    again = send(params())

    assert errors == [(rex.ResendError, 500, "internal_server_error")] * 2
    assert again["id"] == response["id"]
    assert len(fake.sent) == 1
    assert [r.status for r in fake.requests] == [500, 500, 200, 200]


@pytest.mark.parametrize(
    "tags",
    [
        [{"name": "step", "value": "welcome:1"}],
        [{"name": "email type", "value": "sequence"}],
        [{"name": "category", "value": "note.digest"}],
        [{"name": "x" * 257, "value": "y"}],
    ],
)
def test_bad_tags_are_a_422_validation_error(fake: FakeResend, sdk: None, tags: list[dict[str, str]]) -> None:
    with pytest.raises(rex.ValidationError) as caught:
        send(params(tags=tags))

    assert caught.value.code == 422
    assert caught.value.error_type == "validation_error"
    assert fake.sent == []


def test_tag_characters_allowed_by_resend_pass(fake: FakeResend, sdk: None) -> None:
    send(params(tags=[{"name": "email_type", "value": "sequence"}, {"name": "step", "value": "welcome-1_A"}]))

    assert fake.sent[0].tags == {"email_type": "sequence", "step": "welcome-1_A"}


@pytest.mark.parametrize("field", ["from", "to", "subject"])
def test_missing_required_field_is_a_422(fake: FakeResend, sdk: None, field: str) -> None:
    payload = params()
    del payload[field]

    with pytest.raises(rex.MissingRequiredFieldsError) as caught:
        send(payload)

    assert caught.value.code == 422
    assert caught.value.error_type == "missing_required_field"
    assert f"`{field}`" in caught.value.message
    assert fake.sent == []


def test_malformed_address_is_a_422_validation_error(fake: FakeResend, sdk: None) -> None:
    with pytest.raises(rex.ValidationError):
        send(params(to=["not-an-address"]))
    with pytest.raises(rex.ValidationError):
        send(params(reply_to="also bad"))
    assert fake.sent == []


def test_to_as_a_single_string_is_accepted(fake: FakeResend, sdk: None) -> None:
    send(params(to="Ada Lovelace <ada@example.com>"))

    assert fake.sent[0].to == ["Ada Lovelace <ada@example.com>"]
    assert [d.id for d in fake.sent_to("ADA@example.com")] == [fake.sent[0].id]


def test_unset_sdk_key_is_refused_with_401(fake: FakeResend, sdk: None) -> None:
    resend.api_key = None  # the SDK then sends "Authorization: Bearer None"

    with pytest.raises(rex.ResendError) as caught:
        send(params())

    assert caught.value.code == 401
    assert fake.sent == []


def test_missing_authorization_header_is_missing_api_key(fake: FakeResend) -> None:
    status, body, _ = raw_post(
        f"{fake.base_url}/emails", json.dumps(params()).encode(), {"Content-Type": "application/json"}
    )

    assert status == 401
    assert body == {
        "statusCode": 401,
        "name": "missing_api_key",
        "message": "Missing API key in the authorization header",
    }


def test_restricted_api_keys(sdk: None) -> None:
    with FakeResend(api_keys=["re_good"]) as restricted:
        resend.api_url = restricted.base_url
        resend.api_key = "re_other"
        with pytest.raises(rex.ResendError) as caught:
            send(params())
        resend.api_key = "re_good"
        send(params())

        assert caught.value.code == 401
        assert len(restricted.sent) == 1


def test_overlong_idempotency_key_is_a_400(fake: FakeResend, sdk: None) -> None:
    with pytest.raises(rex.ResendError) as caught:
        send(params(), key="k" * 257)

    assert caught.value.code == 400
    assert caught.value.error_type == "invalid_idempotency_key"
    send(params(), key="k" * 256)
    assert len(fake.sent) == 1


def test_same_key_while_the_first_request_is_in_flight_is_a_409(fake: FakeResend, sdk: None) -> None:
    fake.set_delay(0.5)
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = send(params())

    thread = threading.Thread(target=first)
    thread.start()
    for _ in range(500):
        if fake.in_flight_keys == [KEY]:
            break
        time.sleep(0.005)
    with pytest.raises(rex.ResendError) as caught:
        send(params())
    thread.join(timeout=10)

    assert caught.value.code == 409
    assert caught.value.error_type == "concurrent_idempotent_requests"
    assert [d.id for d in fake.sent] == [results["first"]["id"]]
    assert fake.in_flight_keys == []


def test_rate_limit_refuses_requests_over_the_rate(sdk: None) -> None:
    # one token, refilled every 100 s: the second request is always over the limit
    with FakeResend(rate_limit_per_second=0.01) as limited:
        resend.api_url = limited.base_url
        send(params(), key="a")
        with pytest.raises(rex.RateLimitError) as caught:
            send(params(), key="b")

        assert caught.value.headers["retry-after"] == "1"
        assert [d.idempotency_key for d in limited.sent] == ["a"]


def test_outbox_writes_html_text_and_a_multipart_eml(tmp_path: Path, sdk: None) -> None:
    received = datetime(2026, 2, 8, 10, 15, tzinfo=UTC)
    with FakeResend(outbox_dir=tmp_path / "outbox", clock=lambda: received) as fake:
        resend.api_url = fake.base_url
        send(params(headers={"List-Unsubscribe": "<https://dbb.example/unsub>"}))

    stem = "0001-your-first-brain-bits-are-ready-2-notes"
    outbox = tmp_path / "outbox"
    assert sorted(p.name for p in outbox.iterdir()) == [f"{stem}.eml", f"{stem}.html", f"{stem}.txt"]
    assert (outbox / f"{stem}.html").read_text(encoding="utf-8") == "<p>Hello <b>Ada</b></p>"
    assert (outbox / f"{stem}.txt").read_text(encoding="utf-8") == "Hello Ada"
    message = BytesParser(policy=policy.default).parsebytes((outbox / f"{stem}.eml").read_bytes())
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "Your first Brain Bits are ready! (2 notes)"
    assert message["To"] == "ada@example.com"
    assert message["Reply-To"] == "hello@dbb.notionist.app"
    assert message["List-Unsubscribe"] == "<https://dbb.example/unsub>"
    assert message["X-Idempotency-Key"] == KEY
    assert message["Date"] == "Sun, 08 Feb 2026 10:15:00 +0000"
    parts = [(part.get_content_type(), part.get_content().strip()) for part in message.iter_parts()]
    assert parts == [("text/plain", "Hello Ada"), ("text/html", "<p>Hello <b>Ada</b></p>")]


def test_batch_send_and_get(fake: FakeResend, sdk: None) -> None:
    response = resend.Batch.send([params(to="a@example.com"), params(to="b@example.com")])  # type: ignore[list-item]

    ids = [item["id"] for item in response["data"]]
    assert [d.id for d in fake.sent] == ids
    assert [d.to for d in fake.sent] == [["a@example.com"], ["b@example.com"]]
    email = resend.Emails.get(ids[1])
    assert (email["id"], email["to"], email["subject"]) == (ids[1], ["b@example.com"], params()["subject"])


def test_reset_forgets_deliveries_and_keys(fake: FakeResend, sdk: None) -> None:
    first = send(params())
    fake.fail_next(status=500)
    fake.reset()

    second = send(params())  # the injected failure and the key are gone

    assert second["id"] != first["id"]
    assert [d.id for d in fake.sent] == [second["id"]]
    assert fake.requests_count == 1


def test_a_stopped_fake_surfaces_as_an_sdk_http_client_error(sdk: None) -> None:
    fake = FakeResend().start()
    resend.api_url = fake.base_url
    fake.stop()

    with pytest.raises(rex.ResendError) as caught:
        send(params())

    assert caught.value.code == 500
    assert caught.value.error_type == "HttpClientError"


def test_fail_next_rejects_non_error_statuses(fake: FakeResend) -> None:
    with pytest.raises(ValueError):
        fake.fail_next(status=200)
    with pytest.raises(ValueError):
        fake.fail_next(status=500, count=0)


def test_cli_serves_until_sigterm(tmp_path: Path, sdk: None) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dbb_orchestration.testing",
            "resend",
            "--port",
            "0",
            "--outbox",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        resend.api_url = base_url
        send(params())
        assert len(list(tmp_path.glob("*.eml"))) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    assert code == 0


# ------------------------------------------------------------------------------ batch, hang, rate limit


def batch(items: list[dict[str, Any]], key: str | None = "batch-1", mode: str | None = "permissive") -> Any:
    options: dict[str, Any] = {}
    if key is not None:
        options["idempotency_key"] = key
    if mode is not None:
        options["batch_validation"] = mode
    return resend.Batch.send(items, options or None)  # type: ignore[arg-type]


def test_permissive_batch_sends_the_valid_emails_and_reports_each_invalid_one(
    fake: FakeResend, sdk: None
) -> None:
    items = [params(to="a@example.com"), params(to="not-an-address"), params(to="c@example.com")]
    items.append(params(subject=""))
    response = batch(items)

    assert [d.to for d in fake.sent] == [["a@example.com"], ["c@example.com"]]
    assert [item["id"] for item in response["data"]] == [d.id for d in fake.sent]
    errors = response["errors"]
    assert [e["index"] for e in errors] == [1, 3]
    assert "`to`" in errors[0]["message"] and "`subject`" in errors[1]["message"]
    assert {d.idempotency_key for d in fake.sent} == {"batch-1"}


def test_strict_batch_rejects_everything_when_one_email_is_invalid(fake: FakeResend, sdk: None) -> None:
    with pytest.raises(rex.ResendError) as caught:
        batch([params(to="a@example.com"), params(to="nope")], mode=None)
    assert caught.value.code == 422 and fake.sent == []


def test_batch_key_replays_the_same_list_and_refuses_a_different_one(fake: FakeResend, sdk: None) -> None:
    items = [params(to="a@example.com"), params(to="b@example.com")]
    first = batch(items)
    again = batch(items)
    assert [i["id"] for i in again["data"]] == [i["id"] for i in first["data"]]
    assert len(fake.sent) == 2
    with pytest.raises(rex.ResendError) as caught:
        batch([params(to="a@example.com"), params(to="b@example.com", subject="Changed")])
    assert (caught.value.code, caught.value.error_type) == (409, "invalid_idempotent_request")
    assert len(fake.sent) == 2
    other = batch(items, key="batch-2")  # another key is another batch
    assert len(fake.sent) == 4 and other["data"][0]["id"] != first["data"][0]["id"]


def test_rate_limit_counts_every_429(sdk: None) -> None:
    with FakeResend(rate_limit_per_second=0.01, rate_limit_burst=2) as limited:
        resend.api_url = limited.base_url
        batch([params()], key="a")
        send(params(), key="b")
        for key in ("c", "d"):
            with pytest.raises(rex.RateLimitError) as caught:
                batch([params()], key=key)
            assert caught.value.headers["retry-after"] == "1"
        assert limited.rate_limited == 2
        assert [r.status for r in limited.requests] == [200, 200, 429, 429]


def test_hang_mode_accepts_and_never_answers(fake: FakeResend, sdk: None) -> None:
    import requests

    fake.set_hang(True)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{fake.base_url}/emails", json=params(), timeout=0.2)
    assert fake.hung_requests == 1 and fake.sent == []
    fake.set_hang(False)
    assert send(params())["id"] and len(fake.sent) == 1
