"""Request pacing shared by the email sender and the Notion client.

* :class:`RateLimiter` — in-process: spaces calls ``1 / rate`` apart across the threads of one process.
* :class:`PostgresPacer` — team-wide: Resend limits requests per *team* (per API key), whatever the
  number of runs and processes using it. Every process sharing the key serialises its request starts on
  one Postgres advisory lock keyed by a hash of the key: a caller takes the lock (session level, on a
  dedicated autocommit connection — never inside a data transaction), holds it for ``1 / rate``
  seconds, releases it, then makes its request. Two request starts are therefore at least ``1 / rate``
  apart across every process, and nothing is stored: the backend's schema gets no table. A process
  that dies releases the lock with its connection.
* :func:`shared_rate_limiter` — one in-process limiter per key, for SQLite (local runs: one process).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Protocol

import sqlalchemy as sa

__all__ = ["Pacer", "PostgresPacer", "RateLimiter", "advisory_key", "shared_rate_limiter"]


class Pacer(Protocol):
    def acquire(self) -> float:
        """Block until the caller may start a request; return the seconds waited."""
        ...


class RateLimiter:
    """Spaces calls at least ``1 / rate_per_second`` apart, across threads.

    ``rate_per_second`` of 0 or ``None`` disables pacing. ``clock`` and ``sleep`` are injectable so tests
    can check the spacing without waiting.
    """

    def __init__(
        self,
        rate_per_second: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_per_second is not None and rate_per_second < 0:
            raise ValueError(f"rate_per_second must be >= 0, got {rate_per_second}")
        self.interval = 1.0 / rate_per_second if rate_per_second else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot = 0.0

    def acquire(self) -> float:
        """Block until the caller may make its request; returns the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self.interval
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait


_SHARED: dict[tuple[str, float], RateLimiter] = {}
_SHARED_LOCK = threading.Lock()


def shared_rate_limiter(key: str, rate_per_second: float | None) -> RateLimiter:
    """The process-wide :class:`RateLimiter` for ``key`` (e.g. an API key's hash) at this rate: every
    sender of the process using the same key shares one pacing."""
    rate = float(rate_per_second or 0)
    with _SHARED_LOCK:
        limiter = _SHARED.get((key, rate))
        if limiter is None:
            limiter = _SHARED[(key, rate)] = RateLimiter(rate)
        return limiter


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name`` (the first 8 bytes of its SHA-256): the key itself
    never reaches the database."""
    return int.from_bytes(hashlib.sha256(f"dbb-email-pacer:{name}".encode()).digest()[:8], "big", signed=True)


class PostgresPacer:
    """Team-wide pacing on ``pg_advisory_lock`` (see the module docstring). ``engine`` must be Postgres;
    one connection per pacer, opened on first use and kept (autocommit, so no transaction is ever open
    on it). Thread-safe: the threads of one process queue on an in-process lock first. ``rate`` of 0 or
    ``None`` disables pacing."""

    def __init__(
        self,
        engine: sa.Engine,
        name: str,
        rate_per_second: float | None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second is not None and rate_per_second < 0:
            raise ValueError(f"rate_per_second must be >= 0, got {rate_per_second}")
        self.interval = 1.0 / rate_per_second if rate_per_second else 0.0
        self.key = advisory_key(name)
        self._engine = engine
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sa.Connection | None = None

    def _connection(self) -> sa.Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def acquire(self) -> float:
        if not self.interval:
            return 0.0
        started = self._clock()
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                try:
                    self._sleep(self.interval)
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except BaseException:
                self.close()  # a broken connection: its session lock is gone with it
                raise
        return max(0.0, self._clock() - started - self.interval)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection: nothing more to release
                conn.close()
