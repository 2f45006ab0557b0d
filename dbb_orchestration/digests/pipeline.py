"""One batch step's work, generation and sending overlapped (docs/behaviour.md §5, §6).

A batch step owns a range of users. Run one after the other, generation (mostly waiting on Postgres:
the candidate query and the insert) and sending (mostly Python: rendering) each leave the other core
idle. Here generation runs over the range on a worker thread, page after page as always, and reports
the last user id of each page it commits; sending runs on the calling thread over the same range, and
each of its pages reads only users up to the last id generation has committed (waiting when it has
caught up). So a user is sent to only after their digest for the hour was committed, exactly as when
generation finished first: the rules, the statements and the results are the same; the two phases
just overlap. (User ids are only compared by Postgres; here they are only tested for equality.)

SQLite allows one writer at a time (a transaction that read before another one wrote cannot write),
so there the range is generated, then sent, on one thread.

If sending fails (the provider is down, say) generation stops after the page it is on, and the error
is raised once the worker has stopped, so nothing of this step is still writing when the step fails.
An error in generation stops the sending before its next page and is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.batches import UserRange
from dbb_orchestration.digests.generate import GenerateReport, generate_digests
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.email.sender import EmailSender

__all__ = ["GenerationProgress", "generate_and_send"]

_NOTHING: Any = object()


class GenerationStopped(Exception):
    """Raised inside the generation worker to stop it after a page (the sending side failed)."""


class GenerationProgress:
    """What generation has committed so far over a range, shared by the generating and the sending
    thread. :meth:`ready` is the sending side's ``delivery.ReadyGate``."""

    def __init__(self, end: str | None) -> None:
        self._end = end
        self._changed = threading.Condition()
        self._upto: Any = _NOTHING  # last user id committed; _NOTHING before the first page
        self._final = False
        self._error: BaseException | None = None
        self._stop = False

    # the generating side
    def page_committed(self, last_id: str) -> None:
        with self._changed:
            if self._stop:
                raise GenerationStopped
            self._upto = last_id
            self._changed.notify_all()

    def finished(self) -> None:
        with self._changed:
            self._upto, self._final = self._end, True
            self._changed.notify_all()

    def failed(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    # the sending side
    def ready(self, after: str | None) -> tuple[str | None, bool]:
        """Wait until generation committed users beyond ``after`` (or finished, or failed); the highest
        id a page may read now, and whether that is the range's end. A generation error is raised."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._error is not None
                    or self._final
                    or (self._upto is not _NOTHING and self._upto != after)
                )
            )
            if self._error is not None:
                raise RuntimeError("digest generation failed; sending stopped") from self._error
            return self._upto, self._final

    def stop(self) -> None:
        """Ask generation to stop after the page it is on."""
        with self._changed:
            self._stop = True


def generate_and_send(
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    now: datetime,
    user_range: UserRange,
    *,
    clock: Callable[[], datetime],
) -> tuple[GenerateReport, SendReport]:
    """Generate, then send, for the users of ``user_range``, the two overlapped on Postgres (see the
    module docstring). ``now`` is the logical time, ``clock`` the location's clock."""
    if not is_postgres(engine):
        generated = generate_digests(engine, now, settings, clock=clock, user_range=user_range)
        return generated, send_due_digests(engine, sender, settings, now, clock=clock, user_range=user_range)
    progress = GenerationProgress(end=user_range[1])
    reports: list[GenerateReport] = []

    def generate() -> None:
        try:
            reports.append(
                generate_digests(
                    engine, now, settings, clock=clock, user_range=user_range, on_page=progress.page_committed
                )
            )
            progress.finished()
        except GenerationStopped:
            pass
        except BaseException as exc:  # handed to the sending side, which raises it
            progress.failed(exc)

    worker = threading.Thread(target=generate, name="digest-generation", daemon=True)
    worker.start()
    try:
        sent = send_due_digests(
            engine, sender, settings, now, clock=clock, user_range=user_range, ready=progress.ready
        )
    finally:
        progress.stop()
        worker.join()
    return reports[0], sent
