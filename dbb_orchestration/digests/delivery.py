"""The digest delivery engine behind :func:`dbb_orchestration.digests.send.send_due_digests`:
**claim → commit → send → record**, with no database transaction or row lock held while a provider
call is in flight (docs/behaviour.md §6, §7; docs/operations.md "Delivery").

Per page of verified users (keyset pagination, ``DIGEST_BATCH_SIZE``), a bounded number of statements:

1. **Due** (a short read): users, settings, Pro flag and last sends → the pure :func:`due_check`.
2. **Claim per user.** On Postgres each due user is claimed with a *session* advisory lock
   (``pg_try_advisory_lock(namespace, crc32(user id))``, all users in one statement) taken on a
   dedicated autocommit connection that holds no transaction. ``try`` never waits: a user claimed by
   another run (the hourly job and a first-digest run, two overlapping partitions, a rerun) is
   skipped and counted ``claimed_elsewhere``. The claim is held until this run has recorded the
   user's outcome, and vanishes with the connection if the process dies. Why advisory locks rather
   than a claim column: the backend owns the schema (no new column or table), and a lock that dies
   with its holder needs no expiry rule.
3. **Prepare** (one short transaction, ``lock_timeout`` set): under the claim, the last send is read
   again and :func:`due_check` re-run (so a digest recorded by the run that held the claim before us
   makes the user ``already_sent_today``; a send recorded after a backfilled hour makes it
   ``interval_not_elapsed``). Pending digests are read twice, plainly and ``FOR UPDATE SKIP LOCKED``:
   a user with any row held by another transaction (the backend, say) is skipped and counted
   ``locked_elsewhere``, never waited on. The chosen digests are grouped into Resend batches of at
   most ``EMAIL_BATCH_SIZE`` and each digest's ``payload_json`` records ``delivery`` = batch key,
   index, size, member ids and the time — **before** any call. Commit.
4. **Send** (no transaction): render, then one ``POST /emails/batch`` per batch under its key
   (``batch_validation: permissive``), batches in parallel on ``EMAIL_MAX_CONCURRENCY`` threads, each
   request paced by the team-wide pacer and bounded by the sender's timeout, retries and circuit
   breaker.
5. **Record** (one short transaction, ``lock_timeout`` set): review states of delivered items (from
   the time the provider accepted the email), every digest's status, guarded by ``status IN
   ('scheduled', 'failed')``. If a row is locked by someone else meanwhile, the page is recorded
   user by user in savepoints and a user whose rows stay locked is counted ``record_deferred`` (left
   pending with its batch key: the next run proves the delivery, below). Then the claims are released.

**Exactly once after a crash.** A process killed between 4 and 5 leaves its digests pending with a
``delivery`` marker. The next run within 24 h (Resend's key lifetime), whatever its hour — a user
with such a digest is claimed to resolve it even when not due — sends it again in its recorded
batch, under the recorded key: when every member still pending is in this run, the
members go out in their recorded order — the identical request returns the first ids; a request that
differs (a member recorded meanwhile, a title renamed) is answered 409 ``invalid_idempotent_request``,
which proves the key's batch was accepted, so the members are recorded ``sent`` without ids. When a
member still pending belongs to another run's claim, the group waits (``batch_in_flight_elsewhere``).
A per-email validation error, a render failure or a non-retryable refusal clears the marker (the
email was not accepted); a timeout, 5xx or an open breaker keeps it (it may have been).

**Bounded time.** When the circuit breaker opens, every remaining claimed digest of the page is
recorded ``failed`` (``reason: provider_unavailable``, retryable), no further page is started and
:class:`ProviderUnavailableError` fails the op with a clear message.

SQLite (local runs and the demo, one process) has no advisory or row locks: claims always succeed and
the guarded record plus the provider keys keep each digest to one delivery.
"""

from __future__ import annotations

