"""CT: common training, cross-entropy on the full network only."""

from __future__ import annotations

from typing import Literal

from .base import BuildContext, CommonOptions, LossOutput, Objective


class Options(CommonOptions):
    name: Literal["ct"] = "ct"


class CommonTraining(Objective):
    """CT: cross-entropy on the full network; no sub-network pass at all."""

    name = "ct"

    def forward(self, model, images, labels, step):
        logits = model(images)
        ce = self.cross_entropy(logits, labels)
        return LossOutput(ce, {"ce": ce.detach()}, logits)


def build(options: Options, ctx: BuildContext) -> CommonTraining:
    return CommonTraining()
