"""The checkpoint format: the only module that knows what a checkpoint folder holds.

    <checkpoint>/
      st_scale_config.json     the run: resolved config, epoch, step, MLflow run and experiment (rank 0)
      checkpoint/              DeepSpeed's engine state: model, optimizer (sharded under ZeRO) and
                               st-scale's client state (epoch, step, MLflow run id, last metrics)
      rng.rank<r>.pt           each rank's torch / numpy / python (and CUDA) RNG state
      COMMITTED.rank<r>        written last by each rank, naming the number of ranks that wrote the
                               folder: a folder without every one of their markers is incomplete

Every rank calls `save` and `load` (DeepSpeed's are collective). A checkpoint written without ZeRO
resumes on any number of workers (rank 0 saved the whole optimizer state); under ZeRO-1/2 on the
number that wrote it. `read_run` and `load_weights` serve `st-scale eval` and anything else that
wants plain weights without an engine.
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


def save(
    engine, directory: Path, rank: int, world_size: int, client_state: dict, run_info: RunInfo | None = None
) -> None:
    """Every rank of the `world_size` that write the checkpoint calls this. Rank 0 writes the run info
    first; each rank then writes its engine shard, its RNG state and, last, its commit marker."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if run_info is not None:
        (directory / RUN_FILE).write_text(json.dumps(run_info.__dict__, indent=1))
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, client_state=client_state)
    torch.save(rng_state(), _rng_file(directory, rank))
    _commit_marker(directory, rank).write_text(
        json.dumps({"epoch": client_state["epoch"], "step": client_state["step"], "world_size": world_size})
    )


def committed_ranks(directory: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("COMMITTED.rank")) for p in Path(directory).glob("COMMITTED.rank*"))


def writer_world_size(directory: Path) -> int:
    """How many ranks wrote this checkpoint, after checking each of them committed it. The markers
    name it (a checkpoint from before they did: the highest committed rank + 1)."""
    directory = Path(directory)
    ranks = committed_ranks(directory)
    if not ranks:
        raise RuntimeError(f"checkpoint {directory} is incomplete (no commit markers): it was interrupted while saving")
    stated = {json.loads(_commit_marker(directory, r).read_text()).get("world_size") for r in ranks}
    stated.discard(None)
    if len(stated) > 1:
        raise RuntimeError(f"checkpoint {directory}: its commit markers disagree on the number of ranks ({stated})")
    world = stated.pop() if stated else max(ranks) + 1
    missing = [r for r in range(world) if r not in ranks]
    if missing:
        raise RuntimeError(
            f"checkpoint {directory} is incomplete (no commit marker from ranks {missing} of the {world} that wrote "
            f"it): it was interrupted while saving. Resume from an earlier checkpoint, or start a new run name"
        )
    return world


def check_reshardable(zero_stage: int, directory: Path, written_by: int, world_size: int) -> None:
    """Without ZeRO, rank 0 saved the whole optimizer state with the model: any number of ranks loads
    it. Under ZeRO-1/2 each rank saved only its shard, and DeepSpeed 0.19 loads shards into another
    number of ranks only from a universal checkpoint (a converted copy), which st-scale does not write."""
    if zero_stage == 0 or written_by == world_size:
        return
    raise ConfigError(
        f"checkpoint {directory} was written by {written_by} workers under ZeRO-{zero_stage}, whose optimizer "
        f"state is sharded per worker and cannot be re-sharded for {world_size}; resume it with "
        f"scaling.num_workers={written_by} (runs without ZeRO resume on any number of workers)"
    )


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (what Ray Train resumes from), if any."""
    for folder in sorted(Path(run_dir).glob("checkpoint_*"), reverse=True):  # named by their time
        if folder.is_dir() and (folder / RUN_FILE).is_file():
            try:
                writer_world_size(folder)
                return folder
            except RuntimeError:
                continue  # interrupted while saving: Ray Train does not count it either
    return None


def load(engine, directory: Path, rank: int, world_size: int) -> dict:
    """Restore engine, optimizer and this rank's RNG state; return the client state. A checkpoint of
    another number of ranks is re-sharded (see the module's note); a rank the writer did not have keeps
    the RNG state it was seeded with."""
    directory = Path(directory)
    written_by = writer_world_size(directory)
    check_reshardable(engine.zero_optimization_stage(), directory, written_by, world_size)
    _, client_state = engine.load_checkpoint(
        str(directory), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    if rank < written_by:
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
    try:
        writer_world_size(directory)
    except RuntimeError as error:
        raise ConfigError(f"{error}; give an earlier checkpoint_* folder") from None
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