import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from dbb_orchestration.config import Settings
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.bulk import insert_many, update_many
from dbb_orchestration.db.engine import is_postgres
from dbb_orchestration.digests.generate import UserPlan, user_plan
from dbb_orchestration.digests.queries import (
    PENDING_STATUSES,
    DigestRow,
    ItemRow,
    UserRow,
    load_active_sources,
    load_digest_statuses,
    load_document_counts,
    load_items,
    load_last_sends,
    load_marked_pending,
    load_pending_digests,
    load_review_states,
    load_user_batch,
    lock_pending_digests,
)
from dbb_orchestration.digests.send import (
    DEFAULT_EASE_FACTOR,
    EMPTY_SNAPSHOT,
    NO_PENDING,
    SUPERSEDED,
    DueCheck,
    SendJob,
    SendReport,
    build_email,
    choose_pending,
    due_check,
    idempotency_key,
    merge_payload,
    review_interval,
    sent_payload,
)
from dbb_orchestration.email.sender import (
    PROVIDER_UNAVAILABLE,
    BatchResult,
    EmailSender,
    EmailSendError,
    OutgoingEmail,
    ProviderUnavailable,
    send_batch,
)
from dbb_orchestration.redaction import scrub, scrub_json
from dbb_orchestration.timing import as_utc

__all__ = [
    "CLAIM_NAMESPACE",
    "IN_FLIGHT_TTL",
    "MARKER",
    "ProviderUnavailableError",
    "batch_key",
    "claim_key",
    "deliver_due_digests",
    "in_flight_marker",
]

CLAIM_NAMESPACE = 0x64626273  # "dbbs": the advisory-lock namespace of per-user send claims
IN_FLIGHT_TTL = timedelta(hours=24)  # Resend keeps an idempotency key 24 hours
MARKER = "delivery"
CLAIMED_ELSEWHERE = "claimed_elsewhere"
LOCKED_ELSEWHERE = "locked_elsewhere"
BATCH_ELSEWHERE = "batch_in_flight_elsewhere"
RECORD_DEFERRED = "record_deferred"
IN_FLIGHT = "in_flight"
_LOCK_NOT_AVAILABLE = "55P03"


class ProviderUnavailableError(RuntimeError):
    """The circuit breaker opened: the run stopped calling the provider. ``report`` has the counts."""

    def __init__(self, report: SendReport) -> None:
        super().__init__(
            f"email provider unavailable: the circuit breaker opened after consecutive network failures "
            f"or 5xx answers; {report.provider_unavailable} digests recorded failed "
            f"(reason {PROVIDER_UNAVAILABLE}, retried by the next run); sent={report.sent}"
        )
        self.report = report


# ----------------------------------------------------------------------------------------- pure helpers


def claim_key(user_id: str) -> int:
    """The int4 advisory-lock key of a user's send claim (CRC-32 of the id, signed)."""
    value = zlib.crc32(user_id.encode("utf-8"))
    return value - (1 << 32) if value >= (1 << 31) else value


def batch_key() -> str:
    """A fresh batch idempotency key (unique per prepared batch, never reused for another list)."""
    return f"note-digest-batch-{uuid.uuid4().hex}"


def in_flight_marker(payload: Any, real_now: datetime) -> dict[str, Any] | None:
    """The ``delivery`` marker of a pending digest's payload when it is younger than 24 h (its batch
    key may have been used: the digest must be resent under it); ``None`` otherwise or when malformed."""
    if not isinstance(payload, dict):
        return None
    marker = payload.get(MARKER)
    if not isinstance(marker, dict) or not isinstance(marker.get("batch_key"), str):
        return None
    try:
        prepared = datetime.fromisoformat(str(marker.get("prepared_at")))
    except ValueError:
        return None
    if prepared.tzinfo is None or real_now - prepared >= IN_FLIGHT_TTL:
        return None
    return marker


def choose_for_delivery(
    pending: Sequence[DigestRow], real_now: datetime
) -> tuple[DigestRow | None, list[DigestRow]]:
    """:func:`choose_pending`, except that a digest already handed to the provider (an in-flight
    marker) is resolved first: the newest such digest is the one to send and only older
    ``scheduled`` digests are superseded by it."""
    in_flight = [d for d in pending if _is_in_flight(d, real_now)]
    if not in_flight:
        return choose_pending(pending)
    newest, _ = choose_pending(in_flight)
    assert newest is not None
    return newest, sorted((d for d in pending if _superseded_by(d, newest)), key=lambda d: d.id)


def _is_in_flight(d: DigestRow, real_now: datetime) -> bool:
    return d.scheduled_for is not None and in_flight_marker(d.payload_json, real_now) is not None


def _superseded_by(d: DigestRow, newest: DigestRow) -> bool:
    """An older ``scheduled`` digest that the in-flight ``newest`` replaces."""
    if d.id == newest.id or d.status != "scheduled" or d.scheduled_for is None:
        return False
    return _order(d) < _order(newest)


