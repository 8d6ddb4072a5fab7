"""scikit-learn's bundled handwritten digits (1,797 8x8 images), upscaled to RGB: a real dataset
that needs no download, for the embedded default and the tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10


@dataclass
class DigitsSplit:
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64, N


def load_digits_splits(
    image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> tuple[DigitsSplit, DigitsSplit]:
    """Stratified-free fixed split: a seeded permutation, the last `val_fraction` for validation."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size={image_size}: digits are 8x8, choose 8 or more")
    digits = load_digits()
    gray = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # values 0..16
    big = F.interpolate(gray, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction))
    train, val = order[:-n_val], order[-n_val:]
    return DigitsSplit(images[train], labels[train]), DigitsSplit(images[val], labels[val])


def to_batches(
    split: DigitsSplit, batch_size: int, *, shuffle_seed: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory normalised NCHW batches (for tests and benchmarks; training uses FFCV loaders)."""
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.5
    y = torch.from_numpy(split.labels)
    if shuffle_seed is not None:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(shuffle_seed))
        x, y = x[perm], y[perm]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
