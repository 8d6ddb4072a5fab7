"""Main-net and all-sub-network accuracy, BatchNorm re-estimation, network destruction tests.

BatchNorm statistics decide these numbers: training updates shared running statistics from every
pass, so no sub-network's statistics match its own activations. By default each network evaluated
gets its statistics re-estimated on calibration images (cumulative average, train-mode forward).

`evaluate_subnets` walks the sub-networks as a tree: the activations after the first d blocks of a
stage are shared by every sub-net with that prefix, so each block runs once per distinct prefix.
A block's statistics depend only on the prefix in front of it, so calibration walks the same tree
and every tree node keeps its own statistics.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..models import Depths, ElasticNet, Plan, batchnorm_layers, preserved_mode
from ..models.complexity import MacCounter

Batch = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------ accuracy
@dataclass
class Accuracy:
    top1: float  # percent
    top5: float  # percent
    samples: int


class _Counts:
    def __init__(self) -> None:
        self.top1 = self.top5 = self.samples = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == labels[:, None]
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=-1).sum())
        self.samples += labels.numel()

    def result(self) -> Accuracy:
        n = max(self.samples, 1)
        return Accuracy(100.0 * self.top1 / n, 100.0 * self.top5 / n, self.samples)


# ------------------------------------------------------------------------------------ BN state
BNState = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _bn_state(layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> BNState:
    return [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in layers]


def _load_bn_state(layers: Sequence[nn.modules.batchnorm._BatchNorm], state: BNState) -> None:
    for bn, (mean, var, count) in zip(layers, state):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.copy_(count)


def _fresh_bn_state(layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> BNState:
    return [
        (torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var), torch.zeros_like(bn.num_batches_tracked))
        for bn in layers
    ]


@contextlib.contextmanager
def preserved_bn(model: nn.Module) -> Iterator[None]:
    """Evaluation leaves the model as it found it: BN buffers, BN momenta and the train/eval mode
    are restored afterwards, whatever ran inside."""
    layers = batchnorm_layers(model)
    saved = _bn_state(layers)
    momenta = [bn.momentum for bn in layers]
    with preserved_mode(model):
        try:
            yield
        finally:
            _load_bn_state(layers, saved)
            for bn, momentum in zip(layers, momenta):
                bn.momentum = momentum


def _eager():
    """Run compiled blocks eagerly: BN's cumulative average (momentum None) divides by the batch
    count it keeps in a tensor, which a compiled graph cannot specialise on."""
    return torch.compiler.set_stance("force_eager")


@torch.no_grad()
def recalibrate_bn(model: ElasticNet, plan: Plan, calibration: Iterable[Batch]) -> None:
    """Re-estimate BN statistics of the network `plan` IN PLACE (cumulative average over the
    calibration batches, train-mode forward); momenta and mode are restored. Inside evaluation, call
    it under `preserved_bn` so the model's own statistics come back. A network without BatchNorm (a
    transformer's LayerNorm keeps no statistics) has nothing to re-estimate: no batch is run."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average, not an exponential one
    try:
        with preserved_mode(model), _eager():
            model.train()
            for images, _ in calibration:
                model.run(images, plan)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum


