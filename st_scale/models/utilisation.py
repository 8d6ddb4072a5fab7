"""Model FLOPs utilisation (MFU): the share of the accelerator's dense bf16 peak that training's
model FLOPs reach, so the distance to the physical limit is visible next to images/s.

A training step of the main network costs three times its forward pass (forward, and backward for
activations and weights), and a multiply-accumulate is two FLOPs: 6 x MACs per image. ST's extra
sub-network passes are not counted: MFU measures how well the hardware runs the network being
trained, the same figure for CT and ST, and ST's overhead shows as fewer images/s.
"""

from __future__ import annotations

from .complexity import MacCounter
from .elastic import ElasticNet

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s. Matched in this order
# against torch.cuda.get_device_name(); a card not listed gets no MFU rather than a wrong one.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def training_flops_per_image(model: ElasticNet, image_size: int) -> float:
    """6 x the main network's MACs at `image_size`."""
    return 6.0 * MacCounter(model, image_size).subnet_macs(model.full_depths)


def mfu(images_per_s: float, flops_per_image: float, peak_flops: float) -> float:
    return images_per_s * flops_per_image / peak_flops