def _order(d: DigestRow) -> tuple[datetime, datetime, int]:
    assert d.scheduled_for is not None
    return (d.scheduled_for, d.created_at, d.id)


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start : start + max(1, size)])


# ------------------------------------------------------------------------------------------ the claims


class _Claims:
    """Per-user send claims: session advisory locks on one dedicated autocommit connection (Postgres);
    always granted on SQLite."""

    def __init__(self, engine: sa.Engine) -> None:
        self._conn: sa.Connection | None = None
        if is_postgres(engine):
            self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def try_claim(self, user_ids: Sequence[str]) -> set[str]:
        if self._conn is None or not user_ids:
            return set(user_ids)
        rows = self._conn.execute(
            sa.text(
                "SELECT u FROM unnest(CAST(:uids AS text[]), CAST(:keys AS int[])) AS c(u, k) "
                "WHERE pg_try_advisory_lock(:ns, k)"
            ),
            {"uids": list(user_ids), "keys": [claim_key(u) for u in user_ids], "ns": CLAIM_NAMESPACE},
        ).all()
        return {r.u for r in rows}

    def release(self, user_ids: Iterable[str]) -> None:
        ids = list(user_ids)
        if self._conn is None or not ids:
            return
        self._conn.execute(
            sa.text("SELECT pg_advisory_unlock(:ns, k) FROM unnest(CAST(:keys AS int[])) AS c(k)"),
            {"keys": [claim_key(u) for u in ids], "ns": CLAIM_NAMESPACE},
        )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.invalidated:
                conn.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        finally:
            conn.close()


@contextmanager
def _short_transaction(engine: sa.Engine, settings: Settings) -> Iterator[sa.Connection]:
    """A transaction whose lock waits are bounded by ``DIGEST_LOCK_TIMEOUT_SECONDS`` (Postgres)."""
    with engine.begin() as conn:
        if is_postgres(conn):
            ms = max(1, int(settings.digest_lock_timeout_seconds * 1000))
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
        yield conn


def _is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == _LOCK_NOT_AVAILABLE


# ------------------------------------------------------------------------------------------ data shapes

_Choice = tuple[DigestRow, list[DigestRow]]  # a user's digest to send and the older ones it supersedes
_UserRows = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # a user's digest updates, review-state rows


@dataclass
class _Batch:
    key: str
    jobs: list[SendJob]
    replay: bool = False


@dataclass
class _Page:
    batches: list[_Batch] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)  # decided in the claim (empty snapshots)
    older: dict[str, list[DigestRow]] = field(default_factory=dict)
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)  # digest id → its delivery marker


@dataclass
class _Delivery:
    job: SendJob
    outcome: Literal["sent", "duplicate", "failed"]
    provider: str | None = None
    provider_id: str | None = None
    accepted_at: datetime | None = None
    error: dict[str, Any] | None = None
    error_kind: str | None = None
    keep_marker: bool = False  # the email may have been accepted: a rerun must reuse the batch key
    issues: Counter[str] = field(default_factory=Counter)


# ------------------------------------------------------------------------------------------- the run


def deliver_due_digests(
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime] | None = None,
    only_user_id: str | None = None,
    first_digest_bypass: bool = False,
    user_range: tuple[str | None, str | None] = (None, None),
) -> SendReport:
    """See :func:`dbb_orchestration.digests.send.send_due_digests` and the module docstring."""
    now = as_utc(now, "now")
    real_clock = clock or settings.now
    report = SendReport(logical_time=now, dry_run=sender.provider == "dry-run")
    after, upto = user_range
    claims = _Claims(engine)
    try:
        with ThreadPoolExecutor(max_workers=max(1, settings.email_max_concurrency)) as pool:
            while True:
                with engine.connect() as conn:
                    users = load_user_batch(
                        conn,
                        after=after,
                        upto=upto,
                        limit=settings.digest_batch_size,
                        verified_only=True,
                        only_user_id=only_user_id,
                    )
                    if not users:
                        break
                    after = users[-1].id
                    report.batches += 1
                    report.users_considered += len(users)
                    plans = {row.id: user_plan(row, settings.deployment_mode) for row in users}
                    in_flight = _in_flight_users(conn, list(plans), real_clock)
                    due = _due_users(
                        conn,
                        plans,
                        now,
                        first_digest_bypass,
                        report,
                        count=True,
                        in_flight=in_flight,
                        wall=real_clock(),
                    )
                wanted = sorted(due)
                claimed = claims.try_claim(wanted)
                if len(claimed) < len(wanted):
                    report.skipped[CLAIMED_ELSEWHERE] += len(wanted) - len(claimed)
                try:
                    if claimed:
                        _run_page(
                            engine, sender, settings, pool, users, plans, claimed, now, real_clock,
                            first_digest_bypass, report, in_flight,
                        )  # fmt: skip
                finally:
                    claims.release(claimed)
                if report.provider_unavailable:
                    raise ProviderUnavailableError(report)
                if len(users) < settings.digest_batch_size:
                    break
    finally:
        claims.close()
    return report


