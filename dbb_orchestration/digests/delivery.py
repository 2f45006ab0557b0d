"""The digest delivery engine behind :func:`dbb_orchestration.digests.send.send_due_digests`:
**claim → commit → send → record**, with no database transaction or row lock held while a provider
call is in flight (docs/behaviour.md §6, §7; docs/operations.md "Delivery").

A run holds **one connection** for its whole length. On Postgres its session gets
``lock_timeout = DIGEST_LOCK_TIMEOUT_SECONDS`` when the run starts (restored when it ends), so no
statement of the run waits longer than that for a lock, and the run's per-user claims are *session*
advisory locks on that same connection (they survive its commits and vanish with it if the process
dies). Between transactions the connection holds no transaction.

**Replay first.** Before its first page a run looks, in one statement, for pending digests of its users
(its user range, or its one user) that carry a live ``delivery`` marker: handed to the provider less
than 24 h ago (Resend's key lifetime), outcome not recorded (a process killed between send and record,
a timeout, a deferred record). For each such recorded batch it claims the batch
(``pg_try_advisory_lock`` on the batch key: when two batch steps of one hourly run find the same batch,
one replays it and the other skips it, counted ``batch_in_flight_elsewhere``), then every member's user
**by digest id, whatever page or user range they fall in**, and sends the members still pending again
in their recorded order under the recorded key: the identical request returns the first ids; a request
that differs (a member recorded meanwhile, a title renamed) is answered 409
``invalid_idempotent_request``, which proves the key's batch was accepted, so the members are recorded
``sent`` without ids. A batch is replayed whole or not at all: when a member's user is claimed by
another run (``claimed_elsewhere``) or a member's row is held by another transaction
(``locked_elsewhere``), the batch waits for a later run. A replayed digest supersedes its user's older
``scheduled`` digests like any sent digest. When nothing is in flight the replay costs that one
statement.

Then, per page of sendable users (keyset pagination, ``DIGEST_BATCH_SIZE``), a bounded number of
statements:

1. **Due** (one statement): users, settings, Pro flag, newest send and newest in-flight marker → the
   pure :func:`due_check`. A due user with a live in-flight digest is not claimed (the replay owns it;
   counted ``batch_in_flight_elsewhere``): nothing is ever sent to them under a new key while an older
   key may have delivered.
2. **Claim per user** (one statement, which also releases the previous page's claims). Each due user is
   claimed with ``pg_try_advisory_lock(namespace, crc32(user id))``. ``try`` never waits: a user
   claimed by another run (the hourly job and a first-digest run, two overlapping partitions, a rerun)
   is skipped and counted ``claimed_elsewhere``. Why advisory locks rather than a claim column: the
   backend owns the schema (no new column or table), and a lock that dies with its holder needs no
   expiry rule.
3. **Prepare** (in the same short transaction): under the claim, ONE statement locks the users' pending
   digests ``FOR UPDATE SKIP LOCKED`` and, alongside, returns the users of pending rows it skipped and
   the newest sends again. :func:`due_check` is re-run on those sends (so a digest recorded by the run
   that held the claim before us makes the user ``already_sent_today``; a send recorded after a
   backfilled hour makes it ``interval_not_elapsed``); a user with any row held by another transaction
   (the backend, say) is skipped and counted ``locked_elsewhere``, never waited on. Then the items
   (one statement), for first digests their source and note count (one statement), and the chosen
   digests are grouped into Resend batches of at most ``EMAIL_BATCH_SIZE`` whose batch key, index,
   size, member ids and time go into each digest's ``payload_json`` (one statement) — **before** any
   call. Commit.
4. **Send** (no transaction): render, then one ``POST /emails/batch`` per batch under its key
   (``batch_validation: permissive``), batches in parallel on ``EMAIL_MAX_CONCURRENCY`` threads, each
   request paced by the team-wide pacer and bounded by the sender's timeout, retries and circuit
   breaker.
5. **Record** (one short transaction, one statement on Postgres): every digest's status, guarded by
   ``status IN ('scheduled', 'failed')``, and the review states of the items of the digests that
   update actually recorded (the interval merged with the existing one in SQL, next due from the time
   the provider accepted the email). If a row is locked by someone else meanwhile (``lock_timeout``),
   the page is recorded user by user in savepoints and a user whose rows stay locked is counted
   ``record_deferred`` (left pending with its batch key: the next run's replay proves the delivery).

A page without due users costs its one read (and, right after a page with claims, the release of those
claims); one where no user could be claimed no further statement.

A per-email validation error, a render failure or a non-retryable refusal clears the marker (the
email was not accepted); a timeout, 5xx or an open breaker keeps it (it may have been).

**Bounded time.** When the circuit breaker opens, every remaining claimed digest of the page (or of the
replay) is recorded ``failed`` (``reason: provider_unavailable``, retryable), no further page is
started and :class:`ProviderUnavailableError` fails the op with a clear message.

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
    ClaimedDigests,
    DeliveryUser,
    DigestRow,
    ItemRow,
    ReviewBounds,
    UserRow,
    load_delivery_users,
    load_digests,
    load_first_digest_facts,
    load_items,
    load_marked_in_scope,
    load_review_states,
    lock_claimed_digests,
    record_outcomes_postgres,
)
from dbb_orchestration.digests.send import (
    DEFAULT_EASE_FACTOR,
    EMPTY_SNAPSHOT,
    MAX_REVIEW_INTERVAL,
    MIN_REVIEW_INTERVAL,
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
    "BATCH_CLAIM_NAMESPACE",
    "CLAIM_NAMESPACE",
    "IN_FLIGHT_TTL",
    "MARKER",
    "ProviderUnavailableError",
    "batch_key",
    "claim_key",
    "deliver_due_digests",
    "in_flight_marker",
    "superseded_by",
]

CLAIM_NAMESPACE = 0x64626273  # "dbbs": the advisory-lock namespace of per-user send claims
BATCH_CLAIM_NAMESPACE = 0x64626262  # "dbbb": the advisory-lock namespace of batch replay claims
IN_FLIGHT_TTL = timedelta(hours=24)  # Resend keeps an idempotency key 24 hours
MARKER = "delivery"
CLAIMED_ELSEWHERE = "claimed_elsewhere"
LOCKED_ELSEWHERE = "locked_elsewhere"
BATCH_ELSEWHERE = "batch_in_flight_elsewhere"
RECORD_DEFERRED = "record_deferred"
_LOCK_NOT_AVAILABLE = "55P03"
_REVIEW_BOUNDS = ReviewBounds(MIN_REVIEW_INTERVAL, MAX_REVIEW_INTERVAL, DEFAULT_EASE_FACTOR)


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


def claim_key(value: str) -> int:
    """The int4 advisory-lock key of a claim on ``value`` (a user id or a batch key): CRC-32, signed."""
    crc = zlib.crc32(value.encode("utf-8"))
    return crc - (1 << 32) if crc >= (1 << 31) else crc


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
    return marker if _live(marker.get("prepared_at"), real_now) else None


def _live(prepared_at: Any, real_now: datetime) -> bool:
    """A marker's ``prepared_at`` (ISO text) less than 24 h before ``real_now``; junk → False."""
    try:
        prepared = datetime.fromisoformat(str(prepared_at))
    except ValueError:
        return False
    return prepared.tzinfo is not None and real_now - prepared < IN_FLIGHT_TTL


