"""Regional compilation: `torch.compile` applied to each block of an elastic network on its own.

Compiling the whole network would trace one graph per sub-network drawn (729 of them for
ResNet-56's space), each compiled on first use. A block, though, is the same computation whatever
sub-network it runs in, so compiling blocks one by one bounds the number of graphs by the number of
distinct block shapes (ResNet-56: five block shapes plus stem and head) times the modes a block runs
in (training, evaluation; a second batch size makes the batch dimension dynamic once). Prefix
sharing and tree evaluation are untouched: they call blocks, and blocks are compiled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .elastic import ElasticNet

# Per distinct block: training with gradients and evaluation without, each again once the batch
# dimension turns dynamic, and room for forward hooks (stochastic depth's test-time branch scaling)
# and a change of parameter layout (ZeRO's flat buffers). BN re-estimation runs eager.
GRAPHS_PER_BLOCK_SHAPE = 8


def block_shapes(model: ElasticNet) -> set[str]:
    """The distinct blocks of `model`: two blocks with the same layers, channel counts, strides and
    kernel sizes (their printed form) trace to the same graph."""
    return {repr(block) for segment in model.segments for block in segment.blocks}


def compile_blocks(model: ElasticNet, backend: str | Callable = "inductor", mode: str | None = None) -> int:
    """Compile every block of `model` in place (state dict keys are unchanged); returns the number of
    distinct block shapes. Each block is compiled whole (`fullgraph`): a block that cannot be traced
    fails loudly instead of running partly in eager mode."""
    shapes = len(block_shapes(model))
    # torch's limit counts graphs per Python function, and every block of a class shares its forward:
    # without raising it, blocks past the eighth graph would silently fall back to eager mode.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_BLOCK_SHAPE * shapes)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, GRAPHS_PER_BLOCK_SHAPE * shapes)
    for segment in model.segments:
        for block in segment.blocks:
            block.compile(backend=backend, mode=mode, fullgraph=True)
    return shapes
