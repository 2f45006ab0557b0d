"""Which notes go into a digest: the spaced-repetition selection of behaviour §5, as pure functions.

Everything here is deterministic: the same candidates, batch size, ``now`` and seed always give the same
selection. All datetimes must be timezone-aware (naive ones raise ``ValueError``); day arithmetic is done
on exact microsecond counts, so "exactly 3 days" or "exactly 1 day" never depends on float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from dbb_orchestration.timing import iso_utc_millis, require_aware

Reason = Literal["new", "overdue", "due_soon", "scheduled"]

WEIGHT_MIN = 0.1
WEIGHT_MAX = 5.0
DEFAULT_WEIGHT = 1.0

NEW_SCORE = 50
OVERDUE_BASE = 100
OVERDUE_POINTS_PER_DAY = 3
OVERDUE_CAP_DAYS = 30
DUE_SOON_WINDOW_DAYS = 3
DUE_SOON_BASE = 70
DUE_SOON_POINTS_PER_DAY = 5
SCHEDULED_BASE = 20
SCHEDULED_CAP_DAYS = 30

COOLDOWN = timedelta(days=1)
COOLDOWN_FACTOR = 0.25

FNV_OFFSET_BASIS = 2166136261
FNV_PRIME = 16777619

_DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class Candidate:
    """A non-deleted document joined with its review state (no state row: keep the defaults)."""

    document_id: int
    status: str = "new"
    priority_weight: float | None = None
    deprioritized_until: datetime | None = None
    next_due_at: datetime | None = None
    last_sent_at: datetime | None = None


@dataclass(frozen=True)
class Selected:
    document_id: int
    position: int  # 1-based
    score: float  # base × weight, × 0.25 during cooldown
    reason: Reason  # the base-score band
    weight: float  # the clamped priority weight


@dataclass
class Selection:
    items: list[Selected]
    skipped: list[tuple[int, str]]  # (document_id, "suspended" | "deprioritized"), in input order


# --------------------------------------------------------------------------------------------- scoring


def _microseconds(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def clamp_weight(priority_weight: float | None) -> float:
    """``None`` → 1; NaN → 0.1; otherwise clamped to [0.1, 5] (so ±inf → 5 / 0.1)."""
    if priority_weight is None:
        return DEFAULT_WEIGHT
    weight = float(priority_weight)
    if math.isnan(weight):
        return WEIGHT_MIN
    return min(WEIGHT_MAX, max(WEIGHT_MIN, weight))


def base_score(next_due_at: datetime | None, now: datetime) -> tuple[int, Reason]:
    """Base score and reason from ``next_due_at`` (behaviour §5 step 3).

    * ``None`` → (50, "new");
    * due at or before ``now`` → 100 + 3 × whole days overdue (floor, capped at 30), "overdue";
    * due in (0, 3] days → 70 − 5 × ceil(days until due), "due_soon" (exactly 3.0 days is still due soon:
      55; 3 days and one microsecond is "scheduled": 16);
    * later → 20 − min(ceil(days until due), 30), "scheduled" (so between 16 and −10).
    """
    if next_due_at is None:
        return NEW_SCORE, "new"
    require_aware(next_due_at, "next_due_at")
    until_us = _microseconds(next_due_at - now)
    if until_us <= 0:
        overdue_days = min((-until_us) // _DAY_US, OVERDUE_CAP_DAYS)
        return OVERDUE_BASE + OVERDUE_POINTS_PER_DAY * overdue_days, "overdue"
    days_ceil = -(-until_us // _DAY_US)
    if until_us <= DUE_SOON_WINDOW_DAYS * _DAY_US:
        return DUE_SOON_BASE - DUE_SOON_POINTS_PER_DAY * days_ceil, "due_soon"
    return SCHEDULED_BASE - min(days_ceil, SCHEDULED_CAP_DAYS), "scheduled"


def in_cooldown(last_sent_at: datetime | None, now: datetime) -> bool:
    """Sent less than 1 day before ``now`` (strictly: exactly 24 h ago is no longer in cooldown).

    A ``last_sent_at`` in the future (clock skew) counts as recent, so it is in cooldown too.
    """
    if last_sent_at is None:
        return False
    require_aware(last_sent_at, "last_sent_at")
    return now - last_sent_at < COOLDOWN


# ------------------------------------------------------------------------------------------ seeded rank


def fnv1a_32(text: str, state: int = FNV_OFFSET_BASIS) -> int:
    """32-bit FNV-1a over the UTF-16 code units of ``text`` (as JavaScript's ``charCodeAt`` sees them).

    Characters outside the BMP count as their surrogate pair; a lone surrogate counts as itself. For ASCII
    this equals FNV-1a over the bytes. ``state`` continues a hash: ``fnv1a_32(b, fnv1a_32(a)) ==
    fnv1a_32(a + b)``, so a shared prefix is hashed once.
    """
    h = state
    for char in text:
        code = ord(char)
        if code > 0xFFFF:
            code -= 0x10000
            h ^= 0xD800 | (code >> 10)
            h = (h * FNV_PRIME) & 0xFFFFFFFF
            h ^= 0xDC00 | (code & 0x3FF)
        else:
            h ^= code
        h = (h * FNV_PRIME) & 0xFFFFFFFF
    return h


def seeded_rank(seed: str, document_ids: list[int] | tuple[int, ...]) -> dict[int, int]:
    """Rank (0-based) of each id when ordered by ``fnv1a_32(f"{seed}:{id}")``, ties by id ascending.

    Duplicate ids get one entry.
    """
    unique = set(document_ids)
    prefix = fnv1a_32(f"{seed}:")  # hashed once per seed: the ids only continue it
    ordered = sorted(unique, key=lambda doc_id: (fnv1a_32(str(doc_id), prefix), doc_id))
    return {doc_id: rank for rank, doc_id in enumerate(ordered)}


def daily_seed(user_id: str, scheduled_for: datetime) -> str:
    """The daily job's seed: ``"<userId>:<scheduled_for as ISO-8601 UTC with ms>Z"``.

    Example: ``daily_seed("user_1", datetime(2026, 2, 8, tzinfo=UTC)) == "user_1:2026-02-08T00:00:00.000Z"``.
    A naive ``scheduled_for`` raises ``ValueError``.
    """
    return f"{user_id}:{iso_utc_millis(scheduled_for)}"


# ---------------------------------------------------------------------------------------------- select


@dataclass(frozen=True)
class _Scored:
    candidate: Candidate
    weight: float
    score: float
    reason: Reason


def _id_hash(document_id: int, prefix_state: int) -> int:
    """``fnv1a_32(str(document_id), prefix_state)``: an int's decimal digits are ASCII, so their bytes
    are their UTF-16 code units."""
    h = prefix_state
    for code in str(document_id).encode("ascii"):
        h = ((h ^ code) * FNV_PRIME) & 0xFFFFFFFF
    return h


def _order(eligible: list[_Scored], seed: str | None) -> list[_Scored]:
    """Step 5: score desc, ``next_due_at`` asc (None last), weight desc, seeded rank (with a seed),
    document id asc.

    Ordering ties by the seeded rank is ordering them by ``(fnv1a_32("<seed>:<id>"), id)`` (that is how
    the rank is defined), so the hash is computed only for candidates that tie on the first three keys.
    Same order as sorting everything by :func:`seeded_rank`."""
    far_future = datetime.max.replace(tzinfo=UTC)
    keyed = []
    for s in eligible:
        due = s.candidate.next_due_at
        keyed.append(((-s.score, due is None, due if due is not None else far_future, -s.weight), s))
    keyed.sort(key=lambda pair: (pair[0], pair[1].candidate.document_id))
    if seed is None:
        return [s for _key, s in keyed]
    prefix = fnv1a_32(f"{seed}:")
    out: list[_Scored] = []
    i, n = 0, len(keyed)
    while i < n:
        j = i + 1
        while j < n and keyed[j][0] == keyed[i][0]:
            j += 1
        if j - i == 1:
            out.append(keyed[i][1])
        else:
            tied = [s for _key, s in keyed[i:j]]
            tied.sort(key=lambda s: (_id_hash(s.candidate.document_id, prefix), s.candidate.document_id))
            out.extend(tied)
        i = j
    return out


def _skip_reason(cand: Candidate, now: datetime) -> str | None:
    """Step 1: ``suspended`` (wins), ``deprioritized`` while ``deprioritized_until`` is after ``now``."""
    if cand.status == "suspended":
        return "suspended"
    if cand.deprioritized_until is not None:
        require_aware(cand.deprioritized_until, "deprioritized_until")
        if cand.deprioritized_until > now:
            return "deprioritized"
    return None


def _scored(cand: Candidate, now: datetime) -> _Scored:
    """Steps 2–4: weight, base score × weight, × 0.25 during cooldown."""
    weight = clamp_weight(cand.priority_weight)
    base, reason = base_score(cand.next_due_at, now)
    score = base * weight
    if in_cooldown(cand.last_sent_at, now):
        score *= COOLDOWN_FACTOR
    return _Scored(cand, weight, score, reason)


def _fill(ordered: list[_Scored], batch_size: int) -> list[_Scored]:
    """Step 6: the groups in their fill order, each keeping the step-5 order."""
    if any(s.candidate.last_sent_at is None for s in ordered):
        return _fill_never_sent_first(ordered)
    return _fill_by_reason(ordered, batch_size)


def _fill_never_sent_first(ordered: list[_Scored]) -> list[_Scored]:
    """Already-sent ones with weight > 1, then never-sent ones, then the other already-sent ones."""
    boosted = [s for s in ordered if s.candidate.last_sent_at is not None and s.weight > 1]
    never_sent = [s for s in ordered if s.candidate.last_sent_at is None]
    other_seen = [s for s in ordered if s.candidate.last_sent_at is not None and s.weight <= 1]
    return boosted + never_sent + other_seen


def _fill_by_reason(ordered: list[_Scored], batch_size: int) -> list[_Scored]:
    """Overdue and due-soon, at most floor(batch × 0.4) new, scheduled, then the other new ones."""
    urgent = [s for s in ordered if s.reason in ("overdue", "due_soon")]
    new = [s for s in ordered if s.reason == "new"]
    scheduled = [s for s in ordered if s.reason == "scheduled"]
    new_cap = (batch_size * 2) // 5  # floor(batch × 0.4) in exact integer arithmetic
    return urgent + new[:new_cap] + scheduled + new[new_cap:]


def select_notes(
    candidates: list[Candidate] | tuple[Candidate, ...],
    batch_size: int,
    now: datetime,
    seed: str | None = None,
) -> Selection:
    """Pick up to ``batch_size`` notes (behaviour §5 steps 1–7).

    1. ``suspended`` candidates and those with ``deprioritized_until`` later than ``now`` are reported in
       ``skipped`` (suspended wins when both apply), in input order.
    2–4. weight = :func:`clamp_weight`; score = :func:`base_score` × weight, × 0.25 when
       :func:`in_cooldown`.
    5. order: score desc, ``next_due_at`` asc (None last), weight desc, seeded rank (only with a seed),
       document id asc.
    6. if any eligible candidate was never sent: already-sent ones with weight > 1, then never-sent ones,
       then the other already-sent ones; otherwise overdue + due-soon, then at most
       floor(batch × 0.4) "new"-reason ones, then "scheduled", then the remaining "new" ones. Each group
       keeps the step-5 order.
    7. cut to ``batch_size``; positions 1..n.

    ``batch_size`` ≤ 0 gives no items (skips are still reported). A document id seen twice is used once
    (its first occurrence). Naive datetimes raise ``ValueError``.
    """
    require_aware(now, "now")
    skipped: list[tuple[int, str]] = []
    eligible: list[_Scored] = []
    seen_ids: set[int] = set()
    for cand in candidates:
        if cand.document_id in seen_ids:
            continue
        seen_ids.add(cand.document_id)
        skip = _skip_reason(cand, now)
        if skip:
            skipped.append((cand.document_id, skip))
        else:
            eligible.append(_scored(cand, now))

    if batch_size <= 0 or not eligible:
        return Selection(items=[], skipped=skipped)

    filled = _fill(_order(eligible, seed), batch_size)
    items = [
        Selected(
            document_id=s.candidate.document_id,
            position=position,
            score=s.score,
            reason=s.reason,
            weight=s.weight,
        )
        for position, s in enumerate(filled[:batch_size], start=1)
    ]
    return Selection(items=items, skipped=skipped)