def superseded_by(
    member: DigestRow, pending: Sequence[DigestRow], keep: Iterable[int] = ()
) -> list[DigestRow]:
    """The user's older ``scheduled`` digests (by scheduled day, creation, id) that a replayed in-flight
    ``member`` supersedes once it is recorded sent; ``failed`` ones, newer ones and the digests of
    ``keep`` (replayed themselves) are left alone."""
    kept = set(keep)
    return sorted(
        (d for d in pending if d.id not in kept and _older_scheduled(d, member)), key=lambda d: d.id
    )


def _older_scheduled(d: DigestRow, newest: DigestRow) -> bool:
    if d.id == newest.id or d.status != "scheduled" or d.scheduled_for is None:
        return False
    return newest.scheduled_for is not None and _order(d) < _order(newest)


def _order(d: DigestRow) -> tuple[datetime, datetime, int]:
    assert d.scheduled_for is not None
    return (d.scheduled_for, d.created_at, d.id)


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start : start + max(1, size)])


# ------------------------------------------------------------------------------------------ the session

_CLAIM_AND_RELEASE = sa.text(
    "SELECT c.ns, c.v FROM unnest(CAST(:nss AS int[]), CAST(:vals AS text[]), CAST(:keys AS int[])) "
    "AS c(ns, v, k) WHERE pg_try_advisory_lock(c.ns, c.k) "
    "UNION ALL "
    "SELECT NULL, NULL FROM unnest(CAST(:rnss AS int[]), CAST(:rkeys AS int[])) AS r(ns, k) "
    "WHERE NOT pg_advisory_unlock(r.ns, r.k)"
)


