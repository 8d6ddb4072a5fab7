"""ResNets as elastic networks: torchvision's ResNet-18..152 and CIFAR ResNet-6n+2.

The CIFAR nets (He et al. 2016, section 4.2: 3x3 stem, three stages of n basic blocks at 16/32/64
channels) are assembled from torchvision's `BasicBlock`, with 1x1-conv projection shortcuts where
the shape changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import get_model
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from .elastic import ElasticNet, Segment

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)


class CifarResNet(nn.Module):
    """Plain CIFAR ResNet with torchvision's attribute names (conv1, bn1, layerN, fc)."""

    def __init__(self, depth: int, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth {depth} is not 6n+2 (n >= 1); use one of {CIFAR_DEPTHS}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_channels != width:
                downsample = nn.Sequential(conv1x1(in_channels, width, stride), nn.BatchNorm2d(width))
            blocks = [BasicBlock(in_channels, width, stride, downsample)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_branch_end(block: nn.Module) -> nn.Module:
    """The last module of a block's residual branch (before the addition)."""
    if isinstance(block, Bottleneck):
        return block.bn3
    if isinstance(block, BasicBlock):
        return block.bn2
    raise TypeError(f"not a ResNet block: {type(block).__name__}")


def elastic_resnet(name: str, net: nn.Module) -> ElasticNet:
    """View a model with torchvision's ResNet layout as stem, stages layer1..layerN, head."""
    stem = [net.conv1, net.bn1, net.relu] + ([net.maxpool] if hasattr(net, "maxpool") else [])
    segments = [Segment([nn.Sequential(*stem)])]
    stage = 0
    while hasattr(net, f"layer{stage + 1}"):
        segments.append(Segment(list(getattr(net, f"layer{stage + 1}")), stage=stage))
        stage += 1
    segments.append(Segment([nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)]))
    return ElasticNet(name, net, segments, resnet_branch_end)


def cifar_resnet(depth: int, num_classes: int) -> ElasticNet:
    return elastic_resnet(f"cifar_resnet{depth}", CifarResNet(depth, num_classes))


def torchvision_resnet(depth: int, num_classes: int) -> ElasticNet:
    name = f"resnet{depth}"
    return elastic_resnet(name, get_model(name, weights=None, num_classes=num_classes))


def truncated_resnet(model: ElasticNet, depths) -> ElasticNet:
    """The ResNet `model` with only the first depths[s] blocks of each stage: a sub-network's
    architecture as a standalone model, named e.g. cifar_resnet20[1-1-1]."""
    net = model.net
    for stage, depth in enumerate(depths):
        layer = getattr(net, f"layer{stage + 1}")
        setattr(net, f"layer{stage + 1}", nn.Sequential(*list(layer)[:depth]))
    return elastic_resnet(f"{model.name}[{'-'.join(map(str, depths))}]", net)
