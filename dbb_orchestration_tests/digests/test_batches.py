"""The hourly job's fan-out: keyset ranges, mapping keys, summed counts, the multiprocess executor on
Postgres (same digests and emails as in process) and re-execution of one failed batch step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from dbb_orchestration.config import SettingsError, digest_executor_kind
from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.definitions import make_definitions
from dbb_orchestration.digests.batches import (
    add_counts,
    range_from_key,
    range_key,
    ranges_from_cuts,
    user_ranges,
)
from dbb_orchestration.digests.defs import BATCH_OP, PLAN_OP, SUMMARY_OP
from dbb_orchestration.testing import FakeResend
from dbb_orchestration_tests.conftest import BACKEND_DDL, PostgresDatabases
from dbb_orchestration_tests.digests.test_defs import env, query, seed, user_with_notes

PARTITION = "2026-02-08-08:00"
USERS = ["u-01", "u-02", "u-03", "u-04", "u-05", "u-06", "u-07"]  # u-07 has another send hour


def hourly_job(overrides: dict[str, str] | None = None) -> dg.JobDefinition:
    """Module level, so Dagster can rebuild the job in other processes: settings from ``overrides`` (the
    job's reconstruction arguments) over the environment."""
    return make_definitions(overrides).resolve_job_def("digest_hourly_job")


def reconstructable_hourly_job(overrides: dict[str, str]) -> dg.ReconstructableJob:
    """The job for the multiprocess executor with its settings carried by the reconstruction arguments,
    not ``os.environ``: the step processes are forked from a forkserver that keeps the environment of
    the first run of this (test) process, another test's database."""
    return dg.build_reconstructable_job(
        __name__, "hourly_job", reconstructable_kwargs={"overrides": overrides}
    )


def hourly_job_without_retries() -> dg.JobDefinition:
    """The same graph, executor and resources without the job's retry policy (whose delays are minutes)."""
    job = hourly_job()
    return job.graph.to_job(
        name=job.name,
        resource_defs=job.resource_defs,
        executor_def=job.executor_def,
        partitions_def=job.partitions_def,
        tags=job.tags,
    )


def _world(conn: sa.Connection) -> None:
    for uid in USERS:
        user_with_notes(conn, uid, hour=9 if uid == "u-07" else 8)


def _set_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


# ------------------------------------------------------------------------------------ pure parts


def test_ranges_cover_every_id_once_and_keys_carry_them() -> None:
    assert ranges_from_cuts([]) == [(None, None)]
    ranges = ranges_from_cuts(["b", "d"])
    assert ranges == [(None, "b"), ("b", "d"), ("d", None)]
    for index, user_range in enumerate(ranges):
        key = range_key(index, user_range)
        assert key.replace("_", "").isalnum()
        assert range_from_key(key) == user_range
    odd = ("user-ü 1/é", "z" * 40)
    assert range_from_key(range_key(3, odd)) == odd
    for bad in (None, "", "b1", "x_00_00", "b00001_zz_00"):
        with pytest.raises(ValueError):
            range_from_key(bad)


def test_counts_add_up_numbers_and_dicts_and_keep_agreeing_values() -> None:
    total = add_counts(
        [
            {"logical_time": "t", "sent": 2, "by": {"a": 1}, "ids": [1], "dry_run": False, "odd": "x"},
            {
                "logical_time": "t",
                "sent": 3,
                "by": {"a": 1, "b": 2},
                "ids": [2],
                "dry_run": False,
                "odd": "y",
            },
        ]
    )
    assert total == {"logical_time": "t", "sent": 5, "by": {"a": 2, "b": 2}, "ids": [1, 2], "dry_run": False}
    assert add_counts([]) == {}


def test_multiprocess_steps_start_from_a_forkserver_unless_the_run_says_otherwise() -> None:
    job = make_definitions().resolve_job_def("digest_hourly_job")

    def resolved(execution: dict[str, Any] | None) -> dict[str, Any]:
        run_config = {} if execution is None else {"execution": {"config": execution}}
        return dict(dg.validate_run_config(job, run_config)["execution"]["multi_or_in_process_executor"])

    forkserver = {"forkserver": {"preload_modules": ["dbb_orchestration.definitions"]}}
    assert resolved(None)["multiprocess"]["start_method"] == forkserver
    with_workers = resolved({"multiprocess": {"max_concurrent": 2}})["multiprocess"]
    assert with_workers["start_method"] == forkserver and with_workers["max_concurrent"] == 2
    spawn = resolved({"multiprocess": {"start_method": {"spawn": {}}}})["multiprocess"]
    assert spawn["start_method"] == {"spawn": {}}
    assert "multiprocess" not in resolved({"in_process": {}})


def test_executor_setting() -> None:
    assert digest_executor_kind({}) == "multiprocess"
    assert digest_executor_kind({"DIGEST_EXECUTOR": "k8s"}) == "k8s"
    with pytest.raises(SettingsError, match="DIGEST_EXECUTOR"):
        digest_executor_kind({"DIGEST_EXECUTOR": "threads"})


@pytest.mark.parametrize("per_step", [1, 2, 3, 7, 100])
def test_user_ranges_split_the_table_without_gaps(per_step: int, db_url: str) -> None:
    seed(db_url, _world)
    engine = create_db_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        ranges = user_ranges(conn, per_step)
    engine.dispose()
    members = [[u for u in USERS if (lo is None or u > lo) and (hi is None or u <= hi)] for lo, hi in ranges]
    assert sorted(u for m in members for u in m) == USERS  # every user in exactly one range
    assert all(m for m in members)  # none empty
    assert [len(m) for m in members[:-1]] == [per_step] * (len(members) - 1)
    assert len(ranges) == -(-len(USERS) // per_step)


# ------------------------------------------------------------------------------------- through Dagster


def _digests(url: str) -> list[tuple[Any, ...]]:
    d, i, doc = t.note_digests, t.note_digest_items, t.documents
    digests = query(url, sa.select(d.c.id, d.c.user_id, d.c.status, d.c.scheduled_for, d.c.sent_at))
    items = query(
        url,
        sa.select(i.c.note_digest_id, doc.c.external_id, i.c.position).join(doc, doc.c.id == i.c.document_id),
    )
    by_digest: dict[int, list[tuple[str, int]]] = {}
    for item in items:
        by_digest.setdefault(item.note_digest_id, []).append((item.external_id, item.position))
    return sorted(
        (r.user_id, r.status, r.scheduled_for, r.sent_at, tuple(sorted(by_digest.get(r.id, []))))
        for r in digests
    )


def _emails(fake: FakeResend) -> list[tuple[str, str]]:
    return sorted((e.to[0], e.subject) for e in fake.sent)


@pytest.mark.postgres
def test_multiprocess_run_makes_the_same_digests_and_emails_as_in_process(
    postgres_databases: PostgresDatabases, tmp_path: Path
) -> None:
    outcomes = []
    for execution in ({"in_process": {}}, {"multiprocess": {"max_concurrent": 2}}):
        url = postgres_databases.create(ddl=BACKEND_DDL.read_text())
        seed(url, _world)
        fake = FakeResend()
        fake.start()
        try:
            settings = {**env(url, fake), "DIGEST_USERS_PER_STEP": "2"}
            home = tmp_path / next(iter(execution))
            home.mkdir()
            with (
                dg.instance_for_test(temp_dir=str(home)) as instance,
                dg.execute_job(
                    reconstructable_hourly_job(settings),
                    instance=instance,
                    run_config={"execution": {"config": execution}},
                    tags={"dagster/partition": PARTITION},
                ) as result,
            ):
                assert result.success
                batches = sorted(e.step_key for e in result.all_events if e.is_step_success)
                pids = {e.pid for e in result.all_events if e.is_step_start}
                generated = result.output_for_node(SUMMARY_OP, "generated")
                sent = result.output_for_node(SUMMARY_OP, "sent")
                summary = {
                    e.step_output_data.output_name: {
                        k: v.value for k, v in e.step_output_data.metadata.items()
                    }
                    for e in result.all_events
                    if e.is_successful_output and e.step_key == SUMMARY_OP and e.step_output_data
                }
            # every user was considered by exactly one batch step, for generating and for sending
            assert summary["generated"]["users_considered"] == 7 and summary["sent"]["users_considered"] == 7
            assert summary["generated"]["batch_steps"] == 4
            outcomes.append((_digests(url), _emails(fake), generated, sent))
        finally:
            fake.stop()
        assert len([k for k in batches if k.startswith(BATCH_OP)]) == 4  # 7 users, 2 per step
        if "multiprocess" in execution:
            assert len(pids) > 1  # the steps ran in child processes
    (in_process, multiprocess) = outcomes
    assert in_process == multiprocess
    digests, emails, generated, sent = in_process
    assert generated == 7 and sent == 6 and len(emails) == 6
    assert [d[1] for d in digests].count("sent") == 6


@pytest.mark.postgres
def test_reexecution_from_failure_reruns_only_the_failed_batch(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(postgres_url, _world)
    fake = FakeResend()
    fake.start()
    try:
        _set_env(
            monkeypatch,
            {**env(postgres_url, fake), "DIGEST_USERS_PER_STEP": "2", "EMAIL_MAX_RETRIES": "0"},
        )
        fake.fail_next(500, count=1, name="internal_server_error", message="boom")  # one batch's request
        job = dg.reconstructable(hourly_job_without_retries)
        config = {"execution": {"config": {"in_process": {}}}}
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            with dg.execute_job(
                job,
                instance=instance,
                run_config=config,
                tags={"dagster/partition": PARTITION},
                raise_on_error=False,
            ) as first:
                assert not first.success
                [failed] = [e.step_key for e in first.all_events if e.is_step_failure]
                succeeded = {e.step_key for e in first.all_events if e.is_step_success}
            assert failed.startswith(BATCH_OP) and len(succeeded - {PLAN_OP}) == 3
            assert len(fake.sent) == 4  # the failed batch's 2 users got nothing
            requests_before = len(fake.requests)

            options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
            with dg.execute_job(
                job,
                instance=instance,
                reexecution_options=options,
                run_config=config,
                tags={"dagster/partition": PARTITION},  # the UI copies the parent's tags; this API does not
            ) as second:
                assert second.success
                ran = sorted({e.step_key for e in second.all_events if e.is_step_success})
                generated = second.output_for_node(SUMMARY_OP, "generated")
                sent = second.output_for_node(SUMMARY_OP, "sent")
    finally:
        fake.stop()
    assert ran == sorted([failed, SUMMARY_OP])  # the plan and the other batches came from the first run
    assert len(fake.requests) - requests_before == 1  # one batch request for the failed range only
    assert len(_emails(fake)) == 6 and len({e[0] for e in _emails(fake)}) == 6  # each once
    # the summary adds the first run's three good batches (2 + 2 + 1 rows: u-07 is not due, but never
    # sent) to the rerun batch, whose 2 digests the failed attempt had already made and committed
    assert generated == 5
    assert sent == 6  # 4 sent by the first run's batches + 2 by the rerun
    statuses = [d[1] for d in _digests(postgres_url)]
    assert statuses.count("sent") == 6 and statuses.count("scheduled") == 1
