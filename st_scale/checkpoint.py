"""The checkpoint format: the only module that knows what a checkpoint folder holds.

    <checkpoint>/
      st_scale_config.json     the run: resolved config, MLflow tracking URI and experiment (rank 0)
      train_state.json         where training stands (`TrainState`: epochs done, global step, MLflow
                               run, the last epoch's report), stored here only (rank 0)
      checkpoint/              DeepSpeed's engine state: model, optimizer (sharded under ZeRO)
      rng.rank<r>.pt           each rank's torch / numpy / python (and CUDA) RNG state
      ema.pt                   the weights' moving average, fp32 (rank 0; runs with optimizer.ema_decay)
      COMMITTED.rank<r>        written last by each rank, naming the number of ranks that wrote the
                               folder: a folder without every one of their markers is incomplete

A folder of the first format (before `train_state.json`) kept epoch and step in the run file, the
markers and DeepSpeed's client state, and the last report in the client state: `load` and `read_run`
read it from there.

Every rank calls `save` and `load` (DeepSpeed's are collective). A checkpoint resumes on any number
of workers: without ZeRO rank 0 saved the whole optimizer state; under ZeRO-1/2 each rank saved its
shard, and `load` re-partitions the writers' shards for the new number (DeepSpeed 0.19 itself only
re-shards through universal checkpoints, which hold Adam's state and not SGD's momentum). `read_run`
and `load_weights` serve `st-scale eval` and anything else that wants plain weights without an engine.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from .config import Config, ModelSection, explain_validation_error, stored_config
from .errors import ConfigError
from .storage import Location, resolve

ENGINE_TAG = "checkpoint"  # DeepSpeed's tag: the sub-folder of the engine state
RUN_FILE = "st_scale_config.json"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
# DeepSpeed's file of the (unsharded) module weights inside the tag folder, under ZeRO 0-2.
_MODEL_STATES = "mp_rank_00_model_states.pt"


_MARKER_PREFIX = "COMMITTED.rank"


def _commit_marker(directory: Path, rank: int) -> Path:
    return directory / f"{_MARKER_PREFIX}{rank}"


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
class TrainState:
    """Where training stands at a checkpoint: what a resumed run continues from."""

    epoch: int = 0  # epochs done
    step: int = 0  # the global step after them
    mlflow_run_id: str | None = None  # the run a resume keeps logging into
    metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's report (reported again if nothing is left)


@dataclass
class RunInfo:
    """What rank 0 records about the run in every checkpoint; `read_run` adds the checkpoint's state."""

    config: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    state: TrainState = field(default_factory=TrainState)

    def config_model(self) -> Config:
        return Config.model_validate(self.config)  # read_run checked that it validates


