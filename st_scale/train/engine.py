"""DeepSpeed: the JSON config with batch sizes derived from the recipe, the engine around model +
objective, the LR schedule, and checkpoints that resume exactly.

The recipe is the one source of truth for batch sizes: the DS config may omit them, and where it
states them they must agree. A torch optimizer is passed to `deepspeed.initialize` (an optimizer in
the JSON would JIT-build fused kernels); the LR schedule is ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import Config, OptimizerSection, set_dotted
from ..errors import ConfigError
from ..methods import Objective
from ..models import ElasticNet

# The package's ds_configs/: in a source tree a link to the top-level folder, in a wheel a copy of it.
DS_CONFIG_DIR = (Path(__file__).resolve().parent.parent / "ds_configs").resolve()


# ------------------------------------------------------------------------------------ DS config
def find_ds_config(name: str) -> Path:
    """A path, or a file name in the repository's / installation's ds_configs/."""
    candidates = [Path(name).expanduser()]
    if not Path(name).is_absolute():
        candidates += [DS_CONFIG_DIR / name, Path.cwd() / "ds_configs" / name]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    available = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")) if DS_CONFIG_DIR.is_dir() else []
    raise ConfigError(f"deepspeed.config: file {name!r} not found; available in ds_configs/: {', '.join(available)}")


def resolve_ds_config(cfg: Config) -> dict:
    """The DeepSpeed config dict for this run, batch sizes filled in from the recipe."""
    path = find_ds_config(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({error})") from None
    for key, value in cfg.deepspeed.overrides.items():
        set_dotted(ds, key, value, what=f"deepspeed.overrides.{key}")
    for forbidden, why in (
        ("optimizer", "st-scale passes a torch optimizer (optimizer section of the recipe)"),
        ("scheduler", "st-scale owns the LR schedule (optimizer section of the recipe)"),
    ):
        if forbidden in ds:
            raise ConfigError(f"deepspeed.config: {path.name} has an {forbidden!r} block; remove it: {why}")
    accumulation = int(ds.get("gradient_accumulation_steps", 1))
    for world in cfg.scaling.worker_counts:  # an elastic run may train on any of them
        for key, value in batch_sizes(cfg.data.batch_size, world, accumulation).items():
            if key in ds and int(ds[key]) != value:
                raise ConfigError(
                    f"deepspeed.config: {path.name} sets {key}={ds[key]}, which contradicts the recipe "
                    f"(data.batch_size={cfg.data.batch_size}, {world} workers gives {value}); remove it from the JSON"
                )
    # For a full group; each worker restates them for the number of workers it trains with.
    ds = ds | batch_sizes(cfg.data.batch_size, cfg.scaling.max_workers, accumulation)
    if cfg.deepspeed.overrides or path.parent != DS_CONFIG_DIR:  # the packaged files are tested as they are
        _check_against_deepspeed(ds, path.name)
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if bf16 and ds.get("torch_autocast", {}).get("enabled", False):
        raise ConfigError(
            f"deepspeed.config: {path.name} enables both bf16 (the whole model cast to bf16) and torch_autocast "
            f"(fp32 weights, bf16 compute): choose one, e.g. zero1_autocast_bf16.json or zero1_bf16.json"
        )
    if bf16 and not cfg.scaling.use_gpu:
        raise ConfigError(
            f"deepspeed.config: {path.name} enables bf16, which st-scale runs on GPUs only; "
            f"use cpu_fp32.json on CPU workers or set scaling.gpus_per_worker"
        )
    if bf16 and ds.get("data_types", {}).get("buffer_dtype") != "bf16":
        raise ConfigError(
            f"deepspeed.config: {path.name} enables bf16 without data_types.buffer_dtype='bf16'; "
            f"BatchNorm buffers must be bf16 too"
        )
    return ds


def batch_sizes(global_batch: int, world: int, accumulation: int) -> dict:
    """DeepSpeed's batch sizes for `world` workers: the global batch is the recipe's whatever the number
    of workers, so each worker's micro-batch is global / (world x accumulation steps)."""
    if global_batch % (world * accumulation):
        raise ConfigError(
            f"data.batch_size={global_batch} is not divisible by scaling.num_workers={world} x "
            f"gradient_accumulation_steps={accumulation}; the global batch is kept whatever the number of workers: "
            f"choose a worker count and accumulation whose product divides it"
        )
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // (world * accumulation),
        "gradient_accumulation_steps": accumulation,
    }


def _check_against_deepspeed(ds: dict, name: str) -> None:
    """DeepSpeed's own config models reject a misspelt key in a section (`zero_optimization.stagee`)
    only inside the workers: parse the config here first. The batch sizes are restated for one process
    (DeepSpeed checks them against the world size it sees, 1 on the driver); errors other than a
    schema error are left to DeepSpeed on the workers."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = json.loads(json.dumps(ds))
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{error.title}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
        )
        raise ConfigError(
            f"deepspeed.config ({name} with deepspeed.overrides): DeepSpeed rejects it: {problems}; "
            f"fix the key (DeepSpeed's configuration reference lists each section's keys)"
        ) from None
    except Exception:  # noqa: BLE001  (not a schema error: the workers' DeepSpeed reports it in context)
        pass


# ------------------------------------------------------------------------------------ engine
class TrainModule(nn.Module):
    """What DeepSpeed wraps: the elastic model and the objective (with any auxiliary heads)."""

    def __init__(self, model: ElasticNet, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: int):
        out = self.objective(self.model, images, labels, step)
        return out.loss, out.parts, out.logits


# Transformer embeddings decay to nothing under weight decay: torchvision's and timm's recipes exempt them.
EMBEDDING_PARAMETERS = ("class_token", "pos_embedding", "relative_position_bias_table")


def parameter_groups(module: nn.Module, opt: OptimizerSection) -> list[dict]:
    """No weight decay on normalisation weights and biases (every 1-d parameter: this catches the
    shortcut BNs that name-based filters miss) nor on transformer embeddings."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            exempt = p.ndim <= 1 or name.rsplit(".", 1)[-1] in EMBEDDING_PARAMETERS
            (no_decay if exempt and not opt.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_kernels(implementation: str) -> dict[str, bool]:
    """torch.optim.SGD's and AdamW's switches for one implementation (torch picks for_loop on CPU by default)."""
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def build_optimizer(module: nn.Module, opt: OptimizerSection) -> torch.optim.Optimizer:
    groups, kernels = parameter_groups(module, opt), optimizer_kernels(opt.implementation)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, **kernels)
    return torch.optim.SGD(
        groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0, **kernels
    )


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory collective (40-75 s) that training
    never uses: replace its builder before initialize. Note: `import deepspeed.comm.torch` would
    bind the real torch package, so go through sys.modules."""
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def build_engine(model: ElasticNet, objective: Objective, cfg: Config, ds_config: dict):
    import deepspeed

    if not cfg.scaling.use_gpu:
        _skip_cpu_shm_build()
    module = TrainModule(model, objective)
    optimizer = build_optimizer(module, cfg.optimizer)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
