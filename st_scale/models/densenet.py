"""DenseNets as elastic networks: torchvision's DenseNet-121/169/201, DenseNet-264 and a CIFAR-size
DenseNet-BC.

A dense block is a stage; each of its layers is a block that appends `growth_rate` channels to its
input (x -> cat(x, layer(x))). A sub-network keeps the first d layers of each dense block: those layers
see exactly what they see in the full network, and the transition (or the head) after the block reads
only the channels they produced, so its weights are sliced to the leading input channels. That is how
DenseNet-121's depths sit inside DenseNet-264 (the transitions keep the full network's output widths).
A layer deleted from the middle of a block (destruction tests, stochastic depth) contributes zeros:
the channels after it stay where the full network has them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model
from torchvision.models.densenet import DenseNet, _DenseBlock, _Transition

from .elastic import ElasticNet, Segment

TORCHVISION_DENSENETS = (121, 169, 201)
# Huang et al. 2017, Table 1: DenseNet-264 is (6, 12, 64, 48) with growth 32, not in torchvision.
DENSENET264_BLOCKS = (6, 12, 64, 48)
CIFAR_DENSENET_DEPTHS = (40, 100)  # DenseNet-BC-(L, k=12): 3 blocks of (L - 4) / 6 layers


class CifarDenseNet(nn.Module):
    """DenseNet-BC for 32 px images (Huang et al. 2017, section 4): a 3x3 stem of 2k channels, three
    dense blocks of bottleneck layers with transitions halving the channels, with torchvision's
    attribute names (features.conv0, features.denseblockN, features.transitionN, features.norm5,
    classifier) and its forward."""

    def __init__(self, depth: int, num_classes: int = 10, growth_rate: int = 12, bn_size: int = 4):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"DenseNet-BC depth {depth} is not 6n+4 (n >= 1); use one of {CIFAR_DENSENET_DEPTHS}")
        layers = (depth - 4) // 6
        channels = 2 * growth_rate
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, channels, kernel_size=3, padding=1, bias=False))
        for i in range(3):
            self.features.add_module(
                f"denseblock{i + 1}",
                _DenseBlock(layers, channels, bn_size=bn_size, growth_rate=growth_rate, drop_rate=0),
            )
            channels += layers * growth_rate
            if i < 2:
                self.features.add_module(f"transition{i + 1}", _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    forward = DenseNet.forward  # relu after norm5, global average pooling, classifier


class DenseUnit(nn.Module):
    """One dense layer as an elastic block: its input with the layer's new features appended."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer(x)], 1)

    def skipped(self, x: torch.Tensor) -> torch.Tensor:
        """The layer deleted: zeros where its features would be."""
        growth = self.layer.conv2.out_channels
        return torch.cat([x, x.new_zeros(x.shape[0], growth, *x.shape[2:])], 1)


def _sliced_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn` on the leading x.shape[1] of its channels (running statistics of those channels updated
    in place in training, as the whole layer's would be)."""
    c = x.shape[1]
    if c == bn.num_features:
        return bn(x)
    use_batch_stats = bn.training or bn.running_mean is None
    if bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.momentum is None:  # cumulative average, as nn.BatchNorm2d does it
        momentum = 1.0 / float(bn.num_batches_tracked)
    return F.batch_norm(
        x,
        None if bn.running_mean is None else bn.running_mean[:c],
        None if bn.running_var is None else bn.running_var[:c],
        bn.weight[:c],
        bn.bias[:c],
        use_batch_stats,
        momentum,
        bn.eps,
    )


class SlicedTransition(nn.Module):
    """A transition that reads the leading channels it is given: BN, ReLU, 1x1 conv (its input
    weights sliced) and 2x2 average pooling."""

    def __init__(self, transition: _Transition):
        super().__init__()
        self.transition = transition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transition
        x = F.relu(_sliced_batch_norm(t.norm, x))
        return t.pool(F.conv2d(x, t.conv.weight[:, : x.shape[1]]))

    def parameters_read(self, width: int) -> int:
        """Parameters used on `width` input channels: BN's scale and shift, the conv's input slices."""
        return 2 * width + self.transition.conv.out_channels * width


class SlicedHead(nn.Module):
    """norm5, ReLU, global average pooling and the classifier, on the leading channels given."""

    def __init__(self, norm: nn.BatchNorm2d, classifier: nn.Linear):
        super().__init__()
        self.norm, self.classifier = norm, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(_sliced_batch_norm(self.norm, x)), 1), 1)
        return F.linear(x, self.classifier.weight[:, : x.shape[1]], self.classifier.bias)

    def parameters_read(self, width: int) -> int:
        return 2 * width + (width + 1) * self.classifier.out_features


def dense_branch_end(block: nn.Module) -> nn.Module:
    """The module whose output is a dense layer's contribution: the layer itself."""
    if not isinstance(block, DenseUnit):
        raise TypeError(f"not a dense layer: {type(block).__name__}")
    return block.layer


def elastic_densenet(name: str, net: nn.Module) -> ElasticNet:
    """View a model with torchvision's DenseNet layout as stem, dense blocks, sliced transitions, head."""
    features = dict(net.features.named_children())
    stem = [module for key, module in features.items() if key.endswith("0")]  # conv0 (norm0, relu0, pool0)
    segments = [Segment([nn.Sequential(*stem)])]
    stage = 0
    while f"denseblock{stage + 1}" in features:
        segments.append(Segment([DenseUnit(layer) for layer in features[f"denseblock{stage + 1}"].values()], stage))
        transition = features.get(f"transition{stage + 1}")
        if transition is not None:
            segments.append(Segment([SlicedTransition(transition)]))
        stage += 1
    segments.append(Segment([SlicedHead(features["norm5"], net.classifier)]))
    return ElasticNet(name, net, segments, dense_branch_end)


def cifar_densenet(depth: int, num_classes: int) -> ElasticNet:
    return elastic_densenet(f"cifar_densenet{depth}", CifarDenseNet(depth, num_classes))


def torchvision_densenet(depth: int, num_classes: int) -> ElasticNet:
    name = f"densenet{depth}"
    if depth == 264:
        net = DenseNet(growth_rate=32, block_config=DENSENET264_BLOCKS, num_init_features=64, num_classes=num_classes)
    else:
        net = get_model(name, weights=None, num_classes=num_classes)
    return elastic_densenet(name, net)


def truncated_densenet(model: ElasticNet, depths) -> ElasticNet:
    """The DenseNet `model` with the first depths[s] layers of each dense block, each transition (and
    norm5, classifier) reading the channels those layers produce and keeping the full network's
    output widths: a sub-network's architecture as a plain DenseNet, named e.g. densenet264[6-12-24-16]."""
    features = model.net.features
    for stage, depth in enumerate(depths):
        block = getattr(features, f"denseblock{stage + 1}")
        for key in list(block.keys())[depth:]:
            del block[key]
        last = block[list(block.keys())[-1]]
        width = last.norm1.num_features + last.conv2.out_channels
        transition = getattr(features, f"transition{stage + 1}", None)
        if transition is not None and transition.norm.num_features != width:
            narrower = _Transition(width, transition.conv.out_channels)
            nn.init.kaiming_normal_(narrower.conv.weight)
            setattr(features, f"transition{stage + 1}", narrower)
        elif transition is None and features.norm5.num_features != width:
            features.norm5 = nn.BatchNorm2d(width)
            model.net.classifier = nn.Linear(width, model.net.classifier.out_features)
            nn.init.constant_(model.net.classifier.bias, 0)
    return elastic_densenet(f"{model.name}[{'-'.join(map(str, depths))}]", model.net)
