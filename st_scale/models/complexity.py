"""Multiply-accumulate counts of sub-networks, from one traced forward of the full network.

Blocks with an identity shortcut keep their input's shape, so a block costs the same in every
sub-network that runs it: a sub-net's MACs are the sum of its blocks' MACs. A dense block's layers
widen it, and the transition after it reads the channels the kept layers produced: its cost depends
on the sub-network, so a DenseNet's sub-networks are each measured with one traced forward, and so
are a transformer's: its attention multiplies activations with activations (no module to hook).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from .elastic import Depths, ElasticNet, preserved_mode


def _leaf_macs(module: nn.Module, inputs, output: torch.Tensor) -> int:
    per_image = output[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_image.numel() * module.in_features
    return 0


def _eager():
    """Compiled blocks run eagerly while counting: otherwise each block's hook (a closure of its own)
    makes torch compile that block again, a graph per block (seconds each on a GPU, and counted against
    torch's per-function recompile limit, past which blocks silently run eagerly)."""
    return torch.compiler.set_stance("force_eager")


def _probe(model: ElasticNet, image_size: int) -> torch.Tensor:
    """One blank image on the model's device, in its dtype (a bf16 model on a GPU takes bf16 there)."""
    weight = next(model.parameters())
    return torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype)


class MacCounter:
    """Per-block MACs of a model at one input size, and per-block parameters; `subnet_macs(depths)`
    and `subnet_params(depths)` sum them over the blocks a sub-network runs."""

    def __init__(self, model: ElasticNet, image_size: int):
        self.model, self.image_size = model, image_size
        self._traced_cache: dict[Depths, tuple[int, int]] = {}
        attention = (nn.MultiheadAttention, ShiftedWindowAttention)
        self._each_traced = not model.blocks_reorderable or any(isinstance(m, attention) for m in model.modules())
        self.block_macs: dict[tuple[int, int], int] = {}
        self.block_params: dict[tuple[int, int], int] = {}
        handles = []
        for seg_index, segment in enumerate(model.segments):
            for block_index, block in enumerate(segment.blocks):
                key = (seg_index, block_index)
                self.block_macs[key] = 0
                self.block_params[key] = sum(p.numel() for p in block.parameters())
                for leaf in block.modules():
                    if isinstance(leaf, (nn.Conv2d, nn.Linear)):
                        handles.append(leaf.register_forward_hook(self._hook(key)))
        try:
            with preserved_mode(model), torch.no_grad(), _eager():
                model.eval()
                model(_probe(model, image_size))
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, key):
        def add(module, inputs, output):
            self.block_macs[key] += _leaf_macs(module, inputs, output)

        return add

    def _sum(self, per_block: dict[tuple[int, int], int], depths: Depths) -> int:
        total = 0
        for seg_index, segment in enumerate(self.model.segments):
            count = len(segment.blocks) if segment.stage is None else depths[segment.stage]
            total += sum(per_block[(seg_index, j)] for j in range(count))
        return total

    def subnet_macs(self, depths: Depths) -> int:
        if self._each_traced:
            return self._traced(depths)[0]
        return self._sum(self.block_macs, depths)

    def subnet_params(self, depths: Depths) -> int:
        if self._each_traced:
            return self._traced(depths)[1]
        return self._sum(self.block_params, depths)

    def _traced(self, depths: Depths) -> tuple[int, int]:
        """(MACs, parameters) of one sub-network, from a forward of it: the MACs of its matrix products,
        convolutions and attention as torch's FLOP counter sees them (2 FLOPs each), and
        the parameters its modules read (`parameters_read(width)` of sliced ones)."""
        from torch.utils.flop_counter import FlopCounterMode

        depths = self.model.check_depths(depths)
        if depths in self._traced_cache:
            return self._traced_cache[depths]
        params, handles = 0, []

        def read(module, inputs):
            nonlocal params
            params += module.parameters_read(inputs[0].shape[1])

        for seg_index, segment in enumerate(self.model.segments):
            count = len(segment.blocks) if segment.stage is None else depths[segment.stage]
            for block_index, block in enumerate(segment.blocks[:count]):
                if hasattr(block, "parameters_read"):
                    handles.append(block.register_forward_pre_hook(read))
                else:
                    params += self.block_params[(seg_index, block_index)]
        try:
            # With gradients on: without, nn.MultiheadAttention takes a fused kernel the counter does not see.
            # Nor does it know the CPU's fused attention: counted as the GPU's (two matrix products).
            cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _CpuAttentionFlops()}
            counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
            with preserved_mode(self.model), torch.enable_grad(), _eager(), counter as flops:
                self.model.eval()
                self.model(_probe(self.model, self.image_size), depths)
        finally:
            for handle in handles:
                handle.remove()
        self._traced_cache[depths] = (flops.get_total_flops() // 2, params)
        return self._traced_cache[depths]


class _CpuAttentionFlops:
    """torch's formula for fused attention, given the raw arguments it reads shapes from."""

    _get_raw = True

    def __call__(self, *args, **kwargs) -> int:
        from torch.utils.flop_counter import sdpa_flop

        return sdpa_flop(*args, **kwargs)


@torch.no_grad()
def measure_latency_ms(
    model: ElasticNet, depths: Depths, images: torch.Tensor, *, warmup: int = 2, repeats: int = 5
) -> float:
    """Median wall time (ms) of one forward of sub-network `depths` on `images` (batch and device as
    given), in eval mode; on a GPU each forward is waited for."""
    import statistics
    import time

    plan = model.plan_for_depths(depths)
    cuda = images.device.type == "cuda"
    times = []
    with preserved_mode(model):
        model.eval()
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model.run(images, plan)
            if cuda:
                torch.cuda.synchronize(images.device)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)
