"""The cost–quality figure of RESULTS.md ("A cheaper ST"): each setting's step time relative to CT's
(x, from one `bench_speed.py` run) against its sub-network mean and its worst sub-network (y, from the
cheaper-ST study: one marker per seed, the mean over seeds with ± 1 sd), full ST and CT marked, the
goal's region shaded.

    python benchmarks/st_cost_figure.py \\
        --study benchmarks/results/fashion_st_cheap/study.json \\
        --speed benchmarks/results/speed/cifar_resnet20.json \\
        --out benchmarks/results/fashion_st_cheap/cost_quality.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_tables import CHEAP_GROUPS, GOAL, GOAL_TIME, step_ratio  # noqa: E402

PANELS = (
    ("val/subnets_mean_top1", "sub-network mean top-1 (%)", "mean"),
    ("val/subnets_min_top1", "worst sub-network top-1 (%)", "worst"),
)


def _points(finished: list[dict], metric: str, speed: dict) -> list[tuple[str, str, float, list[float]]]:
    """(group, name, step-time ratio, per-seed values) for every group the study and the benchmark have."""
    points = []
    for group, (name, variant) in CHEAP_GROUPS.items():
        x = step_ratio(speed, variant)
        values = [r["metrics"][metric] for r in finished if r["group"] == group and metric in r["metrics"]]
        if x is not None and values:
            points.append((group, name.replace("`", ""), x, values))
    return points


def draw(study: dict, speed: dict):
    """Each panel's accuracy axis from 0, broken: a tall upper part around the ST settings, a short
    lower part from 0 to it (where CT's sub-networks lie)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in study["runs"] if r["status"] == "FINISHED"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 5.6), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    for column, (metric, label, goal_key) in enumerate(PANELS):
        top, bottom = axes[0][column], axes[1][column]
        points = _points(finished, metric, speed)
        st_like = [v for group, _, _, values in points if group.startswith("st") for v in values]
        low = int(min(st_like, default=80) - 2)
        reference = [v for group, _, _, values in points if group == "st" for v in values]
        for ax in (top, bottom):
            if reference:
                floor = statistics.fmean(reference) + GOAL[goal_key]
                ax.fill_between([0.9, GOAL_TIME], floor, 100, color="C2", alpha=0.15, label="the goal")
            for i, (group, name, x, values) in enumerate(points):
                colour = {"ct": "C3", "st": "C2"}.get(group, f"C{i + 2}")
                ax.scatter([x] * len(values), values, s=12, alpha=0.5, color=colour)
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                marker = "o" if group in ("ct", "st") else "D"
                ax.errorbar(
                    x, statistics.fmean(values), yerr=sd, fmt=marker, ms=7, capsize=4, color=colour,
                    label=f"{name} ({len(values)} seeds)",
                )  # fmt: skip
            ax.grid(alpha=0.3)
        top.set_ylim(low, min(100, int(max(st_like, default=95)) + 2))
        bottom.set_ylim(0, low)
        top.spines["bottom"].set_visible(False)
        bottom.spines["top"].set_visible(False)
        top.tick_params(labelbottom=False, bottom=False)
        for ax, y in ((top, 0), (bottom, 1)):  # the break marks
            ax.plot([0, 1], [y, y], transform=ax.transAxes, ls=(0, (3, 3)), color="grey", clip_on=False)
        top.set_ylabel(label)
        bottom.set_xlabel(
            f"step time / CT's ({speed['args']['model']}, {speed['args']['image_size']} px, bench_speed.py)"
        )
        bottom.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=2, frameon=False)
    figure.suptitle(
        "A cheaper ST: cost against quality (small markers: seeds; large: mean ± 1 sd over seeds; "
        "axis broken at the dashed line)",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="the cheaper-ST study's study.json (st-scale report)")
    parser.add_argument("--speed", type=Path, required=True, help="a bench_speed.py --out raw file")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    figure = draw(json.loads(args.study.read_text()), json.loads(args.speed.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