def _in_flight_users(conn: sa.Connection, user_ids: Sequence[str], clock: Callable[[], datetime]) -> set[str]:
    """Users (of ``user_ids``) with a pending digest handed to the provider less than 24 h ago: whatever
    the hour, such a digest is resolved (replayed under its key) before anything else is sent to
    them, so an unrecorded delivery is proven rather than repeated under a new key after the key
    expired. One statement."""
    real_now = as_utc(clock(), "clock()")
    return {
        uid for uid, payload in load_marked_pending(conn, user_ids) if in_flight_marker(payload, real_now)
    }


def _due_users(
    conn: sa.Connection,
    plans: dict[str, UserPlan],
    now: datetime,
    first_digest_bypass: bool,
    report: SendReport,
    *,
    count: bool,
    in_flight: set[str] | None = None,
    wall: datetime | None = None,
) -> dict[str, DueCheck]:
    """:func:`due_check` for every user of ``plans`` against their last send (one statement). With
    ``count`` the plan issues are added to the report (the first check of a page only). A user of
    ``in_flight`` who is not due is kept with reason ``in_flight`` (to resolve that digest only).
    ``wall`` (the location's clock) applies the catch-up rule of :func:`due_check`."""
    last_sends = load_last_sends(conn, list(plans))
    checks: dict[str, DueCheck] = {}
    for uid, plan in plans.items():
        if count:
            report.data_issues.update(plan.issues)
        last = last_sends.get(uid)
        check = due_check(plan, last, now, first_digest_bypass=first_digest_bypass, wall=wall)
        if check.reason == "invalid_send_hour" and count:
            report.data_issues["invalid_send_hour"] += 1
        if check.due:
            checks[uid] = check
        elif in_flight and uid in in_flight:
            checks[uid] = DueCheck(True, IN_FLIGHT, last is None)
        else:
            report.not_due[check.reason] += 1
    return checks


def _run_page(
    engine: sa.Engine,
    sender: EmailSender,
    settings: Settings,
    pool: ThreadPoolExecutor,
    users: Sequence[UserRow],
    plans: dict[str, UserPlan],
    claimed: set[str],
    now: datetime,
    clock: Callable[[], datetime],
    first_digest_bypass: bool,
    report: SendReport,
    in_flight: set[str],
) -> None:
    with _short_transaction(engine, settings) as conn:
        page = _prepare(
            conn, users, plans, claimed, now, clock, settings, first_digest_bypass, report, in_flight
        )
    deliveries = _send(page, sender, settings, pool, clock, report)
    _record(engine, settings, page, deliveries, clock, report)


def _prepare(
    conn: sa.Connection,
    users: Sequence[UserRow],
    plans: dict[str, UserPlan],
    claimed: set[str],
    now: datetime,
    clock: Callable[[], datetime],
    settings: Settings,
    first_digest_bypass: bool,
    report: SendReport,
    in_flight: set[str],
) -> _Page:
    """Under the claims: re-check due, lock (skipping held rows) and choose digests, load what the emails
    show, form the batches and write their keys into the digests' payloads."""
    real_now = as_utc(clock(), "clock()")
    checks = _due_users(
        conn,
        {uid: plans[uid] for uid in sorted(claimed)},
        now,
        first_digest_bypass,
        report,
        count=False,
        in_flight=in_flight,
        wall=real_now,
    )
    report.due += len(checks)
    chosen = _lock_and_choose(conn, checks, now, real_now, report)
    page = _Page()
    items = load_items(conn, [newest.id for newest, _ in chosen.values()])
    ready = _drop_empty_snapshots(chosen, items, page, report)
    jobs = _send_jobs(conn, users, plans, checks, ready, items)
    page.older = {uid: older for uid, (_newest, older) in ready.items()}
    fresh = _plan_replays(conn, jobs, page, real_now, report)
    _mark_fresh(conn, fresh, page, settings.email_batch_size, real_now)
    return page


