"""Sending email: one small interface, a Resend implementation and two local doubles.

Rendering lives apart (``email/rendering.py``); a sender only delivers an :class:`OutgoingEmail`,
one at a time (:meth:`ResendSender.send`, used by sequence steps) or up to 100 per request through
Resend's batch endpoint (:meth:`ResendSender.send_batch`, used by digests).

Every call is bounded in time (docs/operations.md "Delivery"):

* a per-request timeout (``EMAIL_REQUEST_TIMEOUT_SECONDS``) on the SDK's HTTP client;
* bounded retries (``EMAIL_MAX_RETRIES``) of network errors, 5xx, 429 and a concurrent use of the
  same idempotency key, with doubling back-off (a 429's ``retry-after`` is honoured), by the one retry
  implementation every HTTP provider shares (:mod:`dbb_orchestration.http_retry`);
* a circuit breaker: after ``EMAIL_CIRCUIT_BREAKER_FAILURES`` consecutive network failures or 5xx the
  sender stops calling the provider and every later call raises :class:`ProviderUnavailable` at once.

A 409 ``invalid_idempotent_request`` ("this key was already used, with another body") is not a
failure of the email: the key's first use was accepted. :attr:`EmailSendError.already_sent_under_key`
says so, for digests and sequences alike.

Provider messages can quote a recipient address or a key: :class:`EmailSendError` scrubs its message
(:func:`dbb_orchestration.redaction.scrub`) and is raised without the SDK exception as its cause.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import requests
import resend
from resend.http_client import HTTPClient

from dbb_orchestration.http_retry import (
    RetryPolicy,
    call_with_retries,
    is_retryable_status,
)
from dbb_orchestration.ratelimit import Pacer, RateLimiter
from dbb_orchestration.redaction import scrub

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
CONCURRENT_KEY_ERROR = "concurrent_idempotent_requests"
DUPLICATE_KEY_ERROR = "invalid_idempotent_request"
PROVIDER_UNAVAILABLE = "provider_unavailable"
MAX_BATCH = 100
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_BREAKER_FAILURES = 5


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
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    provider_id: str
    provider: str
    attempts: int = 1


@dataclass(frozen=True)
class BatchItemResult:
    """One email of a batch: its provider id, or the (scrubbed) per-email validation error."""

    provider_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """Per-email outcomes in the order the emails were given."""

    items: tuple[BatchItemResult, ...]
    provider: str
    attempts: int = 1


class EmailSendError(Exception):
    """The provider refused or failed. ``status`` is the HTTP status when there was one (``None`` for
    a network failure or timeout). The message is scrubbed of addresses, keys and tokens."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        name: str | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ):
        super().__init__(scrub(message))
        self.status = status
        self.name = name
        self.attempts = attempts
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return is_retryable_status(self.status) or (self.status == 409 and self.name == CONCURRENT_KEY_ERROR)

    @property
    def already_sent_under_key(self) -> bool:
        """409 ``invalid_idempotent_request``: the idempotency key was already used (with a different
        body), so an earlier attempt under this key was accepted: record the email as sent."""
        return self.status == 409 and self.name == DUPLICATE_KEY_ERROR

    @property
    def counts_as_outage(self) -> bool:
        """A network failure, a timeout or a 5xx: what the circuit breaker counts."""
        return self.status is None or self.status >= 500

    def as_json(self) -> dict[str, Any]:
        return {"message": str(self), "status": self.status, "name": self.name, "attempts": self.attempts}


class ProviderUnavailable(EmailSendError):
    """The circuit breaker is open: the provider was not called. Retryable by a later run."""

    def __init__(self, failures: int, attempts: int = 0) -> None:
        super().__init__(
            f"email provider unavailable: {failures} consecutive network failures or 5xx answers; "
            "not calling it again in this run",
            status=None,
            name=PROVIDER_UNAVAILABLE,
            attempts=attempts,
        )


class EmailSender(Protocol):
    provider: str

    def send(self, email: OutgoingEmail) -> SendResult: ...


