"""Every script under benchmarks/ runs, at the smallest size that takes its whole path, as its user runs
it (a process of its own), and writes its raw file under a provenance block. The figures themselves
mean nothing at these sizes; what is checked is that the script works and says where its numbers came
from, so that a script nobody ran since it changed cannot feed a document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = {"command", "commit", "dirty", "date", "machine", "python", "versions", "load_average_start"}


def own_environment() -> dict:
    """This process's environment without the process group's variables the in-process tests set (a
    script started from a shell has none; with them, bench_gpu.py would join their port)."""
    group = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {key: value for key, value in os.environ.items() if key not in group}


def run_script(name: str, *args: str, cwd: Path, raw_file: str | None = None, env: dict | None = None) -> dict:
    """benchmarks/`name` with `args`, writing to `--out` (a file, or a folder holding `raw_file`); the
    raw file, its provenance checked."""
    out = cwd / (Path(name).stem if raw_file else f"{Path(name).stem}.json")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args, "--out", str(out)],
        cwd=cwd,
        env=own_environment() | {"OMP_NUM_THREADS": "1"} | (env or {}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw = json.loads((out / raw_file if raw_file else out).read_text())
    block = raw["provenance"]
    assert PROVENANCE | {"finished", "load_average_end"} <= set(block)
    assert f"benchmarks/{name}" in block["command"] and "--out" in block["command"]
    assert torch.__version__.startswith(block["versions"]["torch"]) and block["commit"] != "unknown"
    assert len(block["load_average_start"]) == len(block["load_average_end"]) == 3
    return raw


@pytest.mark.slow  # a process that loads torch
def test_the_training_step_benchmark(tmp_path):
    raw = run_script(
        "bench_train_step.py", "--model", "cifar_resnet20", "--batch-size", "4", "--steps", "2", "--threads", "1",
        cwd=tmp_path,
    )  # fmt: skip
    rows = {row["objective"]: row for row in raw["objectives"]}
    assert set(rows) == {"CT", "ST shared prefix", "ST unshared"} and rows["CT"]["time_over_ct"] == 1
    assert all(len(row["step_s"]) == 2 and row["mac_estimate_over_ct"] >= 1 for row in rows.values())


@pytest.mark.slow  # a process that loads torch
def test_the_speed_switch_benchmark(tmp_path):
    raw = run_script(
        "bench_speed.py", "--model", "cifar_resnet20", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--threads", "1", "--no-compile", cwd=tmp_path,
    )  # fmt: skip
    names = [row["variant"] for row in raw["variants"]]
    assert "CT, eager NCHW" in names and "ST, eager NCHW" in names and not any("compiled" in n for n in names)
    assert {"ST, subnet_every 2, eager NCHW", "ST, subnet_every 3, eager NCHW"} <= set(names)
    assert all(len(row["step_s"]) == 2 for row in raw["variants"])
    for row in raw["variants"]:  # the mean: subnet_every's steps alternate between cheap and full ones
        assert row["mean_step_s"] == pytest.approx(sum(row["step_s"]) / 2)


@pytest.mark.slow  # a process that loads torch
def test_the_subnet_evaluation_benchmark(tmp_path):
    raw = run_script(
        "bench_subnet_eval.py", "--model", "cifar_resnet20", "--image-size", "8", "--images", "4", "--threads", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert raw["subnets"] == 27 and raw["identical_results"] is True


@pytest.mark.slow  # a process that loads torch
def test_the_gpu_benchmark_in_its_cpu_mode(tmp_path):
    """bench_gpu.py --quick on the CPU (gloo, fp32), the FFCV part included: the script reports a
    failure there instead of raising, so its report must hold no error."""
    report = run_script(
        "bench_gpu.py", "--quick", "--model", "resnet18", "--batch-size", "4", "--image-size", "32", "--images", "24",
        "--steps", "1", "--warmup", "1", "--workers", "1",
        cwd=tmp_path, raw_file="gpu_bench.json", env={"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert "ffcv_error" not in report and report["backend"] == "gloo" and report["ffcv_loader_images_per_s"] > 0
    layouts, objectives = ("eager_nchw", "eager_channels_last"), ("ct", "st", "st_half_batch")
    assert {f"fp32/{layout}/{objective}" for layout in layouts for objective in objectives} <= set(report["train"])
    fed = [name for name in report["train"] if name.endswith("/ffcv_fed")]
    assert sorted(fed) == [f"{report['fastest_ct'].removesuffix('/ct')}/{o}/ffcv_fed" for o in ("ct", "st")]
    assert all(ratio > 0 for key, ratio in report.items() if key.startswith("st_time_ratio/"))


def test_the_mutation_score_counts_what_did_not_run_and_what_only_looks_equivalent(tmp_path):
    """A time-out and an [untestable] mutant count as not killed, an [equivalent] one is left out, a
    mutant that never ran is named rather than scored, and the joins are scored apart from the core."""
    raw = tmp_path / "results.json"
    raw.write_text(
        json.dumps(
            {
                "results": {
                    "st_scale.train.schedule.x_lr_at__mutmut_1": "killed",
                    "st_scale.train.schedule.x_lr_at__mutmut_2": "survived",
                    "st_scale.train.schedule.x_lr_at__mutmut_3": "timeout",
                    "st_scale.checkpoint.x_rng_state__mutmut_8": "survived",
                    "st_scale.checkpoint.x_load__mutmut_26": "survived",
                    "st_scale.sampling.x_step_rng__mutmut_1": "not checked",
                    "st_scale.ema.xǁWeightAverageǁupdate__mutmut_1": "killed",
                    "st_scale.ema.xǁWeightAverageǁupdate__mutmut_2": "survived",
                },
                "exclusions": {
                    "st_scale.checkpoint.x_rng_state__mutmut_8": "untestable",
                    "st_scale.checkpoint.x_load__mutmut_26": "equivalent",
                },
                "stale_exclusions": ["st_scale.checkpoint.x_save__mutmut_20"],
            }
        )
    )
    out = tmp_path / "score"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mutation_score.py"), "--results", str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:] for line in done.stdout.splitlines()
            if line.startswith("| st_scale") or line.startswith("| **")}  # fmt: skip
    # mutants | killed | survived | timed out | untestable | equivalent | not run | score
    assert rows["st_scale/train/schedule.py"] == ["3", "1", "1", "1", "0", "0", "0", "33.3%"]
    assert rows["st_scale/checkpoint.py"] == ["2", "0", "0", "0", "1", "1", "0", "0.0%"]
    assert rows["st_scale/sampling.py"] == ["1", "0", "0", "0", "0", "0", "1", "-"]
    assert rows["**core computations**"] == ["6", "1", "1", "1", "1", "1", "1", "25.0%"]
    assert rows["**where figures are assembled**"] == ["2", "1", "1", "0", "0", "0", "0", "50.0%"]
    assert rows["**all**"] == ["8", "2", "2", "1", "1", "1", "1", "33.3%"]
    assert "1 of 8 mutants never ran (st_scale/sampling.py 1)" in done.stdout
    assert "1 listed exclusions were not applied" in done.stdout and "x_save__mutmut_20" in done.stdout
    assert len((out / "survivors.txt").read_text().splitlines()) == 4


def test_results_carry_over_from_an_earlier_run_for_the_files_unchanged_since(capsys):
    """A new machine has no mutants/: what an earlier run measured fills in the mutants not run again,
    never over a result measured now, and only for files unchanged since that run's commit (in a changed
    file mutmut's numbers would name other changes): a changed file's mutants are all run again."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mutation_score import carry_over, markdown, print_not_run

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    sampling, schedule = "st_scale.sampling.x_step_rng__mutmut_", "st_scale.train.schedule.x_lr_at__mutmut_"
    earlier = {
        "provenance": {"commit": head.strip(), "dirty": False},
        "results": {f"{sampling}1": "killed", f"{sampling}2": "survived", f"{sampling}3": "not checked"}
        | {f"{schedule}1": "killed"},
        "minutes": 5.0,
    }
    merged, note = carry_over({f"{sampling}1": "not checked", f"{sampling}2": "killed"}, earlier)
    assert merged == {f"{sampling}1": "killed", f"{sampling}2": "killed", f"{schedule}1": "killed"}
    assert note == {"commit": head.strip(), "mutants": 2, "minutes": 5.0}
    assert print_not_run(earlier) == 0  # what `make mutate` tests next
    assert capsys.readouterr().out.split() == [f"{sampling}3"]

    # The commit that first added sampling.py: it (and more) changed since; schedule.py too, if it existed.
    first = subprocess.run(
        ["git", "log", "--format=%h", "--reverse", "--", "st_scale/sampling.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    old = earlier | {"provenance": {"commit": first, "dirty": False}}
    merged, note = carry_over({f"{sampling}2": "killed"}, old)
    assert "st_scale/sampling.py" in note["changed_files"]
    assert merged[f"{sampling}2"] == "killed" and f"{sampling}1" not in merged, "no result of a changed file"
    assert "only this run's results count" in markdown({"results": merged, "exclusions": {}, "carried_over": note})
    assert print_not_run(old) == 0
    printed = capsys.readouterr().out.split()
    assert "st_scale.sampling.x*" in printed and not any(name.startswith(sampling) for name in printed)
    with pytest.raises(SystemExit, match="names no clean commit"):
        carry_over({}, earlier | {"provenance": {"commit": head.strip(), "dirty": True}})
    assert print_not_run(earlier | {"provenance": {"commit": head.strip(), "dirty": True}}) == 3
    assert "no clean commit" in capsys.readouterr().err


def test_every_listed_exclusion_names_the_change_it_was_written_for():
    """Each entry of benchmarks/mutation_equivalent.txt carries its mutant's fingerprint (mutmut's
    numbers move when a function changes); the fingerprint reads only the changed lines."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mutation_score import fingerprint, listed_exclusions

    listed = listed_exclusions()
    assert len(listed) > 40 and {section for section, _, _ in listed.values()} == {"equivalent", "untestable"}
    diff = "--- a.py\n+++ a.py\n@@ -1,3 +1,3 @@\n def f():\n-    return x + 1\n+    return x - 1\n"
    assert fingerprint(diff) == fingerprint(diff.replace("    return", "        return").replace(" def f", " def g"))
    assert fingerprint(diff) != fingerprint(diff.replace("x - 1", "x * 1"))


def test_the_suite_timing_report_keeps_every_test_and_its_provenance(tmp_path):
    """benchmarks/suite_time.py over two phases' JUnit XML, as `make test` calls it with --save."""
    for phase, cases in (("fast", {"tests/test_a.py": [1.5, 0.25]}), ("ray", {"tests/test_training.py": [30.0]})):
        rows = "".join(
            f'<testcase classname="{path[:-3].replace("/", ".")}" name="test_{i}" time="{seconds}"/>'
            for path, times in cases.items()
            for i, seconds in enumerate(times)
        )
        (tmp_path / f"{phase}.xml").write_text(f"<testsuites><testsuite>{rows}</testsuite></testsuites>")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite_time.py"), f"fast={tmp_path / 'fast.xml'}:2"]
        + [f"ray={tmp_path / 'ray.xml'}:31", "--save", str(tmp_path / "out"), "--commit", "abc1234"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "the whole suite: 3 tests, 0.6 min wall" in done.stdout
    raw = json.loads((tmp_path / "out" / "suite_time.json").read_text())
    assert raw["phases"]["ray"] == {"wall_s": 31.0, "tests": {"tests/test_training.py::test_0": 30.0}}
    assert raw["phases"]["fast"]["tests"] == {"tests/test_a.py::test_0": 1.5, "tests/test_a.py::test_1": 0.25}
    assert raw["provenance"]["commit"] == "abc1234" and raw["provenance"]["command"] == "make test"
    table = (tmp_path / "out" / "suite_time.md").read_text()
    assert "| `tests/test_training.py::test_0` | 30.0 |" in table and "at commit abc1234" in table


@pytest.mark.slow  # a process that loads matplotlib
def test_the_cost_quality_figure_is_drawn_from_the_raw_files(tmp_path):
    runs = [
        {"group": g, "seed": s, "status": "FINISHED", "epoch_time_s": 40.0, "metrics": {
            "val/subnets_mean_top1": mean + s / 10, "val/subnets_min_top1": mean - 3 - s / 10}}
        for g, mean in (("ct", 69.0), ("st", 86.0), ("st_every2", 85.5)) for s in range(3)
    ]  # fmt: skip
    variants = [
        {"variant": "CT, eager NCHW", "time_over_ct": 1.0},
        {"variant": "ST, eager NCHW", "time_over_ct": 1.46},
        {"variant": "ST, subnet_every 2, eager NCHW", "time_over_ct": 1.22},
    ]
    (tmp_path / "study.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "speed.json").write_text(json.dumps({"args": {"model": "m", "image_size": 28}, "variants": variants}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "st_cost_figure.py"), "--study", str(tmp_path / "study.json"),
         "--speed", str(tmp_path / "speed.json"), "--out", str(tmp_path / "figure.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_raw_file_written_by_an_earlier_benchmark_does_not_make_the_code_dirty(tmp_path, monkeypatch):
    """A study writes several raw files in a row from one checkout: each one's provenance says whether
    the code differs from its commit, and a raw file the one before wrote is not code."""
    from st_scale import provenance

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "speed.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "REPOSITORY", tmp_path)
    (tmp_path / "benchmarks" / "results" / "speed.json").write_text('{"time_over_ct": 1.3}')
    assert provenance.provenance(["bench"])["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.provenance(["bench"])["dirty"] is True
