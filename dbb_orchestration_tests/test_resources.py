"""EmailResource: one team pacer per API key and process, a fresh circuit breaker per sender."""

from __future__ import annotations

import pytest

from dbb_orchestration.email.sender import DryRunSender, ResendSender
from dbb_orchestration.ratelimit import PostgresPacer, RateLimiter
from dbb_orchestration.resources import EmailResource, SettingsResource


def _resource(db_url: str, **extra: str) -> EmailResource:
    overrides = {
        "DATABASE_URL": db_url,
        "RESEND_API_KEY": "re_resource_test",
        "RESEND_API_URL": "http://127.0.0.1:9",
        "EMAIL_REQUEST_TIMEOUT_SECONDS": "3",
        "EMAIL_MAX_RETRIES": "2",
        "EMAIL_CIRCUIT_BREAKER_FAILURES": "4",
        **extra,
    }
    return EmailResource(settings=SettingsResource.from_environment(overrides))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_senders_share_one_team_pacer_and_get_their_own_breaker(
    backend: str, request: pytest.FixtureRequest
) -> None:
    db_url = str(request.getfixturevalue(f"{backend}_url"))
    resource = _resource(db_url)
    first, second = resource.sender(dry_run=False), resource.sender(dry_run=False)
    assert isinstance(first, ResendSender) and isinstance(second, ResendSender)
    assert first.rate_limiter is second.rate_limiter
    expected = PostgresPacer if backend == "postgres" else RateLimiter
    assert isinstance(first.rate_limiter, expected)
    assert first.breaker is not second.breaker and first.breaker.threshold == 4
    assert (first.request_timeout, first.retry_policy.max_retries) == (3.0, 2)
    assert isinstance(resource.sender(dry_run=True), DryRunSender)
