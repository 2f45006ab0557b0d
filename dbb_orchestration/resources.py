"""Dagster resources: settings, the application database, the email sender and the Notion client.

:class:`SettingsResource` has one field per environment variable the code reads (behaviour §12), so
the Dagster UI shows what a run uses: the resource's page (Deployment → the code location →
Resources → ``settings``) lists every field, and the launchpad's scaffolded config of a job shows the
same values. :meth:`SettingsResource.from_environment` binds each variable the location's
environment sets as ``dg.EnvVar`` (shown by name, never by value, and read again when a run starts),
leaves the others at their visible defaults, and lets explicit ``overrides`` win (tests and the demo
pass overrides instead of patching globals). The fields hold the variables' text only:
:meth:`Settings.from_env <dbb_orchestration.config.Settings.from_env>` stays the one place that parses
and validates them. Nothing is read at import time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from enum import Enum
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from dbb_orchestration.config import Settings, SettingsError
from dbb_orchestration.content import is_versioned_key_env_name
from dbb_orchestration.db.engine import is_postgres, shared_engine
from dbb_orchestration.email.sender import CircuitBreaker, DryRunSender, EmailSender, ResendSender
from dbb_orchestration.ratelimit import Pacer, PostgresPacer, advisory_key, shared_rate_limiter

_SETTINGS_DEFAULTS = {f.name: f.default for f in fields(Settings)}
_MISNAMED_KEYS_FIELD = "misnamed_content_key_variables"


def _text(value: object) -> str | None:
    """A :class:`Settings` default as the variable's text (what ``Settings.from_env`` parses back)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _setting(description: str, *, default_of: str | None = None) -> Any:
    """A field holding one variable's text; its default is the text of :class:`Settings`' default for
    the attribute ``default_of`` (so the UI shows the default and the defaults keep one home)."""
    default = _text(_SETTINGS_DEFAULTS[default_of]) if default_of else None
    return Field(default=default, description=description)


def _binding(name: str, overrides: Mapping[str, str], environ: Mapping[str, str]) -> str | None:
    """The override's value, else ``dg.EnvVar(name)`` when ``environ`` sets it, else ``None`` (default)."""
    if name in overrides:
        return overrides[name]
    return dg.EnvVar(name) if name in environ else None