class _Session:
    """The run's one connection and its claims (see the module docstring). Postgres: ``lock_timeout``
    for the session, restored by :meth:`close`; claims are session advisory locks, released in the
    next claim statement (:meth:`release_later`) or by :meth:`close`. SQLite: claims always granted."""

    def __init__(self, engine: sa.Engine, settings: Settings) -> None:
        self.conn = engine.connect()
        self.postgres = is_postgres(engine)
        self._release: list[tuple[int, int]] = []
        self._restore: str | None = None
        if self.postgres:
            ms = max(1, int(settings.digest_lock_timeout_seconds * 1000))
            try:
                with self.conn.begin():
                    self._restore = self.conn.execute(
                        sa.text(
                            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', :ms, false)"
                        ),
                        {"ms": str(ms)},
                    ).scalar_one()
            except BaseException:
                self.conn.invalidate()  # its session state is unknown: never back into the pool
                self.conn.close()
                raise

    def claim(
        self, user_ids: Sequence[str] = (), batch_keys: Sequence[str] = ()
    ) -> tuple[set[str], set[str]]:
        """Try to claim these users and batch keys (never waits) and release the claims queued by
        :meth:`release_later`: one statement, none when there is nothing to do. Returns the users and
        the batch keys claimed."""
        wanted = [(CLAIM_NAMESPACE, uid) for uid in user_ids] + [
            (BATCH_CLAIM_NAMESPACE, k) for k in batch_keys
        ]
        release, self._release = self._release, []
        if not self.postgres:
            return set(user_ids), set(batch_keys)
        if not wanted and not release:
            return set(), set()
        nss, values = zip(*wanted, strict=True) if wanted else ((), ())
        rnss, rkeys = zip(*release, strict=True) if release else ((), ())
        params = {"nss": list(nss), "vals": list(values), "keys": [claim_key(v) for v in values]}
        rows = self.conn.execute(
            _CLAIM_AND_RELEASE, {**params, "rnss": list(rnss), "rkeys": list(rkeys)}
        ).all()
        got = {(r.ns, r.v) for r in rows}
        return _claimed(got, CLAIM_NAMESPACE), _claimed(got, BATCH_CLAIM_NAMESPACE)

    def release_later(self, user_ids: Iterable[str] = (), batch_keys: Iterable[str] = ()) -> None:
        """Queue these claims for release with the next claim statement (or :meth:`close`)."""
        self._release += [(CLAIM_NAMESPACE, claim_key(uid)) for uid in user_ids]
        self._release += [(BATCH_CLAIM_NAMESPACE, claim_key(key)) for key in batch_keys]

    def close(self) -> None:
        """Release every claim, restore ``lock_timeout`` (one statement) and return the connection; if
        that fails, the connection is discarded instead (which also ends its claims)."""
        conn = self.conn
        try:
            if conn.in_transaction():
                conn.rollback()
            if self.postgres and not conn.invalidated:
                with conn.begin():
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock_all(), set_config('lock_timeout', :old, false)"),
                        {"old": self._restore or "0"},
                    )
        except BaseException:
            conn.invalidate()
            raise
        finally:
            conn.close()


