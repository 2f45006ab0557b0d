"""The weekly sync's summary, read back from the ``sync_runs`` rows its steps wrote.

Each step records its connection's outcome in ``sync_runs`` (with the Dagster run id under
:data:`RUN_ID_KEY`), so the summary of a run and its re-executions is a query, not state passed
between steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.results import SyncStatus

__all__ = ["RUN_ID_KEY", "RecordedRun", "load_recorded_runs", "positive_int", "summarize_runs"]


def positive_int(value: Any) -> int:
    """``value`` when it is a positive ``int`` (not a bool), else 0: counters read back from JSON."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


RUN_ID_KEY = "dagsterRunId"
"""Key of ``SyncOptions.run_info`` naming the Dagster run that wrote a ``sync_runs`` row."""


@dataclass(frozen=True)
class RecordedRun:
    connection_id: int
    sync_run_id: int
    status: str
    stats: Mapping[str, Any]
    error: Mapping[str, Any] | None


def load_recorded_runs(conn: sa.Connection, since: datetime, run_ids: Collection[str]) -> list[RecordedRun]:
    """The newest ``sync_runs`` row per connection among rows started at or after ``since`` whose
    ``stats_json`` (or ``error_json``) names one of ``run_ids`` under :data:`RUN_ID_KEY` (a re-execution
    and the runs it re-executes form one group). Ordered by connection id. Rows of other writers (the
    backend's "sync now") are ignored. Empty ``run_ids`` → ``[]``."""
    wanted = sorted(set(run_ids))
    if not wanted:
        return []
    runs = t.sync_runs
    rows = conn.execute(
        sa.select(runs.c.id, runs.c.connection_id, runs.c.status, runs.c.stats_json, runs.c.error_json)
        .where(
            runs.c.started_at >= since,
            sa.or_(
                runs.c.stats_json[RUN_ID_KEY].as_string().in_(wanted),
                runs.c.error_json[RUN_ID_KEY].as_string().in_(wanted),
            ),
        )
        .order_by(runs.c.id)
    ).all()
    newest: dict[int, RecordedRun] = {}
    for row in rows:
        stats = row.stats_json if isinstance(row.stats_json, Mapping) else {}
        error = row.error_json if isinstance(row.error_json, Mapping) else None
        newest[int(row.connection_id)] = RecordedRun(
            int(row.connection_id), int(row.id), str(row.status), stats, error
        )
    return [newest[key] for key in sorted(newest)]


_PAGE_COUNTERS = {
    "pagesVisited": "pages_visited",
    "pagesFetched": "pages_fetched",
    "pagesSkipped": "pages_skipped",
}
_DOCUMENT_GROUPS = ("accepted", "rejected", "skipped")


def _add_run_stats(totals: Counter[str], stats: Mapping[str, Any]) -> None:
    """Add one run's page counters and per-reason document counts to ``totals``."""
    for key, name in _PAGE_COUNTERS.items():
        totals[name] += positive_int(stats.get(key))
    documents = stats.get("documents")
    documents = documents if isinstance(documents, Mapping) else {}
    for group in _DOCUMENT_GROUPS:
        counts = documents.get(group)
        for reason, count in counts.items() if isinstance(counts, Mapping) else []:
            value = positive_int(count)
            totals[f"documents_{group}"] += value
            totals[f"{group}_{reason}"] += value


def summarize_runs(runs: Sequence[RecordedRun]) -> dict[str, int]:
    """Totals over connections: ``connections_total``/``_synced``/``_failed`` (``running`` rows count as
    neither), ``pages_visited``/``_fetched``/``_skipped``, ``documents_accepted``/``_rejected``/
    ``_skipped`` and one ``accepted_<x>``/``rejected_<reason>``/``skipped_<reason>`` per reason. Malformed
    stats count as zero."""
    totals: Counter[str] = Counter()
    totals["connections_total"] = len(runs)
    totals["connections_synced"] = sum(1 for r in runs if r.status == SyncStatus.SUCCESS.value)
    totals["connections_failed"] = sum(1 for r in runs if r.status == SyncStatus.FAILED.value)
    for run in runs:
        _add_run_stats(totals, run.stats)
    for name in _PAGE_COUNTERS.values():
        totals.setdefault(name, 0)
    for group in _DOCUMENT_GROUPS:
        totals.setdefault(f"documents_{group}", 0)
    return dict(totals)
