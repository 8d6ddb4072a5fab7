"""CT: common training, cross-entropy on the full network only."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from ..schema import Section
from .base import BuildContext, LossOutput, Objective


class Options(Section):
    name: Literal["ct"] = "ct"


class CommonTraining(Objective):
    """CT: cross-entropy on the full network; no sub-network pass at all."""

    name = "ct"

    def forward(self, model, images, labels, step):
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        return LossOutput(ce, {"ce": ce.detach()}, logits)


def build(options: Options, ctx: BuildContext) -> CommonTraining:
    return CommonTraining()
