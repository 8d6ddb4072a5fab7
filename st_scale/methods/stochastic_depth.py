"""Stochastic depth (Huang et al. 2016): a baseline of the paper's Table 1."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..models import ElasticNet, Plan
from ..sampling import STREAM_STOCHASTIC_DEPTH, step_rng
from .base import BuildContext, CommonOptions, LossOutput, Objective, method_options


class Options(CommonOptions):
    name: Literal["stochastic_depth"] = "stochastic_depth"
    final_survival: float = Field(0.5, gt=0, le=1, description="survival probability of the last block")


class StochasticDepth(Objective):
    """Per mini-batch Bernoulli skip of each droppable block; survival decays linearly with the
    block's position to `final_survival` at the last block. At test time every block runs with its
    branch scaled by its survival probability (set on the model here, so evaluation sees it)."""

    name = "stochastic_depth"

    def __init__(self, model: ElasticNet, options: Options | None = None, *, seed: int = 0, **fields):
        """`options` (a recipe's), or its fields as keyword arguments: the defaults are the recipe's."""
        super().__init__()
        self.options = method_options(Options, options, fields)
        self.label_smoothing = self.options.label_smoothing
        final_survival = self.options.final_survival
        self.seed = seed
        total = sum(model.stage_sizes)
        self.survival: dict[tuple[int, int], float] = {}
        position = 0
        for stage, size in enumerate(model.stage_sizes):
            for index in range(size):
                position += 1
                if index > 0:
                    self.survival[(stage, index)] = 1.0 - position / total * (1.0 - final_survival)
        model.set_branch_scales(self.survival)

    def sample_plan(self, model: ElasticNet, step: int) -> Plan:
        rng = step_rng(self.seed, step, stream=STREAM_STOCHASTIC_DEPTH)
        plan = []
        for stage, size in enumerate(model.stage_sizes):
            draws = rng.random(size)
            plan.append((0,) + tuple(i for i in range(1, size) if draws[i] < self.survival[(stage, i)]))
        return tuple(plan)

    def forward(self, model, images, labels, step):
        plan = self.sample_plan(model, step)
        with model.unscaled_branches():
            logits = model.run(images, plan)
        ce = self.cross_entropy(logits, labels)
        kept = float(sum(len(blocks) for blocks in plan))
        return LossOutput(ce, {"ce": ce.detach(), "kept_blocks": torch.tensor(kept)}, logits)


def build(options: Options, ctx: BuildContext) -> StochasticDepth:
    return StochasticDepth(ctx.model, options, seed=ctx.seed)
