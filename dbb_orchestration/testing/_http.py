"""Plumbing shared by the loopback fakes: a stdlib HTTP server in a daemon thread, plain request and
response values, a token bucket and small time helpers.

A fake subclasses :class:`LoopbackServer` and implements :meth:`LoopbackServer.handle`, a function from
an :class:`HttpRequest` to an :class:`HttpResponse`. The server speaks HTTP/1.1 with keep-alive (what
``requests`` and ``httpx`` use), always sends ``Content-Length`` and binds to 127.0.0.1 only.

An exception raised by ``handle`` is a bug in the fake or in the test data: it is answered with a
500 whose JSON body says ``fake_server_error`` and is appended to ``server_errors`` so a test can
fail loudly on it (:meth:`LoopbackServer.raise_server_errors`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class HttpRequest:
    """One request as the fake sees it. ``headers`` lookups are case-insensitive."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def bearer_token(self) -> str | None:
        """The token of an ``Authorization: Bearer <token>`` header; ``None`` when absent or not Bearer."""
        raw = self.header("Authorization")
        if raw is None:
            return None
        scheme, _, token = raw.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip()


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def drop(cls) -> HttpResponse:
        """No answer at all: the server closes the connection (the client sees a reset or its own
        timeout)."""
        return cls(0)

    @classmethod
    def json(cls, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> HttpResponse:
        all_headers = {"Content-Type": "application/json; charset=utf-8"}
        all_headers.update(headers or {})
        return cls(status, json.dumps(payload).encode("utf-8"), all_headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once; keep-alive clients see no 40 ms stall
    server_version = "dbb-fake/1.0"
    timeout = 30  # idle keep-alive connections end after this many seconds
    fake: LoopbackServer  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        return

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.fake._track(self.connection, add=False)

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers end with an empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        request = HttpRequest(
            method=self.command.upper(),
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            body=body,
        )
        try:
            response = self.fake.handle(request)
        except Exception as exc:  # a bug in the fake or in its test data: answer 500 and keep it
            self.fake._record_error(exc)
            response = HttpResponse.json(
                500, {"name": "fake_server_error", "message": f"{type(exc).__name__}: {exc}"}
            )
        if response.status == 0:  # HttpResponse.drop(): close without answering (a hung request)
            self.close_connection = True
            return
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command.upper() != "HEAD":
            self.wfile.write(response.body)

    do_GET = _dispatch
    do_POST = _dispatch
    do_PATCH = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch
    do_HEAD = _dispatch


class LoopbackServer:
    """Base class of the fakes: start/stop, context manager, ``base_url``.

    ``port=0`` (the default) lets the OS pick a free port; ``base_url`` is known after :meth:`start`
    (a context manager starts the server on entry and stops it on exit). Starting a started server, or
    stopping a stopped one, does nothing. ``host`` other than a loopback address is refused with
    ``ValueError``: these fakes must never listen on a public interface.
    """

    def __init__(self, *, host: str = DEFAULT_HOST, port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"fake servers bind to loopback only, got host={host!r}")
        self.host = host
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self.server_errors: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` without a trailing slash. ``RuntimeError`` before :meth:`start`."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        raw_host, port = self._server.server_address[:2]
        host = raw_host.decode() if isinstance(raw_host, bytes) else str(raw_host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        if self._server is not None:
            return self
        handler = type(f"{type(self).__name__}Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = None
        self._thread = None
        server.shutdown()
        server.server_close()
        with self._conn_lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:  # end idle keep-alive connections so clients see the server is gone
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- hooks -----------------------------------------------------------------------------------
    def handle(self, request: HttpRequest) -> HttpResponse:  # pragma: no cover - abstract
        raise NotImplementedError

    def raise_server_errors(self) -> None:
        """Raise ``AssertionError`` listing every exception ``handle`` raised so far (none → no-op)."""
        if self.server_errors:
            raise AssertionError("fake server errors:\n" + "\n".join(self.server_errors))

    def _record_error(self, exc: BaseException) -> None:
        with self._conn_lock:
            self.server_errors.append("".join(traceback.format_exception(exc)))

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._conn_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


class TokenBucket:
    """Allows ``rate`` requests per second on average with bursts of up to ``burst`` (default ``rate``,
    at least 1). :meth:`try_acquire` takes a token and returns ``True``, or returns ``False`` when the
    bucket is empty. Not thread-safe on its own: callers hold their state lock. ``rate`` ≤ 0 raises
    ``ValueError``."""

    def __init__(
        self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def try_acquire(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def utc_now() -> datetime:
    """The current aware UTC time (the fakes' default clock; never used by production logic)."""
    return datetime.now(UTC)


def parse_json_body(body: bytes) -> tuple[bool, Any]:
    """``(True, value)`` for a JSON body, ``(True, None)`` for an empty one, ``(False, None)`` when the
    body is not valid UTF-8 JSON."""
    if not body.strip():
        return True, None
    try:
        return True, json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False, None
