"""A loopback fake of the Resend email API, good enough to drive the real ``resend`` SDK.

Usage::

    with FakeResend() as fake:
        resend.api_key = "re_test"
        resend.api_url = fake.base_url
        resend.Emails.send({...}, {"idempotency_key": "note-digest-1"})
        assert fake.sent[0].subject == ...

Endpoints (JSON in, JSON out, ``Content-Type: application/json``):

* ``POST /emails`` — Resend's send body (``from``, ``to`` str or list, ``subject``, ``html``, ``text``,
  ``cc``, ``bcc``, ``reply_to``, ``tags`` ``[{name, value}]``, ``headers`` …) → 200 ``{"id": <uuid>}``.
* ``POST /emails/batch`` — a list of such bodies (at most 100) → 200 ``{"data": [{"id": …}, …]}``,
  ids in request order. Validation follows the ``x-batch-validation`` header (the SDK's
  ``batch_validation`` option): ``strict`` (the default) rejects the whole batch when one email is
  invalid; ``permissive`` sends the valid ones and answers ``{"data": [ids of the accepted emails, in
  order], "errors": [{"index": i, "message": …}, …]}``. The batch's ``Idempotency-Key`` covers the
  whole list: the same key and the same list → the first answer again (nothing new delivered); the
  same key and a different list → 409 ``invalid_idempotent_request``.
* ``GET /emails/{id}`` — the accepted email as an ``{"object": "email", …}`` record, 404 when unknown.

Behaviour copied from the real service (errors are ``{"statusCode", "name", "message"}``):

* ``Authorization: Bearer <key>`` is required: missing or empty → 401 ``missing_api_key``; a key not in
  ``api_keys`` (when given), or the literal ``None`` the SDK sends when ``resend.api_key`` is unset →
  401 ``validation_error`` "API key is invalid".
* Validation → 422: missing ``from``/``to``/``subject`` → ``missing_required_field``; a malformed
  address, more than 50 recipients, a tag name/value with characters outside ``A-Za-z0-9_-`` (or longer
  than 256), non-string headers → ``validation_error``. A body that is not JSON → 400 ``validation_error``.
* ``Idempotency-Key`` (optional, 1–256 characters, else 400 ``invalid_idempotency_key``): the same key
  with the same body (compared as canonical JSON) returns the first response and records nothing new;
  the same key with a different body → 409 ``invalid_idempotent_request``; the same key while the
  first request is still being processed (see :meth:`FakeResend.set_delay`) → 409
  ``concurrent_idempotent_requests``. Keys never expire (Resend keeps them 24 h).
* Optional team-wide rate limit (``rate_limit_per_second``, a token bucket over every request, burst
  ``rate_limit_burst`` default the rate): over it → 429 ``rate_limit_exceeded`` with ``retry-after: 1``
  and ``ratelimit-*`` headers, counted in :attr:`FakeResend.rate_limited`.
* Suppressed recipients (:meth:`FakeResend.suppress`): an email to one is refused with Resend's
  message "The address … is on the suppression list" — a 422 for ``/emails`` and a strict batch, a
  per-email error in a permissive batch.
* Hang mode (:meth:`FakeResend.set_hang`): requests are accepted and never answered (each is held
  until hang mode ends or the fake stops, then the connection is closed without a response), counted
  in :attr:`FakeResend.hung_requests`: what a provider that "accepts connections and never answers"
  looks like to a client.

What the resend SDK 2.52 makes of these (verified by the contract tests): every non-2xx raises a
``resend.exceptions.ResendError`` subclass whose ``.code`` is the HTTP status as an ``int``,
``.error_type`` the ``name``, ``.message`` the message and ``.headers`` the response headers (so a
429's ``retry-after`` is readable). 422 ``missing_required_field`` → ``MissingRequiredFieldsError``,
422 ``validation_error`` → ``ValidationError``, 429 → ``RateLimitError``, 401 ``missing_api_key`` →
``MissingApiKeyError``; 409 and 500 ``internal_server_error`` → plain ``ResendError``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from dbb_orchestration.testing._http import (
    DEFAULT_HOST,
    HttpRequest,
    HttpResponse,
    LoopbackServer,
    TokenBucket,
    parse_json_body,
    utc_now,
)

MAX_RECIPIENTS = 50
MAX_BATCH = 100
MAX_IDEMPOTENCY_KEY = 256
MAX_TAG_LENGTH = 256

_TAG_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ADDRESS = r"[^\s@<>\"]+@[^\s@<>\"]+"
_PLAIN_ADDRESS_RE = re.compile(rf"^{_ADDRESS}$")
_NAMED_ADDRESS_RE = re.compile(rf"^[^<>]*<{_ADDRESS}>$")
_SLUG_RE = re.compile(r"[^a-z0-9]+")

ERROR_NAMES: dict[int, str] = {
    400: "validation_error",
    401: "missing_api_key",
    403: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "invalid_idempotent_request",
    422: "validation_error",
    429: "rate_limit_exceeded",
    500: "internal_server_error",
    502: "internal_server_error",
    503: "internal_server_error",
}


@dataclass(frozen=True)
class ResendDelivery:
    """One accepted email. ``payload`` is the JSON body exactly as received (``from`` included)."""

    id: str
    payload: dict[str, Any]
    idempotency_key: str | None
    received_at: datetime
    number: int
    """1-based order of acceptance since the fake was created (not reset by :meth:`FakeResend.reset`)."""

    @property
    def to(self) -> list[str]:
        return _as_list(self.payload.get("to"))

    @property
    def from_address(self) -> str:
        return str(self.payload.get("from") or "")

    @property
    def subject(self) -> str:
        return str(self.payload.get("subject") or "")

    @property
    def html(self) -> str | None:
        value = self.payload.get("html")
        return value if isinstance(value, str) else None

    @property
    def text(self) -> str | None:
        value = self.payload.get("text")
        return value if isinstance(value, str) else None

    @property
    def reply_to(self) -> list[str]:
        return _as_list(self.payload.get("reply_to"))

    @property
    def tags(self) -> dict[str, str]:
        """Tags as ``{name: value}`` (a tag without value maps to ``""``)."""
        return {
            str(tag["name"]): str(tag.get("value") or "")
            for tag in self.payload.get("tags") or []
            if isinstance(tag, dict) and "name" in tag
        }

    @property
    def headers(self) -> dict[str, str]:
        value = self.payload.get("headers")
        return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ResendRequest:
    """One HTTP request received (accepted or not), for assertions on retries and pacing."""

    method: str
    path: str
    body: Any
    idempotency_key: str | None
    token: str | None
    status: int
    at: float
    """``time.monotonic()`` when the request arrived."""


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: int | None
    name: str
    message: str


@dataclass
class _IdempotencyEntry:
    fingerprint: str
    response: dict[str, Any] | None  # None while the first request is in flight


class _Reject(Exception):
    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def _error(status: int, name: str, message: str, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse.json(status, {"statusCode": status, "name": name, "message": message}, headers)


def _fingerprint(body: Any) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _valid_address(value: Any) -> bool:
    return isinstance(value, str) and bool(
        _PLAIN_ADDRESS_RE.match(value.strip()) or _NAMED_ADDRESS_RE.match(value.strip())
    )


def _check_addresses(field_name: str, value: Any, *, required: bool) -> None:
    if value is None or value == "" or value == []:
        if required:
            raise _Reject(422, "missing_required_field", f"Missing `{field_name}` field.")
        return
    addresses = value if isinstance(value, list) else [value]
    if len(addresses) > MAX_RECIPIENTS:
        raise _Reject(
            422, "validation_error", f"Too many recipients in `{field_name}`: max {MAX_RECIPIENTS}."
        )
    for address in addresses:
        if not _valid_address(address):
            raise _Reject(
                422,
                "validation_error",
                f"Invalid `{field_name}` field. The email address needs to follow the "
                "`email@example.com` or `Name <email@example.com>` format.",
            )


def validate_email_payload(body: Any) -> None:
    """Raise ``_Reject`` (422) when ``body`` is not an email Resend would accept; see the module doc."""
    if not isinstance(body, dict):
        raise _Reject(422, "validation_error", "The request body must be a JSON object.")
    if body.get("from") in (None, ""):
        raise _Reject(422, "missing_required_field", "Missing `from` field.")
    _check_addresses("from", body.get("from"), required=True)
    if isinstance(body.get("from"), list):
        raise _Reject(422, "validation_error", "Invalid `from` field: a single address is expected.")
    _check_addresses("to", body.get("to"), required=True)
    subject = body.get("subject")
    if subject in (None, ""):
        raise _Reject(422, "missing_required_field", "Missing `subject` field.")
    if not isinstance(subject, str):
        raise _Reject(422, "validation_error", "Invalid `subject` field: a string is expected.")
    for name in ("cc", "bcc", "reply_to"):
        _check_addresses(name, body.get(name), required=False)
    for name in ("html", "text"):
        if body.get(name) is not None and not isinstance(body.get(name), str):
            raise _Reject(422, "validation_error", f"Invalid `{name}` field: a string is expected.")
    tags = body.get("tags")
    if tags is not None:
        if not isinstance(tags, list):
            raise _Reject(422, "validation_error", "Invalid `tags` field: a list is expected.")
        for tag in tags:
            if not isinstance(tag, dict) or not isinstance(tag.get("name"), str):
                raise _Reject(422, "validation_error", "Each tag needs a `name` string.")
            for part in ("name", "value"):
                value = tag.get(part)
                if part == "value" and value is None:
                    continue
                if not isinstance(value, str) or not _TAG_RE.match(value) or len(value) > MAX_TAG_LENGTH:
                    raise _Reject(
                        422,
                        "validation_error",
                        f"Invalid tag {part} {value!r}: tags should only contain ASCII letters, numbers, "
                        f"underscores, or dashes, and be at most {MAX_TAG_LENGTH} characters.",
                    )
    headers = body.get("headers")
    if headers is not None and (
        not isinstance(headers, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise _Reject(422, "validation_error", "Invalid `headers` field: an object of strings is expected.")


class FakeResend(LoopbackServer):
    """Loopback Resend API. All state is guarded by one lock; every public method is thread-safe.

    ``rate_limit_per_second`` (``None`` = unlimited) and ``rate_limit_burst`` configure a token bucket
    over every request. ``outbox_dir`` (created when missing) receives each accepted email as
    ``<nnnn>-<subject-slug>.html``, ``.txt`` and ``.eml`` (multipart/alternative). ``api_keys``
    restricts the accepted keys (default: any non-empty key except the SDK's unset ``None``).
    ``clock`` gives ``received_at`` (aware UTC).
    """

    def __init__(
        self,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        rate_limit_per_second: float | None = None,
        rate_limit_burst: float | None = None,
        outbox_dir: Path | str | None = None,
        api_keys: Iterable[str] | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(host=host, port=port)
        self.rate_limit_per_second = rate_limit_per_second
        self.rate_limit_burst = rate_limit_burst
        self.outbox_dir = Path(outbox_dir) if outbox_dir is not None else None
        self.api_keys = frozenset(api_keys) if api_keys is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._sent: list[ResendDelivery] = []
        self._requests: list[ResendRequest] = []
        self._idempotency: dict[str, _IdempotencyEntry] = {}
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._number = 0
        self._bucket = self._new_bucket()
        self._rate_limited = 0
        self._hung = 0
        self._release = threading.Event()
        self._release.set()
        self._suppressed: set[str] = set()

    def _new_bucket(self) -> TokenBucket | None:
        if not self.rate_limit_per_second:
            return None
        return TokenBucket(self.rate_limit_per_second, self.rate_limit_burst)

    # -- inspection and control ------------------------------------------------------------------
    @property
    def sent(self) -> list[ResendDelivery]:
        """Accepted deliveries in order (a copy). Idempotent replays add nothing."""
        with self._lock:
            return list(self._sent)

    @property
    def requests(self) -> list[ResendRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def requests_count(self) -> int:
        """Every HTTP request received, failed ones included."""
        with self._lock:
            return len(self._requests)

    @property
    def rate_limited(self) -> int:
        """429s answered because of the rate limit (injected faults not included)."""
        with self._lock:
            return self._rate_limited

    @property
    def hung_requests(self) -> int:
        """Requests received while hang mode was on (none of them was answered)."""
        with self._lock:
            return self._hung

    def suppress(self, address: str) -> None:
        """Refuse every later email to ``address`` (see the module docstring)."""
        with self._lock:
            self._suppressed.add(_bare(address))

    def _check_suppressed(self, body: Any) -> None:
        if not isinstance(body, dict):
            return
        with self._lock:
            suppressed = set(self._suppressed)
        for address in _as_list(body.get("to")):
            if _bare(address) in suppressed:
                raise _Reject(422, "validation_error", f"The address {address} is on the suppression list.")

    def set_hang(self, on: bool = True) -> None:
        """Hang mode on: every later request is held without an answer; off: held requests are dropped
        (connection closed, no response) and new ones are served normally."""
        if on:
            self._release.clear()
        else:
            self._release.set()

    def stop(self) -> None:
        self._release.set()
        super().stop()

    @property
    def in_flight_keys(self) -> list[str]:
        """Idempotency keys whose first request is still being processed (see :meth:`set_delay`)."""
        with self._lock:
            return [key for key, entry in self._idempotency.items() if entry.response is None]

    def delivery(self, email_id: str) -> ResendDelivery | None:
        with self._lock:
            return next((d for d in self._sent if d.id == email_id), None)

    def sent_to(self, address: str) -> list[ResendDelivery]:
        """Deliveries with ``address`` among their ``to`` recipients (exact, case-insensitive)."""
        wanted = address.strip().lower()
        with self._lock:
            return [d for d in self._sent if any(_bare(a) == wanted for a in d.to)]

    def reset(self) -> None:
        """Forget deliveries, requests, idempotency keys, pending faults, the delay and the rate bucket.
        Outbox files stay; their numbering continues."""
        with self._lock:
            self._sent.clear()
            self._requests.clear()
            self._idempotency.clear()
            self._faults.clear()
            self._delay = 0.0
            self._bucket = self._new_bucket()
            self._rate_limited = 0
            self._hung = 0
        self._release.set()

    def fail_next(
        self,
        status: int = 500,
        count: int = 1,
        *,
        retry_after: int | None = 1,
        name: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests with ``status`` (before auth and validation; nothing is
        recorded as sent). ``name`` defaults by status (429 ``rate_limit_exceeded``, 5xx
        ``internal_server_error``, 409 ``invalid_idempotent_request`` …). A 429 carries ``retry-after``
        (``retry_after`` seconds; ``None`` omits it). Calls queue up in order. ``count`` < 1 or a
        status < 400 raises ``ValueError``."""
        if count < 1 or status < 400:
            raise ValueError(f"fail_next needs count >= 1 and an error status, got {count=} {status=}")
        fault = _Fault(
            status=status,
            remaining=count,
            retry_after=retry_after,
            name=name or ERROR_NAMES.get(status, "application_error"),
            message=message or f"Injected failure ({status}).",
        )
        with self._lock:
            self._faults.append(fault)

    def set_delay(self, seconds: float) -> None:
        """Hold every later response ``seconds`` before answering (0 turns it off). Negative raises
        ``ValueError``."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds}")
        with self._lock:
            self._delay = float(seconds)

    # -- HTTP --------------------------------------------------------------------------------------
    def handle(self, request: HttpRequest) -> HttpResponse:
        arrived = time.monotonic()
        ok, body = parse_json_body(request.body)
        key = request.header("Idempotency-Key")
        token = request.bearer_token()
        if not self._release.is_set():
            with self._lock:
                self._hung += 1
            self._release.wait()
            response = HttpResponse.drop()
        else:
            permissive = (request.header("x-batch-validation") or "").strip().lower() == "permissive"
            response = self._respond(request, ok, body, key, token, permissive)
        with self._lock:
            self._requests.append(
                ResendRequest(request.method, request.path, body, key, token, response.status, arrived)
            )
        return response

    def _respond(
        self,
        request: HttpRequest,
        ok: bool,
        body: Any,
        key: str | None,
        token: str | None,
        permissive: bool = False,
    ) -> HttpResponse:
        with self._lock:
            delay = self._delay
            fault = self._take_fault()
        path = request.path.rstrip("/")
        refusal = self._refusal(fault, token)
        if refusal is None and request.method == "POST" and path in ("/emails", "/emails/batch"):
            # a send spends its delay between reserving the idempotency key and recording the email,
            # so a second request with the same key meanwhile sees it in flight
            return self._send(
                ok, body, key, batch=path == "/emails/batch", delay=delay, permissive=permissive
            )
        if delay:
            time.sleep(delay)
        if refusal is not None:
            return refusal
        if path.startswith("/emails/") and request.method == "GET":
            return self._get_email(path.removeprefix("/emails/"))
        if path in ("/emails", "/emails/batch"):
            return _error(405, "method_not_allowed", f"Method {request.method} not allowed on {path}.")
        return _error(404, "not_found", "The requested endpoint does not exist.")

    def _refusal(self, fault: _Fault | None, token: str | None) -> HttpResponse | None:
        """The error answering a request before its body is looked at (injected fault, auth, rate
        limit), or ``None`` when it may proceed."""
        if fault is not None:
            headers = self._rate_headers(fault.retry_after) if fault.status == 429 else {}
            return _error(fault.status, fault.name, fault.message, headers)
        if not token:
            return _error(401, "missing_api_key", "Missing API key in the authorization header")
        if token == "None" or (self.api_keys is not None and token not in self.api_keys):
            return _error(401, "validation_error", "API key is invalid")
        with self._lock:
            limited = self._bucket is not None and not self._bucket.try_acquire()
            self._rate_limited += int(limited)
        if limited:
            return _error(
                429,
                "rate_limit_exceeded",
                "Too many requests. You can only make a limited number of requests per second.",
                self._rate_headers(1),
            )
        return None

    def _take_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.pop(0)
        return fault

    def _rate_headers(self, retry_after: int | None) -> dict[str, str]:
        headers = {
            "ratelimit-limit": str(int(self.rate_limit_per_second or 2)),
            "ratelimit-remaining": "0",
            "ratelimit-reset": str(retry_after or 1),
        }
        if retry_after is not None:
            headers["retry-after"] = str(retry_after)
        return headers

    def _send(
        self, ok: bool, body: Any, key: str | None, *, batch: bool, delay: float, permissive: bool = False
    ) -> HttpResponse:
        """Validate, apply idempotency and record; sleeps ``delay`` once (after reserving a new key)."""
        refusal = self._validate(ok, body, key, batch=batch, permissive=permissive)
        if refusal is None and not (batch and permissive):
            try:
                for item in body if batch else [body]:
                    self._check_suppressed(item)
            except _Reject as exc:
                refusal = _error(exc.status, exc.name, exc.message)
        if refusal is not None:
            time.sleep(delay)
            return refusal
        fingerprint = _fingerprint(body)
        if key is not None:
            with self._lock:
                entry = self._idempotency.get(key)
                if entry is None:
                    self._idempotency[key] = _IdempotencyEntry(fingerprint, None)
            if entry is not None:
                time.sleep(delay)
                if entry.fingerprint != fingerprint:
                    return _error(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different request payload. "
                        "Change your idempotency key or payload.",
                    )
                if entry.response is None:
                    return _error(
                        409,
                        "concurrent_idempotent_requests",
                        "Same idempotency key used while original request is still in progress. "
                        "Try the request again later.",
                    )
                return HttpResponse.json(200, entry.response)
        time.sleep(delay)

        items: list[dict[str, Any]] = body if batch else [body]
        errors: list[dict[str, Any]] = []
        if batch and permissive:
            errors = _batch_errors(items, self._check_suppressed)
            rejected = {e["index"] for e in errors}
            items = [item for i, item in enumerate(items) if i not in rejected]
        received_at = self._clock()
        with self._lock:
            deliveries = []
            for item in items:
                self._number += 1
                delivery = ResendDelivery(
                    id=str(uuid.uuid4()),
                    payload=item,
                    idempotency_key=key,
                    received_at=received_at,
                    number=self._number,
                )
                deliveries.append(delivery)
                self._sent.append(delivery)
            response: dict[str, Any] = (
                {"data": [{"id": d.id} for d in deliveries]} if batch else {"id": deliveries[0].id}
            )
            if batch and permissive:
                response["errors"] = errors
            if key is not None:
                self._idempotency[key] = _IdempotencyEntry(fingerprint, response)
            if self.outbox_dir is not None:
                for delivery in deliveries:
                    write_outbox(self.outbox_dir, delivery)
        return HttpResponse.json(200, response)

    @staticmethod
    def _validate(
        ok: bool, body: Any, key: str | None, *, batch: bool, permissive: bool = False
    ) -> HttpResponse | None:
        if not ok:
            return _error(400, "validation_error", "The request body is not valid JSON.")
        if key is not None and not (1 <= len(key) <= MAX_IDEMPOTENCY_KEY):
            return _error(
                400,
                "invalid_idempotency_key",
                f"Idempotency keys, if present, must have between 1 and {MAX_IDEMPOTENCY_KEY} characters.",
            )
        try:
            if batch:
                if not isinstance(body, list) or not body:
                    raise _Reject(
                        422, "validation_error", "The batch body must be a non-empty list of emails."
                    )
                if len(body) > MAX_BATCH:
                    raise _Reject(422, "validation_error", f"A batch holds at most {MAX_BATCH} emails.")
                if not permissive:  # permissive: per-email errors in the answer (see _batch_errors)
                    for item in body:
                        validate_email_payload(item)
            else:
                validate_email_payload(body)
        except _Reject as exc:
            return _error(exc.status, exc.name, exc.message)
        return None

    def _get_email(self, email_id: str) -> HttpResponse:
        delivery = self.delivery(email_id)
        if delivery is None:
            return _error(404, "not_found", "Email not found")
        payload = delivery.payload
        record = {
            "object": "email",
            "id": delivery.id,
            "to": delivery.to,
            "from": delivery.from_address,
            "created_at": delivery.received_at.isoformat(),
            "subject": delivery.subject,
            "html": delivery.html,
            "text": delivery.text,
            "bcc": _as_list(payload.get("bcc")) or None,
            "cc": _as_list(payload.get("cc")) or None,
            "reply_to": delivery.reply_to or None,
            "last_event": "delivered",
            "scheduled_at": None,
            "tags": payload.get("tags") or [],
        }
        return HttpResponse.json(200, record)


def _batch_errors(items: list[Any], extra: Callable[[Any], None]) -> list[dict[str, Any]]:
    """Permissive batch validation: ``{"index", "message"}`` for every invalid email, in order."""
    errors = []
    for index, item in enumerate(items):
        try:
            validate_email_payload(item)
            extra(item)
        except _Reject as exc:
            errors.append({"index": index, "message": exc.message})
    return errors


def _bare(address: str) -> str:
    """``Name <a@b>`` → ``a@b``, lower-cased."""
    address = address.strip()
    if address.endswith(">") and "<" in address:
        address = address[address.rindex("<") + 1 : -1]
    return address.strip().lower()


def outbox_stem(delivery: ResendDelivery) -> str:
    """``<nnnn>-<subject slug>``: the slug keeps ``a-z0-9`` (others become ``-``), at most 60 chars,
    ``email`` when nothing is left."""
    slug = _SLUG_RE.sub("-", delivery.subject.lower()).strip("-")[:60].strip("-") or "email"
    return f"{delivery.number:04d}-{slug}"


def build_eml(delivery: ResendDelivery) -> EmailMessage:
    """The delivery as a MIME message: text part then HTML alternative (multipart/alternative when both
    exist), ``From``/``To``/``Cc``/``Reply-To``/``Subject``/``Date``/``Message-ID``, the payload's custom
    headers, and ``X-Resend-Tags`` / ``X-Idempotency-Key`` for inspection."""
    message = EmailMessage()
    message["From"] = delivery.from_address
    message["To"] = ", ".join(delivery.to)
    cc = _as_list(delivery.payload.get("cc"))
    if cc:
        message["Cc"] = ", ".join(cc)
    if delivery.reply_to:
        message["Reply-To"] = ", ".join(delivery.reply_to)
    message["Subject"] = delivery.subject
    message["Date"] = format_datetime(delivery.received_at)
    message["Message-ID"] = f"<{delivery.id}@fake-resend.local>"
    for name, value in delivery.headers.items():
        if name.lower() not in {"from", "to", "cc", "subject", "date", "message-id", "reply-to"}:
            message[name] = value
    if delivery.tags:
        message["X-Resend-Tags"] = ", ".join(f"{k}={v}" for k, v in delivery.tags.items())
    if delivery.idempotency_key:
        message["X-Idempotency-Key"] = delivery.idempotency_key
    text, html = delivery.text, delivery.html
    if text is not None:
        message.set_content(text)
        if html is not None:
            message.add_alternative(html, subtype="html")
    elif html is not None:
        message.set_content(html, subtype="html")
    else:
        message.set_content("")
    return message


def write_outbox(directory: Path, delivery: ResendDelivery) -> Path:
    """Write ``<stem>.html`` (when the email has HTML), ``<stem>.txt`` (when it has text) and
    ``<stem>.eml`` into ``directory`` (created if missing); returns the ``.eml`` path."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = outbox_stem(delivery)
    if delivery.html is not None:
        (directory / f"{stem}.html").write_text(delivery.html, encoding="utf-8")
    if delivery.text is not None:
        (directory / f"{stem}.txt").write_text(delivery.text, encoding="utf-8")
    eml_path = directory / f"{stem}.eml"
    eml_path.write_bytes(bytes(build_eml(delivery)))
    return eml_path
