"""One typed settings object, read from an environment mapping (behaviour §12).

Nothing is read at import time: callers pass a mapping of variables to :meth:`Settings.from_env` (the
Dagster ``SettingsResource``'s configured values, see ``resources.py``, or a dict in tests). Every problem is raised as :class:`SettingsError` naming the variable,
before any work is done. Secrets are never included in messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dbb_orchestration.content import ContentKeyError, ContentKeyring
from dbb_orchestration.db.engine import DatabaseUrlError, normalize_database_url
from dbb_orchestration.plans import DeploymentMode, parse_deployment_mode

DEFAULT_RESEND_API_URL = "https://api.resend.com"
DEFAULT_NOTION_API_URL = "https://api.notion.com"
DEFAULT_FROM = "digest@dbb.notionist.app"
DEFAULT_FRONTEND_URL = "http://localhost:3000"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


DIGEST_EXECUTORS = ("in_process", "multiprocess", "k8s")


def digest_executor_kind(env: Mapping[str, str]) -> str:
    """``DIGEST_EXECUTOR``: ``in_process``, ``multiprocess`` (default) or ``k8s``, the executor of the
    hourly digest job's batch steps."""
    value = (env.get("DIGEST_EXECUTOR") or "").strip() or "multiprocess"
    if value not in DIGEST_EXECUTORS:
        raise SettingsError(f"DIGEST_EXECUTOR must be one of {', '.join(DIGEST_EXECUTORS)}, not {value!r}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, integer: bool = False
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError as exc:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, minimum=0)
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {env.get(name)!r}")
    return value


def _batch_size(env: Mapping[str, str], name: str, default: int) -> int:
    value = int(_number(env, name, default, minimum=1, integer=True))
    if value > 100:
        raise SettingsError(f"{name} must be <= 100 (Resend's batch limit), got {env.get(name)!r}")
    return value


def _text(env: Mapping[str, str], name: str) -> str | None:
    """The trimmed value, or ``None`` when unset or blank."""
    return (env.get(name) or "").strip() or None


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = (env.get(name) or "").strip() or default
    if not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _instant(env: Mapping[str, str], name: str) -> datetime | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SettingsError(f"{name} must be an ISO-8601 time with an offset, got {raw!r}") from exc
    if value.tzinfo is None:
        raise SettingsError(f"{name} must include a UTC offset, got {raw!r}")
    return value.astimezone(UTC)


AUTOMATION_VARIABLE = "DBB_AUTOMATION"


def automation_enabled(env: Mapping[str, str]) -> bool:
    """``DBB_AUTOMATION``: ``on`` (default) or ``off`` (also true/false, 1/0, yes/no). Empty → on."""
    raw = env.get(AUTOMATION_VARIABLE)
    if raw is None or not raw.strip():
        return True
    return _bool(env, AUTOMATION_VARIABLE)


