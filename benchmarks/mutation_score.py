"""Mutation score per core module, from the results `mutmut run` left in mutants/ (`make mutate`) or a
listing of them saved earlier (--results).

A mutant is killed when a fast test fails with it in place. The score is killed / every mutant that ran
and is not shown equivalent: a survivor, a mutant whose tests ran out of time (a slowed-down test is not
a failed one), and a mutant listed as [untestable] in benchmarks/mutation_equivalent.txt (CUDA only, a
process mutmut does not trace, timing only) all count as not killed; only the [equivalent] ones, which
behave exactly like the original, are left out. Mutants that never ran are counted apart and named in
the report: the score says nothing about them. Writes score.md, survivors.txt and (with --save-results)
the compact listing of every mutant's status under --out.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUSIONS_FILE = ROOT / "benchmarks" / "mutation_equivalent.txt"
SECTIONS = ("equivalent", "untestable")
KILLED = {"killed", "caught by type check", "segfault"}
COLUMNS = ("killed", "survived", "timed out", "untestable", "equivalent", "not run")


def mutant_results(saved: Path | None = None) -> dict[str, str]:
    """{mutant name: status} as `mutmut results --all true` reports them (or as `saved` holds them)."""
    if saved is not None:
        out = saved.read_text()
    else:
        out = subprocess.run(
            [str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    results = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            results[name] = status
    if not results:
        raise SystemExit(f"no mutation results in {saved or 'mutants/'}: run `make mutate` first")
    return results


def module_of(mutant: str) -> str:
    """st_scale.methods.st.xǁStimulativeTrainingǁforward__mutmut_3 -> st_scale/methods/st.py (a
    package's own functions live in its __init__.py)"""
    stem = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0].replace(".", "/")
    return f"{stem}/__init__.py" if (ROOT / stem).is_dir() else f"{stem}.py"


def listed_exclusions(path: Path = EXCLUSIONS_FILE) -> dict[str, tuple[str, str]]:
    """{mutant name: (section, reason)}: each line of `path` under its [equivalent] or [untestable] header."""
    listed, section = {}, None
    for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            if section not in SECTIONS:
                raise SystemExit(f"{path}:{number}: section [{section}]; use one of {', '.join(SECTIONS)}")
            continue
        if section is None:
            raise SystemExit(f"{path}:{number}: {line.split()[0]} comes before any [equivalent] or [untestable] line")
        name, _, reason = line.partition(" ")
        listed[name] = (section, reason.strip())
    return listed


def status_of(name: str, status: str, listed: dict[str, tuple[str, str]]) -> str:
    """One column of the table for one mutant."""
    if status == "not checked":
        return "not run"
    if status in KILLED:
        return "killed"
    if name in listed:  # a survivor or a time-out someone has explained
        return listed[name][0]
    return "timed out" if status == "timeout" else "survived"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation")
    parser.add_argument("--results", type=Path, help="a listing saved with --save-results, instead of mutants/")
    parser.add_argument("--save-results", action="store_true", help="also write every mutant's status to --out")
    parser.add_argument("--minutes", type=float, help="wall time of the mutmut run, for the report")
    args = parser.parse_args(argv)
    results, listed = mutant_results(args.results), listed_exclusions()
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors, not_run = [], Counter()
    for name, status in sorted(results.items()):
        column = status_of(name, status, listed)
        per_module[module_of(name)][column] += 1
        if column in ("survived", "timed out", "untestable"):
            survivors.append(f"{name}: {status}" + (f" ({listed[name][1]})" if name in listed else ""))
        if column == "not run":
            not_run[module_of(name)] += 1
    lines = [f"| module | mutants | {' | '.join(COLUMNS)} | score |", "|---" * (len(COLUMNS) + 3) + "|"]
    total = Counter()
    for module, counts in sorted(per_module.items()):
        total.update(counts)
        lines.append(_row(module, counts))
    lines.append(_row("**all**", total))
    if not_run:
        where = ", ".join(f"{module} {count}" for module, count in sorted(not_run.items()))
        lines.append(
            f"\n{total['not run']} of {len(results)} mutants never ran ({where}): the score covers only those that ran."
        )
    if args.minutes:
        lines.append(f"\nWall time of the mutmut run: {args.minutes:.0f} min.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "score.md").write_text("\n".join(lines) + "\n")
    (args.out / "survivors.txt").write_text("".join(f"{line}\n" for line in survivors))
    if args.save_results:
        (args.out / "results.txt").write_text(
            "".join(f"{name}: {status}\n" for name, status in sorted(results.items()))
        )
    print("\n".join(lines))
    print(
        f"\n{len(survivors)} mutants not killed listed in {args.out / 'survivors.txt'} (`mutmut show NAME` shows one)"
    )
    return 0


def _row(module: str, counts: Counter) -> str:
    scored = sum(counts[c] for c in ("killed", "survived", "timed out", "untestable"))
    score = f"{100 * counts['killed'] / scored:.1f}%" if scored else "-"
    return f"| {module} | {sum(counts.values())} | {' | '.join(str(counts[c]) for c in COLUMNS)} | {score} |"


if __name__ == "__main__":
    raise SystemExit(main())
