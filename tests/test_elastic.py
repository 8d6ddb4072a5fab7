"""An elastic worker group on a real two-node Ray cluster on 127.0.0.1: a `ray start --head` and a
second `ray start --address ...` node, one CPU each, started and stopped by their own PIDs. The
second node is killed mid-epoch (as a preempted spot node would vanish): the run continues on the
head's worker from the last checkpoint, then grows back when the node returns; one MLflow run
throughout, its `train/world_size` history recording 2, 1, 2. The nodes share no checkpoint folder:
the run keeps its checkpoints in an S3 store (moto's server over HTTP), as on a KubeRay cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from digits_data import digits_overrides
from processes import free_port, ray_head_processes, serve_s3, stop_processes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent
BUCKET = "st-scale"
# About 5 s each at 16 px (training, evaluation, a checkpoint in the bucket). Measured: the one worker
# left writes its first checkpoint at epoch 2, and the group has grown back three epochs later; 14
# leaves four times that for growing back on a loaded machine.
EPOCHS = 14


def _ours(marker: str):
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


class TwoNodes:
    """A head and a second node, each with 1 CPU; the second can be killed and started again."""

    def __init__(self):
        self.temp_dir = f"/tmp/stel{os.getpid()}"  # short: Ray's unix sockets have a path limit
        self.gcs = free_port()
        self.client_server = free_port()
        self.env = os.environ | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(24),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # st-scale keeps a local Ray on loopback with this at 0 (a single-node default); a second
            # node needs it on
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # a lost node is declared dead after 5 missed 1 s health checks (defaults: 3 s x 5)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "5",
            # after the loss, the elastic group asks for both workers again before the node is declared
            # dead, and falls back to what the cluster has once that request times out (default 60 s)
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
        }
        self.second_marker = None

    def _start(self, *options: str) -> None:
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--num-gpus=0", "--num-cpus=1"]
            + [f"--object-store-memory={256 * 2**20}", "--disable-usage-stats", *options],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, started.stdout + started.stderr

    def start_head(self) -> None:
        self._start(
            "--head",
            f"--port={self.gcs}",
            "--include-dashboard=false",
            f"--ray-client-server-port={self.client_server}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
        )

    def start_second(self) -> None:
        port = free_port()  # the node manager's port names the second node's raylet
        self.second_marker = f"--node_manager_port={port}"
        self._start(
            f"--address=127.0.0.1:{self.gcs}",
            f"--node-manager-port={port}",
            f"--dashboard-agent-listen-port={free_port()}",
        )
        assert _ours(self.second_marker), "the second node's raylet was not found"

    def kill_second(self) -> None:
        """SIGKILL the second node's raylet and everything below it (its workers): a node lost."""
        raylets = _ours(self.second_marker)
        everything = {p.pid: p for r in raylets for p in [r, *r.children(recursive=True)]}
        for p in everything.values():
            try:
                p.send_signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001  (gone already)
                pass

    def stop(self) -> None:
        head = ray_head_processes(self.temp_dir, self.client_server)
        stop_processes(head + (_ours(self.second_marker) if self.second_marker else []))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def s3(tmp_path):
    with serve_s3(tmp_path, buckets=(BUCKET,)) as server:
        yield server


@pytest.fixture
def two_nodes(s3):  # the nodes' processes carry the store's credentials
    nodes = TwoNodes()
    try:
        nodes.start_head()
        nodes.start_second()
        yield nodes
    finally:
        nodes.stop()


def _checkpoints(s3, prefix: str) -> list[tuple[int, int]]:
    """(epoch, world size) of every complete checkpoint of the run in the bucket, in the order they were
    written (Ray Train names a checkpoint folder by its time). An epoch may appear twice: a group that
    resumes from an earlier checkpoint than the last one written trains that epoch again."""
    keys = s3.keys(BUCKET, prefix)
    found = []
    for folder in sorted({key.split("/")[2] for key in keys if key.count("/") > 2 and "/checkpoint_" in key}):
        markers = [key for key in keys if key.startswith(f"{prefix}{folder}/COMMITTED.rank")]
        if markers and f"{prefix}{folder}/st_scale_config.json" in keys:
            stated = json.loads(s3.client().get_object(Bucket=BUCKET, Key=markers[0])["Body"].read())
            state = json.loads(
                s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}{folder}/train_state.json")["Body"].read()
            )
            if len(markers) == stated["world_size"]:
                found.append((state["epoch"], stated["world_size"]))
    return found


def test_an_elastic_run_continues_without_a_lost_node_and_grows_back(two_nodes, s3, digits_dir, tmp_path):
    """One of the suite's slowest tests (about 2 minutes), because it waits for what it checks: two node
    starts, a node declared dead after five missed 1 s health checks, a request for both workers timing
    out after 5 s, the worker group started three times, and EPOCHS epochs: the one worker left must
    still be training when the node has started again and a resize check has found it (about 25 s after
    the loss, here), or the run ends before the group grows back."""
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    prefix = "runs/elastic/"
    command = [
        str(BIN / "st-scale"),
        "train",
        "demo_st",
        "--summary-json",
        str(tmp_path / "summary.json"),
        *(part for override in digits_overrides(digits_dir) for part in ("--set", override)),
        *("--set", "scaling.num_workers=[1, 2]", "--set", "scaling.resize_check_s=5"),
        *(
            "--set",
            f"optimizer.epochs={EPOCHS}",
            "--set",
            "run.max_failures=3",
            "--set",
            f"run.checkpoints_to_keep={EPOCHS}",
        ),
        *("--set", "run.name=elastic", "--set", f"run.storage_path=s3://{BUCKET}/runs"),
        *("--set", f"run.storage_endpoint={s3.endpoint}"),
        *("--set", f"tracking.tracking_uri={store}", "--set", "tracking.system_metrics=false"),
        *("--set", "data.calibration_images=128", "--set", "eval.max_subnets=4"),
        # sub-networks evaluated at the end only, main net on re-estimated statistics only: short epochs
        *("--set", "eval.subnets_every=0", "--set", "eval.shared_stats=false"),
    ]
    env = two_nodes.env | {"RAY_ADDRESS": f"127.0.0.1:{two_nodes.gcs}"}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(
                lambda: driver.poll() is not None or any(w == 2 for _, w in _checkpoints(s3, prefix)),
                600,
                "the first checkpoint of two workers",
            )
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            two_nodes.kill_second()  # during the next epoch
            wait_for(
                lambda: driver.poll() is not None or any(w == 1 for _, w in _checkpoints(s3, prefix)),
                600,
                "a checkpoint of the one worker left",
            )
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            two_nodes.start_second()
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-4000:]

    written = _checkpoints(s3, prefix)
    worlds = [w for _, w in written]
    changes = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    assert changes == [2, 1, 2], f"(epoch, world size) of the checkpoints as written: {written}"
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("st-scale-demo").experiment_id])
    assert run.info.status == "FINISHED"
    history = [
        int(m.value)
        for m in sorted(client.get_metric_history(run.info.run_id, "train/world_size"), key=lambda m: m.step)
    ]
    assert [w for i, w in enumerate(history) if i == 0 or w != history[i - 1]] == [2, 1, 2], history
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)), "no metric step logged twice"
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["epochs"] == EPOCHS
