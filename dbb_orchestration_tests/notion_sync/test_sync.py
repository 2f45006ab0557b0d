"""One connection end to end: FakeNotion through the real SDK, into SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring, content_hash, decode_content
from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.sync import (
    ConnectionSyncResult,
    SyncOptions,
    SyncStatus,
    database_since,
    find_sync_targets,
    load_connection,
    sync_connection,
)
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.testing import FakeNotion
from dbb_orchestration.testing import factories as f
from dbb_orchestration.testing.fake_notion import (
    block,
    checkbox_property,
    rich_text_property,
    select_property,
)
from dbb_orchestration_tests.notion_sync.conftest import T0, ApiFactory, Clock, notion_connection

CLOUD = SyncOptions(ContentKeyring.empty(), DeploymentMode.CLOUD)
KEYRING = ContentKeyring.from_keys({1: b"k" * 32, 2: b"K" * 32})


class SeedCalls:
    def __init__(self) -> None:
        self.calls: list[tuple[str, datetime]] = []

    def __call__(self, conn: sa.Connection, user_id: str, now: datetime) -> str:
        self.calls.append((user_id, now))
        return "created"


def run(
    engine: sa.Engine,
    connection_id: int,
    open_api: ApiFactory,
    clock: Clock,
    options: SyncOptions = CLOUD,
    seed: Any = None,
) -> ConnectionSyncResult:
    return sync_connection(engine, connection_id, open_api=open_api, options=options, clock=clock, seed=seed)


def documents(engine: sa.Engine, keyring: ContentKeyring | None = None) -> dict[str, dict[str, Any]]:
    """external id → row values, with ``text`` = decoded content."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.documents).order_by(t.documents.c.external_id)).mappings().all()
    result = {}
    for row in rows:
        values = dict(row)
        values["text"] = decode_content(
            row["content_ciphertext"], row["content_iv"], row["content_alg"], row["content_key_version"],
            keyring or ContentKeyring.empty(),
        ).text  # fmt: skip
        result[row["external_id"]] = values
    return result


def sync_state(engine: sa.Engine, connection_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(t.sync_state).where(t.sync_state.c.connection_id == connection_id)
        ).one()


def sync_runs(engine: sa.Engine, connection_id: int) -> Sequence[Any]:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(t.sync_runs)
            .where(t.sync_runs.c.connection_id == connection_id)
            .order_by(t.sync_runs.c.id)
        ).all()


def children_requests(fake: FakeNotion) -> list[str]:
    """Parent ids of every ``blocks/{id}/children`` request, in order."""
    return [r.path.split("/")[3] for r in fake.requests if r.path.endswith("/children")]


def query_bodies(fake: FakeNotion) -> list[Any]:
    return [r.body for r in fake.requests if r.path.endswith("/query")]


# --------------------------------------------------------------------------------------------------


