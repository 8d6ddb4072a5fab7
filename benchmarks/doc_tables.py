"""The tables `make docs` writes (benchmarks/docs.py), each rendered from the raw files it names: the
demos (ResNet-20, DenseNet, the transformers), the suite's time, the mutation score, the speed
switches, the sub-network evaluation, the training step, the Table 1 study, the one-seed sweep of ST's
settings and the cheaper-ST studies. A renderer takes the raw files' contents in the order its table
lists them and returns markdown."""

from __future__ import annotations

import statistics

from mutation_score import markdown as mutation_tables
from suite_time import markdown as suite_time_tables

from st_scale.sweep.study import mean_sd, rows_from_json, study_text

# The cheaper-ST study's groups (tune/fashion_st_cheap.yaml), their names and the option that makes
# each; `bench_speed.py` names its variants after the same options.
CHEAP_GROUPS = {
    "ct": ("CT", "CT, eager NCHW"),
    "st": ("full ST", "ST, eager NCHW"),
    "st_half_batch": ("ST, `subnet_batch_fraction: 0.5`", "ST, subnet_batch_fraction 0.5, eager NCHW"),
    "st_every2": ("ST, `subnet_every: 2`", "ST, subnet_every 2, eager NCHW"),
    "st_every3": ("ST, `subnet_every: 3`", "ST, subnet_every 3, eager NCHW"),
    "st_quarter_batch": ("ST, `subnet_batch_fraction: 0.25`", "ST, subnet_batch_fraction 0.25, eager NCHW"),
    "ct_9ep": ("CT, 9 epochs", None),
    "ct_12ep": ("CT, 12 epochs (1.5x)", None),
}
# CT given more epochs does CT's work per epoch: its time per epoch is CT's.
TIMED_AS = {"ct_9ep": "ct", "ct_12ep": "ct"}
# The goal a cheaper ST must meet against full ST of the same seeds (sub-network mean, std, worst, main).
GOAL = {"mean": -0.5, "std_ratio": 1.25, "worst": -1.5, "main": -0.3}


def demo_table(raws: list[dict]) -> str:
    """`st-scale demo --summary-json`'s runs, as the demo prints them (the runs of every file given)."""
    runs = [run for raw in raws for run in raw["runs"]]
    lines = [
        "| method | model | main top-1 | all sub-nets top-1 (mean ± std) | min | sub-nets | epochs | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['method']} | {run['model']} | {run['main_top1']:.2f} | {run['subnets_mean_top1']:.2f} ± "
            f"{run['subnets_std_top1']:.2f} | {run['subnets_min_top1']:.2f} | {run['num_subnets']} | {run['epochs']} "
            f"| {run['wall_s']:.0f} |"
        )
    total = sum(run["wall_s"] for run in runs)
    lines += ["", f"The runs took {total / 60:.1f} minutes together ({total:.0f} s)."]
    return "\n".join(lines)


def suite_tables(raws: list[dict]) -> str:
    """The whole time, then suite_time.py's tables without the source line it writes itself (the block
    adds its own)."""
    raw = raws[0]
    walls = [phase["wall_s"] for phase in raw["phases"].values()]
    tests = sum(len(phase["tests"]) for phase in raw["phases"].values())
    parts = f" ({' + '.join(f'{w:.0f} s' for w in walls)})" if len(walls) > 1 else ""
    head = f"{tests} tests in **{sum(walls) / 60:.1f} minutes** of pytest{parts}.\n\n"
    return head + suite_time_tables(raw).rstrip("\n").rsplit("\n\nSource:", 1)[0]


def mutation_table(raws: list[dict]) -> str:
    """mutation_score.py's table: every module's mutants by outcome, the core's and the joins' scores."""
    return mutation_tables(raws[0])