def _lock_and_choose(
    conn: sa.Connection, checks: dict[str, DueCheck], now: datetime, real_now: datetime, report: SendReport
) -> dict[str, _Choice]:
    """Pending digests read plainly, then ``FOR UPDATE SKIP LOCKED`` (two statements); per user the
    digest to send."""
    ids = sorted(checks)
    everything = load_pending_digests(conn, ids, now)
    locked = lock_pending_digests(conn, ids, now, skip_locked=True)
    locked_ids = {d.id for d in locked}
    held_by_others = {d.user_id for d in everything if d.id not in locked_ids}
    by_user: dict[str, list[DigestRow]] = {}
    for digest in locked:
        by_user.setdefault(digest.user_id, []).append(digest)
    chosen: dict[str, _Choice] = {}
    for uid in ids:
        if uid in held_by_others:
            report.skipped[LOCKED_ELSEWHERE] += 1
            continue
        newest, older = choose_for_delivery(by_user.get(uid, []), real_now)
        if _nothing_to_send(newest, checks[uid], real_now):
            report.skipped[NO_PENDING] += 1
        else:
            assert newest is not None
            chosen[uid] = (newest, older)
    return chosen


def _nothing_to_send(newest: DigestRow | None, check: DueCheck, real_now: datetime) -> bool:
    """No pending digest, or a user kept only to resolve an in-flight digest that was resolved
    meanwhile (nothing in flight is left for them)."""
    if newest is None:
        return True
    return check.reason == IN_FLIGHT and in_flight_marker(newest.payload_json, real_now) is None


def _drop_empty_snapshots(
    chosen: dict[str, _Choice], items: dict[int, list[ItemRow]], page: _Page, report: SendReport
) -> dict[str, _Choice]:
    """The choices whose digest has items; a digest without any is recorded ``skipped`` (on the page)."""
    ready: dict[str, _Choice] = {}
    for uid, (newest, older) in chosen.items():
        if items.get(newest.id):
            ready[uid] = (newest, older)
            continue
        report.skipped[EMPTY_SNAPSHOT] += 1
        payload = merge_payload(newest.payload_json, reason=EMPTY_SNAPSHOT)
        payload.pop(MARKER, None)
        page.updates.append(_digest_update(newest, "skipped", payload))
    return ready


def _send_jobs(
    conn: sa.Connection,
    users: Sequence[UserRow],
    plans: dict[str, UserPlan],
    checks: dict[str, DueCheck],
    ready: dict[str, _Choice],
    items: dict[int, list[ItemRow]],
) -> list[SendJob]:
    """One job per ready user, in digest id order; a first digest also shows its source and note count."""
    rows = {row.id: row for row in users}
    first_ids = [uid for uid in ready if checks[uid].first]
    sources = load_active_sources(conn, first_ids)
    counts = load_document_counts(conn, first_ids)
    return [
        SendJob(
            user=rows[uid],
            plan=plans[uid],
            digest=newest,
            items=tuple(items[newest.id]),
            first=checks[uid].first,
            source=sources.get(uid),
            total_notes=counts.get(uid, 0),
        )
        for uid, (newest, _older) in sorted(ready.items(), key=lambda kv: kv[1][0].id)
    ]


def _plan_replays(
    conn: sa.Connection, jobs: list[SendJob], page: _Page, real_now: datetime, report: SendReport
) -> list[SendJob]:
    """Digests already handed to the provider go out again in their recorded batch when it can be
    replayed here (one statement reads the members outside this run); returns the other, fresh jobs."""
    replays, members, fresh = _split_in_flight(jobs, page, real_now)
    present = {job.digest.id for job in jobs}
    outside = sorted({i for ids_ in members.values() for i in ids_} - present)
    statuses = load_digest_statuses(conn, outside)
    for key, group in replays.items():
        if any(_pending_under(statuses.get(i), key, real_now) for i in members[key]):
            # another member is still pending under this key outside this run: leave the group
            report.skipped[BATCH_ELSEWHERE] += len(group)
            for _index, job in group:
                page.older.pop(job.user.id, None)
                page.markers.pop(job.digest.id, None)
            continue
        page.batches.append(_Batch(key, [job for _index, job in sorted(group, key=lambda g: g[0])], True))
    return fresh


