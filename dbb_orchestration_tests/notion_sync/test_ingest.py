"""Ingest rules (pure) and the set-based writes, on SQLite and Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from dbb_orchestration.content import ContentKeyring, content_hash, decode_content
from dbb_orchestration.db import tables as t
from dbb_orchestration.notion_sync.ingest import (
    Decision,
    NoteBudget,
    StoredDocument,
    count_live_documents,
    decide_delete,
    decide_upsert,
    document_row,
    finish_sync_run,
    is_known_unchanged,
    is_stale,
    is_unstorable_row_error,
    load_stored,
    mark_deleted,
    note_limit_for_user,
    read_sync_state,
    save_sync_failure,
    save_sync_success,
    start_sync_run,
    touch_synced,
    upsert_documents,
    would_add_live_note,
)
from dbb_orchestration.plans import DeploymentMode
from dbb_orchestration.testing import factories as f

T = datetime(2026, 2, 8, 10, 15, tzinfo=UTC)
EARLIER = T - timedelta(minutes=5)
LATER = T + timedelta(minutes=5)


def stored(
    updated: datetime | None = T,
    deleted: datetime | None = None,
    digest: str = "h1",
    synced: datetime | None = None,
) -> StoredDocument:
    return StoredDocument(7, updated, deleted, digest, synced)


# --- decisions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "source_time", "digest", "expected"),
    [
        (None, T, "h1", Decision.INSERT),
        (stored(), EARLIER, "h2", Decision.STALE),  # older than the stored update
        (stored(), T, "h1", Decision.UNCHANGED),  # same time, same hash
        (stored(), T, "h2", Decision.UPDATE),  # same minute, new content (edited twice in a minute)
        (stored(), LATER, "h1", Decision.UPDATE),  # newer time wins even with the same hash
        (stored(deleted=T), T, "h2", Decision.STALE),  # equal to the deletion: stays deleted
        (stored(updated=EARLIER, deleted=T), EARLIER, "h1", Decision.STALE),
        (stored(updated=EARLIER, deleted=T), LATER, "h1", Decision.UPDATE),  # revived
        (stored(updated=None), EARLIER, "h1", Decision.UPDATE),  # a row without times
    ],
)
def test_decide_upsert(
    row: StoredDocument | None, source_time: datetime, digest: str, expected: Decision
) -> None:
    assert decide_upsert(row, source_time, digest) is expected
    assert is_stale(row, source_time) is (expected is Decision.STALE)


@pytest.mark.parametrize(
    ("row", "source_time", "expected"),
    [
        (None, T, Decision.ARCHIVED_UNKNOWN),  # never stored: nothing is written
        (stored(), LATER, Decision.DELETE),
        (stored(), T, Decision.DELETE),  # trashed in the same minute as the last edit
        (stored(), EARLIER, Decision.STALE),
        (stored(updated=EARLIER, deleted=EARLIER), T, Decision.ALREADY_DELETED),
        (stored(deleted=LATER), T, Decision.STALE),
    ],
)
def test_decide_delete(row: StoredDocument | None, source_time: datetime, expected: Decision) -> None:
    assert decide_delete(row, source_time) is expected


def test_known_unchanged_needs_a_read_after_the_edit_minute_ended() -> None:
    after_minute = T + timedelta(minutes=1, seconds=2)
    assert is_known_unchanged(stored(synced=after_minute), T) is True
    assert is_known_unchanged(stored(synced=after_minute - timedelta(microseconds=1)), T) is False
    assert is_known_unchanged(stored(synced=T + timedelta(seconds=40)), T) is False  # same minute
    assert is_known_unchanged(stored(synced=None), T) is False
    assert is_known_unchanged(stored(synced=LATER + timedelta(hours=1)), LATER) is False  # newer edit
    assert is_known_unchanged(stored(deleted=T, synced=LATER), T) is False
    assert is_known_unchanged(None, T) is False


def test_note_budget() -> None:
    budget = NoteBudget(3, 2)
    assert budget.remaining == 1
    assert budget.try_take() is True
    assert budget.try_take() is False
    assert budget.used == 3
    budget.release()
    assert budget.try_take() is True
    unlimited = NoteBudget(None, 10_000)
    assert all(unlimited.try_take() for _ in range(100))
    assert unlimited.remaining is None
    assert NoteBudget(5, -3).used == 0
    assert would_add_live_note(None) and would_add_live_note(stored(deleted=T))
    assert not would_add_live_note(stored())


# --- writes (SQLite and Postgres) ----------------------------------------------------------------


def _row(external_id: str, markdown: str, when: datetime, now: datetime, *, keyring: ContentKeyring | None = None,
         deleted: bool = False, user_id: str = "u1", connection_id: int = 1) -> dict[str, object]:  # fmt: skip
    return document_row(
        user_id=user_id,
        connection_id=connection_id,
        external_id=external_id,
        title=f"Title {external_id}",
        markdown=markdown,
        keyring=keyring or ContentKeyring.empty(),
        metadata={"databaseId": "db", "dataSourceId": "ds", "url": None, "propertiesSummary": {}},
        created_at_source=when,
        updated_at_source=when,
        deleted_at_source=when if deleted else None,
        now=now,
    )


@pytest.fixture
def setup(engine: sa.Engine) -> tuple[sa.Engine, int]:
    with engine.begin() as conn:
        f.user(conn, "u1")
        connection_id = f.connection(conn, "u1", kind="notion", account_external_id="ws1")
    return engine, connection_id


def test_upsert_inserts_updates_and_respects_newer_rows(setup: tuple[sa.Engine, int]) -> None:
    engine, cid = setup
    now = T + timedelta(hours=1)
    with engine.begin() as conn:
        written = upsert_documents(
            conn, [_row("a", "A", T, now, connection_id=cid), _row("b", "B", T, now, connection_id=cid)]
        )
    assert written == {"a", "b"}

    # The backend stored a newer "b" meanwhile: our older write must not overwrite it.
    with engine.begin() as conn:
        conn.execute(
            sa.update(t.documents).where(t.documents.c.external_id == "b").values(updated_at_source=LATER)
        )
        written = upsert_documents(
            conn,
            [_row("a", "A2", LATER, now, connection_id=cid), _row("b", "B-old", T, now, connection_id=cid)],
        )
    assert written == {"a"}
    with engine.connect() as conn:
        rows = {r.external_id: r for r in conn.execute(sa.select(t.documents))}
        found = load_stored(conn, "u1", cid, ["a", "b", "zzz"])
    assert decode_content(rows["a"].content_ciphertext, rows["a"].content_iv, rows["a"].content_alg,
                          rows["a"].content_key_version, ContentKeyring.empty()).text == "A2"  # fmt: skip
    assert decode_content(rows["b"].content_ciphertext, rows["b"].content_iv, rows["b"].content_alg,
                          rows["b"].content_key_version, ContentKeyring.empty()).text == "B"  # fmt: skip
    assert rows["a"].updated_at_source == LATER
    assert rows["a"].metadata_json == {
        "databaseId": "db",
        "dataSourceId": "ds",
        "url": None,
        "propertiesSummary": {},
    }
    assert set(found) == {"a", "b"}
    assert found["a"].updated_at_source == LATER and found["a"].last_synced_at == now


def test_upsert_revives_a_deleted_row_only_when_newer(setup: tuple[sa.Engine, int]) -> None:
    engine, cid = setup
    now = T + timedelta(hours=1)
    with engine.begin() as conn:
        upsert_documents(conn, [_row("gone", "here", EARLIER, now, connection_id=cid)])
        gone_id = conn.execute(sa.select(t.documents.c.id)).scalar_one()
        assert mark_deleted(conn, [(gone_id, T)], now) == 1
        assert upsert_documents(conn, [_row("gone", "back?", T, now, connection_id=cid)]) == set()
        assert upsert_documents(conn, [_row("gone", "back!", LATER, now, connection_id=cid)]) == {"gone"}
        row = conn.execute(sa.select(t.documents).where(t.documents.c.external_id == "gone")).one()
    assert row.deleted_at_source is None
    assert row.updated_at_source == LATER


def test_deletes_and_touch(setup: tuple[sa.Engine, int]) -> None:
    engine, cid = setup
    now = T + timedelta(hours=1)
    with engine.begin() as conn:
        upsert_documents(conn, [_row(x, x, T, now, connection_id=cid) for x in ("live", "old", "newer")])
        ids = {
            r.external_id: r.id for r in conn.execute(sa.select(t.documents.c.external_id, t.documents.c.id))
        }
        deleted = mark_deleted(conn, [(ids["old"], LATER), (ids["newer"], EARLIER)], now)
        touched = touch_synced(conn, [ids["live"]], now + timedelta(hours=1))
        not_back = touch_synced(conn, [ids["live"]], now)  # never moves backwards
        rows = {r.external_id: r for r in conn.execute(sa.select(t.documents))}
        live = count_live_documents(conn, "u1")
    assert (deleted, touched, not_back) == (1, 1, 0)
    assert rows["old"].deleted_at_source == LATER
    assert rows["newer"].deleted_at_source is None  # the deletion is older than the row
    assert rows["live"].last_synced_at == now + timedelta(hours=1)
    assert live == 2  # live, newer


def test_document_row_makes_title_and_metadata_storable_and_keeps_content_exact() -> None:
    row = document_row(
        user_id="u1",
        connection_id=1,
        external_id="p",
        title="a\x00b\udfff",
        markdown="x\x00y \ud800",
        keyring=ContentKeyring.empty(),
        metadata={"url": "h\x00", "propertiesSummary": {"K\x00": ["v\x00", float("nan")]}},
        created_at_source=None,
        updated_at_source=T,
        deleted_at_source=None,
        now=T,
    )
    assert row["title"] == "ab\ufffd"
    # Content is stored base64-encoded, so NUL can stay: the hash must be the backend's for the same text
    # (a lone surrogate becomes U+FFFD in UTF-8, as the backend's Buffer.from does).
    assert decode_content(row["content_ciphertext"], "none", "none", 0, ContentKeyring.empty()).text == (
        "x\x00y \ufffd"
    )
    assert row["content_hash"] == content_hash("x\x00y \ud800") == content_hash("x\x00y \ufffd")
    assert row["content_size_bytes"] == len("x\x00y \ufffd".encode())
    assert row["metadata_json"] == {"url": "h", "propertiesSummary": {"K": ["v", None]}}


def test_document_rows_with_nul_are_stored(setup: tuple[sa.Engine, int]) -> None:
    engine, cid = setup
    row = document_row(
        user_id="u1",
        connection_id=cid,
        external_id="nul",
        title="ti\x00tle",
        markdown="te\x00xt",
        keyring=ContentKeyring.empty(),
        metadata={"propertiesSummary": {"Note": "n\x00b"}},
        created_at_source=T,
        updated_at_source=T,
        deleted_at_source=None,
        now=T,
    )
    with engine.begin() as conn:
        assert upsert_documents(conn, [row]) == {"nul"}
        stored_row = conn.execute(sa.select(t.documents)).one()
    assert (stored_row.title, stored_row.metadata_json) == ("title", {"propertiesSummary": {"Note": "nb"}})


def test_unstorable_row_errors_are_the_value_errors_only() -> None:
    orig = Exception("driver says no")
    assert is_unstorable_row_error(sa.exc.DataError("INSERT", {}, orig))
    assert is_unstorable_row_error(sa.exc.IntegrityError("INSERT", {}, orig))
    assert is_unstorable_row_error(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert is_unstorable_row_error(sa.exc.StatementError("bad", "INSERT", {}, ValueError("x")))
    assert not is_unstorable_row_error(sa.exc.OperationalError("INSERT", {}, orig))  # server gone
    assert not is_unstorable_row_error(sa.exc.ProgrammingError("INSERT", {}, orig))  # no such table
    assert not is_unstorable_row_error(sa.exc.InterfaceError("INSERT", {}, orig))
    assert not is_unstorable_row_error(RuntimeError("bug"))


def test_encrypted_rows_use_the_newest_key(setup: tuple[sa.Engine, int]) -> None:
    engine, cid = setup
    keyring = ContentKeyring.from_keys({1: b"\x01" * 32, 3: b"\x03" * 32})
    with engine.begin() as conn:
        upsert_documents(conn, [_row("secret", "# Private", T, T, keyring=keyring, connection_id=cid)])
        row = conn.execute(sa.select(t.documents)).one()
    assert (row.content_alg, row.content_key_version) == ("aes-256-gcm", 3)
    assert "Private" not in row.content_ciphertext
    decoded = decode_content(
        row.content_ciphertext, row.content_iv, row.content_alg, row.content_key_version, keyring
    )
    assert decoded.text == "# Private"


def test_note_limit_by_plan(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        f.user(conn, "free")
        f.user(conn, "pro")
        f.user(conn, "lapsed")
        f.subscription(conn, "pro", status="trialing")
        f.subscription(conn, "lapsed", status="canceled")
        assert note_limit_for_user(conn, "free", DeploymentMode.CLOUD) == 500
        assert note_limit_for_user(conn, "pro", DeploymentMode.CLOUD) == 10_000
        assert note_limit_for_user(conn, "lapsed", DeploymentMode.CLOUD) == 500
        assert note_limit_for_user(conn, "free", DeploymentMode.SELF_HOSTED) is None


def test_sync_runs_and_state(setup: tuple[sa.Engine, int]) -> None:
    engine, cid = setup
    with engine.begin() as conn:
        assert read_sync_state(conn, cid).cursor_json is None
        run_id = start_sync_run(conn, cid, T)
        save_sync_success(
            conn, cid, cursor={"since": "2026-02-08T10:00:00.000Z"}, now=T, full=True, health={"status": "ok"}
        )
        finish_sync_run(conn, run_id, "success", LATER, stats={"pagesVisited": 3})
        second = start_sync_run(conn, cid, LATER)
        save_sync_failure(conn, cid, now=LATER, health={"status": "failed"})
        finish_sync_run(conn, second, "failed", LATER, error={"code": "unauthorized"})
        state = read_sync_state(conn, cid)
        full_at = conn.execute(sa.select(t.sync_state.c.last_full_sync_at)).scalar_one()
        runs = conn.execute(sa.select(t.sync_runs).order_by(t.sync_runs.c.id)).all()
    assert state.cursor_json == {"since": "2026-02-08T10:00:00.000Z"}  # the failure kept it
    assert state.last_incremental_sync_at == T
    assert state.health_json == {"status": "failed"}
    assert full_at == T
    assert [(r.kind, r.status, r.started_at, r.finished_at) for r in runs] == [
        ("incremental", "success", T, LATER),
        ("incremental", "failed", LATER, LATER),
    ]
    assert runs[0].stats_json == {"pagesVisited": 3} and runs[1].error_json == {"code": "unauthorized"}