def _claimed(got: set[tuple[Any, Any]], namespace: int) -> set[str]:
    return {value for ns, value in got if ns == namespace}


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


@dataclass
class _Run:
    """What every step of one run shares."""

    session: _Session
    sender: EmailSender
    settings: Settings
    pool: ThreadPoolExecutor
    now: datetime  # the logical time
    clock: Callable[[], datetime]  # the location's clock (acceptance times, marker ages)
    first_digest_bypass: bool
    report: SendReport

    def real_now(self) -> datetime:
        return as_utc(self.clock(), "clock()")


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
    ready: ReadyGate | None = None,
) -> SendReport:
    """See :func:`dbb_orchestration.digests.send.send_due_digests` and the module docstring."""
    now = as_utc(now, "now")
    report = SendReport(logical_time=now, dry_run=sender.provider == "dry-run")
    session = _Session(engine, settings)
    try:
        with ThreadPoolExecutor(max_workers=max(1, settings.email_max_concurrency)) as pool:
            run = _Run(
                session, sender, settings, pool, now, clock or settings.now, first_digest_bypass, report
            )
            _replay_in_flight(run, user_range, only_user_id)
            _deliver_pages(run, user_range, only_user_id, ready)
    finally:
        session.close()
    return report


_DONE: Any = object()  # _deliver_page's answer when no page follows

# ``ready(after)`` → ``(upto, final)``: the highest user id the next page (ids above ``after``) may read,
# waiting until there is one, and whether that is the end of the run's range. Without it every page
# may read to the range's end. The hourly batch step passes one so that sending reads only users whose
# generation has committed while generation goes on (``pipeline.py``).
ReadyGate = Callable[[str | None], tuple[str | None, bool]]


def _deliver_pages(
    run: _Run, user_range: tuple[str | None, str | None], only_user_id: str | None, ready: ReadyGate | None
) -> None:
    """Page through ``user_range``, each page bounded by what ``ready`` allows (see :data:`ReadyGate`)."""
    after = user_range[0]
    while True:
        upto, final = ready(after) if ready is not None else (user_range[1], True)
        following = _deliver_page(run, after, upto, only_user_id)
        if following is not _DONE:
            after = following
        elif final:
            return
        else:
            after = upto  # everything allowed so far is done: wait for more


def _skip(report: SendReport, reason: str, count: int) -> None:
    if count:
        report.skipped[reason] += count


def _check_breaker(report: SendReport) -> None:
    if report.provider_unavailable:
        raise ProviderUnavailableError(report)


def _deliver_and_record(run: _Run, page: _Page) -> None:
    """Send the page's batches and record every outcome (nothing to send: record the page's own
    updates, if any)."""
    if not page.batches and not page.updates:
        return
    deliveries = (
        _send(page, run.sender, run.settings, run.pool, run.clock, run.report) if page.batches else []
    )
    _record(run, page, deliveries)


# ------------------------------------------------------------------------------------- replay first


def _replay_in_flight(run: _Run, user_range: tuple[str | None, str | None], only_user_id: str | None) -> None:
    """Resend every recorded batch in flight for this run's users under its key, claiming all its
    members by digest id (module docstring, "Replay first"), about ``DIGEST_BATCH_SIZE`` members at a
    time. One statement when nothing is in flight."""
    conn, real_now = run.session.conn, run.real_now()
    with conn.begin():
        marked = load_marked_in_scope(
            conn, after=user_range[0], upto=user_range[1], only_user_id=only_user_id
        )
        live = [d for d in marked if in_flight_marker(d.payload_json, real_now) is not None]
        member_ids = {d.id for d in live} | {i for d in live for i in _batch_ids(d, real_now)}
        groups = _replay_groups(load_digests(conn, sorted(member_ids)), real_now) if live else {}
    for chunk in _group_chunks(groups, run.settings.digest_batch_size):
        _replay_chunk(run, chunk, real_now)


