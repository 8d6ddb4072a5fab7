"""Mutation score per core module, from the results `mutmut run` left in mutants/ (`make mutate`).

A mutant is killed when a fast test fails with it in place; one no fast test runs counts as survived.
Mutants whose tests ran out of time are counted apart (a machine busy with other work times out
mutants that would be killed or survive), and so are those listed in benchmarks/mutation_equivalent.txt
(`name  reason`: they behave exactly like the original). score = killed / (killed + survived).
Writes score.md and survivors.txt under --out.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "benchmarks" / "mutation_equivalent.txt"
KILLED = {"killed", "caught by type check", "segfault"}


def mutant_results() -> dict[str, str]:
    """{mutant name: status} as `mutmut results --all true` reports them."""
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
        raise SystemExit("no mutation results in mutants/: run `make mutate` first")
    return results


def module_of(mutant: str) -> str:
    """st_scale.methods.st.xǁStimulativeTrainingǁforward__mutmut_3 -> st_scale/methods/st.py (a
    package's own functions live in its __init__.py)"""
    stem = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0].replace(".", "/")
    return f"{stem}/__init__.py" if (ROOT / stem).is_dir() else f"{stem}.py"


def equivalent_mutants() -> dict[str, str]:
    reasons = {}
    if EQUIVALENT_FILE.is_file():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.strip().partition(" ")
                reasons[name] = reason.strip()
    return reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation")
    parser.add_argument("--minutes", type=float, help="wall time of the mutmut run, for the report")
    args = parser.parse_args()
    results, equivalent = mutant_results(), equivalent_mutants()
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for name, status in sorted(results.items()):
        counts = per_module[module_of(name)]
        if status in ("not checked", "timeout"):
            counts[status] += 1
        elif name in equivalent:
            counts["equivalent"] += 1
        elif status in KILLED:
            counts["killed"] += 1
        else:
            counts["survived"] += 1
            counts["no tests"] += status == "no tests"
            survivors.append(f"{name}: {status}")
    lines = [
        "| module | mutants | killed | survived (no test runs it) | equivalent | timed out | not checked | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total = Counter()
    for module, counts in sorted(per_module.items()):
        total.update(counts)
        lines.append(_row(module, counts))
    lines.append(_row("**all**", total))
    if args.minutes:
        lines.append(f"\nWall time of the mutmut run: {args.minutes:.0f} min.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "score.md").write_text("\n".join(lines) + "\n")
    (args.out / "survivors.txt").write_text("\n".join(survivors) + "\n")
    print("\n".join(lines))
    print(f"\n{len(survivors)} surviving mutants listed in {args.out / 'survivors.txt'} (`mutmut show NAME` shows one)")
    return 0


def _row(module: str, counts: Counter) -> str:
    checked = counts["killed"] + counts["survived"]
    score = f"{100 * counts['killed'] / checked:.1f}%" if checked else "-"
    size = sum(v for k, v in counts.items() if k != "no tests")
    return (
        f"| {module} | {size} | {counts['killed']} | {counts['survived']} ({counts['no tests']}) "
        f"| {counts['equivalent']} | {counts['timeout']} | {counts['not checked']} | {score} |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
