"""What cannot run here (Kubernetes, Docker) is validated here: files parse and names match the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from dbb_orchestration.config import Settings

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())
SECRET = yaml.safe_load((ROOT / "deploy" / "secret.example.yaml").read_text())
INSTANCE = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
K8S_RUN_CONFIG = yaml.safe_load((ROOT / "deploy" / "digest_hourly_k8s.yaml").read_text())


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers every variable the settings object asks for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.asked.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def settings_variables() -> set[str]:
    env = RecordingEnv({"DATABASE_URL": "sqlite:///x.sqlite"})
    Settings.from_env(env)
    return env.asked


def _docker_cmd() -> list[str]:
    line = next(x for x in (ROOT / "Dockerfile").read_text().splitlines() if x.startswith("CMD "))
    return list(json.loads(line[4:]))


def test_secret_names_are_settings_the_code_reads() -> None:
    read = settings_variables()
    assert {"DATABASE_URL", "RESEND_API_KEY", "CONTENT_ENCRYPTION_KEY", "CONTENT_ENCRYPTION_KEY_V10"} <= read
    unknown = set(SECRET["stringData"]) - read
    assert unknown == set(), f"secret.example.yaml sets variables the code never reads: {unknown}"


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = {
        name
        for name in settings_variables()
        if not re.match(r"CONTENT_ENCRYPTION_KEY_V\d+$", name) and name not in readme
    }
    assert missing == set()


def test_user_deployment_points_at_the_definitions_module_and_secret() -> None:
    [deployment] = VALUES["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == "dbb_orchestration.definitions"
    assert deployment["port"] == 3030
    secret = SECRET["metadata"]["name"]
    assert {"name": secret} in deployment["envSecrets"]
    assert {"name": secret} in VALUES["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    assert VALUES["runLauncher"]["type"] == "K8sRunLauncher"


def test_k8s_executor_is_named_and_its_run_config_fits_the_job() -> None:
    """The user deployment selects the K8s job executor for the hourly digest job; loaded that way (in a
    fresh interpreter: the executor is chosen when the definitions load) the job's executor is
    dagster-k8s's, and deploy/digest_hourly_k8s.yaml validates against the job's run config schema."""
    [deployment] = VALUES["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["DIGEST_EXECUTOR"] == "k8s"
    assert int(env["DIGEST_USERS_PER_STEP"]) >= 1
    requests = VALUES["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"][
        "resources"
    ]
    assert {"cpu", "memory"} <= set(requests["requests"])  # inherited by the batch step pods
    step = K8S_RUN_CONFIG["execution"]["config"]["per_step_k8s_config"]["digest_batch"]
    assert {"cpu", "memory"} <= set(step["container_config"]["resources"]["requests"])
    script = (
        "import json, sys, dagster as dg\n"
        "from dbb_orchestration.definitions import make_definitions\n"
        "job = make_definitions().resolve_job_def('digest_hourly_job')\n"
        "config = json.loads(sys.argv[1])\n"
        "result = dg.validate_run_config(job, config)\n"
        "print(json.dumps({'executor': job.executor_def.name, 'ok': bool(result)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(K8S_RUN_CONFIG)],
        env={**os.environ, **env, "DATABASE_URL": "sqlite:///unused.sqlite"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"executor": "k8s", "ok": True}
    # a misspelt field is rejected, so the check above is a real validation
    bad = {"execution": {"config": {"max_concurrnt": 4}}}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(bad)],
        env={**os.environ, **env, "DATABASE_URL": "sqlite:///unused.sqlite"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "max_concurrnt" in proc.stderr


def test_helm_and_dagster_yaml_agree_on_run_limits() -> None:
    helm = VALUES["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    ours = INSTANCE["concurrency"]["runs"]
    assert helm["tagConcurrencyLimits"] == ours["tag_concurrency_limits"]
    assert helm["maxConcurrentRuns"] == ours["max_concurrent_runs"]


def test_helm_matches_dagster_yaml_on_pools_monitoring_retries_and_threads() -> None:
    daemon = VALUES["dagsterDaemon"]
    assert VALUES["concurrency"]["pools"]["defaultLimit"] == INSTANCE["concurrency"]["pools"]["default_limit"]
    monitoring = INSTANCE["run_monitoring"]
    assert daemon["runMonitoring"] == {
        "enabled": monitoring["enabled"],
        "startTimeoutSeconds": monitoring["start_timeout_seconds"],
        "cancelTimeoutSeconds": monitoring["cancel_timeout_seconds"],
        "pollIntervalSeconds": monitoring["poll_interval_seconds"],
        "maxResumeRunAttempts": monitoring["max_resume_run_attempts"],
    }
    retries = INSTANCE["run_retries"]
    assert daemon["runRetries"] == {
        "enabled": retries["enabled"],
        "maxRetries": retries["max_retries"],
        "retryOnAssetOrOpFailure": retries["retry_on_asset_or_op_failure"],
    }
    for kind in ("sensors", "schedules"):
        assert daemon[kind] == {
            "useThreads": INSTANCE[kind]["use_threads"],
            "numWorkers": INSTANCE[kind]["num_workers"],
        }


def test_helm_matches_dagster_yaml_on_tick_retention() -> None:
    retention = VALUES["retention"]
    assert retention["enabled"] is True
    assert retention["schedule"]["purgeAfterDays"] == INSTANCE["retention"]["schedule"]["purge_after_days"]
    assert retention["sensor"]["purgeAfterDays"] == INSTANCE["retention"]["sensor"]["purge_after_days"]


def test_docker_cmd_is_dagster_api_grpc_on_the_chart_port() -> None:
    cmd = _docker_cmd()
    assert cmd[:3] == ["dagster", "api", "grpc"]
    assert cmd[cmd.index("-p") + 1] == "3030"
    assert cmd[cmd.index("-m") + 1] == "dbb_orchestration.definitions"


def test_image_carries_the_production_instance_config_where_dagster_reads_it() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    env = next(x for x in lines if "DAGSTER_HOME=" in x)
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in env
    copies = [x.split()[1:] for x in lines if x.startswith("COPY ")]
    assert ["deploy/dagster.yaml", "${DAGSTER_HOME}/dagster.yaml"] in copies
    # the local instance file (SQLite storage) must not ride along where nothing reads it
    assert not any(
        "dagster.yaml" in src for copy in copies for src in copy[:-1] if src != "deploy/dagster.yaml"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_docker_cmd_serves_the_code_location(tmp_path: Path) -> None:
    """Run the image's command (on loopback) and ask the gRPC server for its health."""
    port = _free_port()
    cmd = _docker_cmd()
    cmd[cmd.index("-h") + 1] = "127.0.0.1"
    cmd[cmd.index("-p") + 1] = str(port)
    dagster = str(Path(sys.executable).with_name("dagster"))
    env = {"DAGSTER_HOME": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.Popen([dagster, *cmd[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            check = subprocess.run(
                [dagster, "api", "grpc-health-check", "-p", str(port)],
                env=env,
                capture_output=True,
                text=True,
            )
            if check.returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "server exited"
            assert time.monotonic() < deadline, "gRPC server did not become healthy in 60 s"
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _default_signals() -> None:
    """Child processes start with SIGTERM/SIGINT handled normally, even under a runner that ignores them."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_dagster_dev_serves_the_location_from_a_clean_checkout(tmp_path: Path) -> None:
    """`dagster dev` in the repository root with no DAGSTER_HOME and no DAGSTER_PG_* variables: the
    root dagster.yaml (local storage) is used, the webserver answers and the location loads."""
    port = _free_port()
    homes_before = set(ROOT.glob(".tmp_dagster_home_*"))
    dagster = str(Path(sys.executable).with_name("dagster"))
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    log = (tmp_path / "dagster-dev.log").open("wb")
    proc = subprocess.Popen(
        [dagster, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_default_signals,
    )
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    try:
        deadline = time.monotonic() + 120
        entries: list[dict[str, str]] = []
        while True:
            assert proc.poll() is None, (tmp_path / "dagster-dev.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=json.dumps({"query": query}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dagster dev did not serve the location in 120 s"
            time.sleep(1)
        assert entries == [{"name": "dbb_orchestration", "loadStatus": "LOADED"}]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        for leftover in set(ROOT.glob(".tmp_dagster_home_*")) - homes_before:  # only if not cleaned up
            shutil.rmtree(leftover, ignore_errors=True)
