"""MLflow: one run per training run, logged by rank 0 only.

A resumed or restarted run logs into the same MLflow run (its id travels in the checkpoint; a run
restarted before its first checkpoint is found by its `st_scale.run_key` tag), and points at or
below the last step already logged for a metric are skipped, so steps replayed after a restart from
a checkpoint are never duplicated.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError

DEFAULT_STORE = "mlflow.db"
RUN_KEY_TAG = "st_scale.run_key"  # storage_path/run.name: one MLflow run per Ray Train run


SQLITE = "sqlite:///"


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `st-scale mlflow-server` serves by default


def training_view_url(server: str, experiment_id: str | None = None) -> str:
    """The MLflow 3 UI page of an experiment's runs (or of all experiments), in its model-training view.
    The UI picks GenAI or model training from a workflow type it keeps per browser (GenAI at first),
    not from the experiment's kind tag, so the link names it."""
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{server.rstrip('/')}/#/{page}?workflowType=machine_learning"


def sqlite_path(uri: str) -> str | None:
    """The database file of a SQLite tracking URI (sqlite:///relative or sqlite:////absolute), else None."""
    return uri[len(SQLITE) :] if uri.startswith(SQLITE) else None


def is_database(uri: str) -> bool:
    """A database server MLflow talks to through SQLAlchemy (PostgreSQL, MySQL, MSSQL), not SQLite."""
    return uri.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql")


# the password of a URL's user:password@ (postgresql+psycopg://, mysql://, https://...), wherever it stands
_URL_PASSWORD = re.compile(r"\b([a-z][\w+.-]*://[^:/@\s]+:)[^@\s/]+@")


def redacted(text: str) -> str:
    """`text` (a URI, a config dump, a param) as it may be printed or published: every password in a
    URL replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def check_database_answers(uri: str, field: str, timeout_s: int = 10) -> None:
    """One short connection: MLflow's store retries an unreachable database for minutes."""
    import sqlalchemy

    timeout = {"connect_timeout": timeout_s} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=timeout)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # noqa: BLE001  (a missing driver, a refused connection, a bad password: all named)
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{field}={redacted(uri)!r}: the database cannot be used ({type(error).__name__}: {reason}); start it, "
            f"create the database, or fix the URI (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)"
        ) from None


TRACKING_FORMS = (
    "a SQLite file (sqlite:///mlflow.db, sqlite:////abs/mlflow.db, or its bare path), a database server "
    "(postgresql://USER:PASSWORD@HOST:PORT/DB, mysql://...), an MLflow server (http(s)://host:port) or MLflow's "
    "file store (file:///abs/mlruns)"
)


def resolve_tracking_uri(uri: str | None, field: str = "tracking.tracking_uri") -> str:
    """The one reading of a tracking store's URI (`tracking.tracking_uri`, $MLFLOW_TRACKING_URI,
    `mlflow-server --backend-store`), as an absolute URI: workers and Tune trials do not share the
    driver's cwd. A bare path is a SQLite file, wherever it is given; only the forms of TRACKING_FORMS
    are taken."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{DEFAULT_STORE}"
    if "\x00" in uri or not uri.strip():
        raise ConfigError(f"{field}={uri!r} is not a tracking store; give {TRACKING_FORMS}")
    if uri.startswith("sqlite:") and sqlite_path(uri) is None:
        raise ConfigError(
            f"{field}={uri!r}: a SQLite URI needs three slashes before a relative path and four "
            f"before an absolute one: sqlite:///mlflow.db or sqlite:////data/mlflow.db"
        )
    if "://" not in uri and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri):  # a scheme without its //
        raise ConfigError(f"{field}={redacted(uri)!r}: a URI is scheme:// then its place; give {TRACKING_FORMS}")
    if "://" not in uri:
        uri = SQLITE + uri
    scheme = uri.split("://", 1)[0]
    if uri.startswith(SQLITE):
        database = sqlite_path(uri)
        return uri if database.startswith("/") else SQLITE + str(Path(database).expanduser().resolve())
    if scheme in ("http", "https"):
        if not urlparse(uri).hostname:
            raise ConfigError(f"{field}={uri!r} names no host; give {TRACKING_FORMS}")
        return uri
    if scheme == "file":
        if not uri.startswith("file:///"):
            raise ConfigError(
                f"{field}={uri!r}: a file store's URI is file:// and an absolute path (file:///abs/mlruns)"
            )
        return uri
    if is_database(uri):
        return uri
    raise ConfigError(f"{field}={redacted(uri)!r}: st-scale does not track to {scheme}://; give {TRACKING_FORMS}")


def check_run_recorded(uri: str, run_id: str, where: str) -> None:
    """The MLflow run a checkpoint's results are logged into exists in the store it recorded: checked
    before the evaluation's work, without creating a SQLite file where none is."""
    import mlflow

    database = sqlite_path(uri)
    missing = database is not None and not Path(database).is_file()
    if not missing:
        try:
            mlflow.MlflowClient(uri).get_run(run_id)
        except Exception:  # noqa: BLE001  (not found, or a store that does not answer: both named below)
            missing = True
    if missing:
        raise ConfigError(
            f"{where} logs into its training run's MLflow run {run_id}, which the tracking store it recorded "
            f"({redacted(uri)}) does not hold or cannot be reached; put the store back at that URI (or link it "
            f"there), or start the store's server"
        )


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def check_sqlite_file(uri: str, field: str) -> None:
    """A SQLite store's path must be a database file or nothing yet: a folder, or a file of another
    kind, is refused naming it (SQLAlchemy would fail on it after minutes of retries, in 30 lines)."""
    database = sqlite_path(uri)
    if database is None:
        return
    path = Path(database)
    if path.is_dir():
        raise ConfigError(f"{field}={uri!r}: {path} is a folder; name a database file in it, e.g. {path / 'mlflow.db'}")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as file:
            header = file.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise ConfigError(
                f"{field}={uri!r}: {path} is not a SQLite database (its first bytes are {header[:8]!r}); give a new "
                f"path, or an existing MLflow SQLite file"
            )


