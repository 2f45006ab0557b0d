"""The operator docs name what the code emits: every output-metadata key listed per op in
docs/operations.md is a key that op reports, every `data_issues` name is one the code can count, and
every reason-like name (``snake_case`` in backticks) in the operator docs is a string the package uses."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from dbb_orchestration.content import ALG_AES_256_GCM, ALG_NONE, ContentKeyring, decode_content
from dbb_orchestration.digests.generate import GenerateReport
from dbb_orchestration.digests.send import SendReport
from dbb_orchestration.notion_sync.defs import _step_metadata
from dbb_orchestration.notion_sync.results import ConnectionSyncResult, SyncStats, SyncStatus
from dbb_orchestration.notion_sync.summary import summarize_runs
from dbb_orchestration.sequences.process import StepOutcome, StepResult

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
SEQUENCES = (ROOT / "docs" / "sequences.md").read_text(encoding="utf-8")
NOW = datetime(2026, 2, 8, 8, tzinfo=UTC)

_BACKTICKED = re.compile(r"`([^`]+)`")
_REASON_LIKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _documented_keys_per_op() -> dict[str, set[str]]:
    """``- **op**: `key`, `key` …`` bullets (continuation lines included) of the Watching section."""
    keys: dict[str, set[str]] = {}
    current: list[str] = []
    for line in _section(OPERATIONS, "Watching").splitlines():
        bullet = re.match(r"^\s+- ((?:\*\*\w+\*\*(?:, | and )?)+):(.*)$", line)
        if bullet:
            current = re.findall(r"\*\*(\w+)\*\*", bullet.group(1))
            text = bullet.group(2)
        elif current and line.startswith("    "):
            text = line
        else:
            current = []
            continue
        for op in current:
            keys.setdefault(op, set()).update(_BACKTICKED.findall(text))
    return keys


def _emitted_keys() -> dict[str, set[str]]:
    send = set(SendReport(logical_time=NOW).metadata()) | {"outside_catch_up_window", "user_id"}
    step = StepResult(
        outcome=StepOutcome.SENT,
        ref=cast(Any, SimpleNamespace(state_id=1, sequence_name="welcome", user_id="u", step=1)),
    )
    stats = SyncStats()
    stats.accepted["created"] = 1
    stats.rejected["note_limit_reached"] = 1
    stats.skipped["archived"] = 1
    connection = ConnectionSyncResult(connection_id=1, status=SyncStatus.SUCCESS, stats=stats)
    connection_keys = set(_step_metadata(connection)) | {"paused_seconds"}
    # the per-reason keys are documented by their pattern
    connection_keys |= {"accepted_<x>", "rejected_<reason>", "skipped_<reason>"}
    return {
        "digest_batch": set(GenerateReport(logical_time=NOW).metadata()) | send,
        "summarize_digest_batches": set(GenerateReport(logical_time=NOW).metadata()) | send | {"batch_steps"},
        "send_digest_for_user": send,
        "email_sequence_step": set(step.metadata()),
        "notion_sync_connection": connection_keys,
        "notion_sync_summary": set(summarize_runs([])) | {"runs_in_group", "failed_connections"},
    }


def test_the_watching_section_lists_every_op_with_metadata() -> None:
    assert set(_documented_keys_per_op()) == set(_emitted_keys())


@pytest.mark.parametrize("op", sorted(_emitted_keys()))
def test_documented_metadata_keys_are_the_ones_the_op_emits(op: str) -> None:
    documented = _documented_keys_per_op().get(op, set())
    assert documented, f"docs/operations.md lists no metadata key for {op}"
    assert documented - _emitted_keys()[op] == set()


def _decode_reasons() -> set[str]:
    """What decode_content can report, as the send op counts it: ``content_<reason before ':'>``."""
    keyring = ContentKeyring.from_keys({1: bytes(32)})
    aes = ALG_AES_256_GCM
    cases = [
        ("!!", "x", ALG_NONE, 0),  # bad_base64
        ("AAAA", "AAAAAAAAAAAAAAAA", aes, 9),  # missing_key_version
        ("AAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAA", aes, 1),  # decrypt_failed
        ("AAAAAAAAAAAAAAAAAAAAAAAA", "", aes, 1),  # bad_iv
        ("//79", "none", ALG_NONE, 0),  # bad_utf8
        ("AAAA", "none", "rot13", 0),  # unknown_alg
    ]
    errors = [
        decode_content(ciphertext, iv, alg, version, keyring).error for ciphertext, iv, alg, version in cases
    ]

    def key(version: int) -> bytes:
        raise RuntimeError("a keyring that breaks")

    broken = cast(Any, SimpleNamespace(key=key))
    errors.append(
        decode_content("AAAA", "AAAAAAAAAAAAAAAA", ALG_AES_256_GCM, 1, broken).error
    )  # decode_failed
    assert None not in errors
    return {f"content_{str(error).split(':', 1)[0]}" for error in errors}


def test_documented_data_issues_are_ones_the_code_counts() -> None:
    bullet = next(b for b in _section(OPERATIONS, "Watching").split("\n- ") if b.startswith("`data_issues`"))
    documented = set(_BACKTICKED.findall(bullet)) - {"data_issues"}
    # the generation and delivery checks count these two; decode failures are counted per note
    countable = {"invalid_timezone", "invalid_send_hour", "user_error:<Type>"} | _decode_reasons()
    assert documented - countable == set()
    assert _decode_reasons() <= documented
    rotate = _section(OPERATIONS, "Rotate the content encryption key")
    assert set(_BACKTICKED.findall(rotate)) & {"missing_key_version:<n>", "decrypt_failed"} == set()
    assert "`content_missing_key_version`" in rotate


def test_documented_sequence_outcomes_are_step_outcomes() -> None:
    line = next(line for line in SEQUENCES.split("\n\n") if "Each step's output metadata: outcome" in line)
    outcomes = set(_BACKTICKED.findall(line.split("outcome (", 1)[1].split(")", 1)[0]))
    assert outcomes == {outcome.value for outcome in StepOutcome}


def _package_strings() -> set[str]:
    """Every string constant of the package (and each word in it), and the instance config's keys."""
    strings: set[str] = set(re.findall(r"^\s*(\w+):", (ROOT / "deploy" / "dagster.yaml").read_text(), re.M))
    for path in (ROOT / "dbb_orchestration").rglob("*.py"):
        if "testing" in path.relative_to(ROOT / "dbb_orchestration").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
                strings.update(re.findall(r"[a-z0-9_]+", node.value))
    return strings


@pytest.mark.parametrize("doc", ["operations.md", "sequences.md"])
def test_reason_like_names_in_the_docs_are_strings_the_code_uses(doc: str) -> None:
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    names = {name for name in _BACKTICKED.findall(text) if _REASON_LIKE.match(name)}
    assert names, "the pattern should find names"
    assert names - _package_strings() == set()
