"""One batch step's work, generation and sending overlapped (docs/behaviour.md §5, §6).

A batch step owns a range of users. Run one after the other, generation (mostly waiting on Postgres:
the candidate query and the insert) and sending (mostly Python: rendering) each leave the other core
idle. Here the range is cut into sub-ranges of ``DIGEST_BATCH_SIZE`` users (one keyset page each, one
statement to find the cuts) and a worker thread generates sub-range *k + 1* while the calling thread
sends sub-range *k*. Each sub-range is sent only after its generation committed, exactly as when the
two ran over the whole range in turn: the rules, the statements per page and the results are the same;
only the order of the pages differs.

SQLite allows one writer at a time (a transaction that read before another one wrote cannot write),
so there the range is generated, then sent, on one thread, as before.

If sending fails (the provider is down, say) the worker finishes the sub-range it is on and stops; the
error is raised once it has stopped, so nothing of this step is still writing when the step fails. An
error in generation stops the sending after the sub-range in progress and is raised.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.batches import UserRange, user_ranges
from dbb_orchestration.digests.generate import GenerateReport, generate_digests
from dbb_orchestration.digests.send import SendReport, send_due_digests
from dbb_orchestration.email.sender import EmailSender

__all__ = ["generate_and_send", "merge_reports"]

R = TypeVar("R", GenerateReport, SendReport)

_DONE = object()


def _merged_value(total: Any, value: Any) -> Any:
    if isinstance(total, Counter):
        return total + value if isinstance(value, Counter) else total
    if isinstance(total, bool) or not isinstance(total, (int, float, list)):
        return total  # a logical time, a flag: the same in every part
    if isinstance(total, list):
        return [*total, *value]
    return total + value


def merge_reports(parts: list[R]) -> R:
    """One report for the parts of one range: counts and counters added, lists joined, the rest (logical
    time, flags) taken from the first part."""
    if not parts:
        raise ValueError("merge_reports needs at least one report")
    first = parts[0]
    values = {f.name: getattr(first, f.name) for f in dataclasses.fields(first)}
    for part in parts[1:]:
        for name, total in values.items():
            values[name] = _merged_value(total, getattr(part, name))
    return dataclasses.replace(first, **values)


def generate_and_send(
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    now: datetime,
    user_range: UserRange,
    *,
    clock: Callable[[], datetime],
) -> tuple[GenerateReport, SendReport]:
    """Generate, then send, every sub-range of ``user_range`` (see the module docstring); the merged
    reports. ``now`` is the logical time, ``clock`` the location's clock. On SQLite (one writer at a
    time) the whole range is generated, then sent, on the calling thread."""
    if not is_postgres(engine):
        gen = generate_digests(engine, now, settings, clock=clock, user_range=user_range)
        return gen, send_due_digests(engine, sender, settings, now, clock=clock, user_range=user_range)
    with engine.connect() as conn:
        parts = user_ranges(conn, settings.digest_batch_size, within=user_range)
    generated: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def generate_all() -> None:
        try:
            for part in parts:
                if stop.is_set():
                    break
                generated.put((part, generate_digests(engine, now, settings, clock=clock, user_range=part)))
        except BaseException as exc:  # handed to the sending thread, which raises it
            generated.put(exc)
        finally:
            generated.put(_DONE)

    worker = threading.Thread(target=generate_all, name="digest-generation", daemon=True)
    worker.start()
    try:
        gen_parts, send_parts = _send_as_generated(generated, engine, sender, settings, now, clock)
    finally:
        stop.set()
        worker.join()
    return merge_reports(gen_parts), merge_reports(send_parts)


def _send_as_generated(
    generated: queue.Queue[Any],
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
) -> tuple[list[GenerateReport], list[SendReport]]:
    gen_parts: list[GenerateReport] = []
    send_parts: list[SendReport] = []
    while (item := generated.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        part, report = item
        gen_parts.append(report)
        send_parts.append(send_due_digests(engine, sender, settings, now, clock=clock, user_range=part))
    return gen_parts, send_parts
