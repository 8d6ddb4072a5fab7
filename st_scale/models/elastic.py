"""Elastic residual networks: a plain network seen as stages of droppable residual blocks.

`ElasticNet` wraps an ordinary model (its parameters stay under `.net`, so state dicts match the
plain model) and runs any sub-network: per stage, a list of the blocks to run, in order. A depth
vector `d` (stage s keeps its first d_s blocks) is the sub-network space of Stimulative Training;
arbitrary block lists serve the destruction tests and stochastic depth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..sampling import Depths

# Per stage, the indices of the blocks to run, in order. Block 0 of a stage changes resolution or
# width, so every plan keeps it first.
Plan = tuple[tuple[int, ...], ...]
BlockCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class Segment:
    """A run of modules executed in order. `stage` is its index in the depth vector, or None for a
    fixed segment (stem, transition, head) that always runs whole."""

    blocks: list[nn.Module]
    stage: int | None = None


@contextlib.contextmanager
def preserved_mode(model: nn.Module) -> Iterator[None]:
    """Restore the model's train/eval mode afterwards."""
    was_training = model.training
    try:
        yield
    finally:
        model.train(was_training)


FEATURE_LAYOUTS = ("nchw", "nhwc", "tokens")


class ElasticNet(nn.Module):
    def __init__(
        self,
        name: str,
        net: nn.Module,
        segments: Sequence[Segment],
        branch_end: Callable[[nn.Module], nn.Module],
        feature_layout: str = "nchw",
    ):
        super().__init__()
        self.name = name
        # How a block's output is laid out: "nchw" (convolutional feature maps), "nhwc" (Swin) or
        # "tokens" (a ViT's batch x tokens x width). What reads features between blocks depends on it.
        if feature_layout not in FEATURE_LAYOUTS:
            raise ValueError(f"{name}: feature_layout={feature_layout!r}; choose one of {', '.join(FEATURE_LAYOUTS)}")
        self.feature_layout = feature_layout
        # The name `create_model` knows it by: a model built with `stage_depths` is named after its
        # depths ("cifar_resnet20[2-2-2]"), and its sub-networks are built from the family's full name.
        self.registry_name = name
        self.net = net
        # A plain tuple: the modules are registered once, under self.net.
        self._segments = tuple(segments)
        self._branch_end = branch_end
        self._stage_segments = tuple(i for i, s in enumerate(self._segments) if s.stage is not None)
        self.stage_sizes: Depths = tuple(len(self._segments[i].blocks) for i in self._stage_segments)
        self._branch_scales_on = True
        self._branch_hooks: list = []
        # Blocks that keep their input's shape (residual blocks) may run in another order; blocks that
        # widen it (dense layers) may not, and a deleted one leaves its `skipped(x)` in its place.
        self.blocks_reorderable = not any(
            hasattr(block, "skipped") for i in self._stage_segments for block in self._segments[i].blocks
        )

    # ----------------------------------------------------------------------------- structure
    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._segments

    @property
    def num_stages(self) -> int:
        return len(self.stage_sizes)

    @property
    def full_depths(self) -> Depths:
        return self.stage_sizes

    def stage_segment_index(self, stage: int) -> int:
        return self._stage_segments[stage]

    def stage_blocks(self, stage: int) -> list[nn.Module]:
        return self._segments[self._stage_segments[stage]].blocks

    def droppable_blocks(self) -> Iterator[tuple[int, int, nn.Module]]:
        """(stage, index, block) of every block with an identity shortcut (index >= 1)."""
        for stage in range(self.num_stages):
            for index, block in enumerate(self.stage_blocks(stage)):
                if index > 0:
                    yield stage, index, block

    def check_depths(self, depths: Sequence[int]) -> Depths:
        depths = tuple(int(d) for d in depths)
        if len(depths) != self.num_stages:
            raise ValueError(
                f"depth vector {list(depths)} has {len(depths)} entries but {self.name} has "
                f"{self.num_stages} stages with {list(self.stage_sizes)} blocks: give one depth per stage"
            )
        for stage, (d, n) in enumerate(zip(depths, self.stage_sizes)):
            if not 1 <= d <= n:
                raise ValueError(
                    f"depth vector {list(depths)}: stage {stage} depth {d} is out of range; "
                    f"{self.name} allows 1..{n} blocks in stage {stage}"
                )
        return depths

    def plan_for_depths(self, depths: Sequence[int] | None) -> Plan:
        depths = self.full_depths if depths is None else self.check_depths(depths)
        return tuple(tuple(range(d)) for d in depths)

    def check_plan(self, plan: Sequence[Sequence[int]]) -> Plan:
        plan = tuple(tuple(int(b) for b in blocks) for blocks in plan)
        if len(plan) != self.num_stages:
            raise ValueError(f"block plan has {len(plan)} stages, {self.name} has {self.num_stages}")
        for stage, (blocks, n) in enumerate(zip(plan, self.stage_sizes)):
            if not blocks or blocks[0] != 0:
                raise ValueError(f"block plan stage {stage} must start with block 0 (it changes shape): {blocks}")
            if any(not 0 <= b < n for b in blocks):
                raise ValueError(f"block plan stage {stage} has indices outside 0..{n - 1}: {blocks}")
            if not self.blocks_reorderable and list(blocks) != sorted(set(blocks)):
                raise ValueError(
                    f"block plan stage {stage} runs {blocks}: {self.name}'s blocks widen their input, so they run in "
                    f"their own order, each once"
                )
        return plan

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, depths: Sequence[int] | None = None) -> torch.Tensor:
        return self.run(x, self.plan_for_depths(depths))

    def run(
        self,
        x: torch.Tensor,
        plan: Plan,
        *,
        start_segment: int = 0,
        on_block: BlockCallback | None = None,
    ) -> torch.Tensor:
        """Run segments from `start_segment` on, executing `plan` inside stages.

        `on_block(stage, position, output)` sees the output after the first `position + 1` planned
        blocks of a stage: prefix sharing and auxiliary heads read activations from it.
        """
        for segment in self._segments[start_segment:]:
            if segment.stage is None:
                for block in segment.blocks:
                    x = block(x)
                continue
            blocks = segment.blocks
            last = -1
            for position, index in enumerate(plan[segment.stage]):
                if not self.blocks_reorderable:  # deleted dense layers in between leave zeros
                    for deleted in range(last + 1, index):
                        x = blocks[deleted].skipped(x)
                    last = index
                x = blocks[index](x)
                if on_block is not None:
                    on_block(segment.stage, position, x)
        return x

    def run_from_stage_output(self, h: torch.Tensor, stage: int, plan: Plan) -> torch.Tensor:
        """Continue a forward whose stage `stage` has already produced `h`."""
        return self.run(h, plan, start_segment=self._stage_segments[stage] + 1)

    # ----------------------------------------------------------------------------- branch scaling
    def set_branch_scales(self, scales: dict[tuple[int, int], float] | None) -> None:
        """Scale the residual branch of droppable blocks, e.g. by the survival probability of
        stochastic depth at test time. `None` removes the scaling."""
        for handle in self._branch_hooks:
            handle.remove()
        self._branch_hooks = []
        if not scales:
            return
        for stage, index, block in self.droppable_blocks():
            scale = scales.get((stage, index))
            if scale is None or scale == 1.0:
                continue
            end = self._branch_end(block)
            # A block whose branch ends at its own output (a pre-norm transformer block) scales y - x.
            hook = _ResidualScale(self, float(scale)) if end is block else _BranchScale(self, float(scale))
            self._branch_hooks.append(end.register_forward_hook(hook))

    @property
    def has_branch_scales(self) -> bool:
        return bool(self._branch_hooks)

    @contextlib.contextmanager
    def unscaled_branches(self) -> Iterator[None]:
        """Training-time stochastic depth runs surviving branches unscaled."""
        previous, self._branch_scales_on = self._branch_scales_on, False
        try:
            yield
        finally:
            self._branch_scales_on = previous


class _BranchScale:
    """Forward hook (a class, not a closure, so models stay picklable)."""

    def __init__(self, model: ElasticNet, scale: float):
        self.model, self.scale = model, scale

    def __call__(self, module, inputs, output):
        return output * self.scale if self.model._branch_scales_on else output


class _ResidualScale(_BranchScale):
    """y = x + f(x) becomes x + scale * f(x)."""

    def __call__(self, module, inputs, output):
        x = inputs[0]
        return x + (output - x) * self.scale if self.model._branch_scales_on else output


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
