"""Sub-network spaces and samplers for ordered residual sampling.

A sub-network keeps, in every stage s, its first d_s blocks. A `SubnetSpace` bounds each d_s; a
sampler draws depth vectors from it. Every draw is a pure function of (seed, global step, sub-net
index k[, rank]): all ranks agree on the sub-network without communicating, and a resumed run draws
exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Depths = tuple[int, ...]

# Below this chance of drawing anything but the full net, a sampler without it would mostly reject
# (at this bound, `sample`'s 10,000 tries all fail with probability below e^-100).
MIN_SUBNET_CHANCE = 0.01

# Stream ids keep the random numbers of different consumers (sub-net choice, input size, ...)
# independent even when they share (seed, step, k).
STREAM_SUBNET, STREAM_INPUT_SIZE, STREAM_STOCHASTIC_DEPTH, STREAM_EVAL_SAMPLE, STREAM_AUGMENT, STREAM_CALIBRATION = (
    range(6)
)


def step_rng(
    seed: int, step: int, k: int = 0, *, rank: int | None = None, stream: int = STREAM_SUBNET
) -> np.random.Generator:
    """The generator for one draw. `rank=None` means the same draw on every rank."""
    for field, value in (("seed", seed), ("step", step), ("k", k)):
        if value < 0:
            raise ValueError(f"{field}={value}: must be >= 0")
    rank_word = 0 if rank is None else rank + 1
    return np.random.default_rng(np.random.SeedSequence([seed, step, k, rank_word, stream]))


@dataclass(frozen=True)
class SubnetSpace:
    """Per-stage depth ranges: stage s keeps between min_depths[s] and max_depths[s] blocks."""

    stage_sizes: Depths
    min_depths: Depths
    max_depths: Depths

    def __post_init__(self) -> None:
        n = len(self.stage_sizes)
        if n == 0:
            raise ValueError("stage_sizes is empty: a space needs at least one stage")
        if len(self.min_depths) != n or len(self.max_depths) != n:
            raise ValueError(
                f"min_depths {list(self.min_depths)} and max_depths {list(self.max_depths)} need one "
                f"entry per stage ({n} stages: {list(self.stage_sizes)})"
            )
        for s, (lo, hi, size) in enumerate(zip(self.min_depths, self.max_depths, self.stage_sizes)):
            if size < 1:
                raise ValueError(f"stage_sizes[{s}]={size}: a stage has at least one block")
            if not (1 <= lo <= size and 1 <= hi <= size):
                raise ValueError(f"stage {s}: depth bounds [{lo}, {hi}] must lie within 1..{size}")
            if lo > hi:
                raise ValueError(
                    f"stage {s}: min depth {lo} > max depth {hi} excludes every sub-network; choose min <= max"
                )

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def full(cls, stage_sizes: Sequence[int]) -> SubnetSpace:
        """The paper's space: every stage keeps 1..n_s blocks."""
        sizes = tuple(int(n) for n in stage_sizes)
        return cls(sizes, (1,) * len(sizes), sizes)

    @classmethod
    def restricted(cls, stage_sizes: Sequence[int], max_dropped: Sequence[int]) -> SubnetSpace:
        """ST++ inter-stage rules: stage s may drop at most max_dropped[s] trailing blocks."""
        sizes = tuple(int(n) for n in stage_sizes)
        if len(max_dropped) != len(sizes):
            raise ValueError(f"max_dropped {list(max_dropped)} needs one entry per stage ({len(sizes)})")
        for s, (k, n) in enumerate(zip(max_dropped, sizes)):
            if not 0 <= k <= n - 1:
                raise ValueError(f"max_dropped[{s}]={k}: stage {s} has {n} blocks, so drop 0..{n - 1}")
        return cls(sizes, tuple(n - k for n, k in zip(sizes, max_dropped)), sizes)

    # ----------------------------------------------------------------------------- queries
    @property
    def full_depths(self) -> Depths:
        return self.stage_sizes

    def stage_choices(self, stage: int) -> range:
        return range(self.min_depths[stage], self.max_depths[stage] + 1)

    def __len__(self) -> int:
        return math.prod(hi - lo + 1 for lo, hi in zip(self.min_depths, self.max_depths))

    def __contains__(self, depths: object) -> bool:
        if not isinstance(depths, (tuple, list)) or len(depths) != len(self.stage_sizes):
            return False
        return all(lo <= d <= hi for d, lo, hi in zip(depths, self.min_depths, self.max_depths))

    def __iter__(self) -> Iterator[Depths]:
        """All depth vectors, in lexicographic order (the order tree evaluation visits them)."""
        return iter(itertools.product(*(self.stage_choices(s) for s in range(len(self.stage_sizes)))))

    def check(self, depths: Sequence[int]) -> Depths:
        depths = tuple(int(d) for d in depths)
        if depths not in self:
            raise ValueError(
                f"depth vector {list(depths)} is not in the space (per-stage bounds "
                f"{[list(b) for b in zip(self.min_depths, self.max_depths)]})"
            )
        return depths

    def sample_subset(self, count: int, seed: int) -> list[Depths]:
        """`count` distinct depth vectors drawn uniformly with a fixed seed, in lexicographic order;
        the whole space when it has no more than `count` members."""
        if count < 1:
            raise ValueError(f"sample size {count}: must be >= 1")
        if len(self) <= count:
            return list(self)
        rng = step_rng(seed, 0, stream=STREAM_EVAL_SAMPLE)
        chosen = rng.choice(len(self), size=count, replace=False)
        return sorted(self.unrank(int(i)) for i in chosen)

    def unrank(self, index: int) -> Depths:
        """The index-th depth vector in lexicographic order, without enumerating the space."""
        depths = []
        for s in reversed(range(len(self.stage_sizes))):
            width = self.max_depths[s] - self.min_depths[s] + 1
            index, offset = divmod(index, width)
            depths.append(self.min_depths[s] + offset)
        return tuple(reversed(depths))


