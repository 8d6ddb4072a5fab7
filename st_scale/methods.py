"""Training objectives: CT, Stimulative Training and the paper's baselines.

An objective maps (model, images, labels, global step) to a loss and its logged parts. It knows
nothing of Ray or DeepSpeed; objectives with auxiliary heads are modules whose parameters the
engine optimises together with the model's.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import Depths, ElasticNet, Plan
from .sampling import STREAM_INPUT_SIZE, STREAM_STOCHASTIC_DEPTH, SubnetSampler, step_rng

SUBNET_REDUCTIONS = ("sum", "mean")


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached scalars, logged as train/<name>
    logits: torch.Tensor  # the main network's logits (for train accuracy)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over the batch.

    Computed in fp32 whatever the logits' dtype. The caller decides whether the teacher is detached.
    """
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class Objective(nn.Module, abc.ABC):
    name = "objective"

    @abc.abstractmethod
    def forward(self, model: ElasticNet, images: torch.Tensor, labels: torch.Tensor, step: int) -> LossOutput:
        """The loss of one training step at global step `step`."""


class CommonTraining(Objective):
    """CT: cross-entropy on the full network; no sub-network pass at all."""

    name = "ct"

    def forward(self, model, images, labels, step):
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        return LossOutput(ce, {"ce": ce.detach()}, logits)


class StimulativeTraining(Objective):
    """ST (and ST++ options): CE on the main net plus KL from the main net to K sampled sub-nets.

    With `share_prefix` each sub-net reuses the main pass's activations up to its first dropped
    block: the values are identical, so loss and gradients are unchanged, and the shared blocks run
    (forward and backward) once instead of twice. The only visible difference is that BatchNorm
    running statistics of shared blocks are updated once per step, not twice; evaluation
    re-estimates them anyway.
    """

    name = "st"

    def __init__(
        self,
        sampler: SubnetSampler,
        *,
        kl_weight: float = 1.0,
        temperature: float = 1.0,
        num_subnets: int = 1,
        subnet_reduction: str = "sum",
        logit_norm: bool = False,
        logit_norm_amplitude: float = 1.0,
        small_inputs: bool = False,
        small_input_min_fraction: float = 0.43,
        share_prefix: bool = True,
        rank: int = 0,
    ):
        super().__init__()
        _require(kl_weight >= 0 and math.isfinite(kl_weight), f"kl_weight={kl_weight}: must be a finite number >= 0")
        _require(temperature > 0 and math.isfinite(temperature), f"temperature={temperature}: must be > 0")
        _require(num_subnets >= 1, f"num_subnets={num_subnets}: must be >= 1 (K sub-networks per step)")
        _require(subnet_reduction in SUBNET_REDUCTIONS, f"subnet_reduction={subnet_reduction!r}: choose one of {SUBNET_REDUCTIONS}")
        _require(logit_norm_amplitude > 0, f"logit_norm_amplitude={logit_norm_amplitude}: must be > 0")
        _require(0 < small_input_min_fraction <= 1, f"small_input_min_fraction={small_input_min_fraction}: must be in (0, 1]")
        self.sampler = sampler
        self.kl_weight, self.temperature = kl_weight, temperature
        self.num_subnets, self.subnet_reduction = num_subnets, subnet_reduction
        self.logit_norm, self.logit_norm_amplitude = logit_norm, logit_norm_amplitude
        self.small_inputs, self.small_input_min_fraction = small_inputs, small_input_min_fraction
        self.share_prefix, self.rank = share_prefix, rank

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
        rng = step_rng(self.sampler.seed, step, k, rank=self.rank if self.sampler.per_rank else None, stream=STREAM_INPUT_SIZE)
        size = int(rng.integers(low, crop + 1))
        if size == crop:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    @staticmethod
    def divergence(depths: Depths, full: Depths) -> int | None:
        """The first stage where a sub-net drops blocks; None for the full network."""
        return next((s for s, (d, n) in enumerate(zip(depths, full)) if d < n), None)

    def forward(self, model, images, labels, step):
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
        ce = F.cross_entropy(main, labels)
        teacher = main.detach()

        kls = []
        for k, depths in enumerate(subnets):
            plan: Plan = model.plan_for_depths(depths)
            stage = self.divergence(depths, full)
            if self.small_inputs:
                sub_logits = model.run(self._subnet_input(images, step, k), plan)
            elif not shared:
                sub_logits = model.run(images, plan)
            elif stage is None:
                sub_logits = main_logits  # the full network drawn: the main pass is its pass
            else:
                sub_logits = model.run_from_stage_output(taps[(stage, depths[stage] - 1)], stage, plan)
            kls.append(distillation_kl(self._normalise(sub_logits), teacher, self.temperature))
        kl = torch.stack(kls).sum() if self.subnet_reduction == "sum" else torch.stack(kls).mean()
        loss = ce + self.kl_weight * kl
        blocks = sum(sum(d) for d in subnets) / len(subnets)
        parts = {"ce": ce.detach(), "kl": kl.detach(), "subnet_blocks": torch.tensor(float(blocks))}
        return LossOutput(loss, parts, main_logits)


