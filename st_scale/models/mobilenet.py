"""MobileNetV3 as an elastic network.

Only inverted-residual blocks with an identity shortcut can be dropped. A stage is a block that
changes shape (or the stem) followed by the identity-shortcut blocks after it; modules not followed
by any such block are fixed segments.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import get_model
from torchvision.models.mobilenetv3 import InvertedResidual

from .elastic import ElasticNet, Segment

VARIANTS = ("small", "large")


def inverted_residual_branch_end(block: nn.Module) -> nn.Module:
    if not isinstance(block, InvertedResidual):
        raise TypeError(f"not an inverted residual block: {type(block).__name__}")
    return block.block


def _has_identity_shortcut(module: nn.Module) -> bool:
    return isinstance(module, InvertedResidual) and module.use_res_connect


def mobilenet_v3(variant: str, num_classes: int) -> ElasticNet:
    name = f"mobilenet_v3_{variant}"
    net = get_model(name, weights=None, num_classes=num_classes)
    groups: list[list[nn.Module]] = []
    for module in net.features:
        if _has_identity_shortcut(module) and groups:
            groups[-1].append(module)
        else:
            groups.append([module])
    segments, stage = [], 0
    for group in groups:
        if len(group) > 1:
            segments.append(Segment(group, stage=stage))
            stage += 1
        else:
            segments.append(Segment(group))
    segments.append(Segment([nn.Sequential(net.avgpool, nn.Flatten(1), net.classifier)]))
    return ElasticNet(name, net, segments, inverted_residual_branch_end)
