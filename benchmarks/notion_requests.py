"""How many Notion API requests one connection's weekly sync makes, counted at FakeNotion.

    python benchmarks/notion_requests.py [--pages 100] [--block-page-size 100]

Runs the real sync (``sync_connection``: notion-client 3.1 over HTTP to the loopback fake, SQLite in a
temporary directory, no pacing) for one connection with one database of ``--pages`` pages, and reports
the requests of each scenario, by endpoint:

1. first sync of the pages (each page: a heading, a paragraph and a bulleted list three levels deep);
2. the next weekly sync when nothing changed (incremental: the cursor's minute is read again);
3. the same with the cursor lost (every page returned by the query, none read again: known unchanged);
4. the next weekly sync when every page changed, each with three levels of nesting.

Expected from the design: (2) and (3) cost one ``databases.retrieve`` plus one query per 100 pages and
no block request; (1) and (4) add three ``blocks.children.list`` per page (the page, the level-1 item,
the level-2 item; the level-3 item has no children), i.e. 302 for 100 pages. Request counts do not
depend on timing, so the numbers are exact.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import create_db_engine, create_schema
from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.client import NotionApi, make_sdk_client
from dbb_orchestration.notion_sync.sync import SyncOptions, SyncStatus, sync_connection
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.testing import FakeNotion
from dbb_orchestration.testing import factories as f
from dbb_orchestration.testing.fake_notion import block

TOKEN = "secret_benchmark_token"
T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


def page_blocks(n: int, version: int) -> list[dict[str, Any]]:
    """A heading, a paragraph and a list nested three levels deep."""
    return [
        block("heading_2", f"Note {n} v{version}"),
        block("paragraph", f"Body of note {n}, version {version}."),
        block(
            "bulleted_list_item",
            "level 1",
            children=[
                block(
                    "bulleted_list_item",
                    "level 2",
                    children=[block("bulleted_list_item", f"level 3 (v{version})")],
                )
            ],
        ),
    ]


def endpoint(path: str) -> str:
    parts = path.split("/")
    if path.endswith("/children"):
        return "blocks.children.list"
    if path.endswith("/query"):
        return "data_sources.query"
    return f"{parts[2]}.retrieve"


class Bench:
    def __init__(self, fake: FakeNotion, engine: sa.Engine, connection_id: int) -> None:
        self.fake = fake
        self.engine = engine
        self.connection_id = connection_id
        self.now = T0 + timedelta(days=1)

    @contextmanager
    def open_api(self, token: str) -> Iterator[NotionApi]:
        with NotionApi(make_sdk_client(token, self.fake.base_url)) as api:
            yield api

    def sync(self, label: str) -> Counter[str]:
        self.fake.reset_log()
        result = sync_connection(
            self.engine,
            self.connection_id,
            open_api=self.open_api,
            options=SyncOptions(ContentKeyring.empty(), DeploymentMode.SELF_HOSTED),
            clock=lambda: self.now,
        )
        if result.status is not SyncStatus.SUCCESS:
            raise SystemExit(f"{label}: sync failed: {result.error}")
        counts = Counter(endpoint(r.path) for r in self.fake.requests)
        documents = result.stats.as_json()["documents"]
        print(
            f"{label:<44} {sum(counts.values()):>5} requests  "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f"  | accepted {documents['accepted']} skipped {documents['skipped']}"
        )
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--block-page-size", type=int, default=None, help="cap children per response")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, FakeNotion(tokens=[TOKEN]) as fake:
        fake.block_page_size = args.block_page_size
        engine = create_db_engine(f"sqlite:///{Path(tmp) / 'bench.sqlite'}")
        create_schema(engine)
        fake.add_database("bench-db", ["bench-ds"], "Benchmark")
        for n in range(args.pages):
            fake.add_page(
                "bench-ds", f"page-{n:04d}", f"Note {n}", T0 + timedelta(minutes=n), blocks=page_blocks(n, 1)
            )
        with engine.begin() as conn:
            f.user(conn, "bench")
            connection_id = f.connection(conn, "bench", kind="notion", account_external_id="ws-bench")
            f.notion_account(conn, "bench", account_id="ws-bench", access_token=TOKEN)
            f.scope_item(conn, connection_id, "bench-db")
            conn.execute(sa.update(t.integration_scope_items).values(created_at=T0, updated_at=T0))

        bench = Bench(fake, engine, connection_id)
        print(f"{args.pages} pages, one database, one data source\n")
        bench.sync("1. first sync")
        bench.now += timedelta(days=7)
        unchanged = bench.sync(f"2. {args.pages} unchanged pages (incremental)")
        with engine.begin() as conn:
            conn.execute(sa.update(t.sync_state).values(cursor_json=None))
        bench.now += timedelta(days=7)
        bench.sync(f"3. {args.pages} unchanged pages (cursor lost)")
        edited = bench.now - timedelta(hours=1)
        for n in range(args.pages):
            fake.update_page(f"page-{n:04d}", last_edited_time=edited, blocks=page_blocks(n, 2))
        bench.now += timedelta(days=7)
        changed = bench.sync(f"4. {args.pages} changed pages, 3 levels deep")
        engine.dispose()
        fake.raise_server_errors()

    print(f"\nunchanged: {sum(unchanged.values())} requests; changed: {sum(changed.values())} requests")


if __name__ == "__main__":
    main()
