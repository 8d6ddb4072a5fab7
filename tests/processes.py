"""Processes the end-to-end tests start and stop by their own PIDs: free ports, bounded waits, and
`st-scale mlflow-server` over a given store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # ray, st-scale: the same installation the tests run


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
class MlflowServer:
    url: str
    artifacts: Path


@contextmanager
def serve_mlflow(store: Path, artifacts: Path):
    """`st-scale mlflow-server` on a free loopback port over the SQLite file `store`, healthy before
    it is handed out, stopped by its PID afterwards."""
    import psutil

    port = free_port()
    log_path = store.parent / f"server-{port}.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [
            str(BIN / "st-scale"),
            "mlflow-server",
            "--port",
            str(port),
            "--backend-store",
            str(store),
            "--artifacts",
            str(artifacts),
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
            return process.poll() is not None and pytest.fail(log_path.read_text()[-3000:])

    try:
        wait_for(healthy, 120, "the MLflow server")
        yield MlflowServer(url, artifacts)
    finally:
        stop_processes([psutil.Process(process.pid)] if process.poll() is None else [])
        process.wait(timeout=30)
        log.close()
