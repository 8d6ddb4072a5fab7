"""Small collectives over the process group Ray Train created (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .subnets import Accuracy


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def sum_accuracy(acc: Accuracy, device: torch.device) -> Accuracy:
    """Combine per-rank accuracies over disjoint shards of the validation set."""
    counts = torch.tensor(
        [acc.top1 * acc.samples / 100, acc.top5 * acc.samples / 100, acc.samples], dtype=torch.float64, device=device
    )
    if is_distributed():
        dist.all_reduce(counts)
    top1, top5, samples = (float(c) for c in counts.round())
    if samples == 0:  # a percentage of nothing would read as a real 0%
        raise RuntimeError(
            "the evaluation saw no validation image on any rank: the validation set (data.val) yielded no batch; "
            "give it at least one image"
        )
    return Accuracy(100 * top1 / max(samples, 1), 100 * top5 / max(samples, 1), int(samples))


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order (on every rank)."""
    if not is_distributed():
        return list(items)
    gathered: list[list[Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
