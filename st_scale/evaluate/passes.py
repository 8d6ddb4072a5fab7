"""One evaluation pass, as the per-epoch evaluation and `st-scale eval` both run it: which networks
are measured on which BatchNorm statistics, the metric names, and the tables and figures logged.

Every figure comes in up to two versions: on each network's own re-estimated BN statistics (the
headline, when calibration batches are given) and on the shared running statistics that training
left (suffix `_shared_stats`). The pass leaves the model exactly as it found it, so both versions
describe the same trained weights and statistics.

Works on one process or across the ranks of a process group: the main net is measured on each
rank's shard of the validation set and summed, the sub-networks are split over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..models import Depths, ElasticNet, batchnorm_layers, has_batch_norm
from ..models.complexity import measure_latency_ms
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


def other_protocol(protocol: str) -> str:
    return "train" if protocol == "eval" else "eval"


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


def log_subnet_reports(
    tracker, reports: dict[str, SubnetReport], *, stem: str, title: str, tables: str = "subnets", figures: str = "plots"
) -> None:
    """Each report as `<tables>/<stem><suffix>.csv` and `<figures>/<stem><suffix>.png`."""
    import matplotlib.pyplot as plt

    # lazy: matplotlib loads only where a figure is drawn
    from .plots import subnet_figure

    for suffix, report in reports.items():
        tracker.log_text(report.to_csv(), f"{tables}/{stem}{suffix}.csv")
        figure = subnet_figure(report, title)
        tracker.log_figure(figure, f"{figures}/{stem}{suffix}.png")
        plt.close(figure)


def log_destruction(
    tracker, rows: Sequence[DestructionRow], *, title: str, tables: str = "destruction", figures: str = "plots"
) -> None:
    """`<tables>/destruction.csv` and `<figures>/destruction.png`."""
    import matplotlib.pyplot as plt

    # lazy: matplotlib loads only where a figure is drawn
    from .plots import destruction_figure

    tracker.log_text(destruction_csv(rows), f"{tables}/destruction.csv")
    figure = destruction_figure(rows, title)
    tracker.log_figure(figure, f"{figures}/destruction.png")
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
    if cfg.eval.subnets_every == 1 or cfg.optimizer.epochs == 1:
        return every | subnets, set()
    return every, subnets
