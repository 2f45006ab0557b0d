"""Sending email: one small interface, a Resend implementation and two local doubles.

Rendering lives apart (``email/rendering.py``); a sender only delivers an :class:`OutgoingEmail`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import resend

from dbb_orchestration.ratelimit import RateLimiter

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
RETRYABLE_STATUSES = frozenset({429, 500})


def sanitize_tag(value: object) -> str:
    """Resend tag names/values allow only ``A-Za-z0-9_-``: every other character becomes ``-``."""
    return _TAG_UNSAFE.sub("-", str(value)) or "-"


@dataclass(frozen=True)
class OutgoingEmail:
    to: str
    subject: str
    html: str
    text: str
    idempotency_key: str
    tags: dict[str, str] = field(default_factory=dict)
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    provider_id: str
    provider: str
    attempts: int = 1


class EmailSendError(Exception):
    """The provider refused or failed. ``status`` is the HTTP status when there was one."""

    def __init__(
        self, message: str, *, status: int | None = None, name: str | None = None, attempts: int = 1
    ):
        super().__init__(message)
        self.status = status
        self.name = name
        self.attempts = attempts

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUSES

    def as_json(self) -> dict[str, Any]:
        return {"message": str(self), "status": self.status, "name": self.name, "attempts": self.attempts}


class EmailSender(Protocol):
    provider: str

    def send(self, email: OutgoingEmail) -> SendResult: ...


class ResendSender:
    """Delivers through the real ``resend`` SDK.

    * the idempotency key goes with every call, so a repeated call returns the first email's id;
    * 429 and 500 are retried ``max_retries`` times with doubling back-off from ``base_delay``; a 429's
      ``retry-after`` header, when longer, is honoured (capped at ``max_delay``);
    * calls are paced by a shared :class:`RateLimiter`.
    """

    provider = "resend"
    _sdk_lock = threading.Lock()

    def __init__(
        self,
        *,
        api_key: str,
        api_url: str,
        from_address: str,
        reply_to: str | None = None,
        rate_limiter: RateLimiter | None = None,
        max_retries: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise ValueError("RESEND_API_KEY is required for the Resend sender")
        self.from_address = from_address
        self.reply_to = reply_to
        self.rate_limiter = rate_limiter or RateLimiter(None)
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        # The SDK keeps its key and base URL in module globals; every sender in a process shares them.
        with self._sdk_lock:
            resend.api_key = api_key
            resend.api_url = api_url.rstrip("/")

    def _params(self, email: OutgoingEmail) -> dict[str, Any]:
        params: dict[str, Any] = {
            "from": self.from_address,
            "to": [email.to],
            "subject": email.subject,
            "html": email.html,
            "text": email.text,
            "tags": [{"name": sanitize_tag(k), "value": sanitize_tag(v)} for k, v in email.tags.items()],
        }
        reply_to = email.reply_to or self.reply_to
        if reply_to:
            params["reply_to"] = reply_to
        if email.headers:
            params["headers"] = dict(email.headers)
        return params

    def send(self, email: OutgoingEmail) -> SendResult:
        params = self._params(email)
        attempt = 0
        while True:
            attempt += 1
            self.rate_limiter.acquire()
            try:
                response = resend.Emails.send(params, {"idempotency_key": email.idempotency_key})  # type: ignore[arg-type]
            except resend.exceptions.ResendError as exc:
                status = _int_or_none(getattr(exc, "code", None))
                retry_after = _retry_after(exc)
                error = EmailSendError(
                    getattr(exc, "message", None) or str(exc),
                    status=status,
                    name=getattr(exc, "error_type", None),
                    attempts=attempt,
                )
            except Exception as exc:  # network errors: connection refused, timeouts
                retry_after = None
                error = EmailSendError(f"{type(exc).__name__}: {exc}", status=None, attempts=attempt)
            else:
                provider_id = (
                    response.get("id") if isinstance(response, dict) else getattr(response, "id", None)
                )
                if not provider_id:
                    raise EmailSendError("provider response had no id", attempts=attempt)
                return SendResult(provider_id=str(provider_id), provider=self.provider, attempts=attempt)
            if not error.retryable or attempt > self.max_retries:
                raise error
            delay = self.base_delay * (2 ** (attempt - 1))
            if retry_after is not None:
                delay = max(delay, retry_after)
            self._sleep(min(delay, self.max_delay))


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    raw = next((v for k, v in dict(headers).items() if str(k).lower() == "retry-after"), None)
    try:
        return float(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return None


class DryRunSender:
    """Exercises everything but the provider call: the id becomes ``dry-run-<key>``."""

    provider = "dry-run"

    def __init__(self) -> None:
        self.sent: list[OutgoingEmail] = []
        self._lock = threading.Lock()

    def send(self, email: OutgoingEmail) -> SendResult:
        with self._lock:
            self.sent.append(email)
        return SendResult(provider_id=f"dry-run-{email.idempotency_key}", provider=self.provider)


class RecordingSender:
    """In-memory sender for unit tests: records emails, de-duplicates keys like the provider, can fail."""

    provider = "memory"

    def __init__(self) -> None:
        self.sent: list[OutgoingEmail] = []
        self.calls = 0
        self._ids: dict[str, str] = {}
        self._failures: list[EmailSendError] = []
        self._lock = threading.Lock()

    def fail_next(self, count: int = 1, *, status: int = 500, message: str = "injected failure") -> None:
        with self._lock:
            self._failures.extend(EmailSendError(message, status=status) for _ in range(count))

    def send(self, email: OutgoingEmail) -> SendResult:
        with self._lock:
            self.calls += 1
            if self._failures:
                raise self._failures.pop(0)
            if email.idempotency_key in self._ids:
                return SendResult(self._ids[email.idempotency_key], self.provider)
            provider_id = f"mem-{len(self._ids) + 1}"
            self._ids[email.idempotency_key] = provider_id
            self.sent.append(email)
            return SendResult(provider_id, self.provider)
