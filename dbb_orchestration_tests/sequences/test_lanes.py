"""Lanes: the instance config and the job definitions keep a sequence backlog away from digest runs.

The behaviour itself (a first digest sent while 1,000 steps are due) is measured under a real daemon by
``benchmarks/sequence_daemon_benchmark.py``; these checks keep the settings it relies on from drifting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dbb_orchestration.definitions import make_definitions
from dbb_orchestration.operations.instance_check import REPO_ROOT


def _instance_config() -> dict[str, Any]:
    for path in (REPO_ROOT / "deploy" / "dagster.yaml", REPO_ROOT / "dagster.yaml"):
        if Path(path).exists():
            return dict(yaml.safe_load(path.read_text()))
    raise AssertionError("no dagster.yaml")


def _tag_limit(config: dict[str, Any], value: str) -> int:
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    [limit] = [lim["limit"] for lim in limits if lim["key"] == "dbb/job" and lim["value"] == value]
    return int(limit)


def test_sequence_runs_can_never_take_the_run_slots_digests_need() -> None:
    config = _instance_config()
    runs = config["concurrency"]["runs"]
    sequence = _tag_limit(config, "sequence_step")
    digests = _tag_limit(config, "digest_hourly") + _tag_limit(config, "digest_send_for_user")
    notion = _tag_limit(config, "notion_sync")
    assert sequence + digests + notion <= runs["max_concurrent_runs"]
    assert sequence <= 2  # each run carries up to SEQUENCE_STEPS_PER_RUN steps


def test_sequence_steps_have_their_own_pool_and_come_last_in_the_queue() -> None:
    defs = make_definitions({"DATABASE_URL": "sqlite://"})
    sequence_job = defs.resolve_job_def("email_sequence_step_job")
    sequence_pools = {getattr(node, "pool", None) for node in sequence_job.graph.node_defs} - {None}
    assert sequence_pools == {"sequence_email"}
    for name in ("digest_hourly_job", "digest_send_for_user_job"):
        job = defs.resolve_job_def(name)
        digest_pools = {getattr(node, "pool", None) for node in job.graph.node_defs} - {None}
        assert digest_pools and not digest_pools & sequence_pools, name
        assert int(job.tags.get("dagster/priority", "0")) > int(sequence_job.tags["dagster/priority"])
    pools = _instance_config()["concurrency"]["pools"]
    # one hourly send and four first-digest sends fit in a digest pool at once
    assert pools["default_limit"] >= 1 + _tag_limit(_instance_config(), "digest_send_for_user")


def test_sequence_runs_opt_out_of_run_retries() -> None:
    job = make_definitions({"DATABASE_URL": "sqlite://"}).resolve_job_def("email_sequence_step_job")
    assert job.tags["dagster/max_retries"] == "0"
    assert _instance_config()["run_retries"]["enabled"] is True