def speed_table(raws: list[dict]) -> str:
    """bench_speed.py's table: every variant's mean step time and its ratios."""
    raw = raws[0]
    args = raw["args"]
    lines = [
        f"{args['model']}, batch {args['batch_size']}, {args['image_size']} px, {args['threads']} threads, mean of "
        f"{args['steps']} steps after {args['warmup']} warm-up steps:",
        "",
        "| variant | step time (s) | time / eager NCHW CT | time / same-layout CT | saved activations / CT "
        "| warm-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    ct_saved = statistics.fmean(next(v for v in raw["variants"] if v["variant"] == "CT, eager NCHW")["saved_bytes"])
    for v in raw["variants"]:
        lines.append(
            f"| {v['variant']} | {v['mean_step_s']:.3f} | {v['time_over_ct']:.2f}x | "
            f"{v['time_over_same_layout_ct']:.2f}x | {statistics.fmean(v['saved_bytes']) / ct_saved:.2f}x | "
            f"{v['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


MODEL_LABELS = {"cifar_resnet20": "CIFAR ResNet-20", "cifar_resnet56": "CIFAR ResNet-56", "resnet50": "ResNet-50"}


def subnet_eval_table(raws: list[dict]) -> str:
    """bench_subnet_eval.py's runs, one row a model: all sub-networks evaluated with per-network BN
    re-estimation by the tree walk and one network at a time."""
    lines = [
        "| model | sub-networks | tree walk | one at a time | speed-up | identical results |",
        "|---|---|---|---|---|---|",
    ]
    for raw in raws:
        args = raw["args"]
        label = f"{MODEL_LABELS.get(args['model'], args['model'])}, {args['image_size']} px"
        lines.append(
            f"| {label} | {raw['subnets']} | {raw['tree_s']:.1f} s | {raw['naive_s']:.1f} s | "
            f"**{raw['naive_s'] / raw['tree_s']:.1f}x** | {'yes' if raw['identical_results'] else 'NO'} |"
        )
    args = raws[0]["args"]
    lines += [
        "",
        f"{args['threads']} torch threads, {args['images']} calibration and {args['images']} validation images "
        f"(random: only the time matters), batches of {args['batch_size']}.",
    ]
    return "\n".join(lines)


def train_step_table(raws: list[dict]) -> str:
    """bench_train_step.py's table: each objective's median step time, its MAC estimate and the
    activations autograd saves, against CT's."""
    raw = raws[0]
    args = raw["args"]
    lines = [
        f"{MODEL_LABELS.get(args['model'], args['model'])}, batch {args['batch_size']}, {args['image_size']} px, "
        f"{args['threads']} threads, median of {args['steps']} steps per objective.",
        "",
        "| objective | step time (s) | time / CT | MAC estimate / CT | saved activations (MiB) | memory / CT |",
        "|---|---|---|---|---|---|",
    ]
    for row in raw["objectives"]:
        lines.append(
            f"| {row['objective']} | {row['median_step_s']:.3f} | {row['time_over_ct']:.2f}x | "
            f"{row['mac_estimate_over_ct']:.2f}x | {row['saved_bytes'] / 2**20:.0f} | {row['memory_over_ct']:.2f}x |"
        )
    return "\n".join(lines)


def _by_seed(study: dict, group: str, metric: str) -> dict[int, float]:
    return {
        r["seed"]: r["metrics"][metric]
        for r in study["runs"]
        if r["group"] == group and r["status"] == "FINISHED" and metric in r["metrics"]
    }


def _spread(values: list[float]) -> str:
    return mean_sd(values, signed=True)


# The quality figures the goal bounds, and the metric each is read from.
QUALITY = {
    "main": "val/main_top1",
    "mean": "val/subnets_mean_top1",
    "std": "val/subnets_std_top1",
    "worst": "val/subnets_min_top1",
}


def cheap_quality(study: dict) -> list[dict]:
    """Per group: each figure over the seeds, and its difference from full ST of the same seed."""
    reference = {k: _by_seed(study, "st", metric) for k, metric in QUALITY.items()}
    rows = []
    for group in CHEAP_GROUPS:
        figures = {k: _by_seed(study, group, metric) for k, metric in QUALITY.items()}
        if not figures["main"]:
            continue
        deltas = {k: [v - reference[k][s] for s, v in figures[k].items() if s in reference[k]] for k in figures}
        ratios = [v / reference["std"][s] for s, v in figures["std"].items() if s in reference["std"]]
        rows.append(
            {
                "group": group,
                "seeds": sorted(figures["main"]),
                "figures": figures,
                "deltas": deltas,
                "std_ratio": ratios,
            }
        )
    return rows


def meets_goal(row: dict) -> bool:
    """The goal on the means over seeds of the paired differences from full ST."""
    d = row["deltas"]
    if not all(d[k] for k in ("mean", "worst", "main")) or not row["std_ratio"]:
        return False
    return (
        statistics.fmean(d["mean"]) >= GOAL["mean"]
        and statistics.fmean(row["std_ratio"]) <= GOAL["std_ratio"]
        and statistics.fmean(d["worst"]) >= GOAL["worst"]
        and statistics.fmean(d["main"]) >= GOAL["main"]
    )


def epoch_ratios(timing: dict, group: str) -> list[float]:
    """Each seed's time per epoch over CT's of the same seed, in the timing study (runs one at a time,
    tune/fashion_st_time.yaml)."""

    def by_seed(name: str) -> dict[int, float]:
        return {
            r["seed"]: r["epoch_time_s"]
            for r in timing["runs"]
            if r["group"] == name and r["status"] == "FINISHED" and r["epoch_time_s"]
        }

    ours, ct = by_seed(TIMED_AS.get(group, group)), by_seed("ct")
    return [ours[seed] / ct[seed] for seed in sorted(ours.keys() & ct.keys())]


def _ratio_spread(values: list[float]) -> str:
    """A time ratio as mean ± sd over the seeds."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.fmean(values):.2f}x ± {statistics.stdev(values):.2f}"


def step_ratio(speed: dict, variant: str | None) -> float | None:
    found = [v for v in speed["variants"] if v["variant"] == variant]
    return found[0]["time_over_ct"] if found else None


def _step_columns(speeds: list[dict]) -> list[str]:
    """A step-time column per speed benchmark, named by its model and image size."""
    return [f"step / CT ({s['args']['model']} {s['args']['image_size']} px)" for s in speeds]


def _header(columns: list[str]) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


# A cheaper setting's quality columns (_quality_cells' cells)
QUALITY_COLUMNS = (
    "main top-1 (%)",
    "main vs full ST",
    "sub-net mean (%)",
    "mean vs full ST",
    "sub-net std",
    "std / full ST's",
    "worst sub-net (%)",
    "worst vs full ST",
)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _quality_cells(row: dict) -> list[str]:
    """A setting's main net, sub-network mean, spread and worst (mean ± sd over its seeds), each beside
    its difference from full ST of the same seeds ("-" on full ST's own row)."""
    f, d, is_st = row["figures"], row["deltas"], row["group"] == "st"

    def versus(values: list[float]) -> str:
        return "-" if is_st else _spread(values)

    return [
        mean_sd(list(f["main"].values())),
        versus(d["main"]),
        mean_sd(list(f["mean"].values())),
        versus(d["mean"]),
        f"{statistics.fmean(f['std'].values()):.2f}",
        "-" if is_st else _ratio(statistics.fmean(row["std_ratio"]) if row["std_ratio"] else None),
        mean_sd(list(f["worst"].values())),
        versus(d["worst"]),
    ]


def cheap_st_table(raws: list[dict]) -> str:
    """The cheaper-ST study: cost (step time in one bench_speed run per model; time per epoch in the
    timing study's runs, one at a time) and quality against full ST of the same seeds (differences:
    mean ± sd over the seeds). `raws`: the study, the timing study, then the speed benchmarks."""
    study, timing, speeds = raws[0], raws[1], raws[2:]
    step, epoch = _step_columns(speeds), "epoch / CT (one at a time)"
    lines = _header(["setting", "seeds", *step, epoch, *QUALITY_COLUMNS, "meets the goal"])
    for row in cheap_quality(study):
        name, variant = CHEAP_GROUPS[row["group"]]
        cells = [name, str(len(row["seeds"]))]
        cells += [_ratio(step_ratio(s, variant)) for s in speeds]
        cells += [_ratio_spread(epoch_ratios(timing, row["group"])), *_quality_cells(row)]
        cells += ["-" if row["group"] == "st" else ("yes" if meets_goal(row) else "no")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equal_compute_table(raws: list[dict]) -> str:
    """ "ST, or CT given the time ST takes?": CT at the study's 8 epochs, at 9 (about the cheaper
    setting's cost) and at 12 (about full ST's), full ST and the cheaper settings at 8, the same seeds.
    A run's time is its epochs times its setting's time per epoch in the timing study (runs one at a
    time), against 8 epochs of CT's; figures as mean ± sd over the seeds. `raws`: the study, the timing
    study, the study of CT at 9 epochs."""
    study, timing, more_ct = raws
    merged = {"runs": study["runs"] + more_ct["runs"]}
    lines = [
        "| setting | seeds | epochs | time / 8-epoch CT's (one at a time) | main top-1 (%) | sub-net mean (%) "
        "| sub-net std | worst sub-net (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in cheap_quality(merged):
        name, _ = CHEAP_GROUPS[row["group"]]
        runs = [r for r in merged["runs"] if r["group"] == row["group"] and r["status"] == "FINISHED"]
        epochs = sorted({r["epochs"] for r in runs})
        per_epoch = epoch_ratios(timing, row["group"])
        time = [ratio * epochs[0] / 8 for ratio in per_epoch] if len(epochs) == 1 else []
        f = row["figures"]
        lines.append(
            f"| {name} | {len(runs)} | {'/'.join(map(str, epochs))} | {_ratio_spread(time)} | "
            f"{mean_sd(list(f['main'].values()))} | {mean_sd(list(f['mean'].values()))} | "
            f"{statistics.fmean(f['std'].values()):.2f} | {mean_sd(list(f['worst'].values()))} |"
        )
    return "\n".join(lines)


GOAL_TIME = 1.15  # the time a cheaper ST may cost, relative to CT's


def _misses(row: dict) -> list[str]:
    """The quality bounds a setting misses, on the means over its seeds."""
    d, misses = row["deltas"], []
    if statistics.fmean(d["mean"]) < GOAL["mean"]:
        misses.append(f"sub-net mean {statistics.fmean(d['mean']):+.2f}")
    if statistics.fmean(row["std_ratio"]) > GOAL["std_ratio"]:
        misses.append(f"std {statistics.fmean(row['std_ratio']):.2f}x")
    if statistics.fmean(d["worst"]) < GOAL["worst"]:
        misses.append(f"worst {statistics.fmean(d['worst']):+.2f}")
    if statistics.fmean(d["main"]) < GOAL["main"]:
        misses.append(f"main {statistics.fmean(d['main']):+.2f}")
    return misses


def cheap_st_verdict(raws: list[dict]) -> str:
    """What the cheaper-ST table says against the goal, one line per setting, and the best trade-off:
    the cheapest setting (step time on the first benchmark) that meets every quality bound, or, when
    none does, the one with the best sub-network mean among those within the time. Within the time:
    every step-time ratio and the mean time per epoch (one at a time) at most GOAL_TIME."""
    study, timing, speeds = raws[0], raws[1], raws[2:]
    lines, candidates = [], []
    for row in cheap_quality(study):
        if not row["group"].startswith("st_"):
            continue
        name, variant = CHEAP_GROUPS[row["group"]]
        steps = [step_ratio(s, variant) for s in speeds]
        epochs = epoch_ratios(timing, row["group"])
        epoch = statistics.fmean(epochs) if epochs else None
        cheap = all(r is not None and r <= GOAL_TIME for r in [*steps, epoch])
        misses = _misses(row)
        cost = ", ".join(f"{r:.2f}x" for r in steps if r is not None)
        cost += f", time per epoch {epoch:.2f}x" if epoch is not None else ""
        quality = "meets every quality bound" if not misses else f"misses {'; '.join(misses)} (vs full ST)"
        time = "within" if cheap else "above"
        lines.append(f"- {name}: step time {cost} of CT's, {time} {GOAL_TIME}x; {quality}.")
        candidates.append((row, steps[0], cheap, misses))
    both = [c for c in candidates if c[2] and not c[3]]
    good = sorted((c for c in candidates if not c[3]), key=lambda c: c[1])
    fast = sorted((c for c in candidates if c[2]), key=lambda c: -statistics.fmean(c[0]["deltas"]["mean"]))
    if both:
        best, verdict = both[0], "meets the whole goal"
    elif good:
        best, verdict = good[0], "the cheapest setting that keeps full ST's quality (not within the time)"
    elif fast:
        best, verdict = fast[0], "the best sub-networks within the time (not full ST's quality)"
    else:
        return "\n".join(lines)
    name = CHEAP_GROUPS[best[0]["group"]][0]
    d = best[0]["deltas"]
    lines += [
        "",
        f"**Best trade-off: {name}**, {verdict}: against full ST of the same seeds, main net "
        f"{_spread(d['main'])}, sub-net mean {_spread(d['mean'])}, worst {_spread(d['worst'])} points, "
        f"std {statistics.fmean(best[0]['std_ratio']):.2f}x (mean ± sd over {len(d['main'])} seeds).",
    ]
    return "\n".join(lines)


# The batch fractions side by side: full ST and half a batch from the cheaper-ST study, a quarter from
# its own sweep (tune/fashion_st_cost.yaml), the same data, settings and seeds.
FRACTION_GROUPS = ("st", "st_half_batch", "st_quarter_batch")


def batch_fraction_table(raws: list[dict]) -> str:
    """ "A cheaper ST": the sub-network passes on a half and on a quarter of each batch against full ST
    of the same seeds (differences: mean ± sd over the seeds), with the step time of one bench_speed
    run per model. `raws`: the cheaper-ST study, the quarter's study, then the speed benchmarks."""
    study, quarter, speeds = raws[0], raws[1], raws[2:]
    merged = {"runs": study["runs"] + [dict(run, group="st_quarter_batch") for run in quarter["runs"]]}
    lines = _header(["setting", "seeds", *_step_columns(speeds), *QUALITY_COLUMNS, "meets the quality bounds"])
    for row in cheap_quality(merged):
        if row["group"] not in FRACTION_GROUPS:
            continue
        name, variant = CHEAP_GROUPS[row["group"]]
        cells = [name, str(len(row["seeds"]))] + [_ratio(step_ratio(s, variant)) for s in speeds]
        cells += _quality_cells(row)
        cells += ["-" if row["group"] == "st" else ("yes" if meets_goal(row) else f"no: {'; '.join(_misses(row))}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The 16-epoch study's groups (tune/fashion_main_16ep.yaml) beside the same settings at 8 epochs in
# the cheaper-ST study, same data and seeds: (study index, group, setting, epochs).
MAIN_QUESTION = (
    (0, "ct", "CT", 8),
    (0, "st", "full ST", 8),
    (0, "st_half_batch", "ST, `subnet_batch_fraction: 0.5`", 8),
    (1, "ct_16ep", "CT", 16),
    (1, "st_16ep", "full ST", 16),
    (1, "st_half_batch_16ep", "ST, `subnet_batch_fraction: 0.5`", 16),
)


def main_question_rows(raws: list[dict]) -> list[dict]:
    """Per setting and schedule: each figure by seed, and the main net's difference from CT's of the same
    seed and schedule."""
    rows = []
    for index, group, name, epochs in MAIN_QUESTION:
        study = raws[index]
        figures = {k: _by_seed(study, group, metric) for k, metric in QUALITY.items()}
        ct = _by_seed(study, "ct" if epochs == 8 else "ct_16ep", QUALITY["main"])
        versus_ct = [v - ct[s] for s, v in figures["main"].items() if s in ct]
        rows.append({"name": name, "epochs": epochs, "figures": figures, "versus_ct": versus_ct})
    return rows


def main_question_table(raws: list[dict]) -> str:
    """ "The main-net question": CT, full ST and ST on half a batch at 8 and 16 epochs, the same seeds;
    mean ± sd over the seeds, and ST's main net minus CT's paired by seed."""
    lines = [
        "| setting | epochs | seeds | main top-1 (%) | main − CT's, same seed | sub-net mean (%) | sub-net std "
        "| worst sub-net (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in main_question_rows(raws):
        f = row["figures"]
        versus = "-" if row["name"] == "CT" else _spread(row["versus_ct"])
        lines.append(
            f"| {row['name']} | {row['epochs']} | {len(f['main'])} | {mean_sd(list(f['main'].values()))} | {versus} | "
            f"{mean_sd(list(f['mean'].values()))} | {statistics.fmean(f['std'].values()):.2f} | "
            f"{mean_sd(list(f['worst'].values()))} |"
        )
    return "\n".join(lines)


def study_tables(raws: list[dict]) -> str:
    """A study's two tables as `st-scale report` writes them (the paper's Table 1 columns, then the same
    networks measured otherwise), less the time per epoch: the study ran in parts, two runs at a time
    with other work beside some of them, so its epochs' wall times do not compare one method's cost
    with another's (RESULTS.md measures that with runs made one at a time)."""
    return study_text(rows_from_json(raws[0]["rows"]), timed=False).rstrip("\n")


def loafing_table(raws: list[dict]) -> str:
    """Figure 1's data: each sub-network architecture's top-1 inside the CT- and the ST-trained net and
    trained alone (mean ± sd over seeds), and how far each falls short of it trained alone, paired by
    seed. The full depth's "alone" is CT's main net: CT trains exactly that network alone."""
    lines = _header(
        ["sub-network", "inside CT (%)", "inside ST (%)", "trained alone (%)", "alone − inside CT", "alone − inside ST"]
    )
    *parts, full = raws[0]["loafing"]
    for entry in parts:
        alone, ct, st = entry["alone"], entry["inside_ct"], entry["inside_st"]
        gaps = [_spread([a - b for a, b in zip(alone, inside)]) for inside in (ct, st)]
        lines.append(
            f"| {entry['depths']} | {mean_sd(ct)} | {mean_sd(st)} | {mean_sd(alone)} | {gaps[0]} | {gaps[1]} |"
        )
    lines.append(
        f"| {full['depths']} (the full net; alone: CT's main net) | {mean_sd(full['inside_ct'])} | "
        f"{mean_sd(full['inside_st'])} | {mean_sd(full['alone'])} | - | - |"
    )
    return "\n".join(lines)


# The one-seed sweep of ST's settings (tune/fashion_st_main.yaml) against the Table 1 study's seed 0,
# all at the study's 8 epochs: (study index, group, name).
ONE_SEED_ROWS = (
    (0, "ct", "CT (study)"),
    (0, "st", "ST, KL weight 1, uniform (study)"),
    (1, "st_kl0.3", "ST, KL weight 0.3"),
    (1, "st_kl3", "ST, KL weight 3"),
    (1, "st_biased0.6", "ST, sampler biased to larger sub-nets (decay 0.6)"),
)


def _seed0(study: dict, group: str) -> dict:
    """A group's first seed (a study's rows list each figure in seed order) as one run's figures."""
    row = next(r for r in study["rows"] if r["group"] == group)
    return {k: row[k][0] for k in ("main_top1", "subnets_mean", "subnets_std", "subnets_min")}


def one_seed_table(raws: list[dict]) -> str:
    """ST's KL weight and sampler on seed 0 against the study's CT of that seed (raws: the Table 1
    study, the one-seed sweep)."""
    lines = _header(["run (seed 0)", "main top-1 (%)", "vs CT", "all sub-nets top-1 (%)", "min sub-net (%)"])
    ct = _seed0(raws[0], "ct")["main_top1"]
    for index, group, name in ONE_SEED_ROWS:
        run = _seed0(raws[index], group)
        difference = "-" if group == "ct" else f"{run['main_top1'] - ct:+.2f}"
        lines.append(
            f"| {name} | {run['main_top1']:.2f} | {difference} | "
            f"{run['subnets_mean']:.2f} ± {run['subnets_std']:.2f} | {run['subnets_min']:.2f} |"
        )
    return "\n".join(lines)


# The first GPU benchmark's measurements (bench_gpu.py before its speed matrix), as its rows name them.
FIRST_GPU_ROWS = (
    ("ct", "CT, fixed on-GPU batch"),
    ("st_shared", "ST, prefix sharing, fixed on-GPU batch"),
    ("st_unshared", "ST, no prefix sharing, fixed on-GPU batch"),
    ("st_shared_ffcv_fed", "ST, prefix sharing, fed by the FFCV loader"),
)


def first_gpu_table(raws: list[dict]) -> str:
    """One card's run of the first GPU benchmark: the loader alone, then CT and ST's images/s, median
    step time and peak memory; time against CT's is per image (CT's images/s over theirs), as the
    script's own ratios are."""
    raw = raws[0]
    ct = raw["train"]["ct"]
    lines = [
        f"{raw['device']}; torch {raw['torch']}, DeepSpeed {raw['deepspeed']}, {raw['model']}, batch "
        f"{raw['batch_size']} at {raw['image_size']} px.",
        "",
        "| measurement | images/s | step time (s) | peak GPU memory (GiB) | vs CT |",
        "|---|---|---|---|---|",
        f"| FFCV loader alone -> GPU | {raw['ffcv_loader_images_per_s']:,.0f} | | | |",
    ]
    for key, name in FIRST_GPU_ROWS:
        run = raw["train"][key]
        time, memory = ct["images_per_s"] / run["images_per_s"], run["peak_memory_gib"] / ct["peak_memory_gib"]
        lines.append(
            f"| {name} | {run['images_per_s']:,.0f} | {run['median_step_s']:.3f} | {run['peak_memory_gib']:.1f} | "
            f"{time:.2f}x time, {memory:.2f}x memory |"
        )
    return "\n".join(lines)