class StochasticDepth(Objective):
    """Per mini-batch Bernoulli skip of each droppable block; survival decays linearly with the
    block's position to `final_survival` at the last block. At test time every block runs with its
    branch scaled by its survival probability (set on the model here, so evaluation sees it)."""

    name = "stochastic_depth"

    def __init__(self, model: ElasticNet, *, final_survival: float = 0.5, seed: int = 0):
        super().__init__()
        _require(0 < final_survival <= 1, f"final_survival={final_survival}: must be in (0, 1]")
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
        ce = F.cross_entropy(logits.float(), labels)
        kept = float(sum(len(blocks) for blocks in plan))
        return LossOutput(ce, {"ce": ce.detach(), "kept_blocks": torch.tensor(kept)}, logits)


def _feature_channels(model: ElasticNet, image_size: int = 32) -> tuple[dict[tuple[int, int], int], int]:
    """Channels after every block position of the full net, and the number of classes."""
    channels: dict[tuple[int, int], int] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model.run(
            torch.zeros(1, 3, image_size, image_size),
            model.plan_for_depths(None),
            on_block=lambda s, p, x: channels.__setitem__((s, p), x.shape[1]),
        )
    model.train(was_training)
    return channels, logits.shape[-1]


def _aux_head(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


class AuxiliarySupervision(Objective):
    """CT plus auxiliary classifiers (pool + linear) on intermediate outputs.

    `per="block"`: after every residual block (layer supervision); `per="stage"`: after every stage
    (stage supervision). The last position feeds the main head already and gets none. With
    `distill_alpha > 0` each head also learns from the main net's detached output (self-distillation,
    Be-Your-Own-Teacher style): (1 - alpha) * CE + alpha * T^2 * KL.
    """

    def __init__(self, model: ElasticNet, *, per: str, distill_alpha: float = 0.0, temperature: float = 3.0, name: str):
        super().__init__()
        _require(per in ("block", "stage"), f"per={per!r}: choose 'block' or 'stage'")
        _require(0 <= distill_alpha <= 1, f"distill_alpha={distill_alpha}: must be in [0, 1]")
        _require(temperature > 0, f"temperature={temperature}: must be > 0")
        self.name, self.distill_alpha, self.temperature = name, distill_alpha, temperature
        channels, num_classes = _feature_channels(model)
        last = (model.num_stages - 1, model.stage_sizes[-1] - 1)
        if per == "block":
            positions = [p for p in sorted(channels) if p != last]
        else:
            positions = [(s, model.stage_sizes[s] - 1) for s in range(model.num_stages - 1)]
        self.positions = positions
        self.heads = nn.ModuleList(_aux_head(channels[p], num_classes) for p in positions)

    def forward(self, model, images, labels, step):
        features: dict[tuple[int, int], torch.Tensor] = {}
        wanted = set(self.positions)
        logits = model.run(
            images,
            model.plan_for_depths(None),
            on_block=lambda s, p, x: features.__setitem__((s, p), x) if (s, p) in wanted else None,
        )
        ce = F.cross_entropy(logits.float(), labels)
        teacher = logits.detach()
        aux_ce, aux_kl = [], []
        for position, head in zip(self.positions, self.heads):
            out = head(features[position])
            aux_ce.append(F.cross_entropy(out.float(), labels))
            if self.distill_alpha > 0:
                aux_kl.append(distillation_kl(out, teacher, self.temperature))
        a = self.distill_alpha
        aux_ce_sum = torch.stack(aux_ce).sum()
        loss = ce + (1 - a) * aux_ce_sum
        parts = {"ce": ce.detach(), "aux_ce": aux_ce_sum.detach()}
        if aux_kl:
            aux_kl_sum = torch.stack(aux_kl).sum()
            loss = loss + a * aux_kl_sum
            parts["aux_kl"] = aux_kl_sum.detach()
        return LossOutput(loss, parts, logits)


METHOD_NAMES = ("ct", "st", "stochastic_depth", "layer_supervision", "stage_supervision", "self_distillation")


def build_objective(name: str, model: ElasticNet, sampler: SubnetSampler | None = None, **options) -> Objective:
    """The objective called `name`; `options` are its keyword arguments."""
    if name == "ct":
        _require(not options, f"method 'ct' takes no options, got {sorted(options)}")
        return CommonTraining()
    if name == "st":
        _require(sampler is not None, "method 'st' needs a sub-network sampler")
        return StimulativeTraining(sampler, **options)
    if name == "stochastic_depth":
        return StochasticDepth(model, **options)
    if name == "layer_supervision":
        return AuxiliarySupervision(model, per="block", name=name, **options)
    if name == "stage_supervision":
        return AuxiliarySupervision(model, per="stage", name=name, **options)
    if name == "self_distillation":
        options.setdefault("distill_alpha", 0.1)
        options.setdefault("temperature", 3.0)
        return AuxiliarySupervision(model, per="stage", name=name, **options)
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHOD_NAMES)}")
