"""One evaluation pass, as the per-epoch evaluation and `st-scale eval` both run it (`evaluate`): which
networks are measured on which BatchNorm statistics, the metric names, and the tables and figures
logged (`log_evaluation`, under the names of `artifacts`).

Every figure comes in up to two versions: on each network's own re-estimated BN statistics (the
headline, when calibration batches are given) and on the shared running statistics that training
left (suffix `_shared_stats`). The pass leaves the model exactly as it found it, so both versions
describe the same trained weights and statistics.

Works on one process or across the ranks of a process group: the main net is measured on each
rank's shard of the validation set and summed, the sub-networks are split over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..data.loaders import other_protocol
from ..ema import weights_applied
from ..models import Depths, ElasticNet, batchnorm_layers, has_batch_norm
from ..models.complexity import measure_latency_ms
from .artifacts import ArtifactLayout
from .distributed import gather_lists, rank_and_world, sum_accuracy
from .subnets import (
    Batch,
    DestructionRow,
    SubnetReport,
    destruction_csv,
    destruction_tests,
    evaluate_main,
    evaluate_subnets,
    summarise_destruction,
)

SUBNET_STATS = ("mean_top1", "std_top1", "min_top1", "max_top1")
SHARED = "_shared_stats"  # suffix of every figure measured on the shared running statistics
BatchesFn = Callable[[], Iterable[Batch]]


def main_metrics(
    model: ElasticNet,
    val: BatchesFn,
    calibration: Sequence[Batch] | None,
    device: torch.device,
    *,
    prefix: str,
    shared_stats: bool,
) -> dict[str, float]:
    """Main-net top-1/top-5 (on re-estimated statistics when `calibration` is given) and, with
    `shared_stats`, top-1 on the running statistics."""
    metrics: dict[str, float] = {}
    if shared_stats:
        metrics[f"{prefix}/main_top1{SHARED}"] = sum_accuracy(evaluate_main(model, val()), device).top1
    main = sum_accuracy(evaluate_main(model, val(), calibration), device)
    metrics.update({f"{prefix}/main_top1": main.top1, f"{prefix}/main_top5": main.top5})
    return metrics


def subnet_reports(
    model: ElasticNet,
    subnets: Sequence[Depths],
    val: BatchesFn,
    calibration: Sequence[Batch] | None,
    *,
    shared_stats: bool,
    latency: bool = False,
) -> dict[str, SubnetReport]:
    """{suffix: report} for '' (re-estimated statistics, or shared ones without calibration) and,
    with `shared_stats` and calibration, '_shared_stats'. Every rank gets the whole reports. With
    `latency`, each rank times its share of the sub-networks on its own device: one image, and a
    whole validation batch for the throughput."""
    batch_norm = bool(batchnorm_layers(model))
    versions = {"": calibration}
    if shared_stats and calibration is not None and batch_norm:  # LayerNorm nets: the same figures
        versions[SHARED] = None
    rank, world = rank_and_world()
    mine = list(subnets)[rank::world]
    timed = _timings(model, mine, next(iter(val()))[0]) if latency and mine else {}
    reports = {}
    for suffix, calib in versions.items():
        rows = evaluate_subnets(model, mine, val(), calib).rows if mine else []
        for row in rows:
            row.latency_ms, row.images_per_s = timed.get(row.depths, (None, None))
        rows = gather_lists(rows)
        if rows:
            by_depths = sorted(rows, key=lambda r: r.depths)
            reports[suffix] = SubnetReport(by_depths, calib is not None, batch_norm=batch_norm)
    return reports


def _timings(model: ElasticNet, subnets: Sequence[Depths], batch: torch.Tensor) -> dict:
    """{depths: (ms for one image, images per second at the batch's size)}."""

    timed = {}
    for depths in subnets:
        depths = model.check_depths(depths)
        one = measure_latency_ms(model, depths, batch[:1])
        whole = measure_latency_ms(model, depths, batch, warmup=1, repeats=3)
        timed[depths] = (one, 1000 * len(batch) / whole)
    return timed


def subnet_metrics(prefix: str, reports: dict[str, SubnetReport]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for suffix, report in reports.items():
        metrics.update({f"{prefix}/subnets_{k}{suffix}": report.stats[k] for k in SUBNET_STATS})
        metrics[f"{prefix}/num_subnets"] = report.stats["num_subnets"]
    return metrics


def calibration_suffix(protocol: str) -> str:
    """Suffix of the figures measured under calibration protocol `protocol` when it is not the run's own."""
    return f"_calib_{protocol}"


def with_suffix(metrics: dict[str, float], suffix: str) -> dict[str, float]:
    return {k if k.endswith("/num_subnets") else k + suffix: v for k, v in metrics.items()}


def first_images(batches: Iterable[Batch], limit: int | None) -> list[Batch]:
    """The batches (cloned: FFCV's buffers rotate) up to `limit` images in all."""
    kept, count = [], 0
    for x, y in batches:
        if limit is not None and count >= limit:
            break
        take = len(y) if limit is None else min(len(y), limit - count)
        kept.append((x[:take].clone(), y[:take].clone()))
        count += take
    return kept


def run_destruction(
    model: ElasticNet, val: Sequence[Batch], calibration: Sequence[Batch] | None
) -> list[DestructionRow]:
    """The destruction tests on the shared running statistics and, with calibration, again with
    every damaged network's statistics re-estimated: both are reported, labelled."""
    rows = destruction_tests(model, val, None)
    if calibration is not None:
        rows += destruction_tests(model, val, calibration)
    return rows


def destruction_metrics(prefix: str, rows: Sequence[DestructionRow]) -> dict[str, float]:
    return {f"{prefix}/destruction/{k}": v for k, v in summarise_destruction(rows).items()}


@dataclass
class EvalData:
    """What an evaluation measures on. The main net runs on this process's share of the validation
    set (summed over the ranks); the sub-networks on the whole set (split over the ranks); the
    destruction tests on the whole set, on rank 0."""

    val_shard: BatchesFn
    val_full: BatchesFn
    calibration: Sequence[Batch] | None  # None: every network on the shared running statistics
    device: torch.device
    # the same networks again, BN re-estimated under the other calibration protocol (eval.compare_calibration)
    other_calibration: Sequence[Batch] | None = None
    other_suffix: str = ""


@dataclass
class EvalOptions:
    prefix: str  # the metrics' prefix: "val" (training's evaluation) or "eval" (a checkpoint's)
    shared_stats: bool  # also every figure on the shared running statistics (suffix _shared_stats)
    subnets: Sequence[Depths] = ()  # the sub-networks to evaluate; none: the main net only
    latency: bool = False  # each sub-network's latency and throughput
    destruction: bool = False  # the destruction tests
    destruction_images: int | None = None  # on the first this many validation images (None: all)


@dataclass
class Evaluation:
    """One evaluation's figures (`metrics`), its sub-network reports by suffix, and its destruction rows."""

    metrics: dict[str, float]
    reports: dict[str, SubnetReport] = field(default_factory=dict)
    destruction: list[DestructionRow] | None = None
    other_suffix: str = ""  # the suffix among `reports` measured under the other calibration protocol


def evaluate(
    model: ElasticNet, data: EvalData, options: EvalOptions, *, averaged: dict[str, torch.Tensor] | None = None
) -> Evaluation:
    """The evaluation pass of training's epochs and of `st-scale eval`: the main net, the weights'
    moving average (`averaged`, on BN statistics re-estimated for it), the sub-networks, the other
    calibration protocol and the destruction tests, as `options` and `data` ask. The model is left as
    it was."""
    prefix = options.prefix
    metrics = main_metrics(
        model, data.val_shard, data.calibration, data.device, prefix=prefix, shared_stats=options.shared_stats
    )
    if averaged is not None and data.calibration is not None:  # the average has no BN statistics of its own
        with weights_applied(model, averaged):
            metrics.update(
                main_metrics(
                    model, data.val_shard, data.calibration, data.device, prefix=f"{prefix}/ema", shared_stats=False
                )
            )
    result = Evaluation(metrics, other_suffix=data.other_suffix if data.other_calibration is not None else "")
    if options.subnets:
        result.reports = subnet_reports(
            model,
            options.subnets,
            data.val_full,
            data.calibration,
            shared_stats=options.shared_stats,
            latency=options.latency,
        )
        metrics.update(subnet_metrics(prefix, result.reports))
    if data.other_calibration is not None:
        other_main = main_metrics(
            model, data.val_shard, data.other_calibration, data.device, prefix=prefix, shared_stats=False
        )
        metrics.update(with_suffix(other_main, data.other_suffix))
        if options.subnets:
            other = subnet_reports(model, options.subnets, data.val_full, data.other_calibration, shared_stats=False)
            metrics.update(with_suffix(subnet_metrics(prefix, other), data.other_suffix))
            result.reports[data.other_suffix] = other[""]
    if options.destruction and rank_and_world()[0] == 0:  # the other ranks wait at the next collective
        val = first_images(data.val_full(), options.destruction_images)
        result.destruction = run_destruction(model, val, data.calibration)
        metrics.update(destruction_metrics(prefix, result.destruction))
    return result


def log_evaluation(tracker, result: Evaluation, layout: ArtifactLayout, title: str) -> None:
    """An evaluation's tables and figures, named by `layout`: each sub-network report as CSV and
    figure, and the destruction tests."""
    import matplotlib.pyplot as plt

    # lazy: matplotlib loads only where a figure is drawn
    from .plots import destruction_figure, subnet_figure

    for suffix, report in result.reports.items():
        tracker.log_text(report.to_csv(), layout.subnets_csv(suffix))
        named = f"{title}, {suffix[1:]}" if suffix and suffix == result.other_suffix else title
        figure = subnet_figure(report, named)
        tracker.log_figure(figure, layout.subnets_png(suffix))
        plt.close(figure)
    if result.destruction is not None:
        tracker.log_text(destruction_csv(result.destruction), layout.destruction_csv())
        figure = destruction_figure(result.destruction, f"{title}: network destruction")
        tracker.log_figure(figure, layout.destruction_png())
        plt.close(figure)


def reported_metrics(cfg) -> tuple[set[str], set[str]]:
    """The metric names each epoch's report carries: (every epoch, only some epochs). A sweep's
    objective and scheduler can only use these."""
    every = {"epoch", "step", "val/main_top1", "val/main_top5", "train/epoch_time_s"}
    subnets = {f"val/subnets_{k}" for k in SUBNET_STATS} | {"val/num_subnets"}
    if cfg.eval.shared_stats:
        every.add(f"val/main_top1{SHARED}")
        if cfg.eval.recalibrate and has_batch_norm(cfg.model.name):
            subnets |= {f"val/subnets_{k}{SHARED}" for k in SUBNET_STATS}
    if cfg.eval.compare_calibration and cfg.eval.recalibrate:
        suffix = calibration_suffix(other_protocol(cfg.data.calibration_protocol))
        subnets |= {f"val/main_top1{suffix}", f"val/main_top5{suffix}"} | {
            f"val/subnets_{k}{suffix}" for k in SUBNET_STATS
        }
    if cfg.optimizer.ema_decay is not None and cfg.eval.recalibrate:  # (evaluate: only on statistics of its own)
        every |= {"val/ema/main_top1", "val/ema/main_top5"}
    if cfg.eval.subnets_every == 1 or cfg.optimizer.epochs == 1:
        return every | subnets, set()
    return every, subnets
