"""The suite's training data: scikit-learn's bundled digits at 16 x 16 pixels. The digits are 8 x 8, so
nothing is lost, and a step or an evaluation of a CIFAR-size network costs about a quarter of what it
costs at the demo's 32 px."""

from __future__ import annotations

DIGITS_SIZE = 16


def digits_overrides(digits_dir) -> list[str]:
    """The config fields that point a demo recipe at the session's digits files."""
    return [
        f"data.train={digits_dir}/train.beton",
        f"data.val={digits_dir}/val.beton",
        f"data.image_size={DIGITS_SIZE}",
    ]
