"""What one connection's sync reports: its status, its counters and its result."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["MAX_LISTED_IDS", "ConnectionSyncResult", "SyncStats", "SyncStatus"]

MAX_LISTED_IDS = 20
"""At most this many page ids are listed in ``stats_json``."""


class SyncStatus(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Not eligible any more when its step ran (paused, revoked, token removed): nothing was done."""


@dataclass
class SyncStats:
    """Counters of one connection's sync (JSON for ``sync_runs.stats_json``, flat for Dagster metadata)."""

    databases: int = 0
    databases_not_found: int = 0
    databases_full: int = 0
    data_sources: int = 0
    data_sources_not_found: int = 0
    pages_visited: int = 0
    pages_fetched: int = 0
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    retries: int = 0
    unstorable_page_ids: list[str] = field(default_factory=list)
    """Pages the database refused even after cleaning (ids only, for the operator)."""

    @property
    def pages_skipped(self) -> int:
        """Pages returned by a query whose content was not fetched."""
        return self.pages_visited - self.pages_fetched

    def as_json(self) -> dict[str, Any]:
        data = {
            "databases": self.databases,
            "databasesNotFound": self.databases_not_found,
            "databasesReadInFull": self.databases_full,
            "dataSources": self.data_sources,
            "dataSourcesNotFound": self.data_sources_not_found,
            "pagesVisited": self.pages_visited,
            "pagesFetched": self.pages_fetched,
            "pagesSkipped": self.pages_skipped,
            "documents": {
                "accepted": dict(sorted(self.accepted.items())),
                "rejected": dict(sorted(self.rejected.items())),
                "skipped": dict(sorted(self.skipped.items())),
            },
            "requests": self.requests,
            "retries": self.retries,
        }
        if self.unstorable_page_ids:
            data["unstorablePageIds"] = self.unstorable_page_ids[:MAX_LISTED_IDS]
        return data

    def metadata(self) -> dict[str, int]:
        """Flat counters: ``pages_*``, ``documents_accepted``/``_rejected``/``_skipped`` and one
        ``accepted_<x>`` / ``rejected_<reason>`` / ``skipped_<reason>`` per reason seen."""
        flat: dict[str, int] = {
            "databases": self.databases,
            "databases_not_found": self.databases_not_found,
            "data_sources": self.data_sources,
            "pages_visited": self.pages_visited,
            "pages_fetched": self.pages_fetched,
            "pages_skipped": self.pages_skipped,
            "documents_accepted": sum(self.accepted.values()),
            "documents_rejected": sum(self.rejected.values()),
            "documents_skipped": sum(self.skipped.values()),
            "notion_requests": self.requests,
            "notion_retries": self.retries,
        }
        for prefix, counter in (
            ("accepted", self.accepted),
            ("rejected", self.rejected),
            ("skipped", self.skipped),
        ):
            for reason, count in sorted(counter.items()):
                flat[f"{prefix}_{reason}"] = count
        return flat


@dataclass(frozen=True)
class ConnectionSyncResult:
    connection_id: int
    status: SyncStatus
    user_id: str | None = None
    sync_run_id: int | None = None
    stats: SyncStats = field(default_factory=SyncStats)
    error: Mapping[str, Any] | None = None
    cursor: str | None = None
    seed_result: str | None = None
    seed_error: str | None = None

    @property
    def failed(self) -> bool:
        """The sync failed, or it succeeded but creating the seed digest failed."""
        return self.status is SyncStatus.FAILED or self.seed_error is not None