def check_tracking_uri(uri: str, experiment: str) -> str:
    """Create (or find) the experiment from the driver; fail with the field named if the store is
    unreachable or not writable. Returns the experiment id."""
    import mlflow

    check_sqlite_file(uri, "tracking.tracking_uri")
    if sqlite_path(uri) is not None:
        folder = Path(sqlite_path(uri)).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ConfigError(
                f"tracking.tracking_uri={uri!r}: cannot write to {folder} ({error.strerror}); "
                f"choose a writable location"
            ) from None
    if uri.startswith(("http://", "https://")):
        _check_server_answers(uri)
    if is_database(uri):
        check_database_answers(uri, "tracking.tracking_uri")
    try:
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        if found is None or EXPERIMENT_KIND_TAG not in found.tags:
            # The experiment's kind, for MLflow clients that read it; the 3.x UI itself follows the
            # workflow type in its URL (training_view_url).
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment_id
    except Exception as error:
        raise ConfigError(
            f"tracking.tracking_uri={redacted(uri)!r}: the MLflow store cannot be used ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]}); start the server or fix the URI"
        ) from None


def find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the (oldest) run in the experiment carrying all these tags, if any."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def _check_server_answers(uri: str, timeout_s: float = 10.0) -> None:
    """One short request: MLflow's own client retries a refused connection for minutes."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answers (a proxy may not route /health); the client call below has the last word
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"tracking.tracking_uri={redacted(uri)!r}: no MLflow server answers there ({reason}); start one "
            f"(`st-scale mlflow-server`) or fix the URI / MLFLOW_TRACKING_URI"
        ) from None


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """All params of a run, in the batches MLflow accepts (values cut to its length limit)."""
    from mlflow.entities import Param

    items = [Param(k, "" if v is None else redacted(str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


class Store:
    """One MLflow tracking store, for what st-scale reads and writes beside a training run's own
    `RunTracker`: a sweep's parent run and its children, the study report's reading of them, the
    status of runs a command ends. Every other module reaches MLflow through here."""

    def __init__(self, uri: str):
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(uri)

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str) -> None:
        """Close a run as FINISHED, KILLED or FAILED."""
        self.client.set_terminated(run_id, status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        log_params(self.client, run_id, params)

    def log_metric(self, run_id: str, key: str, value: float, step: int = 0) -> None:
        self.client.log_metric(run_id, key, value, step=step)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in metrics.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def find_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        return find_run(self.client, experiment_id, tags)

    def child_runs(self, experiment_id: str, parent_run_id: str) -> list:
        """Every run nested under `parent_run_id` (MLflow's `Run` objects: info, data.params/metrics/tags)."""
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10_000
        )

    def metric_history(self, run_id: str, key: str) -> list[float]:
        return [m.value for m in self.client.get_metric_history(run_id, key)]

    def artifact_paths(self, run_id: str, folder: str) -> set[str]:
        return {a.path for a in self.client.list_artifacts(run_id, folder)}

    def read_text(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as directory:
            return Path(self.client.download_artifacts(run_id, path, directory)).read_text()


class RunTracker:
    def __init__(
        self,
        uri: str,
        experiment_id: str,
        *,
        run_id: str | None,
        run_name: str | None,
        params: dict[str, Any],
        tags: dict[str, str],
        system_metrics: bool,
        datasets: dict[str, dict[str, Any]] | None = None,
    ):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.MlflowClient(uri)
        if run_id is None and RUN_KEY_TAG in tags:
            run_id = find_run(self.client, experiment_id, {RUN_KEY_TAG: tags[RUN_KEY_TAG]})
        resumed = run_id is not None
        self.run = mlflow.start_run(
            run_id=run_id,
            experiment_id=experiment_id,
            run_name=None if resumed else run_name,
            tags=None if resumed else tags,
            log_system_metrics=system_metrics,
        )
        self.run_id = self.run.info.run_id
        self.last_logged: dict[str, int] = {}
        if resumed:
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.last_logged[key] = max((m.step for m in history), default=-1)
        else:
            log_params(self.client, self.run_id, params)
            self.log_datasets(datasets or {})

    def log_datasets(self, datasets: dict[str, dict[str, Any]]) -> None:
        """Each split as an MLflow dataset input: the .beton's path as source and its sha256 as digest,
        so the UI's dataset column tells runs on different data apart."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        for split, info in datasets.items():
            path = Path(info["path"])
            with warnings.catch_warnings():  # MLflow registers two local-file sources and warns it picks one
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(path.as_uri())
            dataset = MetaDataset(
                source,
                name=f"{path.parent.name}/{path.name}",
                digest=info.get("sha256", "")[:32] or None,  # MLflow keeps at most 36 characters
            )
            extra = {k: str(v) for k, v in info.items() if k in ("source", "num_samples", "num_classes")}
            self.mlflow.log_input(dataset, context="training" if split == "train" else "validation", tags=extra)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in metrics.items() if step > self.last_logged.get(k, -1)}
        if fresh:
            self.mlflow.log_metrics(fresh, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlflow.log_text(redacted(text), artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.mlflow.log_figure(figure, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_network(self, network, example, name: str, register: str | None = None) -> str:
        """`mlflow.pytorch.log_model` of a plain torch network into this run, with an input example
        and signature (and in the model registry as `register`); returns the model's URI. MLflow saves
        it with torch.export, traced on the example: an example of one image would fix the batch size
        at 1, so it holds two."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        example = example.detach().float().cpu().contiguous()
        if example.shape[0] < 2:
            example = torch.cat([example, example])
        with torch.no_grad():
            signature = infer_signature(example.numpy(), network(example).numpy())
        info = mlflow.pytorch.log_model(
            network,
            name=name,
            input_example=example.numpy(),
            signature=signature,
            registered_model_name=register,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def _check_port_free(host: str, port: int) -> None:
    """mlflow server on a taken port logs the error and keeps its workers waiting: refuse first."""
    import errno
    import socket

    try:  # the host's own address family: ::1 is IPv6
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host}: not an address or name this machine resolves ({error.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"--port {port}: {host}:{port} is in use (another server may be running there); choose another "
                    f"--port or stop that server"
                ) from None
            raise ConfigError(
                f"--host {host}: cannot serve there ({error.strerror}); give an address of this machine "
                f"(127.0.0.1, or 0.0.0.0 for every interface)"
            ) from None


def serve_mlflow(*, host: str, port: int, backend_store: str, artifacts: str, workers: int = 1) -> int:
    """Replace this process with `mlflow server` (its PID is this command's PID: stop it by that)."""
    import shutil
    import sys

    _check_port_free(host, port)
    store = resolve_tracking_uri(backend_store, "--backend-store")
    check_sqlite_file(store, "--backend-store")
    if is_database(store):
        check_database_answers(store, "--backend-store")
    if "://" in artifacts:  # object storage (s3://...): MLflow's server writes there itself
        artifacts_dir = artifacts
    else:
        artifacts_dir = Path(artifacts).expanduser().resolve()
        try:
            artifacts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file there, or under a file, or no permission
            raise ConfigError(
                f"--artifacts {artifacts}: cannot use {artifacts_dir} as a folder ({error.strerror}); "
                f"give a folder path"
            ) from None
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_cli is None:
        raise ConfigError(
            "mlflow-server: the `mlflow` command is not installed next to this Python; run `make install`"
        )
    print(
        f"MLflow UI and API on http://{host}:{port}  (store {redacted(store)}, artifacts {artifacts_dir})\n"
        f"runs in the model-training view: {training_view_url(f'http://{host}:{port}')}\n"
        f"log runs there with: export MLFLOW_TRACKING_URI=http://{host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    # The store goes by environment, not argument: a database password stays out of the process list.
    os.execve(
        mlflow_cli,
        [mlflow_cli, "server", "--host", host, "--port", str(port), "--workers", str(workers)]
        + ["--artifacts-destination", str(artifacts_dir)],
        os.environ | {"MLFLOW_BACKEND_STORE_URI": store},
    )
    return 0  # not reached