def _split_in_flight(
    jobs: list[SendJob], page: _Page, real_now: datetime
) -> tuple[dict[str, list[tuple[int, SendJob]]], dict[str, list[int]], list[SendJob]]:
    """The in-flight jobs grouped by batch key (with their recorded index; their markers noted on the
    page), each key's recorded member ids, and the fresh jobs."""
    replays: dict[str, list[tuple[int, SendJob]]] = {}
    members: dict[str, list[int]] = {}
    fresh: list[SendJob] = []
    for job in jobs:
        marker = in_flight_marker(job.digest.payload_json, real_now)
        if marker is None:
            fresh.append(job)
            continue
        key = marker["batch_key"]
        replays.setdefault(key, []).append((int(marker.get("batch_index") or 0), job))
        members[key] = [int(i) for i in marker.get("batch_ids") or [] if isinstance(i, int)]
        page.markers[job.digest.id] = marker
    return replays, members, fresh


def _pending_under(status: tuple[str, Any] | None, key: str, real_now: datetime) -> bool:
    """A digest (its status and payload) still pending with a live marker of batch ``key``."""
    if status is None or status[0] not in PENDING_STATUSES:
        return False
    marker = in_flight_marker(status[1], real_now)
    return marker is not None and marker.get("batch_key") == key


def _mark_fresh(
    conn: sa.Connection, fresh: list[SendJob], page: _Page, batch_size: int, real_now: datetime
) -> None:
    """Group the fresh jobs into batches under new keys and write each digest's marker (one statement)."""
    prepared_at = real_now.isoformat()
    marks: list[dict[str, Any]] = []
    for chunk in chunks(fresh, batch_size):
        key = batch_key()
        ids_in_batch = [job.digest.id for job in chunk]
        for index, job in enumerate(chunk):
            marker = {
                "batch_key": key,
                "batch_index": index,
                "batch_size": len(chunk),
                "batch_ids": ids_in_batch,
                "prepared_at": prepared_at,
            }
            page.markers[job.digest.id] = marker
            marks.append(
                {
                    "id": job.digest.id,
                    "payload_json": merge_payload(job.digest.payload_json, **{MARKER: marker}),
                }
            )
        page.batches.append(_Batch(key, chunk))
    update_many(conn, t.note_digests, marks, where=t.note_digests.c.status.in_(PENDING_STATUSES))


def _send(
    page: _Page,
    sender: EmailSender,
    settings: Settings,
    pool: ThreadPoolExecutor,
    clock: Callable[[], datetime],
    report: SendReport,
) -> list[_Delivery]:
    """Render every email, then send each batch (in parallel); every outcome becomes a delivery.
    ``report.requests`` counts the provider requests made (attempts included)."""
    requests = [0]
    requests_lock = threading.Lock()

    def render(job: SendJob) -> tuple[SendJob, OutgoingEmail | None, Counter[str]]:
        try:
            email, issues = build_email(
                job,
                settings.keyring,
                settings.frontend_url,
                settings.resend_reply_to,
                settings.unsubscribe_secret,
            )
        except Exception:
            return job, None, Counter()
        return job, email, issues

    def deliver(batch: _Batch) -> list[_Delivery]:
        rendered = [render(job) for job in batch.jobs]
        out = [
            _Delivery(
                job,
                "failed",
                error={"stage": "render", "error": "render_failed", "message": "rendering failed"},
                error_kind="render",
            )
            for job, email, _issues in rendered
            if email is None
        ]
        ready = [(job, email, issues) for job, email, issues in rendered if email is not None]
        if not ready:
            return out
        emails = [email for _job, email, _issues in ready]
        try:
            result: BatchResult | None = send_batch(sender, emails, batch.key)
            failure: BaseException | None = None
            attempts = result.attempts if result is not None else 0
        except Exception as exc:  # provider errors are outcomes; a kill (BaseException) propagates
            result, failure = None, exc
            attempts = exc.attempts if isinstance(exc, EmailSendError) else 1
        with requests_lock:
            requests[0] += attempts
        accepted_at = as_utc(clock(), "clock()")
        for index, (job, _email, issues) in enumerate(ready):
            out.append(_outcome(job, issues, sender.provider, result, index, failure, accepted_at))
        return out

    deliveries: list[_Delivery] = []
    try:
        for batch_deliveries in pool.map(deliver, page.batches):
            deliveries.extend(batch_deliveries)
    finally:
        report.requests += requests[0]
    return deliveries


