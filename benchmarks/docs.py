"""`make docs`: the figure tables of README.md and BENCHMARKS.md, written from committed raw files.

Each table sits between two markers in its document,

    <!-- docs.py: NAME -->
    ...written here...
    <!-- /docs.py: NAME -->

and is followed by its source (the command, commit, date and machine of the run that made the raw
file). When git says the code a table measures has changed since that commit, the table says so: the
number is then a fact about older code. `--check` writes nothing and fails when a document differs from
what its raw files give (the suite runs it), so a figure edited by hand, or left behind by new data or
new code, is caught.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from doc_tables import (  # noqa: E402
    batch_fraction_table,
    cheap_st_table,
    cheap_st_verdict,
    demo_table,
    equal_compute_table,
    first_gpu_table,
    loafing_table,
    main_question_table,
    mutation_table,
    one_seed_table,
    speed_table,
    study_tables,
    subnet_eval_table,
    suite_tables,
    train_step_table,
)


@dataclass(frozen=True)
class Table:
    document: str
    raw_files: tuple[str, ...]
    render: Callable[[list[dict]], str]
    measures: tuple[str, ...]  # the paths whose code the figures are about


SUITE_CODE = ("st_scale", "tests", "Makefile", "pyproject.toml")
DEMO = ("benchmarks/results/demo/demo.json",)
DIGITS = {name: f"benchmarks/results/digits_{name}/demo.json" for name in ("densenet40", "swin", "vit")}
# What a training step's speed depends on: the models, the objectives, the sampler.
STEP_CODE = ("st_scale/models", "st_scale/methods", "st_scale/sampling.py", "benchmarks/bench_speed.py")
SPEED = {name: f"benchmarks/results/speed/{name}.json" for name in ("cifar_resnet20", "cifar_resnet56", "resnet50")}
# What a study's figures depend on: the training and evaluation code and the study's recipes. Not
# counted: the commands around them, and st_scale/config.py, which holds the defaults (changed rarely,
# and said in a commit when they are) beside its validation (changed often).
TRAINING_CODE = (
    "st_scale/models", "st_scale/methods", "st_scale/sampling.py", "st_scale/train/loop.py", "st_scale/train/engine.py",
    "st_scale/train/schedule.py", "st_scale/evaluate/subnets.py", "st_scale/evaluate/passes.py", "st_scale/data",
    "st_scale/recipes/fashion_resnet20_ct.yaml", "st_scale/recipes/fashion_resnet20_st.yaml",
)  # fmt: skip
# The digits demos of other networks: the same training code, the demo recipes.
DEMO_TRAINING_CODE = (*TRAINING_CODE[:-2], "st_scale/recipes")
# What the GPU benchmark measures: the models, the objectives, the engine and the FFCV pipeline.
GPU_CODE = (*STEP_CODE[:-1], "st_scale/train/engine.py", "st_scale/data", "benchmarks/bench_gpu.py")
# What the sub-network evaluation's time depends on: the models and the evaluation's tree walk.
EVAL_CODE = ("st_scale/models", "st_scale/evaluate/subnets.py", "benchmarks/bench_subnet_eval.py")
SUBNET_EVAL = tuple(f"benchmarks/results/subnet_eval/{name}.json" for name in ("cifar_resnet56", "resnet50"))
TRAIN_STEP = ("benchmarks/results/train_step/cifar_resnet56.json",)
CHEAP_STUDY = "benchmarks/results/fashion_st_cheap/study.json"
TIME_STUDY = "benchmarks/results/fashion_st_time/study.json"  # the same settings' runs, one at a time
CT_9EP_STUDY = "benchmarks/results/fashion_ct_9ep/study.json"
CHEAP_SOURCES = (CHEAP_STUDY, TIME_STUDY, SPEED["cifar_resnet20"], SPEED["cifar_resnet56"])
MAIN_16EP_STUDY = "benchmarks/results/fashion_main_16ep/study.json"
TABLE1_STUDY = "benchmarks/results/fashion_table1/study.json"
ONE_SEED_STUDY = "benchmarks/results/fashion_st_main/study.json"
QUARTER_STUDY = "benchmarks/results/fashion_st_cost/study.json"
# What a mutation score measures: the modules `make mutate` mutates (and the fast tests, which change
# with nearly every commit and are not counted: new tests can only kill more).
MUTATED = tuple(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"])
TABLES = {
    "demo": Table("README.md", DEMO, demo_table, ("st_scale",)),
    "demo-benchmarks": Table("BENCHMARKS.md", DEMO, demo_table, ("st_scale",)),
    "digits-densenet": Table("RESULTS.md", (DIGITS["densenet40"],), demo_table, DEMO_TRAINING_CODE),
    "digits-transformers": Table("RESULTS.md", (DIGITS["swin"], DIGITS["vit"]), demo_table, DEMO_TRAINING_CODE),
    "suite-time": Table("BENCHMARKS.md", ("benchmarks/results/suite/suite_time.json",), suite_tables, SUITE_CODE),
    "mutation": Table("BENCHMARKS.md", ("benchmarks/results/mutation/results.json",), mutation_table, MUTATED),
    "test-fast-time": Table("BENCHMARKS.md", ("benchmarks/results/suite/test_fast.json",), suite_tables, SUITE_CODE),
    **{f"speed-{name}": Table("BENCHMARKS.md", (path,), speed_table, STEP_CODE) for name, path in SPEED.items()},
    **{
        f"gpu-{card}": Table("BENCHMARKS.md", (f"benchmarks/results/gpu_bench_{card}.json",), first_gpu_table, GPU_CODE)
        for card in ("h100", "h200")
    },
    "subnet-eval": Table("BENCHMARKS.md", SUBNET_EVAL, subnet_eval_table, EVAL_CODE),
    "train-step": Table(
        "BENCHMARKS.md",
        TRAIN_STEP,
        train_step_table,
        (*STEP_CODE[:-1], "st_scale/train/memory.py", "benchmarks/bench_train_step.py"),
    ),
    "table1": Table("RESULTS.md", (TABLE1_STUDY,), study_tables, TRAINING_CODE),
    "loafing": Table("RESULTS.md", (TABLE1_STUDY,), loafing_table, TRAINING_CODE),
    "one-seed-settings": Table("RESULTS.md", (TABLE1_STUDY, ONE_SEED_STUDY), one_seed_table, TRAINING_CODE),
    "cheap-st": Table("RESULTS.md", CHEAP_SOURCES, cheap_st_table, TRAINING_CODE),
    "cheap-st-verdict": Table("RESULTS.md", CHEAP_SOURCES, cheap_st_verdict, TRAINING_CODE),
    "batch-fractions": Table(
        "RESULTS.md",
        (CHEAP_STUDY, QUARTER_STUDY, SPEED["cifar_resnet20"], SPEED["cifar_resnet56"]),
        batch_fraction_table,
        TRAINING_CODE,
    ),
    "equal-compute": Table("RESULTS.md", (CHEAP_STUDY, TIME_STUDY, CT_9EP_STUDY), equal_compute_table, TRAINING_CODE),
    "main-question": Table("RESULTS.md", (CHEAP_STUDY, MAIN_16EP_STUDY), main_question_table, TRAINING_CODE),
}


def block(name: str, table: Table) -> str:
    raws = [json.loads((ROOT / path).read_text()) for path in table.raw_files]
    lines = [table.render(raws), ""]
    for path, raw in zip(table.raw_files, raws):
        p = raw.get("provenance")
        if p is None:  # written before raw files carried one: the commit that wrote it is what git knows
            commit, date = last_written(path)
            lines.append(
                f"Source: `{path}`, committed at {commit} ({date}) without a provenance block; the command and "
                f"machine are in the text around this table."
            )
        else:
            commit = p["commit"]
            dirty = " (with uncommitted changes)" if p.get("dirty") else ""
            lines.append(f"Source: `{path}`: `{p['command']}` at commit {commit}{dirty}, {p['date']}, {p['machine']}.")
        if changed_since(commit, table.measures):
            lines.append(
                f"**Measured at commit {commit}; the code it measures ({', '.join(table.measures)}) has "
                f"changed since.**"
            )
    return "\n".join(lines)


def last_written(path: str) -> tuple[str, str]:
    """The commit that last wrote `path`, and its date."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %ad", "--date=short", "--", path],
        capture_output=True,
        text=True,
        check=True,
    )
    commit, date = done.stdout.split()
    return commit, date


def changed_since(commit: str, paths: tuple[str, ...]) -> bool:
    """Whether any of `paths` differs between `commit` and HEAD (an unknown commit counts as changed)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--quiet", commit, "HEAD", "--", *paths], capture_output=True
    )
    return done.returncode != 0


def render(text: str, name: str, content: str, document: str) -> str:
    pattern = re.compile(
        rf"(<!-- docs.py: {re.escape(name)} -->\n)(?:.*?\n)?(<!-- /docs.py: {re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        markers = f"<!-- docs.py: {name} --> ... <!-- /docs.py: {name} -->"
        raise SystemExit(f"{document}: no markers for table {name!r} ({markers})")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; fail when a document is out of date")
    args = parser.parse_args(argv)
    documents: dict[str, str] = {}
    for name, table in TABLES.items():
        text = documents.get(table.document, (ROOT / table.document).read_text())
        documents[table.document] = render(text, name, block(name, table), table.document)
    stale = [doc for doc, text in documents.items() if (ROOT / doc).read_text() != text]
    if args.check:
        for doc in stale:
            print(f"{doc} differs from what its raw files give: run `make docs` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for doc in stale:
        (ROOT / doc).write_text(documents[doc])
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