def save(
    engine,
    directory: Path,
    rank: int,
    world_size: int,
    state: TrainState,
    run_info: RunInfo | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every rank of the `world_size` that write the checkpoint calls this. Rank 0 writes the run info,
    the training state (and the weights' average) first; each rank then writes its engine shard, its
    RNG state and, last, its commit marker."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if run_info is not None:
        run = {
            "config": run_info.config,
            "tracking_uri": run_info.tracking_uri,
            "experiment_id": run_info.experiment_id,
        }
        (directory / RUN_FILE).write_text(json.dumps(run, indent=1))
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    if ema_state is not None:
        torch.save(ema_state, directory / EMA_FILE)
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, client_state={})
    torch.save(rng_state(), _rng_file(directory, rank))
    _commit_marker(directory, rank).write_text(json.dumps({"world_size": world_size}))


def committed_ranks(directory: Path | Location) -> list[int]:
    markers = resolve(directory).children(f"{_MARKER_PREFIX}*")
    return sorted(int(marker.name.removeprefix(_MARKER_PREFIX)) for marker in markers)


def writer_world_size(directory: Path | Location) -> int:
    """How many ranks wrote this checkpoint (a local folder or one on the run storage), after checking
    each of them committed it. The markers name it (a checkpoint from before they did: the highest
    committed rank + 1)."""
    directory = resolve(directory)
    ranks = committed_ranks(directory)
    if not ranks:
        raise RuntimeError(f"checkpoint {directory} is incomplete (no commit markers): it was interrupted while saving")
    try:
        stated = {json.loads(_commit_marker(directory, r).read_text()).get("world_size") for r in ranks}
    except (ValueError, AttributeError, TypeError) as error:  # cut short while written, or not a marker st-scale wrote
        raise RuntimeError(
            f"checkpoint {directory} is incomplete (a commit marker is unreadable: {error}): it was interrupted while "
            f"saving. Resume from an earlier checkpoint, or start a new run name"
        ) from None
    stated.discard(None)
    if any(type(world) is not int or world < 1 for world in stated):
        raise RuntimeError(
            f"checkpoint {directory} is incomplete (a commit marker names {sorted(map(repr, stated))} ranks, not a "
            f"count): it was interrupted while saving, or damaged. Resume from an earlier checkpoint, or start a new "
            f"run name"
        )
    if len(stated) > 1:
        raise RuntimeError(f"checkpoint {directory}: its commit markers disagree on the number of ranks ({stated})")
    world = stated.pop() if stated else max(ranks) + 1
    present = set(ranks)
    # The first few missing ranks, found among len(ranks) + 8 candidates at most: a damaged marker may
    # name any count, and range(world) is never listed whole.
    missing = list(itertools.islice((r for r in range(world) if r not in present), 8))
    if missing:
        more = ", ..." if world - len(present) > len(missing) else ""
        raise RuntimeError(
            f"checkpoint {directory} is incomplete (no commit marker from ranks {missing}{more} of the {world} that "
            f"wrote it): it was interrupted while saving. Resume from an earlier checkpoint, or start a new run name"
        )
    return world


def check_reshardable(zero_stage: int, directory: Path | Location, written_by: int, world_size: int) -> None:
    """ZeRO-0 (whole optimizer state on rank 0) and ZeRO-1/2 (fp32 weights and optimizer state sharded
    over a flat buffer, re-partitioned by `load`) resume on any number of ranks; ZeRO-3 shards the
    parameters themselves, which st-scale does not re-shard."""
    if zero_stage <= 2 or written_by == world_size:
        return
    raise ConfigError(
        f"checkpoint {directory} was written by {written_by} workers under ZeRO-{zero_stage}, whose parameters "
        f"are sharded per worker and cannot be re-sharded for {world_size}; resume it with "
        f"scaling.num_workers={written_by} (runs under ZeRO-0/1/2 resume on any number of workers)"
    )


def check_resumable(
    run_dir: Path | Location,
    *,
    zero_stage: int,
    num_workers: int | tuple[int, int],
    model: ModelSection | None = None,
) -> None:
    """The rule for resuming a run: from its newest complete checkpoint, which this group of workers
    (`scaling.num_workers`: a number, or an elastic [min, max]) must be able to load. Refused on the
    driver, before any worker starts; with `model`, the checkpoint must hold that network."""
    elastic = isinstance(num_workers, tuple)
    if elastic and zero_stage >= 3:
        raise ConfigError(
            f"scaling.num_workers={list(num_workers)} with ZeRO-{zero_stage}: an elastic group resumes on another "
            f"number of workers, and ZeRO-3 checkpoints cannot be re-sharded; use ZeRO-0/1/2 or a fixed count"
        )
    found = latest(run_dir)
    if found is not None:  # (a range was refused above where re-sharding matters)
        check_reshardable(zero_stage, found, writer_world_size(found), max(num_workers) if elastic else num_workers)
        if model is not None:
            check_same_network(found, model, resolve(run_dir).name)


def latest(run_dir: Path | Location) -> Location | None:
    """The newest complete checkpoint folder of a run (what Ray Train resumes from), if any; the run
    folder may be local or on the object store."""
    for folder in reversed(resolve(run_dir).children("checkpoint_*")):  # named by their time
        if (folder / RUN_FILE).is_file():
            try:
                writer_world_size(folder)
                return folder
            except RuntimeError:
                continue  # interrupted while saving: Ray Train does not count it either
    return None


def load(engine, directory: Path, rank: int, world_size: int) -> TrainState:
    """Restore engine, optimizer and this rank's RNG state; return where training stands. A checkpoint
    of another number of ranks is re-sharded (see the module's note); a rank the writer did not have
    keeps the RNG state it was seeded with."""
    directory = Path(directory)
    written_by = writer_world_size(directory)
    check_reshardable(engine.zero_optimization_stage(), directory, written_by, world_size)
    resharding = written_by != world_size and engine.zero_optimization_stage() > 0
    # Re-sharding: DeepSpeed loads the module (and refreshes the fp32 partitions from it); the
    # optimizer's partitions come from every writer's shard below.
    _, client_state = engine.load_checkpoint(
        str(directory), tag=ENGINE_TAG, load_optimizer_states=not resharding, load_lr_scheduler_states=False
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    if resharding:
        reshard_zero_state(engine.optimizer, _zero_shards(directory, written_by))
    if rank < written_by:
        set_rng_state(torch.load(_rng_file(directory, rank), weights_only=False))
    if (directory / STATE_FILE).is_file():
        return TrainState(**json.loads((directory / STATE_FILE).read_text()))
    return TrainState(**{k: client_state[k] for k in ("epoch", "step", "mlflow_run_id", "metrics")})  # first format


def read_ema(directory: Path) -> dict[str, torch.Tensor] | None:
    """The weights' moving average a checkpoint holds (None: the run kept none)."""
    path = Path(directory) / EMA_FILE
    return _load_tensors(path, directory, weights_only=True) if path.is_file() else None


def _load_tensors(path: Path, directory: Path, *, weights_only: bool):
    """A file of a checkpoint read with torch.load; one that cannot be read (cut short, overwritten,
    not torch's) names the checkpoint and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # noqa: BLE001  (torch raises any of a dozen types on a damaged file)
        raise ConfigError(
            f"{directory} is damaged: {path.name} cannot be read ({type(error).__name__}: "
            f"{str(error).strip()[:120]}); give an earlier checkpoint_* folder"
        ) from None


def _zero_shards(directory: Path, written_by: int) -> list[dict]:
    """Every writer's ZeRO optimizer shard (DeepSpeed's `optimizer_state_dict`), in rank order."""
    shards = []
    for rank in range(written_by):
        found = list((Path(directory) / ENGINE_TAG).glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        if len(found) != 1:
            raise RuntimeError(f"checkpoint {directory}: the ZeRO optimizer shard of rank {rank} is missing")
        shards.append(torch.load(found[0], map_location="cpu", weights_only=False)["optimizer_state_dict"])
    return shards


def reshard_zero_state(optimizer, shards: list[dict]) -> None:
    """Set this rank's ZeRO-1/2 partition of the fp32 master weights and of every optimizer state
    tensor from the shards another number of ranks saved. Each parameter group is one flat buffer cut
    into equal partitions, padding at the end: the writers' partitions (without their padding) joined
    in rank order are the group's buffer, which is cut again for this world size."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.round_robin_gradients:
        raise ConfigError(
            f"a ZeRO checkpoint is re-sharded for another number of workers only with DeepSpeed's ZeRO-1/2 "
            f"optimizer without round_robin_gradients (this run uses {type(optimizer).__name__}); resume it with "
            f"the number of workers that wrote it"
        )
    if any(s["param_alignment_paddings"] != optimizer.round_robin_bit16_padding for s in shards):
        raise ConfigError(
            "the ZeRO checkpoint's parameter layout differs from this run's (zero_optimization.parameter_alignment "
            "changed); resume with the DeepSpeed config that wrote it"
        )
    rank = torch.distributed.get_rank(group=optimizer.dp_process_group)
    for group, partition in enumerate(optimizer.single_partition_of_fp32_groups):
        lengths = [s["single_partition_of_fp32_groups"][group].numel() for s in shards]
        written_size = lengths[0] + shards[0]["group_paddings"][group]  # every writer's partition size
        layout = optimizer.round_robin_bit16_meta[group]
        expected = sum(t.numel() for t in layout) + sum(optimizer.round_robin_bit16_padding[group])
        if sum(lengths) != expected:
            raise RuntimeError(
                f"ZeRO checkpoint: parameter group {group} holds {sum(lengths)} values, this model {expected}"
            )

        fp32 = _recut([s["single_partition_of_fp32_groups"][group] for s in shards], lengths, rank, partition.numel())
        partition.data.copy_(fp32)
        flat_param = optimizer.optimizer.param_groups[group]["params"][0]
        saved = [s["base_optimizer_state"]["state"].get(group, {}) for s in shards]
        state = optimizer.optimizer.state[flat_param]
        for key, value in saved[0].items():
            if torch.is_tensor(value) and value.shape == (written_size,):
                recut = _recut([s[key] for s in saved], lengths, rank, partition.numel())
                state[key] = recut.to(flat_param.device, flat_param.dtype)
            else:  # a scalar (a step count): the same on every rank
                state[key] = value
    # The module's weights already came from the checkpoint. DeepSpeed's per-parameter views of the
    # partitions (its `safe_get_full_*` helpers read them) are linked to the restored state.
    link_optimizer_state(optimizer)


def _recut(pieces: list[torch.Tensor], lengths: list[int], rank: int, size: int) -> torch.Tensor:
    """This rank's `size`-long partition of the flat buffer that the writers' `pieces` (the first
    `lengths` values of each are data, the rest padding) make when joined; zero-padded at the end."""
    whole = torch.cat([piece.flatten()[:n] for piece, n in zip(pieces, lengths)])
    mine = torch.zeros(size, dtype=whole.dtype)
    part = whole[rank * size : (rank + 1) * size]
    mine[: part.numel()] = part
    return mine


def link_optimizer_state(optimizer) -> None:
    """(Re)link every parameter's view of its ZeRO partition and optimizer state. DeepSpeed 0.19 links
    the optimizer state once, right after the first parameter group's first step, so a second group
    (st-scale's parameters without weight decay) stays unlinked."""
    optimizer._link_all_hp_params()
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def read_run(directory: Path | Location) -> RunInfo:
    """The run info of a complete checkpoint folder (local or on the run storage); a ConfigError
    naming what to give otherwise."""
    directory = resolve(directory)
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
    damaged = f"{directory} is damaged: its {{}} cannot be read ({{}}); give an earlier checkpoint_* folder"
    try:
        run = json.loads(info_file.read_text())
        if (directory / STATE_FILE).is_file():
            state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
        else:  # the first format: the state in the run file, the last report only in DeepSpeed's client state
            state = TrainState(run.pop("epoch"), run.pop("step"), run.pop("mlflow_run_id"))
        info = RunInfo(stored_config(run["config"]), run["tracking_uri"], run["experiment_id"], state)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(damaged.format(f"{RUN_FILE} or {STATE_FILE}", f"{type(error).__name__}: {error}")) from None
    try:
        info.config_model()
    except ValidationError as error:
        raise ConfigError(
            f"{directory}: the config in its {RUN_FILE} is not one this version of st-scale reads "
            f"({explain_validation_error(error, 'config')}); evaluate or resume it with the st-scale version "
            f"that wrote it, or give another checkpoint"
        ) from None
    return info


def check_same_network(found: Location, model: ModelSection, run_name: str) -> None:
    """A run resumes into the network it trained: a recipe that builds another (other architecture,
    depths or classes) under the same run name is refused, naming both."""
    written = read_run(found).config_model().model
    differs = [f for f in type(model).model_fields if getattr(written, f) != getattr(model, f)]
    if differs:
        shown = ", ".join(f"model.{f}={getattr(written, f)!r}" for f in differs)
        wanted = ", ".join(f"model.{f}={getattr(model, f)!r}" for f in differs)
        raise ConfigError(
            f"run.name={run_name!r} already holds checkpoints of another network ({shown} "
            f"in {found}) than this recipe builds ({wanted}); give this run its own run.name, or remove that folder "
            f"to start over"
        )


def local_weights(directory: Path | Location, into: Path) -> Path:
    """A local folder with what `read_run`, `module_state` and `read_ema` read (run info, commit
    markers, module weights, the weights' average): the checkpoint folder itself when it is local;
    from an object store, a copy of those files in `into` (the optimizer shards are not needed to
    evaluate or export the weights)."""
    directory = resolve(directory)
    read_run(directory)  # a complete st-scale checkpoint, before anything is copied
    if not directory.remote:
        return Path(directory.path)
    markers = [m.name for m in directory.children(f"{_MARKER_PREFIX}*")]
    wanted = [RUN_FILE, STATE_FILE, *markers, f"{ENGINE_TAG}/{_MODEL_STATES}", EMA_FILE]
    return directory.download([name for name in wanted if (directory / name).is_file()], into)


def module_state(directory: Path) -> dict[str, torch.Tensor]:
    """The trained module's state dict as saved: `model.*` (the elastic model) and `objective.*`
    (auxiliary heads, if the method has any), in the training dtype."""
    path = Path(directory) / ENGINE_TAG / _MODEL_STATES
    if not path.is_file():
        raise ConfigError(
            f"{directory} has no model weights ({ENGINE_TAG}/{_MODEL_STATES} is missing): the folder is damaged or "
            f"was copied in part; give another checkpoint_* folder"
        )
    # DeepSpeed's file, not st-scale's: without ZeRO its bf16 optimizer saves dataclasses in it, which
    # the weights-only loader refuses
    state = _load_tensors(path, directory, weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ConfigError(
            f"{directory} is damaged: {path.name} holds no module weights; give an earlier checkpoint_* folder"
        )
    return state["module"]


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The elastic model's plain weights (fp32), as `model.load_state_dict` takes them."""
    module = module_state(directory)
    return {
        k[len("model.") :]: v.float() if v.is_floating_point() else v
        for k, v in module.items()
        if k.startswith("model.")
    }


def load_weights(directory: Path, model) -> None:
    """The checkpoint's weights into `model`, built from the checkpoint's own config: weights of
    another network (a folder holding two runs' files) are named, not torch's key listing."""
    try:
        model.load_state_dict(model_weights(directory))
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise ConfigError(
            f"{directory}: its weights do not fit the network its {RUN_FILE} builds ({detail[:160]}); the folder "
            f"holds files of two runs or was damaged; give another checkpoint_* folder"
        ) from None