@runtime_checkable
class BatchEmailSender(Protocol):
    provider: str

    def send(self, email: OutgoingEmail) -> SendResult: ...

    def send_batch(self, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult: ...


def send_batch(sender: EmailSender, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult:
    """``sender.send_batch`` when it has one; otherwise each email through ``sender.send`` with its own
    key (a refused email becomes that item's error; an outage propagates as :class:`EmailSendError`)."""
    if isinstance(sender, BatchEmailSender):
        return sender.send_batch(emails, idempotency_key)
    items: list[BatchItemResult] = []
    attempts = 0
    for email in emails:
        try:
            result = sender.send(email)
        except EmailSendError as exc:
            if exc.retryable:
                raise
            attempts += exc.attempts
            items.append(BatchItemResult(error=f"{exc.status}: {exc}"))
            continue
        attempts += result.attempts
        items.append(BatchItemResult(provider_id=result.provider_id))
    return BatchResult(tuple(items), sender.provider, attempts)


class CircuitBreaker:
    """Counts consecutive outages (network failures, timeouts, 5xx); at ``threshold`` it opens and stays
    open for the breaker's life (one run). Any other answer resets the count. Thread-safe."""

    def __init__(self, threshold: int = DEFAULT_BREAKER_FAILURES) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self.consecutive = 0
        self.opened = False
        self._lock = threading.Lock()

    def record(self, *, outage: bool) -> None:
        with self._lock:
            if outage:
                self.consecutive += 1
                if self.consecutive >= self.threshold:
                    self.opened = True
            elif not self.opened:
                self.consecutive = 0

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self.opened


_CALL = threading.local()


class _TimeoutClient(HTTPClient):
    """The SDK's HTTP client, installed as ``resend.default_http_client``: a ``requests`` session per
    thread (connections are reused) and the calling sender's timeout, read from a thread-local, so
    senders with different timeouts can share the SDK's module-global client."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        json: dict[str, object] | list[object] | None = None,
        files: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
    ) -> tuple[bytes, int, Mapping[str, str]]:
        timeout = getattr(_CALL, "timeout", None) or DEFAULT_REQUEST_TIMEOUT
        try:
            resp = self._session().request(
                method=method,
                url=url,
                headers=dict(headers),
                json=json if data is None and files is None else None,
                data=data,
                files=files,
                timeout=timeout,
            )
        except requests.RequestException as exc:
            # the SDK turns this into ResendError(code=500, error_type="HttpClientError")
            raise RuntimeError(f"{type(exc).__name__}: request failed") from None
        return resp.content, resp.status_code, resp.headers


_CLIENT = _TimeoutClient()
NETWORK_ERROR_TYPE = "HttpClientError"


class ResendSender:
    """Delivers through the real ``resend`` SDK.

    * the idempotency key goes with every call, so a repeated call returns the first email's ids;
    * each request times out after ``request_timeout`` seconds;
    * network errors, 5xx, 429 and ``concurrent_idempotent_requests`` are retried ``max_retries``
      times with doubling back-off from ``base_delay`` (a 429's ``retry-after``, when longer, is
      honoured; every wait capped at ``max_delay``);
    * ``breaker`` (one per sender, i.e. per run) stops all calls after too many consecutive outages;
    * every attempt first takes a slot from ``rate_limiter`` (in-process :class:`RateLimiter`, or the
      team-wide :class:`~dbb_orchestration.ratelimit.PostgresPacer`).
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
        rate_limiter: Pacer | None = None,
        max_retries: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise ValueError("RESEND_API_KEY is required for the Resend sender")
        self.from_address = from_address
        self.reply_to = reply_to
        self.rate_limiter: Pacer = rate_limiter or RateLimiter(None)
        self.retry_policy = RetryPolicy(
            max_retries=max_retries,
            initial=base_delay,
            cap=max_delay,
            max_retry_after=max_delay,
            retry_after_floor=True,
        )
        self.request_timeout = request_timeout
        self.breaker = breaker or CircuitBreaker()
        self._sleep = sleep
        # The SDK keeps its key, base URL and HTTP client in module globals; every sender in a process
        # shares them (the timeout travels per call, see _TimeoutClient).
        with self._sdk_lock:
            resend.api_key = api_key
            resend.api_url = api_url.rstrip("/")
            resend.default_http_client = _CLIENT

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
        response, attempts = self._call(
            lambda: resend.Emails.send(params, {"idempotency_key": email.idempotency_key})  # type: ignore[arg-type]
        )
        provider_id = _get(response, "id")
        if not provider_id:
            raise EmailSendError("provider response had no id", attempts=attempts)
        return SendResult(provider_id=str(provider_id), provider=self.provider, attempts=attempts)

    def send_batch(self, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult:
        """Up to 100 emails in one ``POST /emails/batch`` with ``idempotency_key`` and permissive
        validation: an invalid email is reported in its item, the others are sent. The same key with
        the same emails returns the same ids; with different emails Resend answers 409
        ``invalid_idempotent_request`` (raised as :class:`EmailSendError`)."""
        if not emails:
            return BatchResult((), self.provider, 0)
        if len(emails) > MAX_BATCH:
            raise ValueError(f"a batch holds at most {MAX_BATCH} emails, got {len(emails)}")
        params = [self._params(e) for e in emails]
        options = {"idempotency_key": idempotency_key, "batch_validation": "permissive"}
        response, attempts = self._call(lambda: resend.Batch.send(params, options))  # type: ignore[arg-type]
        return BatchResult(_map_batch(response, len(emails), attempts), self.provider, attempts)

    def _call(self, call: Callable[[], Any]) -> tuple[Any, int]:
        """The response and the number of attempts made, retried per :attr:`retry_policy`."""
        made = 0

        def attempt(number: int) -> Any:
            nonlocal made
            if self.breaker.is_open:
                raise ProviderUnavailable(self.breaker.threshold, attempts=number - 1)
            made = number
            self.rate_limiter.acquire()
            _CALL.timeout = self.request_timeout
            outcome = self._attempt(call, number)
            if not isinstance(outcome, EmailSendError):
                self.breaker.record(outage=False)
                return outcome
            self.breaker.record(outage=outcome.counts_as_outage)
            if outcome.counts_as_outage and self.breaker.is_open:
                raise ProviderUnavailable(self.breaker.threshold, attempts=number)
            raise outcome

        response = call_with_retries(
            attempt,
            policy=self.retry_policy,
            retryable=_retryable,
            retry_after=lambda exc: getattr(exc, "retry_after", None),
            sleep=self._sleep,
        )
        return response, made

    @staticmethod
    def _attempt(call: Callable[[], Any], attempt: int) -> Any:
        """The response, or the :class:`EmailSendError` describing the failure (returned, not raised,
        so it never carries the SDK exception — and its text — as ``__context__``)."""
        try:
            return call()
        except resend.exceptions.ResendError as exc:
            name = getattr(exc, "error_type", None)
            network = name == NETWORK_ERROR_TYPE
            return EmailSendError(
                str(getattr(exc, "message", None) or exc),
                status=None if network else _int_or_none(getattr(exc, "code", None)),
                name="network_error" if network else name,
                attempts=attempt,
                retry_after=_retry_after(exc),
            )
        except Exception as exc:  # anything else the SDK or requests raised on the way
            return EmailSendError(f"{type(exc).__name__}: {exc}", status=None, attempts=attempt)


def _retryable(exc: BaseException) -> bool:
    """A refusal worth another attempt; never once the breaker is open."""
    return isinstance(exc, EmailSendError) and exc.retryable and not isinstance(exc, ProviderUnavailable)


def _get(response: Any, key: str) -> Any:
    if isinstance(response, Mapping):
        return response.get(key)
    return getattr(response, key, None)


def _map_batch(response: Any, size: int, attempts: int) -> tuple[BatchItemResult, ...]:
    """Resend's batch answer ``{"data": [{"id"}…], "errors": [{"index", "message"}…]}`` → one result per
    email in order: ``data`` lists the ids of the accepted emails in request order, skipping the
    indexes named in ``errors``."""
    errors = _batch_errors(response, size)
    ids = [str(_get(d, "id") or "") for d in (_get(response, "data") or [])]
    if len(ids) + len(errors) != size or not all(ids):
        raise EmailSendError(
            f"batch answer does not match the request: {len(ids)} ids and {len(errors)} errors for "
            f"{size} emails",
            attempts=attempts,
            name="unexpected_batch_answer",
            status=200,
        )
    accepted = iter(ids)
    return tuple(
        BatchItemResult(error=errors[i]) if i in errors else BatchItemResult(provider_id=next(accepted))
        for i in range(size)
    )


def _batch_errors(response: Any, size: int) -> dict[int, str]:
    """The (scrubbed) per-email errors of a batch answer by index; indexes outside the batch are ignored."""
    errors: dict[int, str] = {}
    for err in _get(response, "errors") or []:
        index = _int_or_none(_get(err, "index"))
        if index is not None and 0 <= index < size:
            errors[index] = scrub(str(_get(err, "message") or "rejected"))
    return errors


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

    def send_batch(self, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult:
        with self._lock:
            self.sent.extend(emails)
        return BatchResult(
            tuple(BatchItemResult(provider_id=f"dry-run-{e.idempotency_key}") for e in emails), self.provider
        )


class RecordingSender:
    """In-memory sender for unit tests: records emails, de-duplicates keys like the provider, can fail
    (a whole call with :meth:`fail_next`, single emails of a batch with :meth:`reject`)."""

    provider = "memory"

    def __init__(self) -> None:
        self.sent: list[OutgoingEmail] = []
        self.calls = 0
        self.batch_keys: list[str] = []
        self._ids: dict[str, str] = {}
        self._failures: list[EmailSendError] = []
        self._rejected: set[str] = set()
        self._lock = threading.Lock()

    def fail_next(self, count: int = 1, *, status: int = 500, message: str = "injected failure") -> None:
        with self._lock:
            self._failures.extend(EmailSendError(message, status=status) for _ in range(count))

    def reject(self, address: str) -> None:
        """Batch sends report emails to ``address`` as per-email validation errors."""
        with self._lock:
            self._rejected.add(address)

    def _deliver(self, email: OutgoingEmail) -> str:
        if email.idempotency_key in self._ids:
            return self._ids[email.idempotency_key]
        provider_id = f"mem-{len(self._ids) + 1}"
        self._ids[email.idempotency_key] = provider_id
        self.sent.append(email)
        return provider_id

    def send(self, email: OutgoingEmail) -> SendResult:
        with self._lock:
            self.calls += 1
            if self._failures:
                raise self._failures.pop(0)
            return SendResult(self._deliver(email), self.provider)

    def send_batch(self, emails: Sequence[OutgoingEmail], idempotency_key: str) -> BatchResult:
        with self._lock:
            self.calls += 1
            self.batch_keys.append(idempotency_key)
            if self._failures:
                raise self._failures.pop(0)
            items = tuple(
                BatchItemResult(error="Invalid `to` field.")
                if e.to in self._rejected
                else BatchItemResult(provider_id=self._deliver(e))
                for e in emails
            )
            return BatchResult(items, self.provider)
