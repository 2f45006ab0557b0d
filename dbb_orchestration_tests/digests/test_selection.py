"""behaviour §5 selection: every step with concrete numbers."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from dbb_orchestration.digests.selection import (
    Candidate,
    Selected,
    _order,
    _Scored,
    base_score,
    clamp_weight,
    daily_seed,
    fnv1a_32,
    in_cooldown,
    seeded_rank,
    select_notes,
)

NOW = datetime(2026, 2, 8, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def ref_fnv1a_utf16(text: str) -> int:
    """Independent reference: FNV-1a 32 over little-endian UTF-16 code units."""
    data = text.encode("utf-16-le", "surrogatepass")
    h = 0x811C9DC5
    for i in range(0, len(data), 2):
        h ^= data[i] | (data[i + 1] << 8)
        h = (h * 0x01000193) % (1 << 32)
    return h


def ids(selection) -> list[int]:
    return [item.document_id for item in selection.items]


# ------------------------------------------------------------------------------------------ step 1


def test_suspended_and_deprioritized_are_skipped_with_reasons() -> None:
    candidates = [
        Candidate(1, status="suspended"),
        Candidate(2, deprioritized_until=NOW + timedelta(seconds=1)),
        Candidate(3, deprioritized_until=NOW),  # not later than now → eligible
        Candidate(4, deprioritized_until=NOW - DAY),
        Candidate(5, status="suspended", deprioritized_until=NOW + DAY),
        Candidate(6),
    ]
    result = select_notes(candidates, 10, NOW)
    assert result.skipped == [(1, "suspended"), (2, "deprioritized"), (5, "suspended")]
    assert sorted(ids(result)) == [3, 4, 6]


# ------------------------------------------------------------------------------------------ step 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 1.0),
        (float("nan"), 0.1),
        (0.0, 0.1),
        (0.05, 0.1),
        (-3.0, 0.1),
        (2.5, 2.5),
        (5.0, 5.0),
        (9.0, 5.0),
        (float("inf"), 5.0),
        (float("-inf"), 0.1),
    ],
)
def test_clamp_weight(raw: float | None, expected: float) -> None:
    assert clamp_weight(raw) == expected


def test_weight_multiplies_the_score() -> None:
    result = select_notes(
        [Candidate(1, priority_weight=float("nan")), Candidate(2, priority_weight=9), Candidate(3)], 3, NOW
    )
    by_id = {item.document_id: item for item in result.items}
    assert by_id[1].weight == 0.1 and by_id[1].score == pytest.approx(5.0)
    assert by_id[2].weight == 5.0 and by_id[2].score == 250.0
    assert by_id[3].weight == 1.0 and by_id[3].score == 50.0


# ------------------------------------------------------------------------------------------ step 3


@pytest.mark.parametrize(
    ("due", "expected"),
    [
        (None, (50, "new")),
        (NOW, (100, "overdue")),
        (NOW - timedelta(hours=23, minutes=59), (100, "overdue")),
        (NOW - DAY, (103, "overdue")),
        (NOW - timedelta(days=2, hours=12), (106, "overdue")),
        (NOW - 30 * DAY, (190, "overdue")),
        (NOW - 45 * DAY, (190, "overdue")),  # capped at 30 days
        (NOW + timedelta(seconds=1), (65, "due_soon")),
        (NOW + DAY, (65, "due_soon")),
        (NOW + timedelta(days=1, seconds=1), (60, "due_soon")),
        (NOW + timedelta(days=1, hours=12), (60, "due_soon")),
        (NOW + 3 * DAY, (55, "due_soon")),  # exactly 3.0 days is still due soon
        (NOW + 3 * DAY + timedelta(microseconds=1), (16, "scheduled")),
        (NOW + 10 * DAY, (10, "scheduled")),
        (NOW + timedelta(days=29, hours=1), (-10, "scheduled")),
        (NOW + 100 * DAY, (-10, "scheduled")),  # capped at 30 days
    ],
)
def test_base_score_bands(due: datetime | None, expected: tuple[int, str]) -> None:
    assert base_score(due, NOW) == expected


def test_base_score_works_across_timezones() -> None:
    from zoneinfo import ZoneInfo

    due = (NOW + 2 * DAY).astimezone(ZoneInfo("Asia/Kolkata"))
    assert base_score(due, NOW) == (60, "due_soon")


# ------------------------------------------------------------------------------------------ step 4


def test_cooldown_window() -> None:
    assert in_cooldown(NOW - timedelta(hours=23, minutes=59), NOW)
    assert not in_cooldown(NOW - DAY, NOW)  # exactly 24 h ago: out of cooldown
    assert not in_cooldown(NOW - timedelta(hours=25), NOW)
    assert in_cooldown(NOW + timedelta(hours=1), NOW)  # clock skew counts as recent
    assert not in_cooldown(None, NOW)


def test_cooldown_quarters_the_score() -> None:
    result = select_notes(
        [
            Candidate(1, next_due_at=NOW - DAY, last_sent_at=NOW - timedelta(hours=2)),
            Candidate(2, next_due_at=NOW - DAY, last_sent_at=NOW - 2 * DAY),
        ],
        2,
        NOW,
    )
    by_id = {item.document_id: item for item in result.items}
    assert by_id[1].score == pytest.approx(103 * 0.25)
    assert by_id[2].score == 103
    assert ids(result) == [2, 1]


# ------------------------------------------------------------------------------------------ step 5


def test_order_by_score_descending() -> None:
    candidates = [
        Candidate(1),  # 50
        Candidate(2, next_due_at=NOW - 2 * DAY),  # 106
        Candidate(3, next_due_at=NOW + 2 * DAY),  # 60
        Candidate(4, next_due_at=NOW + 5 * DAY),  # 15
    ]
    result = select_notes(candidates, 4, NOW)
    assert ids(result) == [2, 3, 1, 4]
    assert [item.position for item in result.items] == [1, 2, 3, 4]
    assert [item.reason for item in result.items] == ["overdue", "due_soon", "new", "scheduled"]
    assert result.items[0] == Selected(document_id=2, position=1, score=106, reason="overdue", weight=1.0)


def test_tie_on_score_earlier_due_first_and_null_due_last() -> None:
    candidates = [
        Candidate(1),  # new: 50, due null
        Candidate(2, priority_weight=5, next_due_at=NOW + 10 * DAY),  # scheduled 10 × 5 = 50
        Candidate(3, next_due_at=NOW - timedelta(days=1, hours=4)),  # 103
        Candidate(4, next_due_at=NOW - timedelta(days=1, hours=20)),  # 103, due earlier
    ]
    result = select_notes(candidates, 4, NOW)
    assert ids(result) == [4, 3, 2, 1]


def test_tie_on_score_and_due_higher_weight_first() -> None:
    due = NOW - timedelta(hours=5)
    candidates = [
        Candidate(1, next_due_at=due, last_sent_at=NOW - 3 * DAY),  # 100 × 1 = 100
        Candidate(2, priority_weight=4, next_due_at=due, last_sent_at=NOW - timedelta(hours=3)),  # 100×4×¼
    ]
    result = select_notes(candidates, 2, NOW)
    assert [item.score for item in result.items] == [100, 100]
    assert ids(result) == [2, 1]


def test_full_tie_without_seed_is_by_id() -> None:
    result = select_notes([Candidate(i) for i in (9, 3, 7, 1)], 4, NOW)
    assert ids(result) == [1, 3, 7, 9]


def test_full_tie_with_seed_follows_the_fnv_rank() -> None:
    seed = "user_1:2026-02-08T00:00:00.000Z"
    doc_ids = list(range(1, 21))
    expected = sorted(doc_ids, key=lambda d: (ref_fnv1a_utf16(f"{seed}:{d}"), d))
    assert expected != doc_ids  # the seed really reorders
    result = select_notes([Candidate(d) for d in reversed(doc_ids)], 20, NOW, seed=seed)
    assert ids(result) == expected
    # determinism: same inputs and seed → same selection; another seed → another order
    again = select_notes([Candidate(d) for d in doc_ids], 20, NOW, seed=seed)
    assert ids(again) == expected
    other = select_notes([Candidate(d) for d in doc_ids], 20, NOW, seed="user_2:2026-02-08T00:00:00.000Z")
    assert ids(other) != expected


def test_seed_only_breaks_ties() -> None:
    seed = "s"
    candidates = [Candidate(1, next_due_at=NOW - DAY), Candidate(2), Candidate(3)]
    result = select_notes(candidates, 3, NOW, seed=seed)
    tail = sorted([2, 3], key=lambda d: (ref_fnv1a_utf16(f"{seed}:{d}"), d))
    assert ids(result) == [1, *tail]


# ------------------------------------------------------------------------------------------ step 6


def test_exploration_first_when_something_was_never_sent() -> None:
    seen = NOW - 10 * DAY
    candidates = [
        Candidate(1, next_due_at=NOW - 5 * DAY, last_sent_at=seen),  # seen, w1, 115
        Candidate(2, priority_weight=2, next_due_at=NOW + 20 * DAY, last_sent_at=seen),  # boosted, 0×2=0
        Candidate(3),  # never sent, 50
        Candidate(4, next_due_at=NOW + 2 * DAY),  # never sent, 60
        Candidate(5, priority_weight=1.5, next_due_at=NOW + 25 * DAY, last_sent_at=seen),  # boosted, -7.5
        Candidate(6, priority_weight=1, next_due_at=NOW - DAY, last_sent_at=seen),  # seen, w1, 103
    ]
    result = select_notes(candidates, 10, NOW)
    assert ids(result) == [2, 5, 4, 3, 1, 6]
    assert ids(select_notes(candidates, 3, NOW)) == [2, 5, 4]


def test_due_order_fill_caps_new_reason_at_40_percent() -> None:
    seen = NOW - 10 * DAY
    candidates = [
        Candidate(1, last_sent_at=seen),  # new-reason (no due date), 50
        Candidate(2, last_sent_at=seen),  # new, 50
        Candidate(3, last_sent_at=seen),  # new, 50
        Candidate(4, last_sent_at=seen),  # new, 50
        Candidate(5, next_due_at=NOW + 5 * DAY, last_sent_at=seen),  # scheduled, 15
        Candidate(6, next_due_at=NOW + 8 * DAY, last_sent_at=seen),  # scheduled, 12
        Candidate(7, next_due_at=NOW - DAY, last_sent_at=seen),  # overdue, 103
        Candidate(8, next_due_at=NOW + 2 * DAY, last_sent_at=seen),  # due_soon, 60
    ]
    # batch 5 → at most floor(5 × 0.4) = 2 "new" before the scheduled ones
    assert ids(select_notes(candidates, 5, NOW)) == [7, 8, 1, 2, 5]
    # batch 10 → cap 4: all four new fit before scheduled
    assert ids(select_notes(candidates, 10, NOW)) == [7, 8, 1, 2, 3, 4, 5, 6]
    # batch 4 → cap 1
    assert ids(select_notes(candidates, 4, NOW)) == [7, 8, 1, 5]
    # batch 2 → cap 0; urgent ones fill it
    assert ids(select_notes(candidates, 2, NOW)) == [7, 8]
    # batch 3 → cap 1
    assert ids(select_notes(candidates, 3, NOW)) == [7, 8, 1]


def test_remaining_new_come_after_scheduled() -> None:
    seen = NOW - 10 * DAY
    candidates = [Candidate(i, last_sent_at=seen) for i in range(1, 5)] + [
        Candidate(10, next_due_at=NOW + 6 * DAY, last_sent_at=seen)
    ]
    # batch 5, cap 2: new 1, 2, then scheduled 10, then remaining new 3, 4 (cut at 5)
    assert ids(select_notes(candidates, 5, NOW)) == [1, 2, 10, 3, 4]


# ------------------------------------------------------------------------------------------ step 7


def test_batch_size_zero_or_negative_is_empty() -> None:
    candidates = [Candidate(1), Candidate(2, status="suspended")]
    for size in (0, -3):
        result = select_notes(candidates, size, NOW)
        assert result.items == []
        assert result.skipped == [(2, "suspended")]


def test_cut_to_batch_and_no_candidates() -> None:
    result = select_notes([Candidate(i) for i in range(1, 8)], 5, NOW)
    assert [item.position for item in result.items] == [1, 2, 3, 4, 5]
    assert select_notes([], 5, NOW).items == []


def test_duplicate_ids_count_once() -> None:
    result = select_notes([Candidate(1), Candidate(1, next_due_at=NOW - DAY), Candidate(2)], 5, NOW)
    assert ids(result) == [1, 2]
    assert result.items[0].reason == "new"


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError):
        select_notes([Candidate(1)], 1, datetime(2026, 2, 8))
    with pytest.raises(ValueError):
        select_notes([Candidate(1, next_due_at=datetime(2026, 2, 8))], 1, NOW)


# ------------------------------------------------------------------------------------------ hashing


def test_fnv1a_known_values() -> None:
    assert fnv1a_32("") == 2166136261
    assert fnv1a_32("a") == 0xE40C292C
    assert fnv1a_32("foobar") == 0xBF9CF968
    assert fnv1a_32("user_1:2026-02-08T00:00:00.000Z:42") == ref_fnv1a_utf16(
        "user_1:2026-02-08T00:00:00.000Z:42"
    )


@pytest.mark.parametrize(
    "text", ["s:1", "user_1:2026-02-08T00:00:00.000Z:123", "é:7", "日本:9", "😀:3", "a😀b"]
)
def test_fnv1a_matches_utf16_reference(text: str) -> None:
    assert fnv1a_32(text) == ref_fnv1a_utf16(text)


def test_fnv1a_uses_utf16_code_units_not_utf8_bytes() -> None:
    # "é" is one UTF-16 unit 0x00E9 but two UTF-8 bytes; the hash must follow the UTF-16 unit.
    expected = ((0x811C9DC5 ^ 0xE9) * 16777619) % 2**32
    assert fnv1a_32("é") == expected
    # "😀" (U+1F600) is the surrogate pair D83D DE00
    h = ((0x811C9DC5 ^ 0xD83D) * 16777619) % 2**32
    h = ((h ^ 0xDE00) * 16777619) % 2**32
    assert fnv1a_32("😀") == h


def test_seeded_rank_orders_by_hash_then_id() -> None:
    seed = "user_1:2026-02-08T00:00:00.000Z"
    doc_ids = [5, 3, 11, 8, 3]
    ranks = seeded_rank(seed, doc_ids)
    expected = sorted({5, 3, 11, 8}, key=lambda d: (ref_fnv1a_utf16(f"{seed}:{d}"), d))
    assert ranks == {d: i for i, d in enumerate(expected)}


def test_daily_seed_format() -> None:
    assert daily_seed("user_1", datetime(2026, 2, 8, tzinfo=UTC)) == "user_1:2026-02-08T00:00:00.000Z"
    from zoneinfo import ZoneInfo

    auckland_midnight = datetime(2026, 9, 27, tzinfo=ZoneInfo("Pacific/Auckland"))
    assert daily_seed("u", auckland_midnight) == "u:2026-09-26T12:00:00.000Z"
    assert daily_seed("u", datetime(2026, 1, 2, 3, 4, 5, 678_999, tzinfo=UTC)) == "u:2026-01-02T03:04:05.678Z"
    with pytest.raises(ValueError):
        daily_seed("u", datetime(2026, 2, 8))


def test_nan_is_not_a_valid_score_anywhere() -> None:
    result = select_notes([Candidate(1, priority_weight=float("nan"), next_due_at=NOW - DAY)], 1, NOW)
    assert not math.isnan(result.items[0].score)
    assert result.items[0].score == pytest.approx(10.3)


def test_fnv1a_continues_from_a_prefix_state() -> None:
    for a, b in [("user_1:2026-02-08T00:00:00.000Z:", "42"), ("", "x"), ("é😀", "1")]:
        assert fnv1a_32(b, fnv1a_32(a)) == fnv1a_32(a + b)


def test_ties_are_ordered_exactly_as_by_the_seeded_rank() -> None:
    """Step 5 hashes only the candidates that tie on score, due date and weight; the order must be the
    one a full sort by ``seeded_rank`` gives, for any mix of ties (random sets with few distinct
    values, so most candidates tie)."""
    rng = random.Random(7)
    far = datetime.max.replace(tzinfo=UTC)
    for trial in range(400):
        n = rng.randint(0, 40)
        ids = rng.sample(range(1, 100_000), n)
        eligible = [
            _Scored(
                Candidate(doc_id, next_due_at=rng.choice([None, NOW, NOW + DAY, NOW - 2 * DAY])),
                weight=rng.choice([1.0, 0.5, 2.0]),
                score=rng.choice([50.0, 25.0, 100.0]),
                reason="new",
            )
            for doc_id in ids
        ]
        seed = f"user-{trial}:2026-02-08T00:00:00.000Z"
        ranks = seeded_rank(seed, ids)

        def full_key(s: _Scored, ranks: dict[int, int] = ranks) -> tuple[object, ...]:
            due = s.candidate.next_due_at
            doc = s.candidate.document_id
            return (-s.score, due is None, due or far, -s.weight, ranks[doc], doc)

        assert _order(eligible, seed) == sorted(eligible, key=full_key)
        unseeded = sorted(eligible, key=lambda s: full_key(s)[:4] + (s.candidate.document_id,))
        assert _order(eligible, None) == unseeded