class SubnetSampler:
    """Draws depth vectors from a space.

    Each stage is drawn independently with P(d_s) proportional to decay ** (max_s - d_s): decay = 1
    is the paper's uniform sampling; decay < 1 favours larger sub-networks (geometric over the
    number of dropped blocks, as in GKT). `include_full=False` never returns the full network.
    `per_rank=True` gives each rank its own draw (more sub-networks per step, same cost).
    """

    def __init__(
        self,
        space: SubnetSpace,
        *,
        seed: int = 0,
        decay: float = 1.0,
        include_full: bool = True,
        per_rank: bool = False,
    ):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"sampler decay={decay}: must be in (0, 1]; 1 is uniform, smaller favours larger sub-nets")
        if seed < 0:
            raise ValueError(f"sampler seed={seed}: must be >= 0")
        if not include_full and len(space) == 1:
            raise ValueError("include_full=False but the space holds only the full network: nothing to sample")
        self.space, self.seed, self.decay = space, seed, decay
        self.include_full, self.per_rank = include_full, per_rank
        self._stage_probs = [self._probs(s) for s in range(len(space.stage_sizes))]
        # P(a draw other than the full net): the bound below, and what `probability` renormalises by
        # when the full net is rejected.
        self._subnet_chance = 1.0 - math.prod(float(probs[-1]) for probs in self._stage_probs)
        if not include_full and self._subnet_chance < MIN_SUBNET_CHANCE:
            raise ValueError(
                f"sampler decay={decay} with include_full=False: a draw other than the full network comes up with "
                f"probability {self._subnet_chance:.2g}, below {MIN_SUBNET_CHANCE}; raise decay or include the full "
                "network"
            )

    def _probs(self, stage: int) -> np.ndarray:
        choices = np.array(self.space.stage_choices(stage))
        weights = self.decay ** (self.space.max_depths[stage] - choices).astype(float)
        return weights / weights.sum()

    def probability(self, depths: Sequence[int]) -> float:
        """P(depths) under this sampler; 0 outside the space."""
        depths = tuple(depths)
        if depths not in self.space or (not self.include_full and depths == self.space.max_depths):
            return 0.0
        p = math.prod(float(self._stage_probs[s][d - self.space.min_depths[s]]) for s, d in enumerate(depths))
        if not self.include_full:
            p /= self._subnet_chance
        return p

    def sample(self, step: int, k: int = 0, rank: int = 0) -> Depths:
        rng = step_rng(self.seed, step, k, rank=rank if self.per_rank else None)
        # Rejection of the full network: bounded, and the constructor refused a sampler that would
        # rarely draw anything else (MIN_SUBNET_CHANCE).
        for _ in range(10_000):
            depths = tuple(
                int(self.space.min_depths[s] + rng.choice(len(p), p=p)) for s, p in enumerate(self._stage_probs)
            )
            if self.include_full or depths != self.space.max_depths:
                return depths
        raise RuntimeError("could not draw a sub-network other than the full net in 10,000 tries")

    def sample_many(self, step: int, count: int, rank: int = 0) -> list[Depths]:
        return [self.sample(step, k, rank) for k in range(count)]
