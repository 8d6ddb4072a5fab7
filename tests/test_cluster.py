"""A real cluster on 127.0.0.1: `ray start --head` with token auth set explicitly on both sides,
`ray job submit` of a training run that logs to a real `st-scale mlflow-server`, a sweep whose
driver is killed mid-trial and then resumed, and concurrent trials logging into a real PostgreSQL.
The head (and every server) is stopped by its own PIDs, never `ray stop`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from digits_data import digits_overrides
from processes import free_port, ray_head_processes, serve_mlflow, serve_postgres, stop_processes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray, st-scale: the same installation the cluster runs


@dataclass
class Head:
    address: str  # the GCS, for drivers (RAY_ADDRESS)
    dashboard: str  # the job server, for `ray job ...`
    env: dict  # token auth on, the token, loopback only


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = f"/tmp/strh{os.getpid()}"  # short: Ray's unix sockets have a path limit; unique: ours alone
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(24),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    gcs, dashboard, client_server = free_port(), free_port(), free_port()
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        f"--ray-client-server-port={client_server}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={512 * 2**20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert ray_head_processes(temp_dir, client_server), "no process of the head was found by its temp dir"
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    finally:
        stop_processes(ray_head_processes(temp_dir, client_server))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    with serve_mlflow(root / "mlflow.db", root / "artifacts") as server:
        yield server


def get_json(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def small_run_overrides(digits_dir) -> list[str]:
    return [
        *digits_overrides(digits_dir),
        "data.calibration_images=128",
        "eval.max_subnets=8",
        "tracking.system_metrics=false",
    ]


def submit_job(head: Head, submission: str, entrypoint: list[str], runtime_env: dict):
    """`ray job submit` (it waits for the job), and a function running `ray job <command>` on it."""
    ray = str(BIN / "ray")
    submitted = subprocess.run(
        [ray, "job", "submit", "--address", head.dashboard, "--submission-id", submission]
        + ["--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    def job(command: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [ray, "job", command, "--address", head.dashboard, submission],
            env=head.env | env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return submitted, job


def digits_tiny_tree(digits_dir, store: str) -> dict:
    """tune/digits_tiny.yaml on the session's digits files, logging to `store`."""
    tree = yaml.safe_load((ROOT / "tune" / "digits_tiny.yaml").read_text())
    fixed = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in small_run_overrides(digits_dir))}
    # Trials log their weights but no MLflow model: its export costs seconds a trial, and a sweep never reads it.
    tree["set"].update(fixed, **{"tracking.tracking_uri": store, "tracking.log_model": False})
    return tree


