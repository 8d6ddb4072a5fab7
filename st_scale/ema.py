"""An exponential moving average (EMA) of the trained weights, evaluated next to the weights themselves.

After every optimizer step, ema <- decay * ema + (1 - decay) * weights, over the network's parameters
in fp32 whatever the training dtype (a bf16 average would stop moving: bf16 cannot hold a change of
(1 - decay) of a weight). BatchNorm statistics are not averaged: the averaged weights are evaluated on
statistics re-estimated for them, as the main network is. Data-parallel ranks hold identical weights
(ZeRO-1/2 shards only the optimizer state), so each keeps the same average; rank 0 checkpoints it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def weights_applied(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """`model` holding `weights` (one per parameter name, cast to the model's dtype and device) inside
    the block, and its own parameters again after it, an error included."""
    params = dict(model.named_parameters())
    if weights.keys() != params.keys():
        raise RuntimeError(
            f"the weight average holds {len(weights)} tensors, this model {len(params)} parameters: it was written "
            f"for another model"
        )
    kept = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        yield model
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])


class WeightEma:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay={decay}: give a number in (0, 1), e.g. 0.999")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.average = [p.detach().float().clone() for p in model.parameters()]

    def update(self, model: nn.Module) -> None:
        """One step of the average towards `model`'s current weights."""
        weights = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.average, weights, 1 - self.decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name: the average itself, on the model's device."""
        return dict(zip(self.names, self.average, strict=True))

    def applied(self, model: nn.Module):
        """`model` holding the averaged weights inside the block, its own after."""
        return weights_applied(model, self.weights())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: a.cpu() for name, a in zip(self.names, self.average, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if list(state) != self.names:
            raise RuntimeError(
                f"the weight average holds {len(state)} tensors, this model {len(self.names)} parameters: it was "
                f"written for another model"
            )
        for a, name in zip(self.average, self.names, strict=True):
            a.copy_(state[name])
