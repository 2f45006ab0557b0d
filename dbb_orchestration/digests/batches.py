"""Batch steps of the hourly digest job: users split into keyset ranges by id, one Dagster step each.

A range is ``(after, upto)``: the users with ``after < id <= upto`` (``None`` = unbounded), so the
first range has no lower end and the last no upper end (a user created after the split still falls in
one). :func:`user_ranges` cuts the sorted user ids every ``users_per_step`` ids in ONE statement that
returns only the cut points, so planning a million users moves a hundred ids, not a million.

A range travels as its Dagster mapping key (:func:`range_key`: the bounds hex-encoded, since mapping
keys allow only ``[A-Za-z0-9_]``), and :class:`RangeKeyIOManager` rebuilds it from the key: nothing is
stored, so batch steps in other processes or pods (and re-executions) need no shared file system.

A batch step's counts are small JSON; :class:`EventLogIOManager` keeps them in the step's own
``HANDLED_OUTPUT`` event (the Dagster instance's event log, shared by every process and pod of the
deployment) and the summary step reads them back from there, including the unchanged steps of the
parent run when a run is re-executed from failure.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import sqlalchemy as sa

from dbb_orchestration.config import digest_executor_kind
from dbb_orchestration.db import tables as t

__all__ = [
    "EventLogIOManager",
    "RangeKeyIOManager",
    "UserRange",
    "add_counts",
    "executor_kind",
    "range_from_key",
    "range_key",
    "ranges_from_cuts",
    "user_ranges",
]

UserRange = tuple[str | None, str | None]

COUNTS_METADATA_KEY = "counts"


def executor_kind(env: Mapping[str, str] | None = None) -> str:
    """``DIGEST_EXECUTOR`` of ``env`` (default: the process environment): which Dagster executor runs
    the hourly job (see ``config.digest_executor_kind``)."""
    return digest_executor_kind(os.environ if env is None else env)


# ---------------------------------------------------------------------------------------- the ranges


def ranges_from_cuts(cuts: list[str]) -> list[UserRange]:
    """The ranges between sorted cut points: ``[(None, c1), (c1, c2), …, (ck, None)]``; no cut → one
    range covering every user."""
    bounds: list[str | None] = [None, *cuts, None]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def user_ranges(conn: sa.Connection, users_per_step: int) -> list[UserRange]:
    """Ranges of about ``users_per_step`` users each, by id order, in one statement: the id of every
    ``users_per_step``-th user except the last user (so the last range is never empty when planned)."""
    if users_per_step < 1:
        raise ValueError("users_per_step must be at least 1")
    u = t.user
    numbered = sa.select(
        u.c.id,
        sa.func.row_number().over(order_by=u.c.id).label("n"),
        sa.func.count().over().label("total"),
    ).subquery()
    stmt = (
        sa.select(numbered.c.id)
        .where(numbered.c.n % users_per_step == 0, numbered.c.n < numbered.c.total)
        .order_by(numbered.c.id)
    )
    return ranges_from_cuts([row.id for row in conn.execute(stmt)])


def _hex(value: str | None) -> str:
    return "" if value is None else value.encode().hex()


def _unhex(value: str) -> str | None:
    return bytes.fromhex(value).decode() if value else None


def range_key(index: int, user_range: UserRange) -> str:
    """``b<index>_<hex(after)>_<hex(upto)>`` (an open end is empty): a valid mapping key that orders
    the steps in the UI and carries the range itself."""
    after, upto = user_range
    return f"b{index:05d}_{_hex(after)}_{_hex(upto)}"


def range_from_key(key: str | None) -> UserRange:
    """The range carried by :func:`range_key`'s key; anything else → ``ValueError``."""
    parts = (key or "").split("_")
    if len(parts) != 3 or not parts[0].startswith("b"):
        raise ValueError(f"not a user range mapping key: {key!r}")
    try:
        return _unhex(parts[1]), _unhex(parts[2])
    except ValueError as exc:
        raise ValueError(f"not a user range mapping key: {key!r}") from exc


class RangeKeyIOManager(dg.ConfigurableIOManager):
    """Stores nothing: a batch step's range is its mapping key (see the module docstring)."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if tuple(obj) != range_from_key(context.mapping_key):
            raise ValueError(f"user range {obj!r} does not match mapping key {context.mapping_key!r}")

    def load_input(self, context: dg.InputContext) -> UserRange:
        upstream = context.upstream_output
        return range_from_key(upstream.mapping_key if upstream is not None else None)


# ---------------------------------------------------------------------------------------- the counts


_DISAGREE = object()  # a non-numeric value the batch reports do not agree on: left out of the sum


def _first(value: Any) -> Any:
    if isinstance(value, dict):
        return Counter(value)
    return list(value) if isinstance(value, list) else value


def _added(total: Any, value: Any) -> Any:
    """``total`` with one more report's ``value`` for the same key."""
    if isinstance(value, bool) or not isinstance(value, (int, float, dict, list)):
        return total if total == value else _DISAGREE
    if total is _DISAGREE:
        return total
    if isinstance(value, dict):
        total.update(value)
        return total
    if isinstance(value, list):
        return [*total, *value]
    return total + value


def add_counts(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of batch reports: numbers add up, dicts of numbers add up key by key, lists are joined,
    and any other value (a logical time, a flag) is kept when every report agrees, else dropped."""
    total: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            total[key] = _added(total[key], value) if key in total else _first(value)
    return {
        k: dict(sorted(v.items())) if isinstance(v, Counter) else v
        for k, v in total.items()
        if v is not _DISAGREE and v is not None
    }


class EventLogIOManager(dg.ConfigurableIOManager):
    """Keeps a JSON-serialisable output (a batch step's counts) in the step's ``HANDLED_OUTPUT`` event
    and reads it back from the instance's event log: works across processes, pods and re-execution."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        context.add_output_metadata({COUNTS_METADATA_KEY: dg.MetadataValue.json(json.loads(json.dumps(obj)))})

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        if upstream is None or upstream.run_id is None:
            raise ValueError("EventLogIOManager loads only the outputs of upstream steps")
        records = context.instance.get_records_for_run(
            upstream.run_id, of_type=dg.DagsterEventType.HANDLED_OUTPUT
        ).records
        for record in records:
            event = record.event_log_entry.dagster_event
            if event is None or event.step_key != upstream.step_key:
                continue
            data = event.event_specific_data
            if getattr(data, "output_name", None) != upstream.name:
                continue
            value = data.metadata.get(COUNTS_METADATA_KEY) if data is not None else None  # type: ignore[union-attr]
            if value is not None:
                return value.value
        raise ValueError(f"no stored output {upstream.name!r} for step {upstream.step_key!r}")
