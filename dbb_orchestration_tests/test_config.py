"""Settings are read from an explicit mapping and fail early, naming the variable."""

from __future__ import annotations

import base64

import pytest

from dbb_orchestration.config import Settings, SettingsError
from dbb_orchestration.plans import DeploymentMode

BASE = {"DATABASE_URL": "sqlite:///x.sqlite"}
KEY = base64.b64encode(bytes(range(32))).decode()


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s.resend_from == "digest@dbb.notionist.app"
    assert s.frontend_url == "http://localhost:3000"
    assert s.deployment_mode is DeploymentMode.CLOUD and s.billing_enabled
    assert s.digest_email_dry_run is False and s.sequence_email_dry_run is False
    assert s.resend_api_url == "https://api.resend.com" and s.notion_api_url == "https://api.notion.com"
    assert s.email_rate_limit_per_second == 2.0 and s.sequence_max_requests_per_tick == 500
    assert s.keyring.newest_version is None


def test_everything_set() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgres://u:secretpw@db:5432/app",
            "RESEND_API_KEY": "re_123",
            "RESEND_FROM": "hi@x.test",
            "RESEND_REPLY_TO": "me@x.test",
            "RESEND_API_URL": "http://127.0.0.1:9999/",
            "NOTION_API_URL": "http://127.0.0.1:9998",
            "FRONTEND_URL": "https://app.test/",
            "DEPLOYMENT_MODE": "self-hosted",
            "DIGEST_EMAIL_DRY_RUN": "true",
            "SEQUENCE_EMAIL_DRY_RUN": "1",
            "CONTENT_ENCRYPTION_KEY": KEY,
            "CONTENT_ENCRYPTION_KEY_V3": KEY,
            "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        }
    )
    assert s.resend_api_url == "http://127.0.0.1:9999" and s.frontend_url == "https://app.test"
    assert s.deployment_mode is DeploymentMode.SELF_HOSTED and not s.billing_enabled
    assert s.digest_email_dry_run and s.sequence_email_dry_run
    assert s.keyring.newest_version == 3 and s.email_rate_limit_per_second == 0
    assert "secretpw" not in repr(s) and "re_123" not in repr(s) and KEY not in repr(s)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL"),
        ({**BASE, "DEPLOYMENT_MODE": "cluster"}, "DEPLOYMENT_MODE"),
        ({**BASE, "DIGEST_EMAIL_DRY_RUN": "maybe"}, "DIGEST_EMAIL_DRY_RUN"),
        ({**BASE, "RESEND_API_URL": "ftp://x"}, "RESEND_API_URL"),
        ({**BASE, "NOTION_API_URL": "localhost:1"}, "NOTION_API_URL"),
        ({**BASE, "CONTENT_ENCRYPTION_KEY": "c2hvcnQ="}, "CONTENT_ENCRYPTION_KEY"),
        ({**BASE, "EMAIL_RATE_LIMIT_PER_SECOND": "fast"}, "EMAIL_RATE_LIMIT_PER_SECOND"),
        ({**BASE, "DIGEST_BATCH_SIZE": "0"}, "DIGEST_BATCH_SIZE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


def test_resend_key_required_unless_dry_run() -> None:
    s = Settings.from_env(BASE)
    s.require_resend(dry_run=True)
    with pytest.raises(SettingsError, match="RESEND_API_KEY"):
        s.require_resend(dry_run=False)


def test_clock_is_real_unless_pinned() -> None:
    from datetime import UTC, datetime

    before = datetime.now(UTC)
    assert Settings.from_env(BASE).now() >= before
    pinned = Settings.from_env({**BASE, "DBB_NOW": "2026-02-08T09:00:00+01:00"})
    assert pinned.now() == datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
    with pytest.raises(SettingsError, match="DBB_NOW"):
        Settings.from_env({**BASE, "DBB_NOW": "2026-02-08T08:00:00"})


def test_delivery_settings() -> None:
    base = {"DATABASE_URL": "sqlite:///x.sqlite"}
    defaults = Settings.from_env(base)
    assert (
        defaults.email_request_timeout_seconds,
        defaults.email_max_retries,
        defaults.email_circuit_breaker_failures,
        defaults.email_batch_size,
        defaults.digest_lock_timeout_seconds,
    ) == (10.0, 3, 5, 100, 5.0)
    custom = Settings.from_env(
        {
            **base,
            "EMAIL_REQUEST_TIMEOUT_SECONDS": "2.5",
            "EMAIL_MAX_RETRIES": "0",
            "EMAIL_CIRCUIT_BREAKER_FAILURES": "3",
            "EMAIL_BATCH_SIZE": "50",
            "DIGEST_LOCK_TIMEOUT_SECONDS": "0.5",
        }
    )
    assert (custom.email_request_timeout_seconds, custom.email_max_retries) == (2.5, 0)
    assert (custom.email_circuit_breaker_failures, custom.email_batch_size) == (3, 50)
    assert custom.digest_lock_timeout_seconds == 0.5
    for name, bad in [
        ("EMAIL_BATCH_SIZE", "101"),
        ("EMAIL_BATCH_SIZE", "0"),
        ("EMAIL_REQUEST_TIMEOUT_SECONDS", "0"),
        ("EMAIL_CIRCUIT_BREAKER_FAILURES", "0"),
        ("DIGEST_LOCK_TIMEOUT_SECONDS", "-1"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({**base, name: bad})
