"""A run's parts as every command builds them: the elastic model, its sub-network space, the training
objective and the recipe's compilation, and the driver's check that they fit together. Below training
(`train.driver`, `train.loop`), sweeps and `st-scale eval`/`export`, so that none of them reaches up
into another to build a model. (The DeepSpeed engine is training's alone: `train.engine`.)"""

from __future__ import annotations

from .config import Config
from .errors import ConfigError
from .methods import build_objective
from .models import ElasticNet, create_model
from .models.regional_compile import compile_blocks
from .sampling import SubnetSampler, SubnetSpace


def build_space(cfg: Config, model: ElasticNet) -> SubnetSpace:
    if cfg.sampling.space == "restricted":
        if len(cfg.sampling.max_dropped) != model.num_stages:
            raise ValueError(
                f"sampling.max_dropped={cfg.sampling.max_dropped} needs one entry per stage of "
                f"{model.name} ({model.num_stages} stages: {list(model.stage_sizes)})"
            )
        try:
            return SubnetSpace.restricted(model.stage_sizes, cfg.sampling.max_dropped)
        except ValueError as error:
            raise ValueError(f"sampling.{error}") from None
    return SubnetSpace.full(model.stage_sizes)


def build_model_and_objective(cfg: Config, rank: int = 0):
    """The elastic model, its sub-network space and the training objective, as a run builds them."""
    model = create_model(cfg.model.name, cfg.model.num_classes, stage_depths=cfg.model.stage_depths)
    space = build_space(cfg, model)
    sampler = SubnetSampler(
        space,
        seed=cfg.run.seed,
        decay=cfg.sampling.decay,
        include_full=cfg.sampling.include_full,
        per_rank=cfg.sampling.per_rank,
    )
    objective = build_objective(cfg.method, model, sampler=sampler, seed=cfg.run.seed, rank=rank)
    return model, space, objective


def speed_up(model: ElasticNet, cfg: Config) -> None:
    """The recipe's compilation, before DeepSpeed takes the module. channels_last is the batches'
    layout only (`memory_format`): a convolution given an NHWC input runs NHWC and gives NHWC, so the
    whole network does. The weights stay contiguous: DeepSpeed broadcasts them as flat bytes and
    ZeRO keeps them as views of its flat buffers, neither of which takes another layout."""
    if cfg.model.compile:
        compile_blocks(model)


def check_buildable(cfg: Config) -> None:
    """Build the model, its sub-network space and the objective once on the driver: a recipe whose
    parts do not fit together (sampling.max_dropped against the model's stages, stage depths, method
    options) fails here, before Ray starts, instead of in every worker (and every retry)."""
    try:
        build_model_and_objective(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