def _misnamed_content_keys(env: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    """Set ``CONTENT_ENCRYPTION_KEY_V<n>`` variables that are not a supported version's."""
    return sorted(
        name
        for name, value in env.items()
        if is_versioned_key_env_name(name) and name not in names and value.strip()
    )


class SettingsResource(dg.ConfigurableResource):
    """The settings a run uses: one field per environment variable (the field's name is the variable's
    name in lower case), each holding the variable's text. Build it with :meth:`from_environment`;
    :meth:`get` hands the values to ``Settings.from_env``, which parses and validates them and names
    the variable in every error, before any work is done."""

    # Required, and secrets: bind them with EnvVar so the UI shows the variable's name only.
    database_url: str | None = _setting(
        "DATABASE_URL (required, secret: may hold a password): the backend's database, postgres://…, "
        "postgresql://… (psycopg 3) or sqlite:///…"
    )
    resend_api_key: str | None = _setting("RESEND_API_KEY (secret; required unless dry-run): Resend API key")
    content_encryption_key: str | None = _setting(
        "CONTENT_ENCRYPTION_KEY (secret): content key version 1, base64 of 32 bytes; new content uses "
        "the highest configured version"
    )
    content_encryption_key_v2: str | None = _setting("CONTENT_ENCRYPTION_KEY_V2 (secret): key version 2")
    content_encryption_key_v3: str | None = _setting("CONTENT_ENCRYPTION_KEY_V3 (secret): key version 3")
    content_encryption_key_v4: str | None = _setting("CONTENT_ENCRYPTION_KEY_V4 (secret): key version 4")
    content_encryption_key_v5: str | None = _setting("CONTENT_ENCRYPTION_KEY_V5 (secret): key version 5")
    content_encryption_key_v6: str | None = _setting("CONTENT_ENCRYPTION_KEY_V6 (secret): key version 6")
    content_encryption_key_v7: str | None = _setting("CONTENT_ENCRYPTION_KEY_V7 (secret): key version 7")
    content_encryption_key_v8: str | None = _setting("CONTENT_ENCRYPTION_KEY_V8 (secret): key version 8")
    content_encryption_key_v9: str | None = _setting("CONTENT_ENCRYPTION_KEY_V9 (secret): key version 9")
    content_encryption_key_v10: str | None = _setting("CONTENT_ENCRYPTION_KEY_V10 (secret): key version 10")
    misnamed_content_key_variables: list[str] = Field(
        default_factory=list,
        description="Names (never values) of set CONTENT_ENCRYPTION_KEY_V<n> variables outside _V2.._V10 "
        "found when the location loaded: a run refuses to start while any is listed, so a misnamed key "
        "never leaves content unencrypted",
    )
    unsubscribe_secret: str | None = _setting(
        "UNSUBSCRIBE_SECRET (secret): key of the one-click unsubscribe token; unset → no List-Unsubscribe"
    )
    sentry_dsn: str | None = _setting("SENTRY_DSN (secret): failed runs are reported to Sentry when set")
    # Where emails and links go.
    resend_from: str = _setting("RESEND_FROM: sender address", default_of="resend_from")
    resend_reply_to: str | None = _setting("RESEND_REPLY_TO: reply-to address of digests")
    resend_api_url: str = _setting("RESEND_API_URL: Resend's base URL", default_of="resend_api_url")
    notion_api_url: str = _setting("NOTION_API_URL: Notion's base URL", default_of="notion_api_url")
    frontend_url: str = _setting("FRONTEND_URL: base of the links in emails", default_of="frontend_url")
    deployment_mode: str = _setting(
        "DEPLOYMENT_MODE: cloud or self-hosted (billing off, everyone Pro, no sequences)",
        default_of="deployment_mode",
    )
    digest_email_dry_run: str = _setting(
        "DIGEST_EMAIL_DRY_RUN: true → digests do everything except call the provider",
        default_of="digest_email_dry_run",
    )
    sequence_email_dry_run: str = _setting(
        "SEQUENCE_EMAIL_DRY_RUN: true → sequence emails do everything except call the provider",
        default_of="sequence_email_dry_run",
    )
    dbb_automation: str = _setting(
        "DBB_AUTOMATION: off pauses every schedule and workflow sensor (read when the location loads)",
        default_of="automation_enabled",
    )
    dbb_now: str | None = _setting("DBB_NOW: demo and tests only, pins the wall clock (ISO-8601 with offset)")
    # Delivery.
    email_rate_limit_per_second: str = _setting(
        "EMAIL_RATE_LIMIT_PER_SECOND: provider requests per second across every process sharing the API "
        "key; 0 = unlimited",
        default_of="email_rate_limit_per_second",
    )
    email_max_concurrency: str = _setting(
        "EMAIL_MAX_CONCURRENCY: parallel batch requests in the digest send",
        default_of="email_max_concurrency",
    )
    email_batch_size: str = _setting(
        "EMAIL_BATCH_SIZE: digests per Resend batch request (at most 100)", default_of="email_batch_size"
    )
    email_request_timeout_seconds: str = _setting(
        "EMAIL_REQUEST_TIMEOUT_SECONDS: timeout of one provider request",
        default_of="email_request_timeout_seconds",
    )
    email_max_retries: str = _setting(
        "EMAIL_MAX_RETRIES: retries of a network error, 5xx or 429", default_of="email_max_retries"
    )
    email_circuit_breaker_failures: str = _setting(
        "EMAIL_CIRCUIT_BREAKER_FAILURES: consecutive failures after which a run stops calling the provider",
        default_of="email_circuit_breaker_failures",
    )
    # Digests.
    digest_batch_size: str = _setting(
        "DIGEST_BATCH_SIZE: users per set-based batch", default_of="digest_batch_size"
    )
    digest_catch_up_hours: str = _setting(
        "DIGEST_CATCH_UP_HOURS: an hourly partition whose hour ended longer ago creates and sends nothing",
        default_of="digest_catch_up_hours",
    )
    digest_lock_timeout_seconds: str = _setting(
        "DIGEST_LOCK_TIMEOUT_SECONDS: longest wait for a row lock in the digest transactions",
        default_of="digest_lock_timeout_seconds",
    )
    digest_users_per_step: str = _setting(
        "DIGEST_USERS_PER_STEP: users per batch step of digest_hourly_job", default_of="digest_users_per_step"
    )
    digest_executor: str = _setting(
        "DIGEST_EXECUTOR: in_process, multiprocess or k8s, the executor of digest_hourly_job (read when "
        "the location loads)",
        default_of="digest_executor",
    )
    # Sequences.
    sequence_max_requests_per_tick: str = _setting(
        "SEQUENCE_MAX_REQUESTS_PER_TICK: due sequence steps launched per sensor tick",
        default_of="sequence_max_requests_per_tick",
    )
    sequence_steps_per_run: str = _setting(
        "SEQUENCE_STEPS_PER_RUN: due sequence steps carried by one run", default_of="sequence_steps_per_run"
    )
    sequence_max_attempts: str = _setting(
        "SEQUENCE_MAX_ATTEMPTS: launches of a failing sequence step before it waits for an operator",
        default_of="sequence_max_attempts",
    )
    # Notion.
    notion_requests_per_second: str = _setting(
        "NOTION_REQUESTS_PER_SECOND: requests per second per connection; 0 = no pacing",
        default_of="notion_requests_per_second",
    )
    notion_page_concurrency: str = _setting(
        "NOTION_PAGE_CONCURRENCY: pages fetched in parallel per connection",
        default_of="notion_page_concurrency",
    )
    notion_connection_pause_seconds: str = _setting(
        "NOTION_CONNECTION_PAUSE_SECONDS: pause between connections synced one after another",
        default_of="notion_connection_pause_seconds",
    )
    notion_max_retry_wait_seconds: str = _setting(
        "NOTION_MAX_RETRY_WAIT_SECONDS: longest Retry-After honoured on a 429",
        default_of="notion_max_retry_wait_seconds",
    )

    @classmethod
    def variable_names(cls) -> tuple[str, ...]:
        """Every environment variable with a field, in declaration order."""
        return tuple(name.upper() for name in cls.model_fields if name != _MISNAMED_KEYS_FIELD)

    @classmethod
    def from_environment(
        cls, overrides: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
    ) -> SettingsResource:
        """Each field: the value in ``overrides``, else ``dg.EnvVar(NAME)`` when ``environ`` (default
        ``os.environ``) sets the variable, else the default. ``overrides`` naming no setting raise
        :class:`SettingsError` (a typo must not pass silently)."""
        environ = os.environ if environ is None else environ
        overrides = dict(overrides or {})
        names = cls.variable_names()
        unknown = sorted(n for n in overrides if n not in names and not is_versioned_key_env_name(n))
        if unknown:
            raise SettingsError(f"not a setting: {', '.join(unknown)}")
        values = {name.lower(): _binding(name, overrides, environ) for name in names}
        misnamed = _misnamed_content_keys({**environ, **overrides}, names)
        return cls(
            **{k: v for k, v in values.items() if v is not None}, misnamed_content_key_variables=misnamed
        )

    def variables(self) -> dict[str, str]:
        """The configured text by variable name (``EnvVar`` bindings resolved; unset ones left out)."""
        values: dict[str, str] = {}
        for name in self.variable_names():
            value = getattr(self, name.lower())
            if isinstance(value, dg.EnvVar):  # a resource used directly, outside a run
                value = value.get_value()
            if value is not None:
                values[name] = value
        # Settings.from_env refuses a set misnamed key with a message naming it (behaviour §12).
        values.update({name: "set" for name in self.misnamed_content_key_variables})
        return values

    def get(self) -> Settings:
        return Settings.from_env(self.variables())


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
