"""The suite's training data: scikit-learn's bundled digits at 16 x 16 pixels. The digits are 8 x 8, so
nothing is lost, and a step or an evaluation of a CIFAR-size network costs about a quarter of what it
costs at the demo's 32 px."""

from __future__ import annotations

from pathlib import Path

DIGITS_SIZE = 16
# A checkpoint of a digits run in st-scale's first checkpoint format (epoch 1 of `demo_st`, depths 2-2-2),
# kept to check that older checkpoints still evaluate and resume.
CHECKPOINT_V1 = Path(__file__).parent / "data" / "checkpoint_v1" / "runs" / "compat-v1"


def digits_overrides(digits_dir) -> list[str]:
    """The config fields that point a demo recipe at the session's digits files."""
    return [
        f"data.train={digits_dir}/train.beton",
        f"data.val={digits_dir}/val.beton",
        f"data.image_size={DIGITS_SIZE}",
    ]