def _plan_counts(
    model: ElasticNet,
    plan: Plan,
    val: Iterable[Batch],
    calibration: Iterable[Batch] | None,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> _Counts:
    counts = _Counts()
    with preserved_bn(model):
        if calibration is not None:
            recalibrate_bn(model, plan, calibration)
        model.eval()
        for images, labels in val:
            logits = model.run(images, plan)
            if on_logits is not None:
                on_logits(images, logits)
            counts.add(logits, labels)
    return counts


@torch.no_grad()
def evaluate_plan(
    model: ElasticNet,
    plan: Plan,
    val: Iterable[Batch],
    calibration: Iterable[Batch] | None = None,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Accuracy:
    """Top-1/top-5 of one network; with `calibration`, on its own re-estimated BN statistics
    (the model's own statistics are restored afterwards). `on_logits(images, logits)` sees every batch."""
    return _plan_counts(model, plan, val, calibration, on_logits).result()


def evaluate_main(model: ElasticNet, val: Iterable[Batch], calibration: Iterable[Batch] | None = None) -> Accuracy:
    return evaluate_plan(model, model.plan_for_depths(None), val, calibration)


# ------------------------------------------------------------------------------------ sub-nets
@dataclass
class SubnetRow:
    depths: Depths
    blocks: int
    macs: int  # per image, at the evaluated size
    params: int
    top1: float
    top5: float
    latency_ms: float | None = None  # one image, on the evaluating device (eval.latency)
    images_per_s: float | None = None  # at the throughput batch, same device


@dataclass
class SubnetReport:
    rows: list[SubnetRow]
    recalibrated: bool
    batch_norm: bool = True  # False: the network has no statistics to re-estimate (a transformer's LayerNorm)
    stats: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        top1 = [r.top1 for r in self.rows]
        self.stats = {
            "mean_top1": statistics.fmean(top1),
            "std_top1": statistics.pstdev(top1) if len(top1) > 1 else 0.0,
            "min_top1": min(top1),
            "max_top1": max(top1),
            "num_subnets": float(len(top1)),
        }

    def row(self, depths: Sequence[int]) -> SubnetRow:
        depths = tuple(depths)
        return next(r for r in self.rows if r.depths == depths)

    @property
    def has_latency(self) -> bool:
        return all(r.latency_ms is not None for r in self.rows)

    def pareto_front(self, cost: str = "macs") -> list[SubnetRow]:
        """The sub-networks no other one beats on both accuracy and `cost` (macs, params or latency_ms): each more
        accurate than every cheaper one (the cheapest of equally accurate ones), cheapest first."""
        front: list[SubnetRow] = []
        for row in sorted(self.rows, key=lambda r: (getattr(r, cost), -r.top1)):
            if not front or row.top1 > front[-1].top1:
                front.append(row)
        return front

    def best_within(
        self, max_macs: float | None = None, max_params: float | None = None, max_latency_ms: float | None = None
    ) -> SubnetRow | None:
        """The most accurate sub-network within the budgets (None: no limit), the cheaper in MACs of a
        tie; None if none fits. A latency budget needs measured latencies."""
        limits = {"macs": max_macs, "params": max_params, "latency_ms": max_latency_ms}
        fits = [r for r in self.rows if all(v is None or getattr(r, c) <= v for c, v in limits.items())]
        return max(fits, key=lambda r: (r.top1, -r.macs), default=None)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["depths", "blocks", "macs", "params", "top1", "top5", "pareto", "latency_ms", "images_per_s"])
        front = {r.depths for r in self.pareto_front()}
        for r in self.rows:
            writer.writerow(
                [
                    "-".join(map(str, r.depths)),
                    r.blocks,
                    r.macs,
                    r.params,
                    f"{r.top1:.4f}",
                    f"{r.top5:.4f}",
                    int(r.depths in front),
                    "" if r.latency_ms is None else f"{r.latency_ms:.4f}",
                    "" if r.images_per_s is None else f"{r.images_per_s:.1f}",
                ]
            )
        return out.getvalue()


def _trie(subnets: Iterable[Depths]) -> dict:
    root: dict = {}
    for depths in subnets:
        node = root
        for d in depths:
            node = node.setdefault(d, {})
    return root


class _TreeWalk:
    """Runs a batch through every sub-network of a trie, each block once per distinct prefix.

    With `bank` set, each tree node (prefix, segment, block) loads its own BN statistics before the
    block runs; with `update_bank`, it stores them back afterwards (calibration).
    """

    def __init__(self, model: ElasticNet, subnets: Sequence[Depths]):
        self.model = model
        self.trie = _trie(subnets)
        self.layers: dict[tuple[int, int], list] = {
            (i, j): batchnorm_layers(block)
            for i, seg in enumerate(model.segments)
            for j, block in enumerate(seg.blocks)
        }
        self.bank: dict | None = None
        self.update_bank = False

    def _block(self, x: torch.Tensor, prefix: Depths, seg_index: int, block_index: int) -> torch.Tensor:
        block = self.model.segments[seg_index].blocks[block_index]
        layers = self.layers[(seg_index, block_index)]
        if self.bank is None or not layers:
            return block(x)
        key = (prefix, seg_index, block_index)
        state = self.bank.get(key)
        if state is None:
            state = self.bank[key] = _fresh_bn_state(layers)
        _load_bn_state(layers, state)
        y = block(x)
        if self.update_bank:
            for bn, (mean, var, count) in zip(layers, state):
                mean.copy_(bn.running_mean)
                var.copy_(bn.running_var)
                count.copy_(bn.num_batches_tracked)
        return y

    def run(self, images: torch.Tensor, on_leaf: Callable[[Depths, torch.Tensor], None]) -> None:
        self._walk(images, 0, self.trie, (), on_leaf)

    def _walk(self, x, seg_index: int, node: dict, prefix: Depths, on_leaf) -> None:
        segments = self.model.segments
        while seg_index < len(segments) and segments[seg_index].stage is None:
            for j in range(len(segments[seg_index].blocks)):
                x = self._block(x, prefix, seg_index, j)
            seg_index += 1
        if seg_index == len(segments):
            on_leaf(prefix, x)
            return
        # Blocks never modify their input in place, so x stays valid for the deeper branches.
        for j in range(max(node)):
            x = self._block(x, prefix, seg_index, j)
            if j + 1 in node:
                self._walk(x, seg_index + 1, node[j + 1], prefix + (j + 1,), on_leaf)


@torch.no_grad()
def evaluate_subnets(
    model: ElasticNet,
    subnets: Sequence[Sequence[int]],
    val: Iterable[Batch],
    calibration: Iterable[Batch] | None = None,
    *,
    image_size: int | None = None,
    on_logits: Callable[[Depths, torch.Tensor], None] | None = None,
) -> SubnetReport:
    """Accuracy of every listed sub-network, by tree walk. With `calibration`, each on its own
    re-estimated BN statistics; without, on the shared running statistics. `on_logits(depths,
    logits)` sees every sub-network's logits of every validation batch."""
    subnets = [model.check_depths(d) for d in subnets]
    if not subnets:
        raise ValueError("no sub-networks to evaluate")
    walk = _TreeWalk(model, subnets)
    counts = {d: _Counts() for d in subnets}
    layers = batchnorm_layers(model)
    with preserved_bn(model):
        if calibration is not None and layers:  # LayerNorm nets have nothing to re-estimate
            for bn in layers:
                bn.momentum = None  # each tree node's statistics: a cumulative average
            walk.bank, walk.update_bank = {}, True
            model.train()
            with _eager():
                for images, _ in calibration:
                    walk.run(images, lambda depths, x: None)
            walk.update_bank = False
        model.eval()
        for images, labels in val:
            image_size = image_size or images.shape[-1]

            def leaf(depths: Depths, logits: torch.Tensor) -> None:
                counts[depths].add(logits, labels)  # noqa: B023  (called within this iteration only)
                if on_logits is not None:
                    on_logits(depths, logits)

            walk.run(images, leaf)
    return _report(model, counts, calibration is not None, image_size)


@torch.no_grad()
def evaluate_subnets_naive(
    model: ElasticNet,
    subnets: Sequence[Sequence[int]],
    val: Sequence[Batch],
    calibration: Sequence[Batch] | None = None,
) -> SubnetReport:
    """The same numbers one sub-network at a time: the reference for `evaluate_subnets`."""
    counts = {}
    for depths in (model.check_depths(d) for d in subnets):
        counts[depths] = _plan_counts(model, model.plan_for_depths(depths), val, calibration)
    return _report(model, counts, calibration is not None, val[0][0].shape[-1])


def _report(model: ElasticNet, counts: dict, recalibrated: bool, image_size: int | None) -> SubnetReport:
    macs = MacCounter(model, image_size or 32)
    rows = []
    for depths, c in counts.items():
        acc = c.result()
        rows.append(
            SubnetRow(depths, sum(depths), macs.subnet_macs(depths), macs.subnet_params(depths), acc.top1, acc.top5)
        )
    return SubnetReport(rows, recalibrated, batch_norm=bool(batchnorm_layers(model)))


# ------------------------------------------------------------------------------------ destruction
SHARED_STATS = "shared"  # DestructionRow.statistics without re-estimation
RECALIBRATED = "recalibrated"


@dataclass
class DestructionRow:
    test: str  # intact | delete_one | delete_k | swap_adjacent
    damage: int  # number of blocks deleted or swapped pairs
    detail: str
    top1: float
    statistics: str = RECALIBRATED  # BN: re-estimated for each damaged net, or the shared running statistics


def destruction_tests(
    model: ElasticNet,
    val: Sequence[Batch],
    calibration: Sequence[Batch] | None = None,
    *,
    max_deleted: int = 4,
    trials: int = 5,
    seed: int = 0,
) -> list[DestructionRow]:
    """Unraveled-view tests: delete each droppable block in turn; delete k random droppable blocks
    (k = 1..max_deleted, `trials` seeded draws each); swap each pair of adjacent droppable blocks
    (not in DenseNets, whose layers each widen their input; a deleted dense layer leaves zeros).
    With `calibration`, each damaged network gets its BN statistics re-estimated (which repairs part
    of the damage); without, it runs on the shared running statistics, as Veit et al. measure."""
    full = model.plan_for_depths(None)
    statistics = RECALIBRATED if calibration is not None else SHARED_STATS
    droppable = [(s, i) for s, i, _ in model.droppable_blocks()]
    rows: list[DestructionRow] = []

    def without(removed: set[tuple[int, int]]) -> Plan:
        return tuple(tuple(b for b in blocks if (s, b) not in removed) for s, blocks in enumerate(full))

    def top1(plan: Plan) -> float:
        return evaluate_plan(model, plan, val, calibration).top1

    def row(test: str, damage: int, detail: str, plan: Plan) -> DestructionRow:
        return DestructionRow(test, damage, detail, top1(plan), statistics)

    rows.append(row("intact", 0, "", full))
    for s, i in droppable:
        rows.append(row("delete_one", 1, f"stage{s}.block{i}", without({(s, i)})))
    rng = np.random.default_rng(seed)
    for k in range(1, min(max_deleted, len(droppable)) + 1):
        for _ in range(trials):
            picks = rng.choice(len(droppable), size=k, replace=False)
            removed = {droppable[p] for p in picks}
            detail = ",".join(f"stage{s}.block{i}" for s, i in sorted(removed))
            rows.append(row("delete_k", k, detail, without(removed)))
    for s, blocks in enumerate(full if model.blocks_reorderable else ()):  # dense layers keep their order
        for i in range(1, len(blocks) - 1):
            swapped = list(full)
            order = list(blocks)
            order[i], order[i + 1] = order[i + 1], order[i]
            swapped[s] = tuple(order)
            rows.append(row("swap_adjacent", 1, f"stage{s}.block{i}<->{i + 1}", tuple(swapped)))
    return rows


def destruction_csv(rows: Sequence[DestructionRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["test", "damage", "detail", "statistics", "top1"])
    for r in rows:
        writer.writerow([r.test, r.damage, r.detail, r.statistics, f"{r.top1:.4f}"])
    return out.getvalue()


def summarise_destruction(rows: Sequence[DestructionRow]) -> dict[str, float]:
    """Mean top-1 per test and damage level, e.g. {'delete_k/2': 81.3}; figures on the shared
    running statistics carry the suffix '_shared_stats' ({'delete_k/2_shared_stats': 40.2})."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        suffix = "_shared_stats" if r.statistics == SHARED_STATS else ""
        groups.setdefault(f"{r.test}/{r.damage}{suffix}", []).append(r.top1)
    return {key: statistics.fmean(values) for key, values in groups.items() if not math.isnan(values[0])}