def _group_chunks(groups: dict[str, _Group], size: int) -> Iterator[dict[str, _Group]]:
    """The groups in chunks of about ``size`` members (a group is never split)."""
    chunk: dict[str, _Group] = {}
    for key, group in groups.items():
        if chunk and sum(map(len, chunk.values())) + len(group) > size:
            yield chunk
            chunk = {}
        chunk[key] = group
    if chunk:
        yield chunk


def _replay_chunk(run: _Run, groups: dict[str, _Group], real_now: datetime) -> None:
    """Claim the batches and their members' users, prepare, commit; send; record; release."""
    conn = run.session.conn
    claimed: tuple[set[str], set[str]] = (set(), set())
    try:
        with conn.begin():
            groups, claimed = _claim_groups(run, groups)
            page = _prepare_replay(run, groups, real_now) if groups else _Page()
        _deliver_and_record(run, page)
    finally:
        run.session.release_later(*claimed)
    _check_breaker(run.report)


def _batch_ids(d: DigestRow, real_now: datetime) -> list[int]:
    marker = in_flight_marker(d.payload_json, real_now) or {}
    return [int(i) for i in marker.get("batch_ids") or [] if isinstance(i, int)]


_Group = list[tuple[int, DigestRow]]  # a recorded batch's members still pending: (recorded index, digest)


def _replay_groups(members: Sequence[DigestRow], real_now: datetime) -> dict[str, _Group]:
    """The members still pending under a live marker, grouped by batch key in recorded order."""
    groups: dict[str, _Group] = {}
    for d in members:
        marker = in_flight_marker(d.payload_json, real_now) if d.status in PENDING_STATUSES else None
        if marker is not None:
            groups.setdefault(marker["batch_key"], []).append((int(marker.get("batch_index") or 0), d))
    return {key: sorted(group, key=lambda m: (m[0], m[1].id)) for key, group in groups.items()}


def _claim_groups(
    run: _Run, groups: dict[str, _Group]
) -> tuple[dict[str, _Group], tuple[set[str], set[str]]]:
    """Claim each batch (one statement), then the users of every member of the batches won (one more):
    the batches whose users are all claimed, and the claims taken (users, batch keys)."""
    report = run.report
    won = run.session.claim(batch_keys=sorted(groups))[1]
    users = run.session.claim(sorted({d.user_id for key in won for _i, d in groups[key]}))[0]
    ready: dict[str, _Group] = {}
    for key, group in groups.items():
        if key not in won:
            report.skipped[BATCH_ELSEWHERE] += len(group)
        elif any(d.user_id not in users for _i, d in group):
            report.skipped[CLAIMED_ELSEWHERE] += len(group)
        else:
            ready[key] = group
    return ready, (users, won)


_Replay = list[tuple[_Batch, list[DigestRow]]]  # the batches to replay with their locked members


def _prepare_replay(run: _Run, groups: dict[str, _Group], real_now: datetime) -> _Page:
    """Under the claims: lock the members' rows (a batch with a member held elsewhere waits whole), load
    what their emails show and form the batches under their recorded keys."""
    conn = run.session.conn
    user_ids = sorted({d.user_id for group in groups.values() for _i, d in group})
    users = {u.row.id: u for u in load_delivery_users(conn, user_ids=user_ids)}
    state = lock_claimed_digests(conn, user_ids, max(run.now, real_now))
    page = _Page()
    replay = _replay_batches(groups, state, users, page, real_now, run.report)
    _replay_jobs(run, page, replay, users, state, real_now)
    return page


