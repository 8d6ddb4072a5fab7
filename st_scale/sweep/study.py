"""`st-scale report SWEEP`: a study's results, read back from MLflow. A study is a sweep whose grid
runs methods (and sub-network architectures trained alone) over seeds; this module averages each
group over its seeds and writes the paper's Table 1 for it, the loafing figure, the destruction
curves and the sub-network accuracy distribution, as files and into the sweep's parent run.

Groups are the values of the sweep's search entries other than the seed (`run.seed`); a sweep over
seeds alone is one group, named after the sweep; a group whose config sets `model.stage_depths` is that
sub-network's architecture trained alone.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..evaluate.artifacts import epoch_layout
from ..evaluate.passes import SHARED, calibration_suffix
from ..evaluate.subnets import RECALIBRATED, DestructionRow
from ..methods import METHOD_NAMES, METHODS
from ..provenance import provenance, write_raw
from ..tracking import Store
from .parent import STATE_FILE
from .spec import load_spec

SEED_LABEL = "run.seed"
METHOD_ORDER = METHOD_NAMES  # the registry's order is the paper's
PAPER_NAMES = {name: method.title for name, method in METHODS.items()}


@dataclass
class StudyRun:
    group: str
    seed: int
    run_id: str
    status: str
    metrics: dict[str, float]
    epoch_time_s: float | None
    stage_depths: tuple[int, ...] | None  # trained alone: this sub-network's architecture
    subnets: dict[tuple[int, ...], dict[str, float]] = field(default_factory=dict)  # final: depths -> top1, macs
    destruction: list[DestructionRow] = field(default_factory=list)
    destruction_images: int | None = None  # the destruction tests' validation images; None: all of them
    epochs: int | None = None  # optimizer.epochs: the schedule it trained


@dataclass
class GroupRow:
    group: str
    runs: int
    epoch_time_s: float | None
    peak_memory_mib: float | None
    main_top1: list[float]
    subnets_mean: list[float]
    subnets_std: list[float]
    subnets_min: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)  # shared-statistics and other-protocol figures
    stage_depths: tuple[int, ...] | None = None  # a sub-network's architecture trained alone


def sweep_state(sweep: str) -> tuple[Path, dict]:
    """The sweep folder and its state file (parent run, tracking store), from a spec or a folder."""

    path = Path(sweep).expanduser()
    if not path.is_dir():  # a spec: its results are in storage_path/name
        spec = load_spec(sweep)
        path = Path(spec.storage_path).expanduser().resolve() / spec.name
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"{sweep}: no sweep results at {path} (no {STATE_FILE}); run `st-scale sweep {sweep}` first")
    state = json.loads(state_file.read_text())
    if "tracking_uri" not in state:
        raise ConfigError(f"{state_file} does not record the MLflow store; re-run the sweep with this version")
    return path, state


def study_provenance(state: dict) -> dict:
    """The report's provenance, naming the commit its runs trained on when the sweep recorded it (the
    report itself may run on later code)."""
    tags = Store(state["tracking_uri"]).tags(state["parent_run_id"])
    block = provenance(commit=tags.get("st_scale.commit"))
    if "st_scale.dirty" in tags:
        block["dirty"] = tags["st_scale.dirty"] == "true"
    return block


def run_record(run: StudyRun) -> dict:
    """One run as study.json keeps it: its final figures, every sub-network and the destruction rows."""
    record = asdict(run)
    record["subnets"] = [{"depths": "-".join(map(str, d)), **v} for d, v in run.subnets.items()]
    return record


def load_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[StudyRun]:
    store = Store(uri)
    runs = []
    for child in store.child_runs(experiment_id, parent_run_id):
        labels = {
            k.removeprefix("st_scale.sweep."): v for k, v in child.data.tags.items() if k.startswith("st_scale.sweep.")
        }
        group = "/".join(v for k, v in sorted(labels.items()) if k != SEED_LABEL)
        depths = child.data.params.get("model.stage_depths")
        history = store.metric_history(child.info.run_id, "train/epoch_time_s")
        run = StudyRun(
            group=group,
            seed=int(child.data.params.get("run.seed", 0)),
            run_id=child.info.run_id,
            status=child.info.status,
            metrics=dict(child.data.metrics),
            epoch_time_s=statistics.fmean(history) if history else None,
            stage_depths=tuple(json.loads(depths)) if depths and depths != "None" else None,
            destruction_images=_optional_int(child.data.params.get("eval.destruction_images")),
            epochs=_optional_int(child.data.params.get("optimizer.epochs")),
        )
        final = epoch_layout(run.epochs or 1)  # the files of the last epoch: its sub-networks, the destruction tests
        if final.subnets_csv() in store.artifact_paths(run.run_id, final.tables):
            for row in csv.DictReader(io.StringIO(store.read_text(run.run_id, final.subnets_csv()))):
                depths_key = tuple(int(d) for d in row["depths"].split("-"))
                run.subnets[depths_key] = {"top1": float(row["top1"]), "macs": float(row["macs"])}
        if final.destruction_csv() in store.artifact_paths(run.run_id, final.destruction_tables):
            for row in csv.DictReader(io.StringIO(store.read_text(run.run_id, final.destruction_csv()))):
                run.destruction.append(
                    DestructionRow(
                        row["test"], int(row["damage"]), row["detail"], float(row["top1"]), row["statistics"]
                    )
                )
        runs.append(run)
    return sorted(runs, key=lambda r: (_group_order(r.group), r.seed))


def _optional_int(param: str | None) -> int | None:
    return int(param) if param and param != "None" else None


def _group_order(group: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(group) if group in METHOD_ORDER else len(METHOD_ORDER), group)


def group_rows(runs: list[StudyRun]) -> list[GroupRow]:
    groups: dict[str, list[StudyRun]] = {}
    for run in runs:
        if run.status == "FINISHED":
            groups.setdefault(run.group, []).append(run)
    rows = []
    for group, members in sorted(groups.items(), key=lambda kv: _group_order(kv[0])):

        def values(key: str) -> list[float]:
            return [r.metrics[key] for r in members if key in r.metrics]  # noqa: B023  (used in this iteration)

        times = [r.epoch_time_s for r in members if r.epoch_time_s is not None]
        memory = values("train/peak_memory_mib")
        extra_keys = sorted(
            {k for r in members for k in r.metrics if k.startswith("val/") and (k.endswith(SHARED) or "_calib_" in k)}
        )
        rows.append(
            GroupRow(
                group,
                len(members),
                statistics.fmean(times) if times else None,
                statistics.fmean(memory) if memory else None,
                values("val/main_top1"),
                values("val/subnets_mean_top1"),
                values("val/subnets_std_top1"),
                values("val/subnets_min_top1"),
                {k: values(k) for k in extra_keys},
                members[0].stage_depths,
            )
        )
    return rows


def mean_sd(values: list[float], signed: bool = False) -> str:
    """Mean ± sample sd over seeds (one value: itself; none: "-"); `signed` for differences."""
    if not values:
        return "-"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def _name(row: GroupRow) -> str:
    if row.stage_depths is not None:
        return f"sub-net {'-'.join(map(str, row.stage_depths))} trained alone"
    return PAPER_NAMES.get(row.group, row.group)


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f}" if values else "-"


def table_markdown(rows: list[GroupRow], timed: bool = True) -> str:
    """The paper's Table 1 columns: main top-1 is mean ± sd over seeds; "all sub-nets" is the mean
    over seeds of each run's mean ± std over its sub-networks. `timed=False` leaves out the time per
    epoch and its ratio to CT's, for runs whose wall times are not comparable (other work beside some
    of them)."""
    ct_time = next((r.epoch_time_s for r in rows if r.group == "ct"), None)
    timing = ["time / epoch (s)", "vs CT"] if timed else []
    header = ["method", "seeds", *timing, "peak memory (MiB)", "main top-1 (%)", "all sub-nets top-1 (%)"]
    lines = ["| " + " | ".join([*header, "min sub-net (%)"]) + " |", "|---" * (len(header) + 1) + "|"]
    for r in rows:
        alone = r.stage_depths is not None  # its own sub-networks are not the study's question
        spread = f"{_mean(r.subnets_mean)} ± {_mean(r.subnets_std)}" if r.subnets_mean and not alone else "-"
        cells = [_name(r), str(r.runs)]
        if timed:
            ratio = f"{r.epoch_time_s / ct_time:.2f}x" if ct_time and r.epoch_time_s else "-"
            cells += [f"{r.epoch_time_s:.1f}" if r.epoch_time_s else "-", ratio]
        memory = f"{r.peak_memory_mib:.0f}" if r.peak_memory_mib else "-"
        cells += [memory, mean_sd(r.main_top1), spread, "-" if alone else _mean(r.subnets_min)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def secondary_markdown(rows: list[GroupRow]) -> str:
    """The same trained networks measured otherwise: on the shared running BN statistics, and with
    BN re-estimated under the other calibration protocol (where the run measured it)."""
    suffixes = sorted({k[len("val/main_top1") :] for r in rows for k in r.extra if k.startswith("val/main_top1")})
    if not suffixes:
        return ""
    names = {
        SHARED: "shared running BN statistics",
        calibration_suffix("train"): "BN re-estimated, train protocol",
        calibration_suffix("eval"): "BN re-estimated, eval protocol",
    }
    header = (
        "| method | "
        + " | ".join(f"main ({names.get(s, s)}) | all sub-nets ({names.get(s, s)})" for s in suffixes)
        + " |"
    )
    lines = [header, "|---|" + "---|---|" * len(suffixes)]
    for r in rows:
        cells = []
        for s in suffixes:
            main = r.extra.get(f"val/main_top1{s}", [])
            mean, std = r.extra.get(f"val/subnets_mean_top1{s}", []), r.extra.get(f"val/subnets_std_top1{s}", [])
            cells += [mean_sd(main), f"{_mean(mean)} ± {_mean(std)}" if mean and r.stage_depths is None else "-"]
        lines.append(f"| {_name(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ figures
def loafing_points(runs: list[StudyRun]) -> list[dict]:
    """For each sub-network trained alone (and the full net): its accuracy inside the CT-trained
    net, inside the ST-trained net and alone, each as mean and sd over seeds."""
    finished = [r for r in runs if r.status == "FINISHED"]
    inside = {g: [r for r in finished if r.group == g] for g in ("ct", "st")}
    alone: dict[tuple[int, ...], list[float]] = {}
    for r in finished:
        if r.stage_depths is not None and "val/main_top1" in r.metrics:
            alone.setdefault(r.stage_depths, []).append(r.metrics["val/main_top1"])
    full = max((d for r in inside["ct"] for d in r.subnets), default=None, key=sum)
    if full is not None:
        alone.setdefault(full, [r.metrics["val/main_top1"] for r in inside["ct"] if "val/main_top1" in r.metrics])
    points = []
    for depths in sorted(alone, key=lambda d: (sum(d), d)):
        point = {"depths": "-".join(map(str, depths)), "alone": alone[depths]}
        for g, members in inside.items():
            point[f"inside_{g}"] = [r.subnets[depths]["top1"] for r in members if depths in r.subnets]
        points.append(point)
    return points


def loafing_figure(points: list[dict], title: str):
    """Bars from 0: a sub-network inside the CT- and ST-trained nets and the same architecture trained
    alone; whiskers are the sd over seeds. The full network's "trained alone" bar is CT's main net
    (CT trains exactly that network alone), hatched and said so on its axis label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, ax = plt.subplots(figsize=(9.5, 4.6))
    xs = np.arange(len(points))
    full = max((p["depths"] for p in points), key=lambda d: sum(int(x) for x in d.split("-")), default=None)
    seeds = max((len(v) for p in points for k, v in p.items() if k != "depths"), default=0)
    for offset, (key, label, colour) in zip(
        (-0.27, 0, 0.27),
        (
            ("inside_ct", "inside the CT-trained net", "C3"),
            ("inside_st", "inside the ST-trained net", "C2"),
            ("alone", "trained alone (for the full net: the CT run)", "C0"),
        ),
    ):
        means = [statistics.fmean(p[key]) if p.get(key) else np.nan for p in points]
        sds = [statistics.stdev(p[key]) if len(p.get(key, [])) > 1 else 0.0 for p in points]
        bars = ax.bar(xs + offset, means, width=0.26, yerr=sds, capsize=3, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        if key == "alone" and full is not None:
            bars[[p["depths"] for p in points].index(full)].set_hatch("//")
    ax.set_xticks(
        xs,
        [
            f"{p['depths']}\n({sum(int(d) for d in p['depths'].split('-'))} blocks"
            + (", the full net)" if p["depths"] == full else ")")
            for p in points
        ],
    )
    ax.set_xlabel(f"sub-network (blocks kept per stage); bars: mean over {seeds} seeds, whiskers: ± 1 sd over seeds")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def _legend_below(ax) -> None:
    """A legend under the axes, off the data."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def destruction_curves(runs: list[StudyRun], title: str):
    """Top-1 against random blocks deleted, and per one-block deletion / adjacent swap: CT vs ST,
    with and without BN re-estimation, averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for group, colour in (("ct", "C3"), ("st", "C2")):
        members = [r for r in runs if r.group == group and r.destruction]
        for statistics_version, style in ((RECALIBRATED, "-"), ("shared", "--")):
            rows = [d for r in members for d in r.destruction if d.statistics == statistics_version]
            if not rows:
                continue
            label = f"{PAPER_NAMES[group]}, " + (
                "BN re-estimated" if statistics_version == RECALIBRATED else "shared BN stats"
            )
            by_k: dict[int, list[float]] = {}
            for d in rows:
                if d.test in ("intact", "delete_k"):
                    by_k.setdefault(d.damage, []).append(d.top1)
            ks = sorted(by_k)
            axes[0].plot(ks, [statistics.fmean(by_k[k]) for k in ks], style, marker="o", color=colour, label=label)
            tests = ("intact", "delete_one", "swap_adjacent")
            means = [statistics.fmean([d.top1 for d in rows if d.test == t] or [float("nan")]) for t in tests]
            axes[1].plot(range(len(tests)), means, style, marker="s", color=colour, label=label)
            axes[1].set_xticks(
                range(len(tests)),
                ["intact", "one block deleted\n(mean over blocks)", "two adjacent swapped\n(mean over pairs)"],
            )
    sizes = sorted(
        {"all" if r.destruction_images is None else str(r.destruction_images) for r in runs if r.destruction}
    )
    on = f"{' / '.join(sizes)} validation images"
    axes[0].set_xlabel("random blocks deleted (mean over draws and seeds)")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        _legend_below(ax)
    figure.suptitle(f"{title}: top-1 on {on}", fontsize=10)
    figure.tight_layout()
    return figure


def subnet_distribution(runs: list[StudyRun], title: str):
    """Left: every sub-network's top-1 against its cost, one marker per seed; right: how many
    sub-networks reach each accuracy, the seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for group, colour in (("ct", "C3"), ("st", "C2")):
        members = [r for r in runs if r.group == group and r.subnets]
        for i, run in enumerate(members):
            axes[0].scatter(
                [v["macs"] / 1e6 for v in run.subnets.values()],
                [v["top1"] for v in run.subnets.values()],
                s=14,
                alpha=0.6,
                color=colour,
                marker="o^sDv"[i % 5],
                label=f"{PAPER_NAMES[group]}, seed {run.seed}",
            )
        pooled = [v["top1"] for r in members for v in r.subnets.values()]
        if pooled:
            seeds = f"{len(members)} seed{'s' if len(members) > 1 else ''}"
            axes[1].hist(
                pooled, bins=20, range=(0, 100), alpha=0.45, color=colour, label=f"{PAPER_NAMES[group]}, {seeds}"
            )
    axes[0].set_xlabel("MMACs per image")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].set_ylim(0, 100)
    axes[1].set_xlabel("top-1 (%)")
    axes[1].set_ylabel("sub-networks (seeds pooled)")
    for ax in axes:
        ax.grid(alpha=0.3)
        _legend_below(ax)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------ command
def study_text(rows: list[GroupRow], timed: bool = True) -> str:
    """table.md: the Table 1 columns, then the same networks measured otherwise (where the runs were)."""
    text = f"{table_markdown(rows, timed)}\n"
    secondary = secondary_markdown(rows)
    if secondary:
        text += (
            f"\nThe same networks, measured otherwise (shared running BN statistics; other calibration "
            f"protocol):\n\n{secondary}\n"
        )
    return text


def draw_figures(runs: list[StudyRun], points: list[dict], name: str, out: Path) -> list[str]:
    """The figures the runs have something to show for (a sweep of variants has no CT/ST pair; the
    loafing figure needs a sub-network trained alone beside the full net), saved to `out`."""
    import matplotlib.pyplot as plt

    figures = {}
    if any(r.group in ("ct", "st") and r.destruction for r in runs):
        figures["destruction.png"] = destruction_curves(runs, f"{name}: network destruction, CT vs ST")
    if any(r.group in ("ct", "st") and r.subnets for r in runs):
        figures["subnets.png"] = subnet_distribution(
            runs, f"{name}: every sub-network's top-1, CT vs ST (BN re-estimated)"
        )
    if len(points) > 1:
        title = f"{name}: loafing (sub-network inside the trained net vs alone)"
        figures["loafing.png"] = loafing_figure(points, title)
    for filename, figure in figures.items():
        figure.savefig(out / filename, dpi=110)
        plt.close(figure)
    return sorted(figures)


def report(sweep: str, out: str | Path | None = None) -> dict:
    """Print the study table, write table.md, runs.csv, study.json and the figures to `out` (default:
    <sweep folder>/report) and log them to the sweep's parent MLflow run under study/."""
    sweep_dir, state = sweep_state(sweep)
    runs = load_runs(state["tracking_uri"], state["experiment_id"], state["parent_run_id"])
    if not runs:
        raise ConfigError(f"{sweep}: the sweep's parent run {state['parent_run_id']} has no child runs yet")
    for run in runs:  # a sweep over seeds alone is one group: it goes by the sweep's name, not a blank
        run.group = run.group or sweep_dir.name
    out = Path(out).expanduser() if out else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = group_rows(runs)
    text = study_text(rows)
    name = sweep_dir.name
    (out / "table.md").write_text(text)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        keys = sorted({k for r in runs for k in r.metrics})
        writer.writerow(["group", "seed", "status", "mlflow_run_id", "epoch_time_s", *keys])
        for r in runs:
            writer.writerow([r.group, r.seed, r.status, r.run_id, r.epoch_time_s, *[r.metrics.get(k) for k in keys]])
    points = loafing_points(runs)
    summary = {
        "sweep": name,
        "parent_run_id": state["parent_run_id"],
        "rows": [asdict(r) for r in rows],
        "loafing": points,
        "runs": [run_record(r) for r in runs],  # what every figure is drawn from
    }
    write_raw(out / "study.json", study_provenance(state), summary)
    draw_figures(runs, points, name, out)
    store = Store(state["tracking_uri"])
    for path in sorted(out.iterdir()):
        store.log_file(state["parent_run_id"], path, "study")
    print(f"{name}: {len(runs)} runs ({sum(r.status == 'FINISHED' for r in runs)} finished)\n\n{text}")
    print(f"files in {out}; logged to MLflow run {state['parent_run_id']} under study/")
    return summary


def rows_from_json(rows: list[dict]) -> list[GroupRow]:
    """study.json's rows as the report built them (JSON keeps a sub-network's depths as a list)."""
    return [GroupRow(**{**r, "stage_depths": _depths(r.get("stage_depths"))}) for r in rows]


def runs_from_json(records: list[dict]) -> list[StudyRun]:
    """study.json's per-run records as the runs the report read from MLflow."""
    runs = []
    for r in records:
        subnets = {_depths(s["depths"].split("-")): {"top1": s["top1"], "macs": s["macs"]} for s in r["subnets"]}
        destruction = [DestructionRow(**d) for d in r["destruction"]]
        runs.append(
            StudyRun(
                **{**r, "stage_depths": _depths(r["stage_depths"]), "subnets": subnets, "destruction": destruction}
            )
        )
    return runs


def _depths(values) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


def redraw(study_file: str | Path, out: str | Path | None = None) -> list[str]:
    """table.md and the figures again from a committed study.json (no MLflow store needed), into `out`
    (default: the file's folder): the tables and the loafing figure from any study.json, the
    destruction and sub-network figures from one that keeps its runs (written since the report did).
    Returns the files written."""
    path = Path(study_file).expanduser()
    try:
        raw = json.loads(path.read_text())
        rows, points, name = rows_from_json(raw["rows"]), raw["loafing"], raw["sweep"]
        runs = runs_from_json(raw.get("runs", []))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path}: not a study.json `st-scale report` wrote ({type(error).__name__}: {error}); give the "
            "study.json of a report's folder"
        ) from None
    out = Path(out).expanduser() if out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(study_text(rows))
    written = ["table.md", *draw_figures(runs, points, name, out)]
    print(f"{name}: {', '.join(written)} written to {out} from {path}")
    return written