def sweep_spec(tmp_path, digits_dir, store: str) -> Path:
    """tune/digits_tiny.yaml with a learning-rate grid whose last point learns nothing in one epoch,
    so ASHA (one trial at a time: a fixed order) stops it at its first rung."""
    tree = digits_tiny_tree(digits_dir, store)
    tree.update(name="cluster-sweep", storage_path=str(tmp_path / "sweeps"), num_samples=1)
    tree["space"]["optimizer.lr"] = {"grid": [0.1, 0.05, 0.00001]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def sweep_to_the_end(head: Head, tree: dict, tmp_path: Path) -> dict:
    """`st-scale sweep` of the spec `tree` on the head; its summary, after checking that every trial
    completed."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tree, sort_keys=False))
    result = subprocess.run(
        [str(BIN / "st-scale"), "sweep", str(spec), "--summary-json", str(tmp_path / "summary.json")],
        env=head.env | {"RAY_ADDRESS": head.address},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "FINISHED"
    assert [r["outcome"] for r in summary["rows"]] == ["completed"] * tree["num_samples"]
    return summary


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
    """A driver killed once the first trial's first epoch reached Tune, then started again: the sweep resumes, ASHA
    stops the learning rate that learns nothing, one MLflow child per trial. Slow (over 2 minutes):
    three trials of up to two epochs, the first one started twice, under two sweep drivers. The middle
    trial stays: it gives the restarted scheduler a first-rung result to compare the last trial with."""
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
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    assert parent.data.tags["st_scale.commit"] == (head.stdout.strip() or "unknown")  # the study report names it
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


def model_based_search(tree: dict, algorithm: str, name: str, tmp_path: Path) -> dict:
    """`tree` as a sweep of two one-epoch trials whose search `algorithm` proposes the second from what
    it has seen (TPE after one random point); Optuna searches a flat space, HyperOpt digits_tiny's
    nested sampler family as it is."""
    tree["set"]["optimizer.epochs"] = 1
    if algorithm == "optuna":  # flat: the family's fields themselves
        tree["space"] = {"method.kl_weight": {"loguniform": [0.3, 3.0]}, "sampling.decay": {"uniform": [0.5, 1.0]}}
    tree.update(
        name=name,
        storage_path=str(tmp_path / "sweeps"),
        num_samples=2,
        scheduler={"name": "fifo"},
        search={"algorithm": algorithm, "initial_points": 1},
    )
    return tree


def check_model_based_search(client, summary: dict, sweep_dir: Path, algorithm: str) -> list:
    """The parent names the searcher, the two children drew different points inside the space, and the
    searcher's state Tune saves with the sweep (what a resume restores) holds both results. Returns
    the children."""
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.params["search.algorithm"] == algorithm
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    weights = sorted(float(c.data.params["method.kl_weight"]) for c in children)
    assert len(children) == 2 and all(0.3 <= w <= 3.0 for w in weights) and weights[0] != weights[1]
    assert all(0.5 <= float(c.data.params["sampling.decay"]) <= 1.0 for c in children)
    for child in children:  # tracking.log_model=false: the weights, no MLflow model
        assert "st_scale.final_model_uri" not in child.data.tags
        assert [a.path for a in client.list_artifacts(child.info.run_id, "model")] == ["model/cifar_resnet20.pt"]

    assert list(sweep_dir.glob("searcher-state-*.pkl")), sorted(p.name for p in sweep_dir.iterdir())
    if algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch()
        searcher.restore_from_dir(str(sweep_dir))
        observed = [t for t in searcher._hpopt_trials.trials if t["result"].get("status") == "ok"]
    else:
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch()
        searcher.restore_from_dir(str(sweep_dir))
        observed = [t for t in searcher._ot_study.trials if t.state.name == "COMPLETE"]
    assert len(observed) == 2, "the saved searcher holds both trials' results"
    return children


def test_hyperopt_searches_the_nested_sampler_family_and_keeps_its_state(ray_head, digits_dir, tmp_path):
    """Two one-epoch trials one after the other: the first drawn at random, the second proposed by TPE
    from it."""
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    tree = model_based_search(digits_tiny_tree(digits_dir, store), "hyperopt", "search-hyperopt", tmp_path)
    summary = sweep_to_the_end(ray_head, tree, tmp_path)
    check_model_based_search(mlflow.MlflowClient(store), summary, tmp_path / "sweeps" / "search-hyperopt", "hyperopt")


def test_concurrent_optuna_trials_log_to_mlflow_on_postgresql(ray_head, digits_dir, tmp_path):
    """Two Optuna trials at once (each 1 CPU of the 2) log through `st-scale mlflow-server` (2 workers)
    into a PostgreSQL database: both child runs and the parent end FINISHED, with their metrics, in the
    database itself; the searcher's saved state holds both results."""
    import mlflow
    import psycopg

    with serve_postgres(tmp_path) as database, serve_mlflow(database, tmp_path / "artifacts", workers=2) as server:
        tree = model_based_search(digits_tiny_tree(digits_dir, server.url), "optuna", "postgres-sweep", tmp_path)
        tree["set"]["scaling.num_workers"] = 1
        tree["trial"] = {"cpus": 0.5}
        summary = sweep_to_the_end(ray_head, tree, tmp_path)

        client = mlflow.MlflowClient(server.url)
        children = check_model_based_search(client, summary, tmp_path / "sweeps" / "postgres-sweep", "optuna")
        parent = client.get_run(summary["parent_run_id"])
        assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"] * 2
        assert all("val/subnets_mean_top1" in c.data.metrics for c in children)
        first, second = sorted(children, key=lambda c: c.info.start_time)
        assert second.info.start_time < first.info.end_time, "the two trials ran at the same time"
        with psycopg.connect(database, connect_timeout=10) as connection:
            stored = dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())
            logged = connection.execute(
                "SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)", ([c.info.run_id for c in children],)
            ).fetchone()[0]
        assert stored == {r.info.run_id: "FINISHED" for r in (parent, *children)}
        assert logged >= 2 * len(children[0].data.metrics)


def test_job_submit_runs_local_code_and_logs_to_the_mlflow_server(ray_head, mlflow_server, digits_dir, tmp_path):
    """The README's way to try local changes on a cluster whose image is older: `"working_dir": "."`
    and `python -m st_scale`. The copy submitted here carries a recipe the installed package lacks, so
    the job succeeds only if the driver and its workers run the uploaded code. The run logs to a real
    `st-scale mlflow-server` (MLFLOW_TRACKING_URI in the job's environment), whose REST API and UI list
    it; the job server refuses a client without the cluster's token."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    local = tmp_path / "checkout"
    for name in tracked.splitlines():
        source, target = ROOT / name, local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    (local / "st_scale" / "recipes" / "local_change_st.yaml").write_text(
        "# demo_st, as a local change not yet in any image\nbase: demo_st\ntracking:\n  run_name: local-change\n"
    )
    assert not (ROOT / "st_scale" / "recipes" / "local_change_st.yaml").exists()
    overrides = small_run_overrides(digits_dir) + [
        "optimizer.epochs=1",
        "run.name=job-local",
        f"run.storage_path={tmp_path}/runs",
    ]
    entrypoint = ["python", "-m", "st_scale", "train", "local_change_st", *(a for o in overrides for a in ("--set", o))]
    submission = f"st-scale-local-{secrets.token_hex(4)}"
    runtime_env = {"working_dir": str(local), "env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.url}}
    submitted, job = submit_job(ray_head, submission, entrypoint, runtime_env)
    logs = job("logs").stdout
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:] + logs[-4000:]
    status = job("status")
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr
    assert "| st | cifar_resnet20 |" in logs and "unknown recipe" not in logs and f"in {mlflow_server.url}" in logs

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
    assert run["info"]["status"] == "FINISHED" and tags["st_scale.run_name"] == "job-local"
    assert run["info"]["run_name"] == "local-change"  # the uploaded recipe's
    assert metrics["val/main_top1"] > 20 and "val/subnets_mean_top1" in metrics
    listed = get_json(f"{mlflow_server.url}/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
    assert {"config", "model", "subnets"} <= {f["path"] for f in listed["files"]}
    assert list(mlflow_server.artifacts.rglob("resolved.yaml")), "artifacts go to the server's artifact root"
    with urllib.request.urlopen(f"{mlflow_server.url}/", timeout=30) as page:
        html = page.read().decode()
    assert page.status == 200 and "<title>MLflow</title>" in html
