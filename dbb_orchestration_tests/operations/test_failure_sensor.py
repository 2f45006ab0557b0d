"""The run-failure sensor records failed runs without PII and reports them to Sentry when configured."""

from __future__ import annotations

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from dbb_orchestration.operations.failure_sensor import (
    FAILURE_TAG,
    failure_record,
    outside_failure_cause,
    run_failure_alert_sensor,
    scrub,
)
from dbb_orchestration.resources import SettingsResource


@dg.op
def explode() -> None:
    raise RuntimeError("could not send to ada@example.com with key re_secretvalue123")


@dg.job(tags={"dbb/job": "test"})
def exploding_job() -> None:
    explode()


class _SentryIngest:
    """A loopback Sentry ingest endpoint that keeps every envelope it receives."""

    def __init__(self) -> None:
        self.envelopes: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                outer.envelopes.append(body.decode("utf-8", "replace"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _SentryIngest:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/42"


def _failed_run_context(instance: dg.DagsterInstance) -> dg.RunFailureSensorContext:
    result = exploding_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    assert run is not None
    failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    return dg.build_run_status_sensor_context(
        sensor_name=run_failure_alert_sensor.name,
        dagster_instance=instance,
        dagster_run=run,
        dagster_event=failure,
    ).for_run_failure()


def test_scrub_removes_emails_and_tokens() -> None:
    text = scrub("to ada@example.com, key re_abcdef123456, Bearer ntn_xyz   and\nmore")
    assert text == "to [email], key [redacted], [redacted] and more"
    assert len(scrub("x" * 2000)) == 500


def test_failed_run_is_recorded_without_pii(tmp_path) -> None:
    with dg.instance_for_test() as instance:
        context = _failed_run_context(instance)
        settings = SettingsResource.from_environment({"DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite"})
        run_failure_alert_sensor(context, settings=settings)
        run = instance.get_run_by_id(context.dagster_run.run_id)
        assert run is not None
        summary = run.tags[FAILURE_TAG]
        assert "explode: RuntimeError: could not send to [email] with key [redacted]" in summary
        assert "ada@example.com" not in summary and "re_secretvalue123" not in summary


def test_failed_run_goes_to_sentry_when_dsn_set(tmp_path) -> None:
    pytest.importorskip("sentry_sdk")
    with _SentryIngest() as ingest, dg.instance_for_test() as instance:
        context = _failed_run_context(instance)
        settings = SettingsResource.from_environment(
            {"DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite", "SENTRY_DSN": ingest.dsn}
        )
        run_failure_alert_sensor(context, settings=settings)
        assert ingest.envelopes, "Sentry received nothing"
        envelope = "\n".join(ingest.envelopes)
        assert "Dagster run failed: exploding_job" in envelope
        assert context.dagster_run.run_id in envelope
        assert "ada@example.com" not in envelope and "re_secretvalue123" not in envelope
        items = [json.loads(line) for line in envelope.splitlines() if line.startswith("{")]
        assert any(i.get("tags", {}).get("job") == "exploding_job" for i in items)


class StepSendFailed(Exception):
    pass


@dg.op
def send_with_chained_causes() -> None:
    try:
        try:
            raise ConnectionError("socket reset by peer at 10.0.0.7")
        except ConnectionError as exc:
            raise ValueError("provider answered 503 for ada@example.com") from exc
    except ValueError as exc:
        raise StepSendFailed("3 of 10 digests failed to send; they stay pending") from exc


@dg.job(tags={"dbb/job": "test"})
def chained_job() -> None:
    send_with_chained_causes()


def _record_for(instance: dg.DagsterInstance, run: dg.DagsterRun, failure: dg.DagsterEvent) -> str:
    context = dg.build_run_status_sensor_context(
        sensor_name=run_failure_alert_sensor.name,
        dagster_instance=instance,
        dagster_run=run,
        dagster_event=failure,
    ).for_run_failure()
    return failure_record(context).error


def test_op_failure_keeps_the_top_level_message_not_the_innermost_cause() -> None:
    with dg.instance_for_test() as instance:
        result = chained_job.execute_in_process(instance=instance, raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
        error = _record_for(instance, run, failure)
    assert error == (
        "send_with_chained_causes: StepSendFailed: 3 of 10 digests failed to send; they stay pending"
    )


def test_killed_run_carries_the_signal_from_the_engine_event() -> None:
    """The gRPC server reports a dead run worker exactly like this: an engine event with the exit
    explanation, then a generic run failure."""
    from dagster._utils import get_run_crash_explanation

    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(job_def=exploding_job)
        instance.report_engine_event("Started process for run (pid: 4242).", run)
        instance.report_engine_event(
            get_run_crash_explanation(prefix=f"Run execution process for {run.run_id}", exit_code=-9), run
        )
        failure = instance.report_run_failed(run)
        error = _record_for(instance, run, failure)
    assert error.startswith(f"Run execution process for {run.run_id} was terminated by signal 9 (SIGKILL).")
    assert error.endswith("(marked as failed from outside the execution context)")


def test_run_monitoring_verdict_is_kept_as_the_cause() -> None:
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(job_def=exploding_job)
        verdict = (
            f"Detected run worker status WorkerStatus.FAILED: 'pod dbb-run-1 OOMKilled'. Marking run {run.run_id} "
            "as failed."
        )
        failure = instance.report_run_failed(run, verdict)
        assert _record_for(instance, run, failure) == verdict


def test_run_level_error_is_reported_by_its_top_level_message() -> None:
    from dagster._core.events import JobFailureData
    from dagster._utils.error import serializable_error_info_from_exc_info

    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(job_def=exploding_job)
        try:
            try:
                raise OSError("disk full at /var/lib")
            except OSError as exc:
                raise RuntimeError("could not start the run worker for ada@example.com") from exc
        except RuntimeError:
            error = serializable_error_info_from_exc_info(sys.exc_info())
        failure = instance.report_run_failed(
            run, "Execution of run failed.", JobFailureData(error=error, failure_reason=None)
        )
        assert (
            _record_for(instance, run, failure) == "RuntimeError: could not start the run worker for [email]"
        )


def test_outside_failure_without_any_cause_says_so() -> None:
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(job_def=exploding_job)
        instance.report_engine_event("Started process for run (pid: 1).", run)
        failure = instance.report_run_failed(run)
        assert _record_for(instance, run, failure) == (
            "This run has been marked as failed from outside the execution context."
        )


def test_outside_failure_cause_is_scrubbed() -> None:
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(job_def=exploding_job)
        instance.report_engine_event("Run worker for ada@example.com exited with exit code 137", run)
        failure = instance.report_run_failed(run)
        error = _record_for(instance, run, failure)
    assert "ada@example.com" not in error and "[email]" in error and "exit code 137" in error


@pytest.mark.parametrize(
    ("failure", "engine", "expected"),
    [
        ("Exceeded maximum runtime of 3600 seconds.", [], "Exceeded maximum runtime of 3600 seconds."),
        (None, ["Run worker exited with code 1"], "Run worker exited with code 1"),
        ("", [], "run failed"),
        (
            "This run has been marked as failed from outside the execution context.",
            ["Process exited with code -15", "Launching run in a new process"],
            "Process exited with code -15 (marked as failed from outside the execution context)",
        ),
    ],
)
def test_outside_failure_cause_rules(failure: str | None, engine: list[str], expected: str) -> None:
    assert outside_failure_cause(failure, engine) == expected
