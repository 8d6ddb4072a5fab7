"""A real cluster on 127.0.0.1: `ray start --head` with token auth set explicitly on both sides,
`ray job submit` of a training run that logs to a real `st-scale mlflow-server`, and a sweep whose
driver is killed mid-trial and then resumed. The head is stopped by its own PIDs, never `ray stop`."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray, st-scale: the same installation the cluster runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stop_processes(processes) -> None:
    """SIGTERM, then SIGKILL what is left: only the processes given (and found below them)."""
    import psutil

    everything = {}
    for p in processes:
        try:
            everything[p.pid] = p
            everything.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in everything.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(everything.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class Head:
    address: str  # the GCS, for drivers (RAY_ADDRESS)
    dashboard: str  # the job server, for `ray job ...`
    env: dict  # token auth on, the token, loopback only


@pytest.fixture(scope="module")
def ray_head():
    import psutil

    temp_dir = f"/tmp/strh{os.getpid()}"  # short: Ray's unix sockets have a path limit; unique: ours alone
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(24),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    gcs, dashboard = free_port(), free_port()
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={512 * 2**20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert ours, "no process of the head was found by its temp dir"
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        stop_processes(ours)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    url: str
    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    import psutil

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            str(BIN / "st-scale"),
            "mlflow-server",
            "--port",
            str(port),
            "--backend-store",
            str(root / "mlflow.db"),
            "--artifacts",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return process.poll() is not None and pytest.fail((root / "server.log").read_text()[-3000:])

    try:
        wait_for(healthy, 120, "the MLflow server")
        yield MlflowServer(url, root / "artifacts")
    finally:
        stop_processes([psutil.Process(process.pid)] if process.poll() is None else [])
        process.wait(timeout=30)
        log.close()


def get_json(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def digits_overrides(digits_dir) -> list[str]:
    return [
        f"data.train={digits_dir}/train.beton",
        f"data.val={digits_dir}/val.beton",
        "data.calibration_images=128",
        "eval.max_subnets=8",
        "tracking.system_metrics=false",
    ]


def test_job_submit_trains_and_logs_to_the_mlflow_server(ray_head, mlflow_server, digits_dir, tmp_path):
    submission = f"st-scale-test-{secrets.token_hex(4)}"
    overrides = digits_overrides(digits_dir) + [
        "optimizer.epochs=1",
        "run.name=job-st",
        f"run.storage_path={tmp_path}/runs",
    ]
    entrypoint = "st-scale train demo_st " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.url}}
    ray = str(BIN / "ray")
    submitted = subprocess.run(
        [
            ray,
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--submission-id",
            submission,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *shlex.split(entrypoint),
        ],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]

    def job(command: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [ray, "job", command, "--address", ray_head.dashboard, submission],
            env=ray_head.env | env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    status = job("status")
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr
    logs = job("logs").stdout
    assert "| st | cifar_resnet20 |" in logs and f"in {mlflow_server.url}" in logs

    # The same token is what lets the client in: without it the job server refuses.
    refused = job("status", RAY_AUTH_TOKEN="wrong-token")
    assert refused.returncode != 0 and "succeeded" not in refused.stdout + refused.stderr

    # The server's REST API and UI list the run the job logged.
    experiment = get_json(f"{mlflow_server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=st-scale-demo")
    runs = get_json(
        f"{mlflow_server.url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment["experiment"]["experiment_id"]]},
    )["runs"]
    assert len(runs) == 1
    run = runs[0]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert run["info"]["status"] == "FINISHED" and tags["st_scale.run_name"] == "job-st"
    assert metrics["val/main_top1"] > 20 and "val/subnets_mean_top1" in metrics
    listed = get_json(f"{mlflow_server.url}/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
    assert {"config", "model", "subnets"} <= {f["path"] for f in listed["files"]}
    assert list(mlflow_server.artifacts.rglob("resolved.yaml")), "artifacts go to the server's artifact root"
    with urllib.request.urlopen(f"{mlflow_server.url}/", timeout=30) as page:
        html = page.read().decode()
    assert page.status == 200 and "<title>MLflow</title>" in html


def sweep_spec(tmp_path, digits_dir, store: str) -> Path:
    """tune/digits_tiny.yaml with a learning-rate grid whose last point learns nothing in one epoch,
    so ASHA (one trial at a time: a fixed order) stops it at its first rung."""
    tree = yaml.safe_load((ROOT / "tune" / "digits_tiny.yaml").read_text())
    tree.update(name="cluster-sweep", storage_path=str(tmp_path / "sweeps"), num_samples=1)
    fixed = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in digits_overrides(digits_dir))}
    tree["set"].update(fixed, **{"tracking.tracking_uri": store})
    tree["space"]["optimizer.lr"] = {"grid": [0.1, 0.05, 0.00001]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_sweep_too_big_for_the_cluster_fails_before_any_trial(ray_head, digits_dir, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    spec = sweep_spec(tmp_path, digits_dir, store)
    result = subprocess.run(
        [str(BIN / "st-scale"), "sweep", str(spec), "--set", "trial.cpus=2"],
        env=ray_head.env | {"RAY_ADDRESS": ray_head.address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "a trial needs trial.cpus=2 + scaling.num_workers=2 x scaling.cpus_per_worker=0.5 = 3 CPUs but the Ray "
        "cluster has 2"
    ) in result.stderr
    assert not (tmp_path / "sweeps" / "cluster-sweep").exists()


def test_sweep_resumes_after_its_driver_dies(ray_head, digits_dir, tmp_path):
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    spec = sweep_spec(tmp_path, digits_dir, store)
    sweep_dir = tmp_path / "sweeps" / "cluster-sweep"
    command = [str(BIN / "st-scale"), "sweep", str(spec), "--summary-json", str(tmp_path / "summary.json")]
    env = ray_head.env | {"RAY_ADDRESS": ray_head.address}
    with open(tmp_path / "first_driver.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(
                lambda: (
                    first.poll() is not None or any(p.stat().st_size for p in sweep_dir.glob("trial_*/result.json"))
                ),
                420,
                "the first trial's first epoch to reach Tune",
            )
            assert first.poll() is None, (tmp_path / "first_driver.log").read_text()[-3000:]
        finally:
            first.send_signal(signal.SIGKILL)  # the driver dies; the cluster lives on
            first.wait(timeout=30)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed"] and summary["status"] == "FINISHED"
    assert "resuming" in second.stderr

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("st-scale-demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("st_scale.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == summary["parent_run_id"]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 4 and len(children) == 3, "one parent and one child per trial: no duplicates"
    assert len({c.data.tags["st_scale.trial_id"] for c in children}) == 3

    by_lr = {float(c.data.params["optimizer.lr"]): c for c in children}
    status_of = {"completed": "FINISHED", "stopped early": "KILLED"}
    for child in children:  # each child ends with the status its trial earned
        assert child.info.status == status_of[child.data.tags["st_scale.trial_outcome"]]
    assert by_lr[0.00001].data.tags["st_scale.trial_outcome"] == "stopped early"  # ASHA, at its first rung
    assert by_lr[0.1].data.tags["st_scale.trial_outcome"] == "completed"
    # (lr 0.05 is compared with whatever the restarted scheduler has seen of lr 0.1: either outcome is right)
    # The trial interrupted with its driver resumed from its checkpoint, in the same child run.
    history = client.get_metric_history(by_lr[0.1].info.run_id, "val/main_top1")
    assert sorted(m.step for m in history) == [22, 44]
    assert all("sweep/objective" in c.data.metrics for c in children)

    assert parent.info.status == "FINISHED"
    best = max((r for r in summary["rows"] if r["outcome"] == "completed"), key=lambda r: r["objective"])
    assert parent.data.tags["st_scale.best_trial_id"] == best["trial_id"]
    assert parent.data.tags["st_scale.best_run_id"] == best["run_id"]
    assert parent.data.metrics["best/objective"] == pytest.approx(best["objective"])
    assert parent.data.params["objective"] == "0.5*val/main_top1 + 0.5*val/subnets_mean_top1"
    artifacts = {a.path for folder in ("sweep", "plots") for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {
        "sweep/spec.yaml",
        "sweep/search_space.yaml",
        "sweep/trials.csv",
        "sweep/best_config.yaml",
        "sweep/best_trial.json",
        "plots/objective_vs_search_space.png",
    } <= artifacts