def _outcome(
    job: SendJob,
    issues: Counter[str],
    provider: str,
    result: BatchResult | None,
    index: int,
    failure: BaseException | None,
    accepted_at: datetime,
) -> _Delivery:
    if result is not None:
        item = result.items[index]
        if item.provider_id:
            return _Delivery(
                job, "sent", provider=result.provider, provider_id=item.provider_id,
                accepted_at=accepted_at, issues=issues,
            )  # fmt: skip
        return _Delivery(
            job,
            "failed",
            error={"stage": "provider", "reason": "rejected", "message": scrub(item.error or "rejected")},
            error_kind="rejected",
            issues=issues,
        )
    if isinstance(failure, EmailSendError):
        if failure.already_sent_under_key:
            return _Delivery(job, "duplicate", provider=provider, accepted_at=accepted_at, issues=issues)
        unavailable = isinstance(failure, ProviderUnavailable)
        return _Delivery(
            job,
            "failed",
            error={
                "stage": "provider",
                "reason": PROVIDER_UNAVAILABLE if unavailable else "provider_error",
                "retryable": failure.retryable,
                **failure.as_json(),
            },
            error_kind=PROVIDER_UNAVAILABLE
            if unavailable
            else (str(failure.status) if failure.status is not None else "network"),
            keep_marker=failure.retryable,
            issues=issues,
        )
    return _Delivery(
        job,
        "failed",
        error={"stage": "provider", "error": type(failure).__name__, "message": "sender raised"},
        error_kind="sender_error",
        keep_marker=True,
        issues=issues,
    )


def _digest_update(
    digest: DigestRow,
    status: str,
    payload: dict[str, Any],
    *,
    sent_at: datetime | None = None,
    error_json: Any = None,
    keep_error: bool = True,
) -> dict[str, Any]:
    return {
        "id": digest.id,
        "status": status,
        "sent_at": sent_at,
        "payload_json": scrub_json(payload, None),
        "error_json": digest.error_json if keep_error and error_json is None else scrub_json(error_json),
    }


def _record(
    engine: sa.Engine,
    settings: Settings,
    page: _Page,
    deliveries: Sequence[_Delivery],
    clock: Callable[[], datetime],
    report: SendReport,
) -> None:
    """Write the page's outcome in one short transaction; when a row is locked by someone else, user by
    user in savepoints instead (a user whose rows stay locked is deferred to a later run)."""
    stamp = as_utc(clock(), "clock()")
    per_user = _updates(page, deliveries, stamp)
    try:
        with _short_transaction(engine, settings) as conn:
            _write(
                conn,
                [u for rows in per_user.values() for u in rows[0]],
                [r for rows in per_user.values() for r in rows[1]],
                report,
            )
    except sa.exc.OperationalError as exc:
        if not _is_lock_timeout(exc):
            raise
        with _short_transaction(engine, settings) as conn:
            for uid in sorted(per_user):
                updates, reviews = per_user[uid]
                try:
                    with conn.begin_nested():
                        _write(conn, updates, reviews, report)
                except sa.exc.OperationalError as inner:
                    if not _is_lock_timeout(inner):
                        raise
                    report.skipped[RECORD_DEFERRED] += 1
                    per_user[uid] = ([], [])
    _count(page, deliveries, per_user, report)


def _updates(page: _Page, deliveries: Sequence[_Delivery], stamp: datetime) -> dict[str, _UserRows]:
    """Per user: the digest updates and review-state rows to write (``""`` holds page-level updates)."""
    per_user: dict[str, _UserRows] = {}
    for update in page.updates:
        per_user.setdefault("", ([], []))[0].append({**update, "updated_at": stamp})
    for d in deliveries:
        updates, reviews = per_user.setdefault(d.job.user.id, ([], []))
        if d.outcome == "failed":
            updates.append(_failed_update(page, d, stamp))
            continue
        accepted = d.accepted_at or stamp
        updates.extend(_sent_updates(page, d, accepted, stamp))
        reviews.extend(_review_rows(d, accepted, stamp))
    return per_user


def _failed_update(page: _Page, d: _Delivery, stamp: datetime) -> dict[str, Any]:
    """A failed digest: its error, and its batch marker only when the email may have been accepted."""
    digest = d.job.digest
    payload = merge_payload(
        digest.payload_json, idempotency_key=idempotency_key(digest.id), last_attempt_at=stamp.isoformat()
    )
    if d.keep_marker and digest.id in page.markers:
        payload[MARKER] = page.markers[digest.id]
    else:
        payload.pop(MARKER, None)
    return {
        **_digest_update(digest, "failed", payload, error_json=d.error, keep_error=False),
        "updated_at": stamp,
    }


