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
def serve_mlflow(store: Path | str, artifacts: Path, workers: int = 1):
    """`st-scale mlflow-server` on a free loopback port over `store` (a SQLite file or a database URI),
    healthy before it is handed out, stopped by its PID afterwards."""
    import psutil

    port = free_port()
    log_path = artifacts.parent / f"server-{port}.log"
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
            "--workers",
            str(workers),
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


@contextmanager
def serve_postgres(root: Path):
    """A PostgreSQL server from Debian's packages on a free loopback port, over a new data directory
    under `root`, trusting local connections; yields the URI of an empty `mlflow` database. Run as the
    `postgres` user when the tests run as root (PostgreSQL refuses root)."""
    import glob
    import shutil
    import tempfile

    import psutil
    import psycopg

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail("PostgreSQL is not installed: run `make postgres` (Debian's postgresql package)")
    bin_dir = Path(found[-1]).parent
    as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    # Not under pytest's root-only temp folder: the postgres user must reach its data directory.
    data = Path(tempfile.mkdtemp(prefix="st-pg-", dir=root if not as_postgres else None))
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
    initdb = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "st_scale", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        timeout=120,
        **as_postgres,
    )
    assert initdb.returncode == 0, initdb.stdout + initdb.stderr
    port = free_port()
    log = open(root / f"postgres-{port}.log", "w")
    server = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(data / "db"), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)],
        stdout=log,
        stderr=subprocess.STDOUT,
        **as_postgres,
    )

    def connect(database="postgres"):
        return psycopg.connect(host="127.0.0.1", port=port, user="st_scale", dbname=database, connect_timeout=5)

    def accepts():
        if server.poll() is not None:
            pytest.fail((root / f"postgres-{port}.log").read_text()[-3000:])
        try:
            connect().close()
            return True
        except psycopg.OperationalError:
            return False

    try:
        wait_for(accepts, 60, "PostgreSQL", interval_s=0.5)
        connection = connect()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://st_scale@127.0.0.1:{port}/mlflow"
    finally:
        stop_processes([psutil.Process(server.pid)] if server.poll() is None else [])
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)
