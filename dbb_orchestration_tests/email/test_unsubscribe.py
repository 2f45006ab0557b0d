"""RFC 8058 one-click List-Unsubscribe headers on digests and sequence emails, with a signed token."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import sqlalchemy as sa

from dbb_orchestration.digests.send import send_due_digests
from dbb_orchestration.email.unsubscribe import (
    list_unsubscribe_headers,
    unsubscribe_token,
    verify_unsubscribe_token,
)
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing.fake_resend import build_eml
from dbb_orchestration_tests.conftest import resend_sender
from dbb_orchestration_tests.digests.test_generate import settings_for
from dbb_orchestration_tests.digests.test_send import KEYRING, NOW, clock, make_user, pending
from dbb_orchestration_tests.sequences.test_process import run, setup_state

SECRET = "test-unsubscribe-secret"
FRONTEND = "https://app.example.test"


def test_token_is_the_user_id_and_its_hmac_sha256() -> None:
    expected = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), b"user_42", hashlib.sha256).digest())
    assert unsubscribe_token("user_42", SECRET) == "user_42." + expected.decode().rstrip("=")
    assert verify_unsubscribe_token(unsubscribe_token("user_42", SECRET), SECRET) == "user_42"


@pytest.mark.parametrize(
    "token",
    [
        "user_43." + unsubscribe_token("user_42", SECRET).split(".", 1)[1],  # another user's signature
        unsubscribe_token("user_42", "other-secret"),
        "user_42",
        "",
        ".abc",
    ],
)
def test_forged_or_malformed_tokens_are_rejected(token: str) -> None:
    assert verify_unsubscribe_token(token, SECRET) is None


def test_user_ids_with_dots_and_odd_characters_round_trip() -> None:
    for user_id in ("a.b.c", "ü/ser id+1"):
        headers = list_unsubscribe_headers(FRONTEND, user_id, SECRET)
        url = headers["List-Unsubscribe"].strip("<>")
        (token,) = parse_qs(urlsplit(url).query)["token"]
        assert verify_unsubscribe_token(token, SECRET) == user_id


def test_headers_follow_rfc_8058() -> None:
    headers = list_unsubscribe_headers(FRONTEND + "/", "u1", SECRET)
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = headers["List-Unsubscribe"]
    assert url.startswith(f"<{FRONTEND}/unsubscribe?token=u1.") and url.endswith(">")
    assert unquote(url[1:-1].split("token=", 1)[1]) == unsubscribe_token("u1", SECRET)


def test_no_secret_means_no_header() -> None:
    assert list_unsubscribe_headers(FRONTEND, "u1", None) == {}
    assert list_unsubscribe_headers(FRONTEND, "u1", "") == {}
    assert list_unsubscribe_headers(FRONTEND, None, SECRET) == {}


def test_digest_email_carries_the_headers_through_resend(engine: sa.Engine, fake_resend: FakeResend) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        pending(conn, "u1", docs)
    settings = settings_for(engine, keyring=KEYRING, unsubscribe_secret=SECRET, frontend_url=FRONTEND)
    report = send_due_digests(engine, resend_sender(fake_resend), settings, NOW, clock)
    assert report.sent == 1
    (delivery,) = fake_resend.sent
    assert delivery.payload["headers"] == list_unsubscribe_headers(FRONTEND, "u1", SECRET)
    eml = build_eml(delivery)
    assert eml["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert eml["List-Unsubscribe"] == list_unsubscribe_headers(FRONTEND, "u1", SECRET)["List-Unsubscribe"]


def test_digest_without_secret_sends_no_unsubscribe_header(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    with engine.begin() as conn:
        docs = make_user(conn, "u1")
        pending(conn, "u1", docs)
    send_due_digests(engine, resend_sender(fake_resend), settings_for(engine, keyring=KEYRING), NOW, clock)
    (delivery,) = fake_resend.sent
    assert "List-Unsubscribe" not in (delivery.payload.get("headers") or {})


def test_sequence_email_carries_the_headers_through_resend(
    engine: sa.Engine, fake_resend: FakeResend
) -> None:
    ref = setup_state(engine, "welcome", user_id="u7")
    run(engine, ref, resend_sender(fake_resend), frontend_url=FRONTEND, unsubscribe_secret=SECRET)
    (delivery,) = fake_resend.sent
    assert delivery.payload["headers"] == list_unsubscribe_headers(FRONTEND, "u7", SECRET)
