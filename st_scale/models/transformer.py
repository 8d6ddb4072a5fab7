"""Vision transformers as elastic networks: torchvision's ViT-B/16 and Swin-T, and CPU-size ones for
32 px images.

Swin has stages of its own (2-2-6-2 blocks at four resolutions, patch merging between them): a
sub-network keeps the first d blocks of each, as a ResNet does. A ViT has one stage of identical
blocks, so st-scale cuts its encoder into groups of consecutive blocks (ViT-B/16: four groups of
three) and a sub-network keeps the first d blocks of each group. Dropping only the top blocks of
one stage would give a space of 12 networks that all share the lower layers; groups give a product
space like a ResNet's (81 networks for ViT-B/16), which ST's samplers, the tree evaluation and the
sweeps over the sampling distribution are built for, and they spread the dropped depth over the
whole network, which pruning transformer layers finds better than dropping the top ones (Fan et
al. 2019, LayerDrop).

Transformer blocks are pre-norm residual blocks, y = x + f(x) with nothing after the addition, so a
dropped block is the identity and a block's branch is scaled as a whole (`y = x + s * f(x)`). They
hold LayerNorm, not BatchNorm: evaluation has no statistics to re-estimate for them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import get_model
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from .elastic import ElasticNet, Segment

VIT_PREFIXES, SWIN_PREFIXES = ("cifar_vit", "vit_"), ("cifar_swin", "swin_")
# Models that only take one input size (a ViT's position embedding has one entry per patch).
FIXED_IMAGE_SIZES = {"vit_b_16": 224, "cifar_vit": 32}
VIT_GROUPS = {"vit_b_16": 4, "cifar_vit": 3}


def cifar_vit_net(num_classes: int) -> VisionTransformer:
    """A ViT for 32 px images: 4 px patches (64 tokens and a class token), 96 wide, 3 heads."""
    return VisionTransformer(
        image_size=32, patch_size=4, num_layers=9, num_heads=3, hidden_dim=96, mlp_dim=192,
        num_classes=num_classes,
    )  # fmt: skip


def swin_t_net(num_classes: int) -> SwinTransformer:
    """torchvision's swin_t without its stochastic depth (one of st-scale's methods, not part of the
    architecture)."""
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=[7, 7],
        stochastic_depth_prob=0.0, num_classes=num_classes,
    )  # fmt: skip


def cifar_swin_net(num_classes: int) -> SwinTransformer:
    """Swin-T's 2-2-6-2 layout for 32 px images: 2 px patches (16x16 tokens), 4x4 windows, 32 wide."""
    return SwinTransformer(
        patch_size=[2, 2], embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=num_classes,
    )  # fmt: skip


class ViTEmbedding(nn.Module):
    """A ViT's input: patches projected, the class token prepended, the position embedding added."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.image_size = vit.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        torch._assert(h == self.image_size and w == self.image_size, f"this ViT takes {self.image_size} px images")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (n, patches, width), as torchvision's reshape/permute
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTHead(nn.Module):
    """The encoder's final LayerNorm and the classifier on the class token."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.ln, self.heads = vit.encoder.ln, vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def transformer_branch_end(block: nn.Module) -> nn.Module:
    """A transformer block's branch ends at the block's own output (nothing follows the addition)."""
    return block


def elastic_vit(name: str, net: VisionTransformer, groups: tuple[int, ...]) -> ElasticNet:
    """View a torchvision ViT as embedding, `groups` runs of consecutive encoder blocks, head."""
    layers = list(net.encoder.layers)
    if sum(groups) != len(layers):
        raise ValueError(f"{name}: groups {groups} do not add up to its {len(layers)} encoder blocks")
    segments, start = [Segment([ViTEmbedding(net)])], 0
    for stage, size in enumerate(groups):
        segments.append(Segment(layers[start : start + size], stage))
        start += size
    segments.append(Segment([ViTHead(net)]))
    return ElasticNet(name, net, segments, transformer_branch_end, feature_layout="tokens")


def elastic_swin(name: str, net: SwinTransformer) -> ElasticNet:
    """View a torchvision Swin as patch embedding, its stages (patch merging between), head."""
    features = list(net.features)
    segments = [Segment([features[0]])]
    for stage, index in enumerate(range(1, len(features), 2)):
        segments.append(Segment(list(features[index]), stage))
        if index + 1 < len(features):
            segments.append(Segment([features[index + 1]]))  # patch merging
    segments.append(Segment([nn.Sequential(net.norm, net.permute, net.avgpool, net.flatten, net.head)]))
    return ElasticNet(name, net, segments, transformer_branch_end, feature_layout="nhwc")


def _even_groups(num_layers: int, groups: int) -> tuple[int, ...]:
    return tuple(num_layers // groups + (1 if g < num_layers % groups else 0) for g in range(groups))


def vit(name: str, num_classes: int) -> ElasticNet:
    net = cifar_vit_net(num_classes) if name == "cifar_vit" else get_model(name, weights=None, num_classes=num_classes)
    return elastic_vit(name, net, _even_groups(len(net.encoder.layers), VIT_GROUPS[name]))


def swin(name: str, num_classes: int) -> ElasticNet:
    net = cifar_swin_net(num_classes) if name == "cifar_swin" else swin_t_net(num_classes)
    return elastic_swin(name, net)


def truncated_vit(model: ElasticNet, depths) -> ElasticNet:
    """The ViT `model` with the first depths[g] blocks of each group: a plain torchvision ViT of
    sum(depths) blocks (numbered from 0, as torchvision numbers them), each group of the new one holding
    its kept blocks."""
    net = model.net
    kept = [block for stage, d in enumerate(depths) for block in model.stage_blocks(stage)[:d]]
    net.encoder.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", block) for i, block in enumerate(kept)))
    return elastic_vit(f"{model.name}[{'-'.join(map(str, depths))}]", net, tuple(depths))


def truncated_swin(model: ElasticNet, depths) -> ElasticNet:
    """The Swin `model` with the first depths[s] blocks of each stage (shifted windows every second
    block, as before): a plain torchvision Swin of those depths."""
    net = model.net
    for stage, d in enumerate(depths):
        index = 1 + 2 * stage
        net.features[index] = nn.Sequential(*list(net.features[index])[:d])
    return elastic_swin(f"{model.name}[{'-'.join(map(str, depths))}]", net)
