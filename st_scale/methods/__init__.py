"""Training objectives: CT, Stimulative Training and the paper's baselines.

Each method owns its options (a pydantic model whose `name` is its tag) and a builder, and is
registered once below; the recipe's `method:` section validates against the chosen method's
options only. Adding a method: one new module with `Options` and `build`, and one line in METHODS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field

from ..models import ElasticNet
from ..sampling import SubnetSampler
from . import auxiliary, ct, st, stochastic_depth
from .auxiliary import AuxiliarySupervision
from .base import BuildContext, LossOutput, Objective, distillation_kl
from .ct import CommonTraining
from .st import SUBNET_REDUCTIONS, StimulativeTraining
from .stochastic_depth import StochasticDepth


@dataclass(frozen=True)
class Method:
    options: type  # the pydantic options model; its `name` field is the method's tag
    build: Callable[[Any, BuildContext], Objective]
    title: str  # what tables and figures call it (the paper's name)


# In the order of the paper's Table 1, which the study report keeps.
METHODS: dict[str, Method] = {
    "ct": Method(ct.Options, ct.build, "CT"),
    "layer_supervision": Method(
        auxiliary.LayerSupervisionOptions, auxiliary.build_layer_supervision, "CT + layer supervision"
    ),
    "stage_supervision": Method(
        auxiliary.StageSupervisionOptions, auxiliary.build_stage_supervision, "CT + stage supervision"
    ),
    "self_distillation": Method(
        auxiliary.SelfDistillationOptions, auxiliary.build_self_distillation, "self-distillation"
    ),
    "stochastic_depth": Method(stochastic_depth.Options, stochastic_depth.build, "stochastic depth"),
    "st": Method(st.Options, st.build, "ST"),
}
METHOD_NAMES = tuple(METHODS)

# The recipe's `method:` section: exactly one method's options, chosen by `name`.
MethodOptions = Annotated[Union[tuple(m.options for m in METHODS.values())], Field(discriminator="name")]  # noqa: UP007


def build_objective(
    method: str | Any,
    model: ElasticNet,
    sampler: SubnetSampler | None = None,
    *,
    seed: int = 0,
    rank: int = 0,
    **options,
) -> Objective:
    """The objective of `method`: an options model from the config, or a name plus its options as
    keyword arguments (validated by the method's options model). Every stochastic choice follows
    `seed`."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHOD_NAMES)}")
        method = METHODS[method].options(name=method, **options)
    elif options:
        raise ValueError(f"options {sorted(options)} given twice: they belong in the options model")
    objective = METHODS[method.name].build(method, BuildContext(model, sampler, seed, rank))
    objective.label_smoothing = method.label_smoothing
    return objective


__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "SUBNET_REDUCTIONS",
    "AuxiliarySupervision",
    "BuildContext",
    "CommonTraining",
    "LossOutput",
    "MethodOptions",
    "Objective",
    "StimulativeTraining",
    "StochasticDepth",
    "build_objective",
    "distillation_kl",
]
