"""ST: Stimulative Training (and the ST++ options)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..models import Depths, Plan
from ..sampling import STREAM_INPUT_SIZE, SubnetSampler, step_rng
from ..schema import one_of
from .base import BuildContext, CommonOptions, LossOutput, Objective, _require, distillation_kl, method_options

SUBNET_REDUCTIONS = ("sum", "mean")


class Options(CommonOptions):
    name: Literal["st"] = "st"
    kl_weight: float = Field(1.0, ge=0, description="lambda: weight of the KL from the main net to each sub-net")
    temperature: float = Field(1.0, gt=0)
    num_subnets: int = Field(1, ge=1, description="K sub-networks per step")
    subnet_reduction: str = Field("sum", description="sum (the reference) or mean of the K KL terms")
    logit_norm: bool = Field(False, description="ST++ KL-: layer-normalised logits")
    logit_norm_amplitude: float = Field(1.0, gt=0)
    small_inputs: bool = Field(False, description="ST++: each sub-net sees a smaller resize of the batch")
    small_input_min_fraction: float = Field(0.43, gt=0, le=1)
    share_prefix: bool = Field(True, description="sub-nets reuse the main pass up to their first dropped block")
    subnet_batch_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the sub-net passes see only the batch's first fraction of images (batches are shuffled): "
        "a cheaper ST; the KL is averaged over those images",
    )
    subnet_every: int = Field(
        1,
        ge=1,
        description="the sub-net passes run on every k-th step only, their KL weighted k times so that the "
        "average pull is the same: a cheaper ST (k = 1 is the reference)",
    )

    @field_validator("subnet_reduction")
    @classmethod
    def _reduction(cls, value: str) -> str:
        return one_of("subnet_reduction", value, SUBNET_REDUCTIONS)


class StimulativeTraining(Objective):
    """ST (and ST++ options): CE on the main net plus KL from the main net to K sampled sub-nets.

    With `share_prefix` each sub-net reuses the main pass's activations up to its first dropped
    block: the values are identical, so loss and gradients are unchanged, and the shared blocks run
    (forward and backward) once instead of twice. The only visible difference is that BatchNorm
    running statistics of shared blocks are updated once per step, not twice; evaluation
    re-estimates them anyway.
    """

    name = "st"

    def __init__(self, sampler: SubnetSampler, options: Options | None = None, *, rank: int = 0, **fields):
        """`options` (a recipe's), or its fields as keyword arguments: the defaults are the recipe's."""
        super().__init__()
        o = self.options = method_options(Options, options, fields)
        self.sampler, self.rank = sampler, rank
        self.kl_weight, self.temperature = o.kl_weight, o.temperature
        self.num_subnets, self.subnet_reduction = o.num_subnets, o.subnet_reduction
        self.logit_norm, self.logit_norm_amplitude = o.logit_norm, o.logit_norm_amplitude
        self.small_inputs, self.small_input_min_fraction = o.small_inputs, o.small_input_min_fraction
        self.share_prefix = o.share_prefix
        self.subnet_batch_fraction, self.subnet_every = o.subnet_batch_fraction, o.subnet_every
        self.label_smoothing = o.label_smoothing

    def _normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """ST++ "KL-": a parameter-free layer norm over classes aligns only the logits' direction."""
        logits = logits.float()
        if not self.logit_norm:
            return logits
        return F.layer_norm(logits, logits.shape[-1:]) * self.logit_norm_amplitude

    def _subnet_input(self, images: torch.Tensor, step: int, k: int) -> torch.Tensor:
        """ST++ small inputs: the ORIGINAL batch resized to s x s, s uniform in [min_frac*crop, crop].

        Bilinear (antialiased) resizing has weights that sum to one, so resizing the normalised batch
        equals normalising the resized one: normalisation happens once, in the loader.
        """
        crop = images.shape[-1]
        low = max(1, math.ceil(self.small_input_min_fraction * crop))
        rng = step_rng(
            self.sampler.seed, step, k, rank=self.rank if self.sampler.per_rank else None, stream=STREAM_INPUT_SIZE
        )
        size = int(rng.integers(low, crop + 1))
        if size == crop:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def subnet_batch(self, batch: int) -> int:
        """How many of the batch's images the sub-net passes see: at least one."""
        return max(1, round(self.subnet_batch_fraction * batch))

    @staticmethod
    def divergence(depths: Depths, full: Depths) -> int | None:
        """The first stage where a sub-net drops blocks; None for the full network."""
        return next((s for s, (d, n) in enumerate(zip(depths, full)) if d < n), None)

    def runs_subnets(self, step: int) -> bool:
        """Whether step `step` has sub-network passes: every `subnet_every`-th global step, the same on
        every rank (the step is global)."""
        return step % self.subnet_every == 0

    def forward(self, model, images, labels, step):
        if not self.runs_subnets(step):
            main_logits = model.run(images, model.plan_for_depths(None))
            ce = self.cross_entropy(self._normalise(main_logits), labels)
            return LossOutput(ce, {"ce": ce.detach()}, main_logits)
        subnets = self.sampler.sample_many(step, self.num_subnets, self.rank)
        full = model.full_depths
        shared = self.share_prefix and not self.small_inputs
        taps: dict[tuple[int, int], torch.Tensor] = {}
        wanted = {(s, d[s] - 1) for d in subnets if (s := self.divergence(d, full)) is not None} if shared else set()

        def record(stage: int, position: int, x: torch.Tensor) -> None:
            if (stage, position) in wanted:
                taps[(stage, position)] = x

        main_logits = model.run(images, model.plan_for_depths(None), on_block=record if wanted else None)
        main = self._normalise(main_logits)
        ce = self.cross_entropy(main, labels)
        # A fraction of the batch: the leading images. Shared prefixes are the main pass's activations
        # of those images (BatchNorm there normalised them with the whole batch's statistics).
        n = self.subnet_batch(images.shape[0])
        teacher, images = main.detach()[:n], images[:n]

        kls = []
        for k, depths in enumerate(subnets):
            plan: Plan = model.plan_for_depths(depths)
            stage = self.divergence(depths, full)
            if self.small_inputs:
                sub_logits = model.run(self._subnet_input(images, step, k), plan)
            elif not shared:
                sub_logits = model.run(images, plan)
            elif stage is None:
                sub_logits = main_logits[:n]  # the full network drawn: the main pass is its pass
            else:
                sub_logits = model.run_from_stage_output(taps[(stage, depths[stage] - 1)][:n], stage, plan)
            kls.append(distillation_kl(self._normalise(sub_logits), teacher, self.temperature))
        kl = torch.stack(kls).sum() if self.subnet_reduction == "sum" else torch.stack(kls).mean()
        # Sub-network steps weigh k times when they come every k-th step: the same average pull.
        loss = ce + self.kl_weight * self.subnet_every * kl
        blocks = sum(sum(d) for d in subnets) / len(subnets)
        parts = {"ce": ce.detach(), "kl": kl.detach(), "subnet_blocks": torch.tensor(float(blocks))}
        return LossOutput(loss, parts, main_logits)


def build(options: Options, ctx: BuildContext) -> StimulativeTraining:
    _require(ctx.sampler is not None, "method 'st' needs a sub-network sampler")
    return StimulativeTraining(ctx.sampler, options, rank=ctx.rank)
