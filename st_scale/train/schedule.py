"""The learning-rate schedule: a pure function of the global step, so a resumed run continues it
exactly and the schedule can be tested on its own."""

from __future__ import annotations

import math

from ..config import OptimizerSection


def lr_at(step: int, total_steps: int, steps_per_epoch: int, opt: OptimizerSection) -> float:
    """Linear warm-up, then cosine (per step) or constant."""
    warmup = int(opt.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return opt.lr * (step + 1) / warmup
    if opt.schedule == "constant":
        return opt.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return opt.lr_min + (opt.lr - opt.lr_min) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
