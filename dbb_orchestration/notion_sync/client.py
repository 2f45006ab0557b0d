"""The Notion API as the weekly sync uses it: the real notion-client, paced and retried once (behaviour §11).

Retries are done here, not by the SDK. notion-client 3.1 retries 429 and 5xx on its own (2 retries, up to
60 s apart, with random jitter), which would stack with ours (5 × 6 = 30 attempts) and sleep outside the
rate limiter. :func:`make_sdk_client` therefore builds the client with ``retry=False`` and
:class:`NotionApi` applies behaviour §11's policy itself (:func:`notion_retry_policy`, run by the retry
implementation every HTTP provider shares, :mod:`dbb_orchestration.http_retry`), where it can also count
attempts and pass every attempt through the connection's :class:`~dbb_orchestration.ratelimit.RateLimiter`:

- 429 ``rate_limited``: wait ``Retry-After`` seconds as sent, bounded only by
  ``NOTION_MAX_RETRY_WAIT_SECONDS`` (default 300 s), or the back-off when the header is missing or
  unreadable;
- 500/502/503/504, a request timeout or a transport error (connection reset, refused …): the back-off,
  400 ms doubling, capped at 10 s (every call made here only reads, so repeating it is safe);
- at most 5 retries, then :class:`NotionRequestError`;
- 401 → :class:`NotionUnauthorized` at once (the connection is aborted), 404 → :class:`NotionNotFound`
  at once (the caller skips the object), any other error → :class:`NotionRequestError` at once.

Nothing here logs tokens or response bodies; errors carry the HTTP status, the Notion error code and
Notion's message (which names object ids, never content).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg
import httpx
from notion_client import Client
from notion_client.errors import HTTPResponseError, RequestTimeoutError
from pydantic import PrivateAttr

from dbb_orchestration.http_retry import (
    RETRYABLE_STATUSES,
    RetryPolicy,
    call_with_retries,
    is_retryable_status,
)
from dbb_orchestration.ratelimit import RateLimiter
from dbb_orchestration.resources import SettingsResource

__all__ = [
    "MAX_RETRIES",
    "RETRYABLE_STATUSES",
    "NotionApi",
    "NotionApiError",
    "NotionNotFound",
    "NotionRequestError",
    "NotionResource",
    "NotionUnauthorized",
    "RetryPolicy",
    "make_sdk_client",
    "notion_retry_policy",
    "parse_retry_after",
    "retry_delay",
]

MAX_RETRIES = 5
INITIAL_BACKOFF_SECONDS = 0.4
MAX_BACKOFF_SECONDS = 10.0
DEFAULT_MAX_RETRY_WAIT_SECONDS = 300.0
REQUEST_TIMEOUT_MS = 60_000
_SDK_LOGGER = "dbb_orchestration.notion_sync.sdk"
_MESSAGE_LIMIT = 300


def notion_retry_policy(
    *, max_retries: int = MAX_RETRIES, max_retry_after: float = DEFAULT_MAX_RETRY_WAIT_SECONDS
) -> RetryPolicy:
    """behaviour §11's policy: back-off from 400 ms doubling, capped at 10 s; a 429's ``Retry-After``
    waited as sent, bounded only by ``max_retry_after``; at most ``max_retries`` retries."""
    return RetryPolicy(
        max_retries=max_retries,
        initial=INITIAL_BACKOFF_SECONDS,
        cap=MAX_BACKOFF_SECONDS,
        max_retry_after=max_retry_after,
    )


class NotionApiError(Exception):
    """A Notion call failed for good. ``status`` is the HTTP status (0 for timeouts and transport errors),
    ``code`` Notion's error code (or ``timeout`` / ``transport_error``), ``attempts`` how many requests
    were made."""

    def __init__(
        self, message: str, *, status: int, code: str, attempts: int = 1, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.attempts = attempts
        self.retry_after = retry_after  # a 429's Retry-After, in seconds

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe description for ``sync_runs.error_json`` (no tokens, no note content)."""
        return {
            "type": type(self).__name__,
            "status": self.status,
            "code": self.code,
            "message": str(self)[:_MESSAGE_LIMIT],
            "attempts": self.attempts,
        }


