"""The figure tables of README.md and BENCHMARKS.md are what their committed raw files give
(`make docs` writes them; benchmarks/docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import docs  # noqa: E402


def test_the_documents_tables_are_what_their_raw_files_give():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "docs.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_a_table_is_written_between_its_markers_only():
    text = "before\n<!-- docs.py: t -->\nold 1.00\n<!-- /docs.py: t -->\nafter 2.00\n"
    assert docs.render(text, "t", "new 3.00", "DOC.md") == (
        "before\n<!-- docs.py: t -->\nnew 3.00\n<!-- /docs.py: t -->\nafter 2.00\n"
    )
    with pytest.raises(SystemExit, match="DOC.md: no markers for table 'other'"):
        docs.render(text, "other", "x", "DOC.md")


def test_a_table_of_code_that_changed_since_its_run_says_so():
    assert not docs.changed_since("HEAD", ("st_scale",))
    first = subprocess.run(
        ["git", "-C", str(ROOT), "rev-list", "--max-parents=0", "HEAD"], capture_output=True, text=True
    ).stdout.split()[0]
    assert docs.changed_since(first, ("st_scale",))
    assert docs.changed_since("0000000", ("st_scale",))  # a commit git does not know


def test_empty_markers_are_filled():
    text = "<!-- docs.py: t -->\n<!-- /docs.py: t -->\n"
    assert docs.render(text, "t", "| a |", "DOC.md") == "<!-- docs.py: t -->\n| a |\n<!-- /docs.py: t -->\n"


def _study(**groups):
    """A study.json with the given groups: {group: [(seed, main, mean, std, worst, epoch_s), ...]}."""
    runs = []
    for group, rows in groups.items():
        for seed, main, mean, std, worst, epoch in rows:
            metrics = {
                "val/main_top1": main,
                "val/subnets_mean_top1": mean,
                "val/subnets_std_top1": std,
                "val/subnets_min_top1": worst,
            }
            epochs = {"ct_12ep": 12, "ct_9ep": 9}.get(group, 8)
            run = {"group": group, "seed": seed, "status": "FINISHED", "metrics": metrics, "epoch_time_s": epoch}
            runs.append(run | {"epochs": epochs})
    return {"runs": runs}


def test_the_cheaper_st_table_compares_each_seed_with_full_st_of_the_same_seed():
    from doc_tables import cheap_quality, meets_goal

    study = _study(
        ct=[(0, 88.0, 70.0, 14.0, 40.0, 40.0), (1, 88.4, 69.0, 14.5, 38.0, 44.0)],
        st=[(0, 88.0, 86.0, 1.2, 83.0, 60.0), (1, 88.2, 86.4, 1.4, 83.4, 64.0)],
        st_every2=[(0, 87.9, 85.8, 1.4, 82.5, 50.0), (1, 88.0, 86.0, 1.6, 82.4, 50.0)],
        st_every3=[(0, 87.0, 85.0, 1.2, 83.0, 46.0), (1, 88.2, 86.4, 1.4, 83.4, 46.0)],
    )
    rows = {r["group"]: r for r in cheap_quality(study)}
    every2 = rows["st_every2"]
    assert every2["deltas"]["mean"] == pytest.approx([-0.2, -0.4])  # 85.8 - 86.0, 86.0 - 86.4: paired by seed
    assert every2["deltas"]["main"] == pytest.approx([-0.1, -0.2])
    assert every2["std_ratio"] == pytest.approx([1.4 / 1.2, 1.6 / 1.4])
    assert every2["deltas"]["worst"] == pytest.approx([-0.5, -1.0])
    assert meets_goal(every2)  # mean -0.3 >= -0.5, std 1.15x <= 1.25x, worst -0.75 >= -1.5, main -0.15 >= -0.3
    assert not meets_goal(rows["st_every3"])  # main -0.5 on average: fails the main-net bound alone


def _timing(**groups):
    """A timing study.json: {group: {seed: time per epoch}}."""
    return _study(**{g: [(seed, 0, 0, 0, 0, t) for seed, t in times.items()] for g, times in groups.items()})


def test_epoch_ratios_pair_each_seed_with_ct_of_the_same_seed():
    from doc_tables import epoch_ratios

    timing = _timing(ct={0: 40.0, 1: 50.0, 2: 45.0}, st_every2={0: 48.0, 1: 55.0})
    assert epoch_ratios(timing, "st_every2") == pytest.approx([1.2, 1.1])  # seed 2 has no st_every2 run
    assert epoch_ratios(timing, "ct_12ep") == pytest.approx([1.0, 1.0, 1.0])  # CT's work per epoch
    assert epoch_ratios(timing, "st_half_batch") == []


def test_the_cheaper_st_table_renders_every_group_that_ran():
    from doc_tables import cheap_st_table

    study = _study(
        ct=[(0, 88.0, 70.0, 14.0, 40.0, 40.0)],
        st=[(0, 88.0, 86.0, 1.2, 83.0, 60.0)],
        st_half_batch=[(0, 87.0, 84.6, 1.5, 81.0, 52.0)],
    )
    variants = [
        {"variant": "CT, eager NCHW", "time_over_ct": 1.0},
        {"variant": "ST, eager NCHW", "time_over_ct": 1.46},
        {"variant": "ST, subnet_batch_fraction 0.5, eager NCHW", "time_over_ct": 1.22},
    ]
    speed = {"args": {"model": "cifar_resnet20", "image_size": 28}, "variants": variants}
    timing = _timing(ct={0: 40.0, 1: 30.0}, st={0: 56.0}, st_half_batch={0: 52.0, 1: 36.0})
    lines = cheap_st_table([study, timing, speed]).splitlines()
    assert len(lines) == 5 and "step / CT (cifar_resnet20 28 px)" in lines[0]
    assert "epoch / CT (one at a time)" in lines[0]
    half = lines[-1].split(" | ")
    assert half[2:5] == ["1.22x", "1.25x ± 0.07", "87.00"]  # step ratio; epochs 52 / 40, 36 / 30; main
    assert half[5:8] == ["-1.00", "84.60", "-1.40"] and half[9] == "1.25x" and half[-1] == "no |"


def test_the_batch_fraction_table_pairs_the_quarters_seeds_with_full_st_from_the_other_study():
    from doc_tables import batch_fraction_table

    study = _study(
        ct=[(0, 88.0, 70.0, 14.0, 40.0, 40.0)],
        st=[(0, 88.0, 86.0, 1.2, 83.0, 60.0), (1, 88.2, 86.4, 1.4, 83.4, 64.0)],
        st_half_batch=[(0, 87.8, 85.9, 1.3, 82.0, 52.0), (1, 88.0, 86.2, 1.5, 82.6, 56.0)],
    )
    # the quarter's own sweep names its runs otherwise; seed 2 has no full ST to be paired with
    quarter = _study(
        fraction=[(0, 87.0, 84.0, 1.8, 80.0, 45.0), (1, 87.6, 85.4, 1.4, 82.4, 47.0), (2, 99, 99, 1, 99, 1)]
    )
    variants = [
        {"variant": "ST, subnet_batch_fraction 0.5, eager NCHW", "time_over_ct": 1.22},
        {"variant": "ST, subnet_batch_fraction 0.25, eager NCHW", "time_over_ct": 1.13},
    ]
    speed = {"args": {"model": "cifar_resnet20", "image_size": 28}, "variants": variants}
    lines = batch_fraction_table([study, quarter, speed]).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| full ST",
        "| ST, `subnet_batch_fraction: 0.5`",
        "| ST, `subnet_batch_fraction: 0.25`",
    ]  # CT is not a batch fraction
    cells = lines[-1].split(" | ")
    assert cells[1:4] == ["3", "1.13x", "91.20 ± 6.76"]  # every seed of the quarter counts for its own figures
    # paired with full ST of seeds 0 and 1: main -1.0, -0.6; mean -2.0, -1.0; std 1.5x, 1.0x; worst -3.0, -1.0
    assert cells[4] == "-0.80 ± 0.28" and cells[6] == "-1.50 ± 0.71" and cells[8] == "1.25x"
    assert cells[10] == "-2.00 ± 1.41"
    assert cells[11] == "no: sub-net mean -1.50; worst -2.00; main -0.80 |"
    assert lines[3].split(" | ")[-1] == "yes |"  # half a batch: -0.15, 1.08x, -0.9, -0.2


def test_the_loafing_table_pairs_each_architecture_alone_with_its_own_seed():
    from doc_tables import loafing_table

    loafing = [
        {"depths": "1-1-1", "alone": [85.0, 86.0], "inside_ct": [40.0, 36.0], "inside_st": [83.0, 84.5]},
        {"depths": "3-3-3", "alone": [88.0, 89.0], "inside_ct": [88.0, 89.0], "inside_st": [88.5, 88.0]},
    ]
    lines = loafing_table([{"loafing": loafing}]).splitlines()
    # seed by seed: 85 - 40 = 45 and 86 - 36 = 50 under CT; 85 - 83 = 2 and 86 - 84.5 = 1.5 under ST
    assert lines[2] == "| 1-1-1 | 38.00 ± 2.83 | 83.75 ± 1.06 | 85.50 ± 0.71 | +47.50 ± 3.54 | +1.75 ± 0.35 |"
    # the full depth "alone" is CT's main net itself: no gap is claimed for it
    assert lines[3] == (
        "| 3-3-3 (the full net; alone: CT's main net) | 88.50 ± 0.71 | 88.25 ± 0.35 | 88.50 ± 0.71 | - | - |"
    )


def test_the_equal_compute_table_compares_whole_training_times():
    from doc_tables import equal_compute_table

    study = _study(
        ct=[(0, 88.0, 70.0, 14.0, 40.0, 40.0), (1, 88.4, 69.0, 14.5, 38.0, 44.0)],
        ct_12ep=[(0, 89.0, 69.0, 15.0, 35.0, 42.0), (1, 89.4, 68.0, 15.5, 33.0, 42.0)],
        st=[(0, 88.0, 86.0, 1.2, 83.0, 60.0), (1, 88.2, 86.4, 1.4, 83.4, 64.0)],
    )
    more_ct = _study(ct_9ep=[(0, 88.6, 68.0, 15.0, 36.0, 99.0), (1, 88.8, 67.0, 15.5, 34.0, 99.0)])
    timing = _timing(ct={0: 40.0, 1: 50.0}, st={0: 52.0, 1: 70.0})
    lines = equal_compute_table([study, timing, more_ct]).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| CT",
        "| full ST",
        "| CT, 9 epochs",
        "| CT, 12 epochs (1.5x)",
    ]
    ct12 = next(line for line in lines if line.startswith("| CT, 12 epochs")).split(" | ")
    assert ct12[2:5] == ["12", "1.50x ± 0.00", "89.20 ± 0.28"]  # 12 epochs of CT's time per epoch
    ct9 = next(line for line in lines if line.startswith("| CT, 9 epochs")).split(" | ")
    assert ct9[2:5] == ["9", "1.12x ± 0.00", "88.70 ± 0.14"]
    st = next(line for line in lines if line.startswith("| full ST")).split(" | ")
    assert st[2:4] == ["8", "1.35x ± 0.07"]  # 52 / 40 and 70 / 50, one at a time: the study's own times unused


def test_the_verdict_names_what_each_setting_misses_and_the_best_trade_off():
    from doc_tables import cheap_st_verdict

    study = _study(
        st=[(0, 88.0, 86.0, 1.2, 83.0, 60.0), (1, 88.2, 86.4, 1.4, 83.4, 64.0)],
        st_half_batch=[(0, 88.0, 86.0, 1.2, 83.0, 52.0), (1, 88.2, 86.2, 1.4, 83.4, 52.0)],
        st_every3=[(0, 87.0, 85.0, 1.2, 83.0, 46.0), (1, 88.2, 86.4, 1.4, 83.4, 46.0)],
    )
    variants = [
        {"variant": "ST, subnet_batch_fraction 0.5, eager NCHW", "time_over_ct": 1.22},
        {"variant": "ST, subnet_every 3, eager NCHW", "time_over_ct": 1.14},
    ]
    timing = _timing(ct={0: 40.0, 1: 40.0}, st_half_batch={0: 44.0, 1: 46.0}, st_every3={0: 44.0, 1: 44.0})
    text = cheap_st_verdict([study, timing, {"variants": variants}])
    half = "- ST, `subnet_batch_fraction: 0.5`: step time 1.22x, time per epoch 1.12x of CT's, above 1.15x"
    assert half + "; meets every quality bound" in text
    assert "- ST, `subnet_every: 3`: step time 1.14x, time per epoch 1.10x of CT's, within 1.15x;" in text
    assert "misses sub-net mean -0.50" not in text
    assert "misses main -0.50 (vs full ST)" in text  # mean -0.50 is on the bound: only the main net misses
    assert "**Best trade-off: ST, `subnet_batch_fraction: 0.5`**, the cheapest setting that keeps" in text
    slower_epochs = _timing(ct={0: 40.0}, st_every3={0: 48.0})  # its step within 1.15x, its epoch 1.20x
    assert "step time 1.14x, time per epoch 1.20x of CT's, above 1.15x" in cheap_st_verdict(
        [study, slower_epochs, {"variants": variants}]
    )
