"""Where the test suite's time goes, from the JUnit XML files `make test` writes (one per phase).

Prints the slowest tests and each phase's total; with --save, writes a compact raw file (every test's
seconds, the phases' wall times, the command, commit, date and machine) and the markdown table of
BENCHMARKS.md ("The test suite's time") beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from st_scale.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent

# What a test file spends its time on, for the table by kind (files not named: in-process tests).
KINDS = {
    "test_training": "training runs on a local Ray (2 DeepSpeed workers, FFCV, MLflow on SQLite; 16 px digits)",
    "test_cluster": "a `ray start` cluster: `ray job submit`, Tune sweeps, PostgreSQL",
    "test_elastic": "a two-node cluster losing and regaining a node (S3 checkpoints)",
    "test_signals": "`st-scale train` stopped by a signal (its own local Ray)",
    "test_bad_input": "`st-scale` commands refusing bad input (a process per case)",
    "test_speed": "compiled blocks (inductor), speed switches",
    "test_export": "export to state dict, pt2, TorchScript, ONNX",
    "test_recipes": "every packaged recipe: two steps and an evaluation in one process",
    "test_benchmarks": "the benchmark scripts at their smallest size (a process each)",
}
IN_PROCESS = "in-process (models, objectives, evaluation, engine, data, configs)"


def read_phase(path: Path) -> dict[str, float]:
    """{test id: seconds (setup + call + teardown)} of one JUnit XML file."""
    times = {}
    for case in ET.parse(path).iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        times[f"{module}.py::{case.get('name')}"] = float(case.get("time", 0.0))
    return times


def by_file(times: dict[str, float]) -> dict[str, tuple[int, float]]:
    files: dict[str, list[float]] = defaultdict(list)
    for test, seconds in times.items():
        files[test.split("::")[0]].append(seconds)
    return {f: (len(s), sum(s)) for f, s in sorted(files.items(), key=lambda item: -sum(item[1]))}


def kind_of(test_file: str) -> str:
    return KINDS.get(Path(test_file).stem, IN_PROCESS)


def markdown(raw: dict) -> str:
    phases = raw["phases"]
    everything = {t: s for p in phases.values() for t, s in p["tests"].items()}
    lines = [
        "| phase | tests | wall (s) | sum of test times (s) |",
        "|---|---|---|---|",
    ]
    for name, phase in phases.items():
        lines.append(f"| {name} | {len(phase['tests'])} | {phase['wall_s']:.0f} | {sum(phase['tests'].values()):.0f} |")
    files = by_file(everything)
    lines += ["", "| test file | tests | seconds | kind |", "|---|---|---|---|"]
    kinds: dict[str, float] = defaultdict(float)
    for test_file, (count, seconds) in files.items():
        kind = kind_of(test_file)
        kinds[kind] += seconds
        lines.append(
            f"| `{Path(test_file).name}` | {count} | {seconds:.0f} | {'in-process' if kind == IN_PROCESS else kind} |"
        )
    lines += ["", "| kind | seconds |", "|---|---|"]
    lines += [f"| {kind} | {seconds:.0f} |" for kind, seconds in sorted(kinds.items(), key=lambda item: -item[1])]
    lines += ["", "| slowest tests | seconds |", "|---|---|"]
    for test, seconds in sorted(everything.items(), key=lambda item: -item[1])[:10]:
        lines.append(f"| `{test}` | {seconds:.1f} |")
    p = raw["provenance"]
    lines += ["", f"Source: `{p['command']}` at commit {p['commit']}, {p['date']}, {p['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "phases", nargs="+", metavar="NAME=JUNIT_XML[:WALL_S]", help="each phase's JUnit XML and its wall time"
    )
    parser.add_argument("--top", type=int, default=25, help="how many of the slowest tests to print")
    parser.add_argument("--save", type=Path, help="a folder for suite_time.json and suite_time.md")
    parser.add_argument("--command", default="make test", help="the command the raw file names")
    parser.add_argument("--commit", help="the commit the XML files were measured at (default: HEAD)")
    parser.add_argument("--name", default="suite_time", help="the raw file's and the table's name under --save")
    args = parser.parse_args(argv)

    phases = {}
    for spec in args.phases:
        name, _, rest = spec.partition("=")
        path, _, wall = rest.partition(":")
        if not Path(path).is_file():
            print(f"suite_time: {path}: no JUnit XML (did that phase run?)", file=sys.stderr)
            continue
        tests = read_phase(Path(path))
        phases[name] = {"wall_s": float(wall) if wall else sum(tests.values()), "tests": tests}
    everything = {t: s for p in phases.values() for t, s in p["tests"].items()}
    print(f"\n{args.top} slowest tests (setup + call + teardown):")
    for test, seconds in sorted(everything.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {seconds:7.1f} s  {test}")
    for name, phase in phases.items():
        print(f"{name}: {len(phase['tests'])} tests, {phase['wall_s']:.0f} s wall")
    print(f"the whole suite: {len(everything)} tests, {sum(p['wall_s'] for p in phases.values()) / 60:.1f} min wall")
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        raw = {"provenance": provenance(args.command, commit=args.commit), "phases": phases}
        (args.save / f"{args.name}.json").write_text(json.dumps(raw, indent=1) + "\n")
        (args.save / f"{args.name}.md").write_text(markdown(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
