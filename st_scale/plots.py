"""Figures a person would rather look at than read: sub-network accuracy and destruction curves."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .evaluation import DestructionRow, SubnetReport  # noqa: E402


def subnet_figure(report: SubnetReport, title: str):
    """Top-1 vs number of blocks, vs MACs, and the histogram of top-1 over all sub-networks."""
    rows = report.rows
    top1 = [r.top1 for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].scatter([r.blocks for r in rows], top1, s=12, alpha=0.7)
    axes[0].set_xlabel("blocks kept")
    axes[1].scatter([r.macs / 1e6 for r in rows], top1, s=12, alpha=0.7)
    axes[1].set_xlabel("MMACs per image")
    for ax in axes[:2]:
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[2].hist(top1, bins=min(30, max(5, len(rows) // 3)))
    axes[2].set_xlabel("top-1 (%)")
    axes[2].set_ylabel("sub-networks")
    s = report.stats
    label = "per-network BN statistics" if report.recalibrated else "shared BN statistics"
    figure.suptitle(f"{title}: {int(s['num_subnets'])} sub-nets, {s['mean_top1']:.1f} ± {s['std_top1']:.1f} "
                    f"(min {s['min_top1']:.1f}), {label}")
    figure.tight_layout()
    return figure


def destruction_figure(rows: Sequence[DestructionRow], title: str):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    delete_k = {}
    for r in rows:
        if r.test in ("intact", "delete_k"):
            delete_k.setdefault(r.damage, []).append(r.top1)
    ks = sorted(delete_k)
    axes[0].plot(ks, [sum(delete_k[k]) / len(delete_k[k]) for k in ks], marker="o")
    axes[0].set_xlabel("random blocks deleted")
    axes[0].set_ylabel("top-1 (%)")
    one = [r for r in rows if r.test in ("delete_one", "swap_adjacent")]
    axes[1].bar(range(len(one)), [r.top1 for r in one], color=["C0" if r.test == "delete_one" else "C1" for r in one])
    axes[1].set_xticks(range(len(one)), [r.detail for r in one], rotation=90, fontsize=6)
    axes[1].set_ylabel("top-1 (%)")
    axes[1].set_title("delete one block (blue) / swap adjacent (orange)")
    for ax in axes:
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
