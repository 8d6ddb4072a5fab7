"""Auxiliary supervision baselines of the paper's Table 1: CT + layer supervision, CT + stage
supervision, and self-distillation (Be Your Own Teacher style)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..models import ElasticNet, preserved_mode
from .base import BuildContext, CommonOptions, LossOutput, Objective, _require, distillation_kl, method_options


class LayerSupervisionOptions(CommonOptions):
    name: Literal["layer_supervision"] = "layer_supervision"


class StageSupervisionOptions(CommonOptions):
    name: Literal["stage_supervision"] = "stage_supervision"


class SelfDistillationOptions(CommonOptions):
    name: Literal["self_distillation"] = "self_distillation"
    distill_alpha: float = Field(0.1, ge=0, le=1, description="weight of the KL to the main net in each head's loss")
    distill_temperature: float = Field(3.0, gt=0)


LAYOUT_WORDS = {"nhwc": "NHWC feature maps", "tokens": "tokens (batch x tokens x width)"}


def _feature_channels(model: ElasticNet, image_size: int = 32) -> tuple[dict[tuple[int, int], int], int]:
    """Channels after every block position of the full net, and the number of classes."""
    channels: dict[tuple[int, int], int] = {}
    with preserved_mode(model), torch.no_grad():
        model.eval()
        logits = model.run(
            torch.zeros(1, 3, image_size, image_size),
            model.plan_for_depths(None),
            on_block=lambda s, p, x: channels.__setitem__((s, p), x.shape[1]),
        )
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

    def __init__(
        self, model: ElasticNet, *, per: str, name: str, distill: SelfDistillationOptions | None = None, **fields
    ):
        """`distill`: self-distillation's options (or their fields as keyword arguments, the recipe's
        defaults for the rest); without either, the heads learn from the labels alone."""
        super().__init__()
        _require(per in ("block", "stage"), f"per={per!r}: choose 'block' or 'stage'")
        # A head pools a block's output over its spatial axes: NCHW feature maps only. On a ViT's tokens
        # or Swin's NHWC maps it would pool over the wrong axes (or fail at the first step).
        if model.feature_layout != "nchw":
            raise ValueError(
                f"method {name}: its heads read convolutional (NCHW) feature maps, and {model.name}'s blocks "
                f"give {LAYOUT_WORDS[model.feature_layout]}; train {model.name} with ct, st or stochastic_depth"
            )
        if distill is not None or fields:
            distill = method_options(SelfDistillationOptions, distill, fields)
        self.name = name
        self.distill_alpha = distill.distill_alpha if distill else 0.0
        self.temperature = distill.distill_temperature if distill else None
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
        ce = self.cross_entropy(logits, labels)
        teacher = logits.detach()
        aux_ce, aux_kl = [], []
        for position, head in zip(self.positions, self.heads):
            out = head(features[position])
            aux_ce.append(self.cross_entropy(out, labels))
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


def build_layer_supervision(options: LayerSupervisionOptions, ctx: BuildContext) -> AuxiliarySupervision:
    return AuxiliarySupervision(ctx.model, per="block", name=options.name)


def build_stage_supervision(options: StageSupervisionOptions, ctx: BuildContext) -> AuxiliarySupervision:
    return AuxiliarySupervision(ctx.model, per="stage", name=options.name)


def build_self_distillation(options: SelfDistillationOptions, ctx: BuildContext) -> AuxiliarySupervision:
    return AuxiliarySupervision(ctx.model, per="stage", name=options.name, distill=options)