def _replay_jobs(
    run: _Run,
    page: _Page,
    replay: _Replay,
    users: dict[str, DeliveryUser],
    state: ClaimedDigests,
    real_now: datetime,
) -> None:
    """The replay batches' jobs (what each email shows, loaded in two statements), markers and
    superseded digests."""
    conn = run.session.conn
    members = [d for _batch, digests in replay for d in digests]
    items = load_items(conn, [d.id for d in members])
    first = {d.user_id for d in members if users[d.user_id].last_sent_at is None}
    facts = load_first_digest_facts(conn, sorted(first))
    replayed = {d.id for d in members}
    for batch, digests in replay:
        for d in digests:
            row = users[d.user_id].row
            plan = user_plan(row, run.settings.deployment_mode)
            batch.jobs.append(_job(row, plan, d, items.get(d.id, []), d.user_id in first, facts))
        _note_replayed(page, digests, state, replayed, real_now)


def _note_replayed(
    page: _Page, digests: Sequence[DigestRow], state: ClaimedDigests, replayed: set[int], real_now: datetime
) -> None:
    """Each replayed digest's recorded marker (kept when it is recorded) and the older digests it
    supersedes once sent."""
    for d in digests:
        page.markers[d.id] = in_flight_marker(d.payload_json, real_now) or {}
        page.older[d.user_id] = superseded_by(d, state.pending_of(d.user_id), replayed)


def _replay_batches(
    groups: dict[str, _Group],
    state: ClaimedDigests,
    users: dict[str, DeliveryUser],
    page: _Page,
    real_now: datetime,
    report: SendReport,
) -> _Replay:
    """The page's replay batches (added to ``page``) with their members as locked; a batch with a member
    held by another transaction is left for a later run (counted ``locked_elsewhere``)."""
    mine = {d.id: d for d in state.pending}
    replay: _Replay = []
    for key, group in groups.items():
        digests = _lockable(key, group, mine, state.held_elsewhere, users, real_now)
        if digests is None:
            report.skipped[LOCKED_ELSEWHERE] += len(group)
        elif digests:
            page.batches.append(_Batch(key, [], replay=True))
            replay.append((page.batches[-1], digests))
    return replay


def _lockable(
    key: str,
    group: _Group,
    mine: dict[int, DigestRow],
    held: set[str],
    users: dict[str, DeliveryUser],
    real_now: datetime,
) -> list[DigestRow] | None:
    """A batch's members to replay, as locked: ``None`` when a member's row is held by another
    transaction (the batch waits whole); members recorded meanwhile, re-marked, or whose user is no
    longer sendable are left out (the request then differs: the provider's 409 proves the batch)."""
    out: list[DigestRow] = []
    for _index, d in group:
        locked = mine.get(d.id)
        if locked is None:
            if d.user_id in held:
                return None
            continue
        marker = in_flight_marker(locked.payload_json, real_now)
        if marker is not None and marker["batch_key"] == key and d.user_id in users:
            out.append(locked)
    return out


def _job(
    row: UserRow,
    plan: UserPlan,
    digest: DigestRow,
    items: Sequence[ItemRow],
    first: bool,
    facts: tuple[dict[str, tuple[str, str | None]], dict[str, int]],
) -> SendJob:
    sources, counts = facts
    return SendJob(
        user=row,
        plan=plan,
        digest=digest,
        items=tuple(items),
        first=first,
        source=sources.get(row.id),
        total_notes=counts.get(row.id, 0),
    )


# ------------------------------------------------------------------------------------------ the pages


def _deliver_page(run: _Run, after: str | None, upto: str | None, only_user_id: str | None) -> Any:
    """One page: read and check due (one statement), claim, prepare, commit; send; record. Returns the
    next page's ``after``, or ``_DONE``."""
    conn, report, limit = run.session.conn, run.report, run.settings.digest_batch_size
    claimed: set[str] = set()
    try:
        with conn.begin():
            loaded = load_delivery_users(
                conn, after=after, upto=upto, limit=limit + 1, only_user_id=only_user_id
            )
            users = loaded[:limit]
            if not users:
                return _DONE
            report.batches += 1
            report.users_considered += len(users)
            plans = {u.row.id: user_plan(u.row, run.settings.deployment_mode) for u in users}
            wanted = _wanted(run, users, plans)
            claimed = run.session.claim(wanted)[0]
            _skip(report, CLAIMED_ELSEWHERE, len(wanted) - len(claimed))
            page = _prepare(run, users, plans, claimed) if claimed else _Page()
        _deliver_and_record(run, page)
    finally:
        run.session.release_later(claimed)
    _check_breaker(report)
    return users[-1].row.id if len(loaded) > limit else _DONE


