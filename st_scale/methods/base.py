"""What every training objective shares: the loss output, the distillation KL, the base class and
the context an objective is built in. An objective knows nothing of Ray or DeepSpeed."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import nn

from ..models import ElasticNet
from ..sampling import SubnetSampler
from ..schema import Section


class CommonOptions(Section):
    """What every method's options hold besides its own."""

    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="every cross-entropy term against the labels aims at (1 - e) on the label and e spread "
        "evenly over all classes (Szegedy et al. 2016; timm's --smoothing); distillation KLs are unchanged",
    )


@dataclass
class BuildContext:
    """What a method may need besides its options: the run's seed decides every stochastic choice."""

    model: ElasticNet
    sampler: SubnetSampler | None = None
    seed: int = 0
    rank: int = 0


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached scalars, logged as train/<name>
    logits: torch.Tensor  # the main network's logits (for train accuracy)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over the batch.

    Computed in fp32 whatever the logits' dtype. The caller decides whether the teacher is detached.
    """
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def method_options(options_model: type[Section], options: Section | None, fields: dict[str, Any]) -> Section:
    """An objective's options: the options model it was given, or one made from keyword arguments
    and checked by `options_model`, where a method's fields, defaults and bounds are declared, once.
    A bad value is a ValueError naming the field, the value and what it must be."""
    if options is not None:
        if fields:
            raise ValueError(f"{sorted(fields)} given beside the options model: set them in it")
        return options
    try:
        return options_model(**fields)
    except ValidationError as error:
        raise ValueError(_described(options_model, error.errors()[0])) from None


_OPERATORS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _described(options_model: type[Section], error: dict) -> str:
    """One pydantic error as `field=value: must be ...`, the bound read from the field itself."""
    if error["type"] == "value_error":  # a validator's own message, which names the field
        return str(error["ctx"]["error"])
    field = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    shown = f"{field}={value!r}" if isinstance(value, str) else f"{field}={value}"
    info = options_model.model_fields.get(field)
    bounds = {
        name: getattr(constraint, name)
        for constraint in (info.metadata if info else ())
        for name in _OPERATORS
        if getattr(constraint, name, None) is not None
    }
    if not bounds or error["type"] not in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{shown}: {error['msg']}"
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds['ge']}" if "ge" in bounds else None
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds['le']}]" if "le" in bounds else None
    if low and high:
        return f"{shown}: must be in {low}, {high}"
    name, bound = next(iter(bounds.items()))
    return f"{shown}: must be {_OPERATORS[name]} {bound}"


class Objective(nn.Module, abc.ABC):
    name = "objective"
    label_smoothing = 0.0  # the method's `label_smoothing` option, set by `build_objective`

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the labels, smoothed by `label_smoothing`, in fp32."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    @abc.abstractmethod
    def forward(self, model: ElasticNet, images: torch.Tensor, labels: torch.Tensor, step: int) -> LossOutput:
        """The loss of one training step at global step `step`."""
