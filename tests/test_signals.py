"""Ctrl-C and SIGTERM end `st-scale train` within seconds, and everything it started with it: the
local Ray it launched, the Ray Train controller and the workers. Each case is a real training run in
a process of its own, stopped in its first epoch."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from digits_data import digits_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STARTED_WITHIN_S = 240  # Ray and two DeepSpeed workers on a loaded 2-core machine
STOPPED_WITHIN_S = 30  # the command exits: Ray Train aborts the run, Ray shuts down
GONE_WITHIN_S = 15  # after that, no process it started is left


def _train_until_its_first_steps(digits_dir, tmp_path) -> tuple[subprocess.Popen, list[str]]:
    command = [sys.executable, "-m", "st_scale", "train", "demo_st"]
    for override in (
        *digits_overrides(digits_dir),
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
        "run.name=stopped",
        "optimizer.epochs=50",
    ):
        command += ["--set", override]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + STARTED_WITHIN_S
    while "step/s" not in "".join(output[-5:]) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the progress bar moves: the workers are training
    assert process.poll() is None and "step/s" in "".join(output), "".join(output)
    return process, output


@pytest.mark.parametrize(
    "sent, code, named", [(signal.SIGINT, 130, "Ctrl-C (SIGINT)"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_a_signal_stops_the_run_and_everything_it_started(digits_dir, tmp_path, sent, code, named):
    process, output = _train_until_its_first_steps(digits_dir, tmp_path)
    started = psutil.Process(process.pid).children(recursive=True)
    names = {p.name() for p in started}
    assert {"raylet", "gcs_server", "ray::RayTrainWorker", "ray::TrainController.run"} <= names, names
    sent_at = time.monotonic()
    process.send_signal(sent)
    try:
        returned = process.wait(timeout=STOPPED_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"st-scale train still running {STOPPED_WITHIN_S} s after {named}")
    stopped_after = time.monotonic() - sent_at
    _, alive = psutil.wait_procs(started, timeout=GONE_WITHIN_S)
    for leftover in alive:  # clean up before failing: nothing outlives the test
        leftover.kill()
    printed = "".join(output)
    assert returned == code, printed
    assert not alive, f"still running {GONE_WITHIN_S} s after st-scale exited: {[p.name() for p in alive]}"
    assert f"run 'stopped' stopped by {named}; its workers were stopped" in printed, printed
    assert "resume from the last complete checkpoint in" in printed and "Traceback" not in printed, printed
    assert stopped_after < STOPPED_WITHIN_S