def _wanted(run: _Run, users: Sequence[DeliveryUser], plans: dict[str, UserPlan]) -> list[str]:
    """The page's due users to claim (plan issues and reasons counted); a due user with a live in-flight
    digest is left to the replay (counted ``batch_in_flight_elsewhere``)."""
    real_now = run.real_now()
    last_sends = {u.row.id: u.last_sent_at for u in users if u.last_sent_at is not None}
    checks = _due_checks(run, plans, last_sends, count=True, wall=real_now)
    in_flight = {u.row.id for u in users if u.marked_at is not None and _live(u.marked_at, real_now)}
    _skip(run.report, BATCH_ELSEWHERE, len(in_flight & set(checks)))
    return sorted(set(checks) - in_flight)


def _due_checks(
    run: _Run,
    plans: dict[str, UserPlan],
    last_sends: dict[str, datetime],
    *,
    count: bool,
    wall: datetime,
) -> dict[str, DueCheck]:
    """:func:`due_check` for every user of ``plans`` against their last send: the due users. With
    ``count`` the plan issues are added to the report (the first check of a page only). ``wall`` (the
    location's clock) applies the catch-up rule of :func:`due_check`."""
    report = run.report
    checks: dict[str, DueCheck] = {}
    for uid, plan in plans.items():
        if count:
            report.data_issues.update(plan.issues)
        check = due_check(
            plan, last_sends.get(uid), run.now, first_digest_bypass=run.first_digest_bypass, wall=wall
        )
        if check.reason == "invalid_send_hour" and count:
            report.data_issues["invalid_send_hour"] += 1
        if check.due:
            checks[uid] = check
        else:
            report.not_due[check.reason] += 1
    return checks


def _prepare(
    run: _Run, users: Sequence[DeliveryUser], plans: dict[str, UserPlan], claimed: set[str]
) -> _Page:
    """Under the claims: lock the pending digests (skipping held rows) and re-check due (one statement),
    choose, load what the emails show, form the batches and write their keys into the digests."""
    conn, report, real_now = run.session.conn, run.report, run.real_now()
    ids = sorted(claimed)
    state = lock_claimed_digests(conn, ids, run.now)
    checks = _due_checks(run, {uid: plans[uid] for uid in ids}, state.last_sends, count=False, wall=real_now)
    report.due += len(checks)
    chosen = _choose(state, checks, real_now, report)
    page = _Page()
    items = load_items(conn, [newest.id for newest, _ in chosen.values()])
    ready = _drop_empty_snapshots(chosen, items, page, report)
    facts = load_first_digest_facts(conn, sorted(uid for uid in ready if checks[uid].first))
    rows = {u.row.id: u.row for u in users}
    jobs = [
        _job(rows[uid], plans[uid], newest, items[newest.id], checks[uid].first, facts)
        for uid, (newest, _older) in sorted(ready.items(), key=lambda kv: kv[1][0].id)
    ]
    page.older = {uid: older for uid, (_newest, older) in ready.items()}
    _mark(conn, jobs, page, run.settings.email_batch_size, real_now)
    return page