def test_first_sync_then_incremental_fetches_only_changed_pages(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.block_page_size = 2
    fake.add_database("db1", ["ds1"], "Study Notes")
    fake.add_page(
        "ds1", "p1", "Alpha", T0, properties={"Done": checkbox_property(True), "Kind": select_property("Book")},
        blocks=[block("heading_1", "Alpha"), block("bulleted_list_item", "one", children=[
            block("bulleted_list_item", "two", children=[block("bulleted_list_item", "three")]),
            block("bulleted_list_item", "two b"), block("bulleted_list_item", "two c")])],
    )  # fmt: skip
    fake.add_page("ds1", "p2", "Beta", T0 + timedelta(minutes=5), blocks=[block("paragraph", "beta text")])
    fake.add_page("ds1", "p3", "Gamma", T0 + timedelta(minutes=9), blocks=[block("quote", "gamma")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    seed = SeedCalls()

    first = run(engine, cid, open_api, clock, seed=seed)

    assert first.status is SyncStatus.SUCCESS, first.error
    assert first.stats.accepted == {"inserted": 3}
    assert (first.stats.pages_visited, first.stats.pages_fetched) == (3, 3)
    assert first.cursor == "2026-02-08T10:09:00.000Z"  # the newest page's (rounded) time
    assert seed.calls == [("u1", clock.now)]
    docs = documents(engine)
    assert docs["p1"]["text"] == "# Alpha\n\n- one\n  - two\n    - three\n  - two b\n  - two c"
    assert docs["p1"]["title"] == "Alpha"
    assert docs["p1"]["metadata_json"] == {
        "databaseId": "db1",
        "dataSourceId": "ds1",
        "url": "https://www.notion.so/Alpha-p1",
        "propertiesSummary": {"Done": True, "Kind": "Book", "Name": "Alpha"},
    }
    assert docs["p1"]["updated_at_source"] == T0 and docs["p1"]["created_at_source"] == T0
    assert docs["p3"]["text"] == "> gamma"
    assert query_bodies(fake) == [
        {"sorts": [{"timestamp": "last_edited_time", "direction": "descending"}], "page_size": 100}
    ]
    [first_run] = sync_runs(engine, cid)
    assert (first_run.kind, first_run.status) == ("incremental", "success")
    assert first_run.stats_json["documents"]["accepted"] == {"inserted": 3}
    assert sync_state(engine, cid).cursor_json == {"since": "2026-02-08T10:09:00.000Z"}

    # A week later only p2 changed.
    clock.advance(days=7)
    fake.update_page(
        "p2", last_edited_time=clock.now - timedelta(hours=2), blocks=[block("paragraph", "beta v2")]
    )
    fake.reset_log()

    second = run(engine, cid, open_api, clock, seed=seed)

    assert second.status is SyncStatus.SUCCESS, second.error
    assert query_bodies(fake)[0]["filter"] == {
        "timestamp": "last_edited_time",
        "last_edited_time": {"on_or_after": "2026-02-08T10:08:58.000Z"},
    }
    # p3 (the cursor's minute) is returned again but known unchanged: only p2's blocks are read.
    assert children_requests(fake) == ["p2"]
    assert second.stats.accepted == {"updated": 1}
    assert second.stats.skipped == {"unchanged": 1}
    assert documents(engine)["p2"]["text"] == "beta v2"
    assert second.cursor == "2026-02-15T09:00:00.000Z"
    assert sync_state(engine, cid).last_incremental_sync_at == clock.now


def test_database_with_two_data_sources(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db2", ["ds-a", "ds-b"], "Two", data_source_names=["A", "B"])
    fake.add_page("ds-a", "a1", "From A", T0, blocks=[block("paragraph", "a")])
    fake.add_page("ds-b", "b1", "From B", T0 + timedelta(minutes=1), blocks=[block("paragraph", "b")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u2", ["db2"])

    result = run(engine, cid, open_api, clock)

    assert result.stats.data_sources == 2
    docs = documents(engine)
    assert {k: (v["text"], v["metadata_json"]["dataSourceId"]) for k, v in docs.items()} == {
        "a1": ("a", "ds-a"),
        "b1": ("b", "ds-b"),
    }
    assert [r.path for r in fake.requests if r.path.endswith("/query")] == [
        "/v1/data_sources/ds-a/query",
        "/v1/data_sources/ds-b/query",
    ]


def test_429_with_retry_after_then_success(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "p1", "One", T0, blocks=[block("paragraph", "x")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    fake.fail_next("/v1/data_sources/", status=429, count=1, retry_after=1)
    fake.fail_next("/v1/blocks/", status=429, count=1, retry_after=30)

    result = run(engine, cid, open_api, clock)

    assert result.status is SyncStatus.SUCCESS
    assert sorted(open_api.sleeps) == [1.0, 30.0]  # Retry-After as sent, not cut to 10 s
    assert (result.stats.retries, result.stats.requests) == (2, 5)
    assert documents(engine)["p1"]["text"] == "x"
    assert sync_runs(engine, cid)[0].stats_json["retries"] == 2


def test_trashed_pages_mark_known_rows_deleted_and_leave_no_row_for_unknown_ones(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "keep", "Keep", T0, blocks=[block("paragraph", "k")])
    fake.add_page("ds1", "trash-me", "Trash me", T0 + timedelta(minutes=1), blocks=[block("paragraph", "t")])
    fake.add_page("ds1", "archived-early", "Old", T0, archived=True)
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])

    first = run(engine, cid, open_api, clock)
    assert first.stats.skipped == {"archived": 1}  # unknown and archived on the first sync: nothing stored
    assert set(documents(engine)) == {"keep", "trash-me"}

    clock.advance(days=7)
    trashed_at = clock.now - timedelta(hours=1)
    fake.update_page("trash-me", in_trash=True, last_edited_time=trashed_at)
    fake.add_page("ds1", "never-seen", "Never seen", trashed_at, in_trash=True)
    fake.add_page("ds1", "vanishing", "Vanishing", trashed_at, blocks=[block("paragraph", "v")])
    fake.fail_next("/v1/blocks/vanishing", status=404)  # removed between the query and the fetch

    second = run(engine, cid, open_api, clock)

    assert second.status is SyncStatus.SUCCESS
    assert second.stats.accepted == {"deleted": 1}
    assert second.stats.skipped == {"archived": 1, "not_found": 1}
    docs = documents(engine)
    assert docs["trash-me"]["deleted_at_source"] == trashed_at.replace(second=0, microsecond=0)
    assert docs["keep"]["deleted_at_source"] is None
    # Like the backend: a trashed page never stored writes no row (not even a deleted one).
    assert set(docs) == {"keep", "trash-me"}


def test_a_user_whose_only_pages_are_trashed_has_no_document_rows(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    assert run(engine, cid, open_api, clock).status is SyncStatus.SUCCESS  # first sync: empty database

    clock.advance(days=7)
    fake.add_page("ds1", "binned", "Binned", clock.now - timedelta(hours=1), in_trash=True)
    fake.add_page("ds1", "archived", "Archived", clock.now - timedelta(hours=2), archived=True)

    incremental = run(engine, cid, open_api, clock)

    assert incremental.status is SyncStatus.SUCCESS
    assert incremental.stats.skipped == {"archived": 2}
    assert incremental.stats.accepted == {}
    assert documents(engine) == {}


def test_page_edited_twice_in_the_same_minute(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "p", "Draft", "2026-02-08T10:15:10Z", blocks=[block("paragraph", "first draft")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    clock = Clock(datetime.fromisoformat("2026-02-08T10:15:30+00:00"))  # the sync runs within that minute

    first = run(engine, cid, open_api, clock)
    assert first.cursor == "2026-02-08T10:15:00.000Z"

    # Edited again at 10:15:50: Notion still reports 10:15:00.
    fake.update_page("p", last_edited_time="2026-02-08T10:15:50Z", blocks=[block("paragraph", "final text")])
    clock.now = datetime.fromisoformat("2026-02-08T10:16:30+00:00")
    fake.reset_log()

    second = run(engine, cid, open_api, clock)

    assert children_requests(fake) == ["p"]  # read again: the first read was inside that minute
    assert second.stats.accepted == {"updated": 1}
    assert documents(engine)["p"]["text"] == "final text"

    # A third sync after the minute ended knows the page is unchanged without reading it.
    clock.advance(minutes=5)
    fake.reset_log()
    third = run(engine, cid, open_api, clock)
    assert children_requests(fake) == []
    assert third.stats.skipped == {"unchanged": 1}


def _bulk_documents(conn: sa.Connection, user_id: str, connection_id: int, count: int) -> None:
    conn.execute(
        sa.insert(t.documents),
        [
            {
                "user_id": user_id, "connection_id": connection_id, "external_id": f"vault-{n}", "title": "n",
                "content_ciphertext": "", "content_iv": "none", "content_alg": "none", "content_key_version": 0,
                "content_hash": "h", "content_size_bytes": 0, "updated_at_source": T0, "last_synced_at": T0,
            }
            for n in range(count)
        ],
    )  # fmt: skip


def test_note_cap_for_a_free_user_then_upgrade(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    for n in range(3):
        fake.add_page(
            "ds1", f"p{n}", f"Page {n}", T0 + timedelta(minutes=n), blocks=[block("paragraph", f"t{n}")]
        )
    with engine.begin() as conn:
        f.user(conn, "free")
        vault = f.connection(conn, "free", kind="obsidian")
        _bulk_documents(conn, "free", vault, 499)
        cid = notion_connection(conn, fake, "free", ["db1"], create_user=False)

    capped = run(engine, cid, open_api, clock)

    assert capped.status is SyncStatus.SUCCESS
    assert capped.stats.accepted == {"inserted": 1}  # the newest page fills the 500th slot
    assert capped.stats.rejected == {"note_limit_reached": 2}
    assert capped.stats.pages_fetched == 1  # rejected pages cost no block requests
    assert set(documents(engine)) - {f"vault-{n}" for n in range(499)} == {"p2"}
    assert sync_state(engine, cid).health_json["noteLimitReached"] == 2

    # A failed sync in between does not forget that pages are waiting for room.
    fake.revoke_token("secret_free")
    assert run(engine, cid, open_api, clock).status is SyncStatus.FAILED
    assert sync_state(engine, cid).health_json["noteLimitReached"] == 2
    fake.add_token("secret_free")

    # The user upgrades: the next sync reads the database in full and stores the rest.
    with engine.begin() as conn:
        f.subscription(conn, "free", status="active")
    clock.advance(days=7)
    fake.reset_log()
    upgraded = run(engine, cid, open_api, clock)

    assert "filter" not in query_bodies(fake)[0]
    assert upgraded.stats.accepted == {"inserted": 2}
    assert upgraded.stats.skipped == {"unchanged": 1}
    assert sync_state(engine, cid).health_json["noteLimitReached"] == 0


def test_self_hosted_has_no_cap(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "p", "P", T0, blocks=[block("paragraph", "x")])
    with engine.begin() as conn:
        f.user(conn, "selfie")
        vault = f.connection(conn, "selfie", kind="obsidian")
        _bulk_documents(conn, "selfie", vault, 10_000)
        cid = notion_connection(conn, fake, "selfie", ["db1"], create_user=False)

    result = run(
        engine, cid, open_api, clock, SyncOptions(ContentKeyring.empty(), DeploymentMode.SELF_HOSTED)
    )

    assert result.stats.accepted == {"inserted": 1}


@pytest.mark.parametrize("encrypted", [True, False])
def test_content_encryption_on_and_off(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock, encrypted: bool
) -> None:
    keyring = KEYRING if encrypted else ContentKeyring.empty()
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "p", "Secret", T0, blocks=[block("paragraph", "my private thought")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])

    run(engine, cid, open_api, clock, SyncOptions(keyring, DeploymentMode.CLOUD))

    row = documents(engine, keyring)["p"]
    assert row["text"] == "my private thought"
    if encrypted:
        assert (row["content_alg"], row["content_key_version"]) == ("aes-256-gcm", 2)
        assert "private" not in row["content_ciphertext"]
        assert len(row["content_iv"]) == 16  # base64 of 12 bytes
    else:
        assert (row["content_alg"], row["content_iv"], row["content_key_version"]) == ("none", "none", 0)
    assert row["content_size_bytes"] == len(b"my private thought")


def test_failure_mid_sync_keeps_the_cursor(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "a", "A", T0, blocks=[block("paragraph", "a1")])
    fake.add_page("ds1", "b", "B", T0 + timedelta(minutes=1), blocks=[block("paragraph", "b1")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    seed = SeedCalls()
    run(engine, cid, open_api, clock, seed=seed)
    cursor = sync_state(engine, cid).cursor_json

    clock.advance(days=7)
    fake.query_page_size = 1  # one page per batch: "b" is written before "a" fails
    fake.update_page("b", last_edited_time=clock.now - timedelta(hours=1), blocks=[block("paragraph", "b2")])
    fake.update_page("a", last_edited_time=clock.now - timedelta(hours=2), blocks=[block("paragraph", "a2")])
    fake.fail_next("/v1/blocks/a", status=500, count=6)

    failed = run(engine, cid, open_api, clock, seed=seed)

    assert failed.status is SyncStatus.FAILED
    assert failed.error is not None and (failed.error["status"], failed.error["code"]) == (
        500,
        "internal_server_error",
    )
    assert sync_state(engine, cid).cursor_json == cursor  # unchanged
    assert sync_state(engine, cid).health_json["status"] == "failed"
    last = sync_runs(engine, cid)[-1]
    assert (last.status, last.error_json["code"]) == ("failed", "internal_server_error")
    assert last.finished_at == clock.now
    assert len(seed.calls) == 1  # no seed after a failure
    assert documents(engine)["b"]["text"] == "b2"
    assert documents(engine)["a"]["text"] == "a1"

    clock.advance(minutes=10)
    rerun = run(engine, cid, open_api, clock, seed=seed)

    assert rerun.status is SyncStatus.SUCCESS
    assert rerun.stats.accepted == {"updated": 1}
    assert rerun.stats.skipped == {"unchanged": 1}
    assert documents(engine)["a"]["text"] == "a2"


def test_unauthorized_fails_the_connection(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"], token="secret_revoked_token")
    fake.revoke_token("secret_revoked_token")
    seed = SeedCalls()

    result = run(engine, cid, open_api, clock, seed=seed)

    assert result.status is SyncStatus.FAILED and result.failed
    assert result.error is not None
    assert (result.error["status"], result.error["code"], result.error["type"]) == (
        401,
        "unauthorized",
        "NotionUnauthorized",
    )
    assert "secret_revoked_token" not in str(result.error)
    [row] = sync_runs(engine, cid)
    assert (row.status, row.error_json["code"]) == ("failed", "unauthorized")
    assert sync_state(engine, cid).cursor_json is None
    assert seed.calls == []


def test_no_enabled_database_is_success_with_zero_work(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", [])

    result = run(engine, cid, open_api, clock)

    assert result.status is SyncStatus.SUCCESS
    assert (result.stats.databases, result.stats.requests) == (0, 0)
    assert result.cursor == "2026-02-08T11:00:00.000Z"
    assert fake.requests == []


def test_missing_database_is_skipped(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "p", "P", T0, blocks=[block("paragraph", "x")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["not-shared", "db1"])

    result = run(engine, cid, open_api, clock)

    assert result.status is SyncStatus.SUCCESS
    assert (result.stats.databases, result.stats.databases_not_found) == (2, 1)
    assert set(documents(engine)) == {"p"}


def test_new_scope_item_is_read_in_full(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_database("db2", ["ds2"])
    fake.add_page("ds1", "new", "New", T0 + timedelta(minutes=30), blocks=[block("paragraph", "n")])
    fake.add_page("ds2", "old", "Old", T0 - timedelta(days=30), blocks=[block("paragraph", "o")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    run(engine, cid, open_api, clock)

    clock.advance(days=1)
    with engine.begin() as conn:
        item = f.scope_item(conn, cid, "db2")
        conn.execute(
            sa.update(t.integration_scope_items)
            .where(t.integration_scope_items.c.id == item)
            .values(created_at=clock.now - timedelta(hours=1), updated_at=clock.now - timedelta(hours=1))
        )
    fake.reset_log()

    result = run(engine, cid, open_api, clock)

    bodies = query_bodies(fake)
    assert "filter" in bodies[0] and "filter" not in bodies[1]  # db1 incremental, db2 in full
    assert result.stats.accepted == {"inserted": 1}
    assert documents(engine)["old"]["text"] == "o"


def test_database_since_rules() -> None:
    since = T0
    last = T0 + timedelta(days=1)
    assert database_since(None, None, last, recheck_all=False) is None
    assert database_since(since, None, last, recheck_all=True) is None
    assert database_since(since, last + timedelta(seconds=1), last, recheck_all=False) is None
    assert database_since(since, last - timedelta(seconds=1), last, recheck_all=False) == since
    assert database_since(since, None, last, recheck_all=False) == since
    assert database_since(since, T0, None, recheck_all=False) is None


def test_eligibility(engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock) -> None:
    with engine.begin() as conn:
        ok = notion_connection(conn, fake, "ok", ["db"])
        paused = notion_connection(conn, fake, "paused", ["db"])
        conn.execute(
            sa.update(t.integration_connections)
            .where(t.integration_connections.c.id == paused)
            .values(status="paused")
        )
        f.user(conn, "no-token")
        no_token = f.connection(conn, "no-token", kind="notion", account_external_id="ws-x")
        f.notion_account(conn, "no-token", account_id="ws-x", access_token=None)
        f.user(conn, "other-ws")
        other_ws = f.connection(conn, "other-ws", kind="notion", account_external_id="ws-a")
        f.notion_account(conn, "other-ws", account_id="ws-b", access_token="secret_tok_b")
        f.user(conn, "vault")
        f.connection(conn, "vault", kind="obsidian")
        targets = find_sync_targets(conn)
        only = find_sync_targets(conn, [paused, ok])
        details = load_connection(conn, ok)
    assert [x.connection_id for x in targets] == [ok]
    assert [x.connection_id for x in only] == [ok]
    assert (
        details is not None
        and details.user_id == "ok"
        and [d.database_id for d in details.databases] == ["db"]
    )
    assert "secret_ok" not in repr(details)
    for cid in (paused, no_token, other_ws):
        assert run(engine, cid, open_api, clock).status is SyncStatus.SKIPPED
    assert sync_runs(engine, paused) == []


def test_seed_failure_is_reported_after_the_sync_is_recorded(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])

    def broken_seed(conn: sa.Connection, user_id: str, now: datetime) -> None:
        raise RuntimeError("seed exploded")

    result = run(engine, cid, open_api, clock, seed=broken_seed)

    assert result.status is SyncStatus.SUCCESS and result.failed
    assert result.seed_error == "RuntimeError: seed exploded"
    assert sync_runs(engine, cid)[0].status == "success"


def test_characters_postgres_refuses_are_cleaned_per_page_and_siblings_are_stored(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "before", "Before", T0, blocks=[block("paragraph", "fine")])
    fake.add_page("ds1", "only-nul", "\x00", T0 + timedelta(minutes=1), blocks=[block("paragraph", "x")])
    fake.add_page("ds1", "after", "After", T0 + timedelta(minutes=2), blocks=[block("paragraph", "ok")])
    fake.add_page(
        "ds1", "nul", "Ti\x00tle \ud800", T0 + timedelta(minutes=3),
        properties={"Kind": select_property("bo\x00ok"), "Note\x00": rich_text_property("n\x00b")},
        blocks=[block("paragraph", "a\x00b"), block("paragraph", "lone \udc00 surrogate")],
    )  # fmt: skip
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    clock = Clock(T0 + timedelta(minutes=3, seconds=30))  # within the newest page's minute

    first = run(engine, cid, open_api, clock)

    assert first.status is SyncStatus.SUCCESS, first.error
    assert first.stats.accepted == {"inserted": 4}
    assert first.cursor == "2026-02-08T10:03:00.000Z"
    docs = documents(engine)
    assert set(docs) == {"before", "nul", "only-nul", "after"}
    cleaned = docs["nul"]
    assert cleaned["title"] == "Title \ufffd"
    assert cleaned["text"] == "ab\n\nlone \ufffd surrogate"
    assert cleaned["content_hash"] == content_hash("ab\n\nlone \ufffd surrogate")
    assert cleaned["metadata_json"]["propertiesSummary"] == {
        "Kind": "book",
        "Note": "nb",
        "Name": "Title \ufffd",
    }
    assert docs["only-nul"]["title"] == "Untitled"

    # The page was read inside its edit minute, so the next sync reads it again: its stored hash is
    # of the stored (cleaned) text, so the unchanged page is recognised and nothing is rewritten.
    clock.advance(days=7)
    fake.reset_log()
    second = run(engine, cid, open_api, clock)
    assert children_requests(fake) == ["nul"]
    assert second.stats.accepted == {}
    assert second.stats.skipped == {"unchanged": 1}


def _refuse_title(engine: sa.Engine, title: str) -> None:
    """A real constraint that makes the database refuse one page's row (the way a character it cannot
    hold would), on either database."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                sa.text(f"ALTER TABLE documents ADD CONSTRAINT test_refuse CHECK (title <> '{title}')")
            )
        else:
            for event in ("INSERT", "UPDATE"):
                conn.execute(
                    sa.text(
                        f"CREATE TRIGGER test_refuse_{event.lower()} BEFORE {event} ON documents "
                        f"WHEN NEW.title = '{title}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                    )
                )


def _accept_all_titles(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE documents DROP CONSTRAINT test_refuse"))
        else:
            conn.execute(sa.text("DROP TRIGGER test_refuse_insert"))
            conn.execute(sa.text("DROP TRIGGER test_refuse_update"))


def test_a_page_the_database_still_refuses_is_isolated_and_holds_the_cursor(
    engine: sa.Engine, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "old", "Old", T0, blocks=[block("paragraph", "o")])
    fake.add_page("ds1", "refused", "Refused", T0 + timedelta(minutes=5), blocks=[block("paragraph", "r")])
    fake.add_page("ds1", "new", "New", T0 + timedelta(minutes=9), blocks=[block("paragraph", "n")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
    _refuse_title(engine, "Refused")
    seed = SeedCalls()

    first = run(engine, cid, open_api, clock, seed=seed)

    assert first.status is SyncStatus.SUCCESS, first.error
    assert first.stats.accepted == {"inserted": 2}
    assert first.stats.rejected == {"unstorable": 1}
    assert set(documents(engine)) == {"old", "new"}
    # The cursor stops at the refused page's minute, not the newest page's.
    assert first.cursor == "2026-02-08T10:05:00.000Z"
    [row] = sync_runs(engine, cid)
    assert row.status == "success"
    assert row.stats_json["documents"]["rejected"] == {"unstorable": 1}
    assert row.stats_json["unstorablePageIds"] == ["refused"]
    assert seed.calls  # the rest of the connection counts as synced

    # Once the database accepts it, the next incremental sync stores it.
    _accept_all_titles(engine)
    clock.advance(days=7)
    fake.reset_log()
    second = run(engine, cid, open_api, clock)

    assert query_bodies(fake)[0]["filter"]["last_edited_time"] == {"on_or_after": "2026-02-08T10:04:58.000Z"}
    assert second.stats.accepted == {"inserted": 1}
    assert documents(engine)["refused"]["text"] == "r"
    assert second.cursor == "2026-02-08T10:09:00.000Z"


@pytest.mark.postgres
def test_a_database_error_that_is_not_about_a_value_still_fails_the_connection(
    postgres_url: str, fake: FakeNotion, open_api: ApiFactory, clock: Clock
) -> None:
    engine = create_db_engine(postgres_url)
    fake.add_database("db1", ["ds1"])
    fake.add_page("ds1", "p1", "One", T0, blocks=[block("paragraph", "x")])
    with engine.begin() as conn:
        cid = notion_connection(conn, fake, "u1", ["db1"])
        # Every write of a document fails the way a server in trouble does (not a refused value).
        conn.execute(
            sa.text(
                "CREATE FUNCTION test_down() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'disk full' USING ERRCODE = '53100'; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER test_down BEFORE INSERT ON documents FOR EACH ROW EXECUTE FUNCTION test_down()"
            )
        )
    try:
        result = run(engine, cid, open_api, clock)

        assert result.status is SyncStatus.FAILED
        assert result.error is not None and result.error["type"] == "OperationalError"
        assert sync_state(engine, cid).cursor_json is None  # nothing counted as synced
        assert documents(engine) == {}
    finally:
        engine.dispose()
