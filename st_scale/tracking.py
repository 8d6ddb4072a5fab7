"""MLflow: one run per training run, logged by rank 0 only.

A resumed or restarted run logs into the same MLflow run (its id travels in the checkpoint), and
points at or below the last step already logged for a metric are skipped, so steps replayed after a
restart from a checkpoint are never duplicated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .config import ConfigError

DEFAULT_STORE = "mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute URI (workers and Tune trials do not share the driver's cwd)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def check_tracking_uri(uri: str, experiment: str) -> str:
    """Create (or find) the experiment from the driver; fail with the field named if the store is
    unreachable or not writable. Returns the experiment id."""
    import mlflow

    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ConfigError(f"tracking.tracking_uri={uri!r}: cannot write to {folder} ({error.strerror}); "
                              f"choose a writable location") from None
    try:
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        return found.experiment_id if found else client.create_experiment(experiment)
    except Exception as error:
        raise ConfigError(f"tracking.tracking_uri={uri!r}: the MLflow store cannot be used ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:300]}); start the server or fix the URI") from None


class RunTracker:
    def __init__(self, uri: str, experiment_id: str, *, run_id: str | None, run_name: str | None,
                 params: dict[str, Any], tags: dict[str, str], system_metrics: bool):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.MlflowClient(uri)
        resumed = run_id is not None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=None if resumed else run_name,
                                    tags=None if resumed else tags, log_system_metrics=system_metrics)
        self.run_id = self.run.info.run_id
        self.last_logged: dict[str, int] = {}
        if resumed:
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.last_logged[key] = max((m.step for m in history), default=-1)
        else:
            items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(items), 100):
                mlflow.log_params(dict(items[start:start + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in metrics.items() if step > self.last_logged.get(k, -1)}
        if fresh:
            self.mlflow.log_metrics(fresh, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlflow.log_text(text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.mlflow.log_figure(figure, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
