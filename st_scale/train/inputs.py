"""What the driver hands each Ray Train worker: one typed object, built by keyword in one place
(`train.driver.resolve_inputs`), after every input was checked on the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Config


@dataclass(frozen=True)
class FaultInjection:
    """Tests only: rank `rank` exits at global step `step`, once per run (`marker` records it)."""

    step: int
    rank: int
    marker: str


@dataclass(frozen=True)
class WorkerInputs:
    config: Config  # validated once, on the driver, and resolved there: every path absolute
    ds_config: dict[str, Any]  # the resolved DeepSpeed config (batch sizes filled in)
    tracking_uri: str  # absolute: workers and trials do not share the driver's cwd
    experiment_id: str
    # per split ("train", "val"): path, sha256, source, num_samples, num_classes (logged as MLflow inputs)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (a sweep's parent run, trial id)
    fault: FaultInjection | None = None
    progress: Any = None  # the board of the driver's console.ConsoleView (a Ray actor); None in Tune trials
    verbose: bool = False  # --verbose: Ray Train's and MLflow's INFO messages stay on the console

    @property
    def dataset(self) -> str:
        """What the training file says it holds (its metadata's source), else its path."""
        train = self.datasets.get("train", {})
        return train.get("source", train.get("path", ""))

    def to_loop_config(self) -> dict[str, Any]:
        """Ray Train's train_loop_config (a dict) carrying these inputs."""
        return {"inputs": self}

    @staticmethod
    def from_loop_config(loop_config: dict[str, Any]) -> WorkerInputs:
        inputs = loop_config["inputs"]
        if not isinstance(inputs, WorkerInputs):
            raise TypeError(f"train_loop_config['inputs'] is a {type(inputs).__name__}, not WorkerInputs")
        return inputs
