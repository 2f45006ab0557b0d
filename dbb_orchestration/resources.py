"""Dagster resources: settings, the application database, the email sender and the Notion client.

Every resource reads its values through one :class:`~dbb_orchestration.config.Settings`, built from
the process environment plus explicit ``overrides`` (tests and the demo pass overrides instead of
patching globals). Nothing is read at import time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from dbb_orchestration.config import Settings, SettingsError
from dbb_orchestration.db.engine import is_postgres, shared_engine
from dbb_orchestration.email.sender import CircuitBreaker, DryRunSender, EmailSender, ResendSender
from dbb_orchestration.ratelimit import Pacer, PostgresPacer, advisory_key, shared_rate_limiter


class SettingsResource(dg.ConfigurableResource):
    """The typed settings: the environment, with ``overrides`` taking precedence."""

    overrides: dict[str, str] = Field(
        default_factory=dict, description="Values that win over the environment"
    )

    def get(self) -> Settings:
        return Settings.from_env({**os.environ, **self.overrides})


class DatabaseResource(dg.ConfigurableResource):
    """The application database named by ``DATABASE_URL`` (one pooled engine per process)."""

    settings: SettingsResource

    @property
    def engine(self) -> sa.Engine:
        return shared_engine(self.settings.get().database_url)

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A connection inside a transaction, committed on success and rolled back on error."""
        with self.engine.begin() as conn:
            yield conn


_PACERS: dict[tuple[str, int, float], Pacer] = {}
_PACERS_LOCK = threading.Lock()


def team_pacer(settings: Settings) -> Pacer:
    """The pacer every sender of this process uses for ``settings``' API key: on Postgres the team-wide
    :class:`PostgresPacer` (shared with every other process using the key), on SQLite the process-wide
    :class:`~dbb_orchestration.ratelimit.RateLimiter`. One per (database, key, rate) per process."""
    name = settings.resend_api_key or ""
    rate = float(settings.email_rate_limit_per_second or 0)
    cache_key = (settings.database_url, advisory_key(name), rate)
    with _PACERS_LOCK:
        pacer = _PACERS.get(cache_key)
        if pacer is None:
            engine = shared_engine(settings.database_url)
            if is_postgres(engine):
                pacer = PostgresPacer(engine, name, rate)
            else:
                pacer = shared_rate_limiter(str(advisory_key(name)), rate)
            _PACERS[cache_key] = pacer
        return pacer


def resend_sender(settings: Settings) -> ResendSender:
    """The Resend sender for ``settings`` (``RESEND_API_KEY`` required): team-wide pacing, request
    timeout, bounded retries and a fresh circuit breaker (one per run)."""
    settings.require_resend(dry_run=False)
    assert settings.resend_api_key is not None
    return ResendSender(
        api_key=settings.resend_api_key,
        api_url=settings.resend_api_url,
        from_address=settings.resend_from,
        reply_to=settings.resend_reply_to,
        rate_limiter=team_pacer(settings),
        max_retries=settings.email_max_retries,
        request_timeout=settings.email_request_timeout_seconds,
        breaker=CircuitBreaker(settings.email_circuit_breaker_failures),
    )


class EmailResource(dg.ConfigurableResource):
    """Builds the email sender: Resend, or the dry-run sender when the job's dry-run flag is on."""

    settings: SettingsResource

    def sender(self, *, dry_run: bool) -> EmailSender:
        settings = self.settings.get()
        if dry_run:
            return DryRunSender()
        return resend_sender(settings)

    def sender_for_op(self, *, dry_run: bool) -> EmailSender:
        """:meth:`sender` for an op: a missing ``RESEND_API_KEY`` fails the op at once (no retries),
        naming the variable, before any work is done."""
        try:
            return self.sender(dry_run=dry_run)
        except SettingsError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
