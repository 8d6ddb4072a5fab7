"""Processes the end-to-end tests start and stop by their own PIDs: free ports, bounded waits,
`st-scale mlflow-server` over a given store, PostgreSQL and an S3 server."""

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


def ray_head_processes(temp_dir: str, client_server_port: int) -> list:
    """A Ray head's processes: those with its --temp-dir in their command line, and its Ray client
    server, which has not (it is found by the head's --ray-client-server-port) and outlives the raylet
    that started it."""
    import psutil

    def ours(args: list[str]) -> bool:
        client_server = "ray.util.client.server" in args and f"--port={client_server_port}" in args
        return client_server or any(temp_dir in arg for arg in args)

    return [p for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])]


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


class S3Server:
    """moto's standalone S3 server on a loopback port, reached through a TCP relay (tests/tcp_relay.py)
    that `interrupt` kills and starts again: for that long the store refuses every connection, as a
    restarting store does, and keeps its objects (moto's are in memory: the server itself stays up)."""

    def __init__(self, root: Path):
        self.root = root
        self.server_port, self.port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(root / f"s3-{self.port}.log", "a")
        self.server: subprocess.Popen | None = None
        self.relay: subprocess.Popen | None = None

    def start(self) -> None:
        self.server = self._spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.server_port)])
        self._start_relay()

    def stop(self) -> None:
        for process in (self.relay, self.server):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)

    def cut(self) -> None:
        """From now on no connection reaches the store; those open are cut."""
        self.relay.kill()
        self.relay.wait(timeout=30)

    def restore(self) -> None:
        self._start_relay()

    def interrupt(self, down_s: float) -> None:
        self.cut()
        time.sleep(down_s)
        self.restore()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="st-scale-tests",
            aws_secret_access_key="st-scale-tests",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def _start_relay(self) -> None:
        relay = Path(__file__).with_name("tcp_relay.py")
        self.relay = self._spawn([sys.executable, str(relay), str(self.port), str(self.server_port)])
        wait_for(self._answers, 60, "the S3 server", interval_s=0.2)

    def _answers(self) -> bool:
        for process in (self.server, self.relay):
            if process.poll() is not None:
                pytest.fail(
                    f"the S3 server or its relay exited: {(self.root / f's3-{self.port}.log').read_text()[-3000:]}"
                )
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


@contextmanager
def serve_s3(root: Path, buckets: tuple[str, ...] = ("st-scale",)):
    """An S3-compatible server on 127.0.0.1 with `buckets` created, spoken to over HTTP like any S3
    store; the process environment holds the credentials it takes (any key does) while it runs."""
    credentials = {
        "AWS_ACCESS_KEY_ID": "st-scale-tests",
        "AWS_SECRET_ACCESS_KEY": "st-scale-tests",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on this machine
    }
    saved = {key: os.environ.get(key) for key in credentials}
    os.environ.update(credentials)
    server = S3Server(root)
    try:
        server.start()
        for bucket in buckets:
            server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()
        server.log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
