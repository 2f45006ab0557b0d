"""The one scrubber: addresses, keys, tokens and URL credentials never leave the process."""

from __future__ import annotations

from dbb_orchestration.redaction import scrub, scrub_json


def test_scrub_removes_addresses_keys_tokens_and_url_passwords() -> None:
    text = scrub(
        "The address ada.lovelace+x@example.co.uk is on the suppression list; key re_AbC123xyz_9, "
        "header Authorization: Bearer abc.def, db postgresql://app:s3cr3t@db.internal:5432/app, "
        "api_key=abcd1234 and password: hunter2"
    )
    for secret in (
        "ada.lovelace",
        "example.co.uk",
        "re_AbC123xyz_9",
        "abc.def",
        "s3cr3t",
        "abcd1234",
        "hunter2",
    ):
        assert secret not in text
    assert "[email]" in text and "postgresql://[redacted]@db.internal:5432/app" in text
    assert "api_key=[redacted]" in text


def test_scrub_is_idempotent_collapses_whitespace_and_cuts() -> None:
    once = scrub("to ada@example.com,\n\n key re_abcdef123456")
    assert scrub(once) == once == "to [email], key [redacted]"
    assert len(scrub("x" * 2000)) == 500
    assert len(scrub("x" * 2000, None)) == 2000
    assert scrub(None) == ""


def test_scrub_json_walks_nested_values() -> None:
    value = {
        "message": "bounce for bob@example.org",
        "status": 422,
        "nested": [{"detail": "Bearer tok_123"}, ("re_secretvalue1",)],
        "ok": True,
        "none": None,
    }
    assert scrub_json(value) == {
        "message": "bounce for [email]",
        "status": 422,
        "nested": [{"detail": "[redacted]"}, ["[redacted]"]],
        "ok": True,
        "none": None,
    }


def test_the_fast_path_returns_exactly_what_the_full_scrub_returns() -> None:
    """Random strings built from the pieces the patterns look for (and the whitespace they collapse):
    ``scrub`` with its fast path gives the same result as the full set of substitutions."""
    import random

    from dbb_orchestration.redaction import _scrub_slow

    pieces = [
        "a", "Z", "7", "-", ".", "/", ":", "=", "@", "_", " ", "  ", "\t", "\n", "\u00a0", "\u2003",
        "re_", "RE_", "ntn_", "secret", "Secret_", "api", "API-key", "token", "passwd", "password",
        "Authorization", "Bearer ", "basic ", "https://", "user:pw@", "x@y.io", "abcdef12", "2026-02-08T08:00:00+00:00",
    ]  # fmt: skip
    rng = random.Random(20261201)
    seen_fast = seen_slow = 0
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        limit = rng.choice([None, 10, 40, 500])
        expected = _scrub_slow(text, limit)
        assert scrub(text, limit) == expected, (text, limit)
        if expected == text:
            seen_fast += 1
        else:
            seen_slow += 1
    assert seen_fast > 1000 and seen_slow > 1000  # both paths really exercised
