"""What every training objective shares: the loss output, the distillation KL, the base class and
the context an objective is built in. An objective knows nothing of Ray or DeepSpeed."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
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


class Objective(nn.Module, abc.ABC):
    name = "objective"
    label_smoothing = 0.0  # the method's `label_smoothing` option, set by `build_objective`

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the labels, smoothed by `label_smoothing`, in fp32."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    @abc.abstractmethod
    def forward(self, model: ElasticNet, images: torch.Tensor, labels: torch.Tensor, step: int) -> LossOutput:
        """The loss of one training step at global step `step`."""
