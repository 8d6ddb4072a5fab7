"""Figures a person would rather look at than read: sub-network accuracy and destruction curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .subnets import RECALIBRATED, DestructionRow, SubnetReport  # noqa: E402


def subnet_figure(report: SubnetReport, title: str):
    """Top-1 vs number of blocks, vs MACs and (when measured) latency with their Pareto fronts, and
    the histogram of top-1 over all sub-networks."""
    rows = report.rows
    top1 = [r.top1 for r in rows]
    panels = 4 if report.has_latency else 3
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    axes[0].scatter([r.blocks for r in rows], top1, s=12, alpha=0.7)
    axes[0].set_xlabel("blocks kept")
    costs = [("macs", 1e-6, "MMACs per image")]
    if report.has_latency:
        costs.append(("latency_ms", 1.0, "latency, one image (ms)"))
    for ax, (cost, scale, label) in zip(axes[1:], costs):
        ax.scatter([getattr(r, cost) * scale for r in rows], top1, s=12, alpha=0.7)
        front = report.pareto_front(cost)
        xs = [getattr(r, cost) * scale for r in front]
        ax.step(xs, [r.top1 for r in front], where="post", color="C3", label="Pareto front")
        ax.legend(loc="lower right")
        ax.set_xlabel(label)
    for ax in axes[: 1 + len(costs)]:
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[-1].hist(top1, bins=min(30, max(5, len(rows) // 3)))
    axes[-1].set_xlabel("top-1 (%)")
    axes[-1].set_ylabel("sub-networks")
    s = report.stats
    label = "per-network BN statistics" if report.recalibrated else "shared BN statistics"
    if not report.batch_norm:
        label = "no BN statistics (LayerNorm)"
    figure.suptitle(
        f"{title}: {int(s['num_subnets'])} sub-nets, {s['mean_top1']:.1f} ± {s['std_top1']:.1f} "
        f"(min {s['min_top1']:.1f}), {label}"
    )
    figure.tight_layout()
    return figure


def destruction_figure(rows: Sequence[DestructionRow], title: str):
    """Top-1 against random blocks deleted, and per deleted / swapped block; one line or marker
    series per BN statistics version (shared running statistics vs re-estimated per network)."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    versions = sorted({r.statistics for r in rows})
    for colour, version in enumerate(versions):
        mine = [r for r in rows if r.statistics == version]
        delete_k: dict[int, list[float]] = {}
        for r in mine:
            if r.test in ("intact", "delete_k"):
                delete_k.setdefault(r.damage, []).append(r.top1)
        ks = sorted(delete_k)
        label = "BN re-estimated per network" if version == RECALIBRATED else "shared running BN statistics"
        axes[0].plot(ks, [sum(delete_k[k]) / len(delete_k[k]) for k in ks], marker="o", color=f"C{colour}", label=label)
        one = [r for r in mine if r.test in ("delete_one", "swap_adjacent")]
        axes[1].scatter(
            range(len(one)),
            [r.top1 for r in one],
            color=f"C{colour}",
            label=label,
            marker="o" if version == RECALIBRATED else "s",
            s=18,
        )
        axes[1].set_xticks(range(len(one)), [r.detail for r in one], rotation=90, fontsize=6)
    axes[0].set_xlabel("random blocks deleted")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("top-1 (%)")
    axes[1].set_title("one block deleted / two adjacent blocks swapped")
    for ax in axes:
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def sweep_figure(rows, dimensions, title: str):
    """The sweep objective against each searched entry (one panel each), coloured by the first
    categorical entry (e.g. the sampler family); hollow markers: trials the scheduler stopped early."""
    import numpy as np

    def numeric(values):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    scored = [r for r in rows if r.objective is not None]
    categorical = [d.label for d in dimensions if not numeric([r.labels.get(d.label) for r in scored])]
    colour_by = categorical[0] if categorical else None
    colour_values = sorted({str(r.labels.get(colour_by)) for r in scored}) if colour_by else [""]
    palette = plt.get_cmap("tab10")
    figure, axes = plt.subplots(1, len(dimensions), figsize=(4.6 * len(dimensions), 4), squeeze=False)
    for ax, dim in zip(axes[0], dimensions):
        values = [r.labels.get(dim.label) for r in scored]
        if numeric(values):
            xs = np.asarray(values, dtype=float)
            if dim.distribution is not None and dim.distribution.kind == "loguniform":
                ax.set_xscale("log")
        else:
            ticks = sorted({str(v) for v in values})
            xs = np.asarray([ticks.index(str(v)) for v in values], dtype=float)
            xs += np.random.default_rng(0).uniform(-0.12, 0.12, len(xs))
            ax.set_xticks(range(len(ticks)), ticks, rotation=20)
            ax.set_xlim(-0.5, len(ticks) - 0.5)
        for x, r in zip(xs, scored):
            colour = palette(colour_values.index(str(r.labels.get(colour_by))) % 10) if colour_by else palette(0)
            stopped = r.outcome != "completed"
            ax.scatter([x], [r.objective], s=40, edgecolors=colour, facecolors="none" if stopped else colour)
        ax.set_xlabel(dim.label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("objective")
    if colour_by:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=palette(i % 10), label=v)
            for i, v in enumerate(colour_values)
        ]
        handles.append(
            plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey", label="stopped early")
        )
        axes[0][-1].legend(handles=handles, title=colour_by, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