class NotionUnauthorized(NotionApiError):
    """401: the token is invalid or revoked; the whole connection stops."""


class NotionNotFound(NotionApiError):
    """404: the object is gone or no longer shared with the integration."""


class NotionRequestError(NotionApiError):
    """Any other failure, including retryable ones once the retries are used up."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given as delta-seconds (``"3"``, ``"1.5"``).

    ``None``, blank, negative, non-numeric values (including the HTTP-date form, which Notion does not
    send) and NaN/infinity give ``None`` (the caller then uses its back-off)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return None
    return seconds


def retry_delay(status: int, retry_after: float | None, attempt: int, policy: RetryPolicy) -> float | None:
    """How long :meth:`NotionApi._call` waits before retry number ``attempt + 1`` (``attempt`` counts
    from 0), or ``None`` when the failure is not retried: ``status`` is not retryable
    (:func:`~dbb_orchestration.http_retry.is_retryable_status`; 0 = timeout / transport error) or the
    retries are used up. A 429 waits ``retry_after`` when given (Notion says how long its limit lasts:
    retrying earlier only spends the retries), at most ``policy.max_retry_after``; everything else the
    back-off. A negative ``attempt`` counts as 0."""
    attempt = max(0, attempt)
    if not is_retryable_status(status) or attempt >= policy.max_retries:
        return None
    return policy.delay(attempt, retry_after if status == 429 else None)


def make_sdk_client(token: str, base_url: str, *, timeout_ms: int = REQUEST_TIMEOUT_MS) -> Client:
    """A notion-client ``Client`` for ``token`` against ``base_url`` (Notion-Version 2025-09-03, the
    SDK's default), with the SDK's own retries off (see the module docstring) and its logging muted
    below ERROR. An empty token raises ``ValueError``."""
    if not token:
        raise ValueError("a Notion access token is required")
    return Client(
        auth=token,
        base_url=base_url.rstrip("/"),
        timeout_ms=timeout_ms,
        retry=False,
        logger=logging.getLogger(_SDK_LOGGER),
        log_level=logging.ERROR,
    )


class NotionApi:
    """The calls the sync makes, each paced by ``rate_limiter`` (per attempt) and retried per ``policy``.

    Thread-safe: one instance per connection is shared by that connection's page-fetching threads, so
    they share one rate limit. ``sleep`` is injectable for tests. Counters: :attr:`requests` (attempts
    made) and :attr:`retries`.
    """

    def __init__(
        self,
        sdk: Client,
        *,
        rate_limiter: RateLimiter | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.sdk = sdk
        self.rate_limiter = rate_limiter or RateLimiter(None)
        self.policy = policy or notion_retry_policy()
        self._sleep = sleep
        self._lock = threading.Lock()
        self._requests = 0
        self._retries = 0

    # -- counters -------------------------------------------------------------------------------------
    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def retries(self) -> int:
        with self._lock:
            return self._retries

    # -- calls ----------------------------------------------------------------------------------------
    def retrieve_database(self, database_id: str) -> dict[str, Any]:
        """``GET /v1/databases/{id}``: the database with its ``data_sources``."""
        return self._call("databases.retrieve", lambda: self.sdk.databases.retrieve(database_id))

    def query_data_source(self, data_source_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/data_sources/{id}/query`` with ``body`` (``filter``, ``sorts``, ``page_size``,
        ``start_cursor``)."""
        return self._call(
            "data_sources.query", lambda: self.sdk.data_sources.query(data_source_id, **dict(body))
        )

    def list_block_children(self, block_id: str, start_cursor: str | None = None) -> dict[str, Any]:
        """``GET /v1/blocks/{id}/children`` (100 per page), from ``start_cursor`` when given."""
        kwargs: dict[str, Any] = {"page_size": 100}
        if start_cursor:
            kwargs["start_cursor"] = start_cursor
        return self._call("blocks.children.list", lambda: self.sdk.blocks.children.list(block_id, **kwargs))

    def close(self) -> None:
        self.sdk.close()

    def __enter__(self) -> NotionApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the retry loop -------------------------------------------------------------------------------
    def _call(self, name: str, send: Callable[[], Any]) -> dict[str, Any]:
        """``send()`` paced and retried per :attr:`policy` (:func:`retry_delay` decides)."""
        return call_with_retries(
            lambda number: self._attempt(name, send, number),
            policy=self.policy,
            retryable=_retryable,
            retry_after=lambda exc: getattr(exc, "retry_after", None),
            sleep=self._sleep,
            on_retry=self._count_retry,
        )

    def _count_retry(self, _wait: float) -> None:
        with self._lock:
            self._retries += 1

    def _attempt(self, name: str, send: Callable[[], Any], number: int) -> dict[str, Any]:
        """One request; a failure is raised as the :class:`NotionApiError` it means (built outside the
        ``except`` so it never carries the SDK exception, and its text, as context)."""
        self.rate_limiter.acquire()
        with self._lock:
            self._requests += 1
        error: NotionApiError
        try:
            result = send()
        except HTTPResponseError as exc:
            status, code = exc.status, str(getattr(exc.code, "value", exc.code))
            retry_after = parse_retry_after(exc.headers.get("retry-after")) if status == 429 else None
            message = f"{name}: Notion answered {status} {code}: {str(exc)[:_MESSAGE_LIMIT]}"
            error = _error_for(status)(
                message, status=status, code=code, attempts=number, retry_after=retry_after
            )
        except RequestTimeoutError:
            error = NotionRequestError(
                f"{name}: request timed out", status=0, code="timeout", attempts=number
            )
        except httpx.TransportError as exc:
            message = f"{name}: {type(exc).__name__}"
            error = NotionRequestError(message, status=0, code="transport_error", attempts=number)
        else:
            if isinstance(result, dict):
                return result
            message = f"{name}: unexpected response type {type(result).__name__}"
            error = NotionRequestError(message, status=200, code="bad_response", attempts=number)
        raise error


def _error_for(status: int) -> type[NotionApiError]:
    """401 → :class:`NotionUnauthorized`, 404 → :class:`NotionNotFound`, else :class:`NotionRequestError`."""
    return {401: NotionUnauthorized, 404: NotionNotFound}.get(status, NotionRequestError)


def _retryable(exc: BaseException) -> bool:
    """Timeouts, transport errors and retryable statuses (:func:`retry_delay`'s rule)."""
    return isinstance(exc, NotionRequestError) and is_retryable_status(exc.status)


class NotionResource(dg.ConfigurableResource):
    """Builds one :class:`NotionApi` per connection: ``NOTION_API_URL`` (default the real API),
    ``NOTION_REQUESTS_PER_SECOND`` (3; 0 = no pacing) through a fresh rate limiter per call, so each
    connection has its own limit shared by its threads, and ``NOTION_MAX_RETRY_WAIT_SECONDS`` (300) as
    the longest ``Retry-After`` honoured.

    It also spaces connections that run one after another in the same process (the job's in-process
    executor shares one resource instance between its steps): :meth:`pause_between_connections` waits
    until ``NOTION_CONNECTION_PAUSE_SECONDS`` (2) have passed since :meth:`connection_finished` was
    last called; the first connection does not wait."""

    settings: SettingsResource
    _pause_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _last_finished: float | None = PrivateAttr(default=None)

    def client(self, token: str) -> NotionApi:
        """A paced, retrying API for one connection's ``token``. Close it (or use ``with``) when done."""
        settings = self.settings.get()
        return NotionApi(
            make_sdk_client(token, settings.notion_api_url),
            rate_limiter=RateLimiter(settings.notion_requests_per_second),
            policy=notion_retry_policy(max_retry_after=settings.notion_max_retry_wait_seconds),
        )

    @contextmanager
    def open(self, token: str) -> Iterator[NotionApi]:
        """:meth:`client` as a context manager that closes the HTTP pool afterwards."""
        api = self.client(token)
        try:
            yield api
        finally:
            api.close()

    def pause_between_connections(
        self,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> float:
        """Sleep until ``seconds`` have passed since the previous connection finished; returns the wait."""
        with self._pause_lock:
            last = self._last_finished
        if last is None or seconds <= 0:
            return 0.0
        wait = last + seconds - clock()
        if wait > 0:
            sleep(wait)
            return wait
        return 0.0

    def connection_finished(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Note that a connection just finished (successfully or not)."""
        with self._pause_lock:
            self._last_finished = clock()
