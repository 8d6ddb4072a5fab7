"""Elastic residual networks and the factory that builds them by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .densenet import (
    CIFAR_DENSENET_DEPTHS,
    TORCHVISION_DENSENETS,
    cifar_densenet,
    torchvision_densenet,
)
from .elastic import Depths, ElasticNet, Plan, Segment, batchnorm_layers, preserved_mode
from .mobilenet import mobilenet_v3
from .resnet import CIFAR_DEPTHS, TORCHVISION_DEPTHS, CifarResNet, cifar_resnet, torchvision_resnet, truncated_resnet

_FACTORIES: dict[str, Callable[[int], ElasticNet]] = {
    **{f"cifar_resnet{d}": partial(cifar_resnet, d) for d in CIFAR_DEPTHS},
    **{f"resnet{d}": partial(torchvision_resnet, d) for d in TORCHVISION_DEPTHS},
    **{f"cifar_densenet{d}": partial(cifar_densenet, d) for d in CIFAR_DENSENET_DEPTHS},
    **{f"densenet{d}": partial(torchvision_densenet, d) for d in (*TORCHVISION_DENSENETS, 264)},
    "mobilenet_v3_small": partial(mobilenet_v3, "small"),
    "mobilenet_v3_large": partial(mobilenet_v3, "large"),
}
MODEL_NAMES = tuple(_FACTORIES)


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
    if not name.startswith(("cifar_resnet", "resnet")):
        raise ValueError(f"model.stage_depths={list(stage_depths)}: supported for ResNets, not {name}")
    return truncated_resnet(model, depths)


__all__ = [
    "MODEL_NAMES",
    "CifarResNet",
    "Depths",
    "ElasticNet",
    "Plan",
    "Segment",
    "batchnorm_layers",
    "create_model",
    "preserved_mode",
]