@dataclass(frozen=True)
class Settings:
    database_url: str
    resend_api_key: str | None = None
    resend_from: str = DEFAULT_FROM
    resend_reply_to: str | None = None
    resend_api_url: str = DEFAULT_RESEND_API_URL
    notion_api_url: str = DEFAULT_NOTION_API_URL
    frontend_url: str = DEFAULT_FRONTEND_URL
    deployment_mode: DeploymentMode = DeploymentMode.CLOUD
    digest_email_dry_run: bool = False
    sequence_email_dry_run: bool = False
    keyring: ContentKeyring = field(default_factory=ContentKeyring.empty)
    sentry_dsn: str | None = None
    # Operational knobs (all optional).
    email_rate_limit_per_second: float = 2.0  # Resend's default team limit; 0 = unlimited
    email_max_concurrency: int = 4
    digest_batch_size: int = 1000
    sequence_max_requests_per_tick: int = 500
    sequence_max_attempts: int = 5
    notion_requests_per_second: float = 3.0
    notion_page_concurrency: int = 4
    notion_connection_pause_seconds: float = 2.0
    sequence_steps_per_run: int = 50
    # Demo and tests only: pins the wall clock (``DBB_NOW``, ISO-8601 with offset).
    now_override: datetime | None = None
    # Longest Notion ``Retry-After`` honoured on a 429, in seconds.
    notion_max_retry_wait_seconds: float = 300.0
    # ``DBB_AUTOMATION=off`` pauses every schedule and workflow sensor (see dbb_orchestration/automation.py).
    automation_enabled: bool = True
    # HMAC-SHA256 key of the one-click unsubscribe token (``UNSUBSCRIBE_SECRET``); unset → no header.
    unsubscribe_secret: str | None = None
    # An hourly digest partition whose hour ended more than this many hours before ``now()`` creates
    # and sends nothing (``DIGEST_CATCH_UP_HOURS``; docs/operations.md, backfill section).
    digest_catch_up_hours: int = 24
    # Delivery (docs/operations.md "Delivery"): bounded provider calls, batches, short DB waits.
    email_request_timeout_seconds: float = 10.0
    email_max_retries: int = 3
    email_circuit_breaker_failures: int = 5
    email_batch_size: int = 100  # digests per Resend batch request (Resend allows at most 100)
    digest_lock_timeout_seconds: float = 5.0
    # The hourly job's fan-out (docs/deployment.md "Executor"): users per batch step, and the executor
    # (``in_process`` / ``multiprocess`` / ``k8s``; read when the definitions load).
    digest_users_per_step: int = 10_000
    digest_executor: str = "multiprocess"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse and validate every setting; raise :class:`SettingsError` naming the first bad one."""
        raw_db = env.get("DATABASE_URL", "")
        try:
            normalize_database_url(raw_db)
        except DatabaseUrlError as exc:
            raise SettingsError(str(exc)) from None
        try:
            mode = parse_deployment_mode(env.get("DEPLOYMENT_MODE"))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        try:
            keyring = ContentKeyring.from_env(env)
        except ContentKeyError as exc:
            raise SettingsError(str(exc)) from None
        return cls(
            database_url=raw_db.strip(),
            resend_api_key=_text(env, "RESEND_API_KEY"),
            resend_from=_text(env, "RESEND_FROM") or DEFAULT_FROM,
            resend_reply_to=_text(env, "RESEND_REPLY_TO"),
            resend_api_url=_url(env, "RESEND_API_URL", DEFAULT_RESEND_API_URL),
            notion_api_url=_url(env, "NOTION_API_URL", DEFAULT_NOTION_API_URL),
            frontend_url=_url(env, "FRONTEND_URL", DEFAULT_FRONTEND_URL),
            deployment_mode=mode,
            digest_email_dry_run=_bool(env, "DIGEST_EMAIL_DRY_RUN"),
            sequence_email_dry_run=_bool(env, "SEQUENCE_EMAIL_DRY_RUN"),
            keyring=keyring,
            sentry_dsn=_text(env, "SENTRY_DSN"),
            email_rate_limit_per_second=_number(env, "EMAIL_RATE_LIMIT_PER_SECOND", 2.0, minimum=0),
            email_max_concurrency=int(_number(env, "EMAIL_MAX_CONCURRENCY", 4, minimum=1, integer=True)),
            digest_batch_size=int(_number(env, "DIGEST_BATCH_SIZE", 1000, minimum=1, integer=True)),
            sequence_max_requests_per_tick=int(
                _number(env, "SEQUENCE_MAX_REQUESTS_PER_TICK", 500, minimum=1, integer=True)
            ),
            sequence_max_attempts=int(_number(env, "SEQUENCE_MAX_ATTEMPTS", 5, minimum=1, integer=True)),
            notion_requests_per_second=_number(env, "NOTION_REQUESTS_PER_SECOND", 3.0, minimum=0),
            notion_page_concurrency=int(_number(env, "NOTION_PAGE_CONCURRENCY", 4, minimum=1, integer=True)),
            notion_connection_pause_seconds=_number(env, "NOTION_CONNECTION_PAUSE_SECONDS", 2.0, minimum=0),
            sequence_steps_per_run=int(_number(env, "SEQUENCE_STEPS_PER_RUN", 50, minimum=1, integer=True)),
            now_override=_instant(env, "DBB_NOW"),
            notion_max_retry_wait_seconds=_number(env, "NOTION_MAX_RETRY_WAIT_SECONDS", 300.0, minimum=0),
            automation_enabled=automation_enabled(env),
            unsubscribe_secret=(env.get("UNSUBSCRIBE_SECRET") or "").strip() or None,
            digest_catch_up_hours=int(_number(env, "DIGEST_CATCH_UP_HOURS", 24, minimum=0, integer=True)),
            email_request_timeout_seconds=_positive(env, "EMAIL_REQUEST_TIMEOUT_SECONDS", 10.0),
            email_max_retries=int(_number(env, "EMAIL_MAX_RETRIES", 3, minimum=0, integer=True)),
            email_circuit_breaker_failures=int(
                _number(env, "EMAIL_CIRCUIT_BREAKER_FAILURES", 5, minimum=1, integer=True)
            ),
            email_batch_size=_batch_size(env, "EMAIL_BATCH_SIZE", 100),
            digest_lock_timeout_seconds=_positive(env, "DIGEST_LOCK_TIMEOUT_SECONDS", 5.0),
            digest_users_per_step=int(_number(env, "DIGEST_USERS_PER_STEP", 10_000, minimum=1, integer=True)),
            digest_executor=digest_executor_kind(env),
        )

    def now(self) -> datetime:
        """The wall clock (aware UTC) that records when things really happened, e.g. ``sent_at``.

        Logical times (a partition's hour) are passed explicitly instead. ``DBB_NOW`` pins this clock
        so the demo can simulate a day; production never sets it.
        """
        return self.now_override or datetime.now(UTC)

    def require_resend(self, *, dry_run: bool) -> None:
        """Raise unless emails can be sent: ``RESEND_API_KEY`` is required when not in dry-run."""
        if not dry_run and not self.resend_api_key:
            raise SettingsError(
                "RESEND_API_KEY is not set (set it, or set DIGEST_EMAIL_DRY_RUN/SEQUENCE_EMAIL_DRY_RUN=true)"
            )

    @property
    def billing_enabled(self) -> bool:
        return self.deployment_mode is DeploymentMode.CLOUD

    def __repr__(self) -> str:  # never print secrets
        return (
            f"Settings(database={normalize_database_url(self.database_url).render_as_string(hide_password=True)!r}, "
            f"mode={self.deployment_mode.value}, digest_dry_run={self.digest_email_dry_run}, "
            f"sequence_dry_run={self.sequence_email_dry_run}, key_versions={list(self.keyring.versions)})"
        )
