"""The checkpoint format: the only module that knows what a checkpoint folder holds.

    <checkpoint>/
      st_scale_config.json     the run: resolved config, epoch, step, MLflow run and experiment (rank 0)
      checkpoint/              DeepSpeed's engine state: model, optimizer (sharded under ZeRO) and
                               st-scale's client state (epoch, step, MLflow run id, last metrics)
      rng.rank<r>.pt           each rank's torch / numpy / python (and CUDA) RNG state
      COMMITTED.rank<r>        written last by each rank: a folder without every marker is incomplete

Every rank calls `save` and `load` (DeepSpeed's are collective). `read_run` and `load_weights` serve
`st-scale eval` and anything else that wants plain weights without an engine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .errors import ConfigError

ENGINE_TAG = "checkpoint"  # DeepSpeed's tag: the sub-folder of the engine state
RUN_FILE = "st_scale_config.json"
# DeepSpeed's file of the (unsharded) module weights inside the tag folder, under ZeRO 0-2.
_MODEL_STATES = "mp_rank_00_model_states.pt"


def _commit_marker(directory: Path, rank: int) -> Path:
    return directory / f"COMMITTED.rank{rank}"


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng.rank{rank}.pt"


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunInfo:
    """What rank 0 records about the run in every checkpoint."""

    config: dict[str, Any]
    epoch: int
    step: int
    mlflow_run_id: str | None
    tracking_uri: str
    experiment_id: str

    def config_model(self) -> Config:
        return Config.model_validate(self.config)


def save(engine, directory: Path, rank: int, client_state: dict, run_info: RunInfo | None = None) -> None:
    """Every rank calls this. Rank 0 writes the run info first; each rank then writes its engine
    shard, its RNG state and, last, its commit marker."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if run_info is not None:
        (directory / RUN_FILE).write_text(json.dumps(run_info.__dict__, indent=1))
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, client_state=client_state)
    torch.save(rng_state(), _rng_file(directory, rank))
    _commit_marker(directory, rank).write_text(
        json.dumps({"epoch": client_state["epoch"], "step": client_state["step"]})
    )


def committed_ranks(directory: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("COMMITTED.rank")) for p in Path(directory).glob("COMMITTED.rank*"))


def check_complete(directory: Path, world_size: int) -> None:
    missing = [r for r in range(world_size) if not _commit_marker(Path(directory), r).is_file()]
    if missing:
        raise RuntimeError(
            f"checkpoint {directory} is incomplete (no commit marker from ranks {missing}); it was written by a "
            f"different number of workers or interrupted while saving. Resume with {world_size} workers from a "
            f"complete checkpoint, or start a new run name"
        )


def load(engine, directory: Path, rank: int, world_size: int) -> dict:
    """Restore engine, optimizer and this rank's RNG state; return the client state."""
    directory = Path(directory)
    check_complete(directory, world_size)
    _, client_state = engine.load_checkpoint(
        str(directory), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    set_rng_state(torch.load(_rng_file(directory, rank), weights_only=False))
    return client_state


def read_run(directory: Path) -> RunInfo:
    """The run info of a complete checkpoint folder; a ConfigError naming what to give otherwise."""
    directory = Path(directory)
    info_file = directory / RUN_FILE
    if not info_file.is_file():
        raise ConfigError(
            f"{directory} is not an st-scale checkpoint folder (no {RUN_FILE}); give a "
            f"checkpoint_* folder under <run.storage_path>/<run.name>/"
        )
    ranks = committed_ranks(directory)
    if not ranks:
        raise ConfigError(
            f"{directory} is incomplete (no commit markers): it was interrupted while saving; "
            f"give an earlier checkpoint_* folder"
        )
    check_complete(directory, max(ranks) + 1)
    return RunInfo(**json.loads(info_file.read_text()))


def module_state(directory: Path) -> dict[str, torch.Tensor]:
    """The trained module's state dict as saved: `model.*` (the elastic model) and `objective.*`
    (auxiliary heads, if the method has any), in the training dtype."""
    path = Path(directory) / ENGINE_TAG / _MODEL_STATES
    if not path.is_file():
        raise ConfigError(
            f"{directory} has no model weights ({ENGINE_TAG}/{_MODEL_STATES} is missing): the folder is damaged or "
            f"was copied in part; give another checkpoint_* folder"
        )
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The elastic model's plain weights (fp32), as `model.load_state_dict` takes them."""
    module = module_state(directory)
    return {
        k[len("model.") :]: v.float() if v.is_floating_point() else v
        for k, v in module.items()
        if k.startswith("model.")
    }


def load_weights(directory: Path, model) -> None:
    model.load_state_dict(model_weights(directory))
