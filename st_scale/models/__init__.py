"""Elastic residual networks and the factory that builds them by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .densenet import (
    CIFAR_DENSENET_DEPTHS,
    TORCHVISION_DENSENETS,
    cifar_densenet,
    torchvision_densenet,
    truncated_densenet,
)
from .elastic import Depths, ElasticNet, Plan, Segment, batchnorm_layers, preserved_mode
from .mobilenet import mobilenet_v3
from .resnet import CIFAR_DEPTHS, TORCHVISION_DEPTHS, CifarResNet, cifar_resnet, torchvision_resnet, truncated_resnet
from .transformer import FIXED_IMAGE_SIZES, SWIN_PREFIXES, VIT_PREFIXES, swin, truncated_swin, truncated_vit, vit

_FACTORIES: dict[str, Callable[[int], ElasticNet]] = {
    **{f"cifar_resnet{d}": partial(cifar_resnet, d) for d in CIFAR_DEPTHS},
    **{f"resnet{d}": partial(torchvision_resnet, d) for d in TORCHVISION_DEPTHS},
    **{f"cifar_densenet{d}": partial(cifar_densenet, d) for d in CIFAR_DENSENET_DEPTHS},
    **{f"densenet{d}": partial(torchvision_densenet, d) for d in (*TORCHVISION_DENSENETS, 264)},
    "mobilenet_v3_small": partial(mobilenet_v3, "small"),
    "mobilenet_v3_large": partial(mobilenet_v3, "large"),
    **{name: partial(vit, name) for name in ("cifar_vit", "vit_b_16")},
    **{name: partial(swin, name) for name in ("cifar_swin", "swin_t")},
}
MODEL_NAMES = tuple(_FACTORIES)
# Each family's sub-network as a plain model of its own: (name prefixes, truncation).
_TRUNCATIONS = (
    (("cifar_resnet", "resnet"), truncated_resnet),
    (("cifar_densenet", "densenet"), truncated_densenet),
    (VIT_PREFIXES, truncated_vit),
    (SWIN_PREFIXES, truncated_swin),
)
STANDALONE_FAMILIES = "ResNets, DenseNets, ViTs and Swins"


def has_batch_norm(name: str) -> bool:
    """Whether the model keeps BatchNorm statistics (a transformer's LayerNorm keeps none)."""
    return not name.startswith(VIT_PREFIXES + SWIN_PREFIXES)


def has_standalone_subnets(name: str) -> bool:
    """Whether `create_model(name, stage_depths=...)` builds that family's sub-networks."""
    return any(name.startswith(prefixes) for prefixes, _ in _TRUNCATIONS)


def create_model(name: str, num_classes: int, *, stage_depths=None) -> ElasticNet:
    """Build an elastic network by name, randomly initialised (nothing is downloaded). With
    `stage_depths`, only the first d blocks of each stage are built: the architecture of that
    sub-network as a model of its own (to train it alone, the loafing comparison)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown model name {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    model = _FACTORIES[name](num_classes)
    if stage_depths is None:
        return model
    depths = model.check_depths(stage_depths)
    for prefixes, truncated in _TRUNCATIONS:
        if name.startswith(prefixes):
            shallower = truncated(model, depths)
            shallower.registry_name = name
            return shallower
    raise ValueError(f"model.stage_depths={list(stage_depths)}: supported for {STANDALONE_FAMILIES}, not {name}")


__all__ = [
    "FIXED_IMAGE_SIZES",
    "MODEL_NAMES",
    "STANDALONE_FAMILIES",
    "CifarResNet",
    "Depths",
    "ElasticNet",
    "Plan",
    "Segment",
    "batchnorm_layers",
    "create_model",
    "has_batch_norm",
    "has_standalone_subnets",
    "preserved_mode",
]