def _sent_updates(page: _Page, d: _Delivery, accepted: datetime, stamp: datetime) -> list[dict[str, Any]]:
    """A sent (or proven duplicate) digest, then the user's older digests it supersedes."""
    digest = d.job.digest
    payload = sent_payload(
        digest.payload_json,
        provider=d.provider,
        provider_id=d.provider_id,
        idempotency_key=idempotency_key(digest.id),
        first_digest=d.job.first,
        interval_days=d.job.plan.interval_days,
    )
    if digest.id in page.markers:
        payload[MARKER] = page.markers[digest.id]
    if d.outcome == "duplicate":
        payload["provider_duplicate_key"] = True
    updates = [
        {**_digest_update(digest, "sent", payload, sent_at=accepted, keep_error=False), "updated_at": stamp}
    ]
    for older in page.older.get(d.job.user.id, []):
        superseded = merge_payload(older.payload_json, reason=SUPERSEDED, superseded_by=digest.id)
        updates.append({**_digest_update(older, "skipped", superseded), "updated_at": stamp})
    return updates


def _review_rows(d: _Delivery, accepted: datetime, stamp: datetime) -> list[dict[str, Any]]:
    """The review-state rows of a delivered digest's items (the interval is merged in :func:`_write`)."""
    return [
        {
            "document_id": item.document_id,
            "user_id": d.job.user.id,
            "status": "new",
            "interval_days": d.job.plan.interval_days,  # the effective interval; merged in _write
            "last_sent_at": accepted,
            "next_due_at": accepted,
            "ease_factor": DEFAULT_EASE_FACTOR,
            "repetitions": 0,
            "updated_at": stamp,
        }
        for item in d.job.items
    ]


def _write(
    conn: sa.Connection, updates: list[dict[str, Any]], reviews: list[dict[str, Any]], report: SendReport
) -> None:
    """Review states (one upsert: interval = :func:`review_interval` of the existing one; next due =
    acceptance + interval) and the digest updates (one multi-row update guarded by the pending status)."""
    existing = load_review_states(conn, [r["document_id"] for r in reviews])
    rows: dict[int, dict[str, Any]] = {}
    for r in reviews:
        doc = r["document_id"]
        interval = review_interval(
            existing[doc].interval_days if doc in existing else None, r["interval_days"]
        )
        rows[doc] = {
            **r,
            "interval_days": interval,
            "next_due_at": r["last_sent_at"] + timedelta(days=interval),
        }
    rs = t.review_states

    def upsert(stmt: Any) -> Any:
        excluded = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[rs.c.document_id],
            set_={
                "interval_days": excluded.interval_days,
                "last_sent_at": excluded.last_sent_at,
                "next_due_at": excluded.next_due_at,
                "ease_factor": sa.func.coalesce(rs.c.ease_factor, excluded.ease_factor),
                "repetitions": sa.func.coalesce(rs.c.repetitions, excluded.repetitions),
                "updated_at": excluded.updated_at,
            },
        )

    insert_many(conn, rs, list(rows.values()), on_conflict=upsert)
    written = update_many(
        conn,
        t.note_digests,
        updates,
        where=t.note_digests.c.status.in_(PENDING_STATUSES),
        returning=(t.note_digests.c.id,),
    )
    missed = len(updates) - len(written)
    if missed:
        report.skipped["already_recorded_elsewhere"] += missed


def _count(
    page: _Page,
    deliveries: Sequence[_Delivery],
    per_user: dict[str, _UserRows],
    report: SendReport,
) -> None:
    for d in deliveries:
        report.data_issues.update(d.issues)
        if not per_user.get(d.job.user.id, ([], []))[0]:
            continue  # deferred: nothing recorded for this user in this run
        if d.outcome == "failed":
            report.failed += 1
            report.failed_digest_ids.append(d.job.digest.id)
            report.provider_errors[d.error_kind or "unknown"] += 1
            if d.error_kind == PROVIDER_UNAVAILABLE:
                report.provider_unavailable += 1
            continue
        report.sent += 1
        report.first_digests += int(d.job.first)
        report.provider_duplicates += int(d.outcome == "duplicate")
        report.superseded += len(page.older.get(d.job.user.id, []))