def _choose(
    state: ClaimedDigests, checks: dict[str, DueCheck], real_now: datetime, report: SendReport
) -> dict[str, _Choice]:
    """Per due user the digest to send and the older ones it supersedes; a user with a row held by
    another transaction, or with a digest in flight (left to a replay), is skipped and counted."""
    by_user: dict[str, list[DigestRow]] = {}
    for digest in state.pending:
        by_user.setdefault(digest.user_id, []).append(digest)
    chosen: dict[str, _Choice] = {}
    for uid in sorted(checks):
        pending = by_user.get(uid, [])
        if uid in state.held_elsewhere:
            report.skipped[LOCKED_ELSEWHERE] += 1
        elif any(in_flight_marker(d.payload_json, real_now) is not None for d in pending):
            report.skipped[BATCH_ELSEWHERE] += 1
        else:
            newest, older = choose_pending(pending)
            if newest is None:
                report.skipped[NO_PENDING] += 1
            else:
                chosen[uid] = (newest, older)
    return chosen


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


def _mark(conn: sa.Connection, jobs: list[SendJob], page: _Page, batch_size: int, real_now: datetime) -> None:
    """Group the jobs into batches under new keys and write each digest's marker (one statement)."""
    prepared_at = real_now.isoformat()
    marks: list[dict[str, Any]] = []
    for chunk in chunks(jobs, batch_size):
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


# ------------------------------------------------------------------------------------ send and record


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


def _record(run: _Run, page: _Page, deliveries: Sequence[_Delivery]) -> None:
    """Write the page's outcome in one short transaction; when a row is locked by someone else, user by
    user in savepoints instead (a user whose rows stay locked is deferred to a later run)."""
    conn, report = run.session.conn, run.report
    stamp = run.real_now()
    per_user = _updates(page, deliveries, stamp)
    try:
        with conn.begin():
            _write(
                conn,
                [u for rows in per_user.values() for u in rows[0]],
                [r for rows in per_user.values() for r in rows[1]],
                report,
            )
    except sa.exc.OperationalError as exc:
        if not _is_lock_timeout(exc):
            raise
        with conn.begin():
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
    """The review-state rows of a delivered digest's items: the effective interval (merged with the
    existing one by :func:`_write`) and the acceptance time."""
    return [
        {
            "digest_id": d.job.digest.id,
            "document_id": item.document_id,
            "user_id": d.job.user.id,
            "interval_days": d.job.plan.interval_days,
            "last_sent_at": accepted,
            "updated_at": stamp,
        }
        for item in d.job.items
    ]


def _write(
    conn: sa.Connection, updates: list[dict[str, Any]], reviews: list[dict[str, Any]], report: SendReport
) -> None:
    """The digest updates (guarded by the pending status), then the review states of the delivered
    items of the digests actually updated (interval = :func:`review_interval` of the existing one; next
    due = acceptance + interval). Postgres: one statement; SQLite: the update, a read, an upsert."""
    reviews = list({r["document_id"]: r for r in reviews}.values())  # a document once per statement
    if is_postgres(conn):
        written = record_outcomes_postgres(conn, updates, reviews, _REVIEW_BOUNDS)
    else:
        written = _write_sqlite(conn, updates, reviews)
    missed = len(updates) - len(written)
    if missed:
        report.skipped["already_recorded_elsewhere"] += missed


def _write_sqlite(
    conn: sa.Connection, updates: list[dict[str, Any]], reviews: list[dict[str, Any]]
) -> set[int]:
    d, rs = t.note_digests, t.review_states
    written = {
        int(r.id)
        for r in update_many(conn, d, updates, where=d.c.status.in_(PENDING_STATUSES), returning=(d.c.id,))
    }
    mine = [r for r in reviews if r["digest_id"] in written]
    existing = load_review_states(conn, [r["document_id"] for r in mine])
    rows = []
    for r in mine:
        doc = r["document_id"]
        interval = review_interval(
            existing[doc].interval_days if doc in existing else None, r["interval_days"]
        )
        rows.append(
            {
                **{k: v for k, v in r.items() if k != "digest_id"},
                "status": "new",
                "interval_days": interval,
                "next_due_at": r["last_sent_at"] + timedelta(days=interval),
                "ease_factor": DEFAULT_EASE_FACTOR,
                "repetitions": 0,
            }
        )

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

    insert_many(conn, rs, rows, on_conflict=upsert)
    return written


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
