"""Mutation score per module, from the results `mutmut run` left in mutants/ (`make mutate`) or a raw
file saved earlier (--results).

A mutant is killed when a fast test fails with it in place. The score is killed / every mutant that ran
and is not shown equivalent: a survivor, a mutant whose tests ran out of time (a slowed-down test is not
a failed one), and a mutant listed as [untestable] in benchmarks/mutation_equivalent.txt (CUDA only, a
process mutmut does not trace, timing only) all count as not killed; only the [equivalent] ones, which
behave exactly like the original, are left out. Mutants that never ran are counted apart and named in
the report: the score says nothing about them.

mutmut numbers a function's mutants in order, so the numbers move when the function changes: each
listed exclusion carries the fingerprint of the change it was written for, and an entry whose mutant is
now another change (or gone) is not applied; --show-exclusions prints every entry's mutant as it is now,
to re-check them. mutmut keeps its results in mutants/, which a new machine does not have: --carry-over
RESULTS takes every mutant this mutants/ has not run from a raw file saved earlier, provided no mutated
module changed since the commit it was measured at, and --not-run RESULTS prints the mutants that have no
result in it (nor in mutants/): what `make mutate` tests next. Prints the table and writes the mutants not killed
to --out/survivors.txt; with --save-results the raw file (every mutant's status, the exclusions applied,
the provenance block) goes to --out/results.json, which `make docs` turns into BENCHMARKS.md's table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from st_scale.provenance import provenance, write_raw  # noqa: E402

EXCLUSIONS_FILE = ROOT / "benchmarks" / "mutation_equivalent.txt"
SECTIONS = ("equivalent", "untestable")
KILLED = {"killed", "caught by type check", "segfault"}
COLUMNS = ("killed", "survived", "timed out", "untestable", "equivalent", "not run")
# Where the figures are assembled (the worker's loop, the evaluation pass and its reductions, the
# weights' average): scored on their own line beside the core computations.
JOINS = ("st_scale/train/loop.py", "st_scale/evaluate/passes.py", "st_scale/evaluate/distributed.py", "st_scale/ema.py")


def live_results() -> dict[str, str]:
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


def mutated_paths() -> list[str]:
    """[tool.mutmut] only_mutate of pyproject.toml: the files whose mutants are scored."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def changed_since(commit: str) -> list[str]:
    """The mutated files that differ (committed or not) from `commit`."""
    changed = subprocess.run(
        ["git", "diff", "--name-only", commit, "--", *mutated_paths()], cwd=ROOT, capture_output=True, text=True
    )
    if changed.returncode != 0:
        raise SystemExit(f"--carry-over: git cannot compare with {commit}: {changed.stderr.strip()}")
    return sorted(changed.stdout.split())


def carry_over(results: dict[str, str], earlier: dict) -> tuple[dict[str, str], dict]:
    """`results` with each mutant they have not run taken from the raw file `earlier`, and a note of
    what was taken. Only the mutants of files unchanged (committed or not) since the commit `earlier`
    measured are taken: mutmut numbers a function's mutants in order, so in a changed file an old
    number may name another change; those files' mutants run again."""
    commit = earlier.get("provenance", {}).get("commit")
    if not commit or earlier["provenance"].get("dirty"):
        raise SystemExit("--carry-over: the raw file names no clean commit; its results cannot be matched to code")
    changed = changed_since(commit)
    merged, taken = dict(results), 0
    for name, status in earlier["results"].items():
        if module_of(name) in changed:
            continue
        if merged.get(name, "not checked") == "not checked" and status != "not checked":
            merged[name] = status
            taken += 1
    note = {"commit": commit, "mutants": taken, "minutes": earlier.get("minutes")}
    return merged, note | ({"changed_files": changed} if changed else {})


def print_not_run(earlier: dict) -> int:
    """What `make mutate` runs next, one per line: each mutant neither `earlier` nor mutants/ has a
    result for, and for a mutated file changed since `earlier` whose mutants mutants/ does not list,
    a pattern naming all of them (mutmut matches names with fnmatch). 0, or 3 (and why, on stderr)
    when `earlier` names no clean commit."""
    live = live_results() if (ROOT / "mutants").is_dir() else {}
    try:
        merged, note = carry_over(live, earlier)
    except SystemExit as refused:
        print(refused, file=sys.stderr)
        return 3
    changed = note.get("changed_files", [])
    names = set(live) | {name for name in earlier["results"] if module_of(name) not in changed}
    left = sorted(name for name in names if merged.get(name, "not checked") == "not checked")
    listed_live = {module_of(name) for name in live}
    left += [f"{module_name(path)}.x*" for path in changed if path not in listed_live]
    print("\n".join(left))
    return 0


def module_name(path: str) -> str:
    """st_scale/methods/st.py -> st_scale.methods.st; st_scale/methods/__init__.py -> st_scale.methods"""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def module_of(mutant: str) -> str:
    """st_scale.methods.st.xǁStimulativeTrainingǁforward__mutmut_3 -> st_scale/methods/st.py (a
    package's own functions live in its __init__.py)"""
    stem = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0].replace(".", "/")
    return f"{stem}/__init__.py" if (ROOT / stem).is_dir() else f"{stem}.py"


def listed_exclusions(path: Path = EXCLUSIONS_FILE) -> dict[str, tuple[str, str, str]]:
    """{mutant name: (section, fingerprint, reason)}: each `NAME FINGERPRINT REASON` line of `path`
    under its [equivalent] or [untestable] header."""
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
        name, fingerprint, reason = (line.split(None, 2) + ["", ""])[:3]
        if not re.fullmatch(r"[0-9a-f]{8}", fingerprint) or not reason:
            raise SystemExit(
                f"{path}:{number}: {name}: write NAME FINGERPRINT REASON; `benchmarks/mutation_score.py "
                "--show-exclusions` prints each listed mutant's fingerprint"
            )
        listed[name] = (section, fingerprint, reason)
    return listed


def mutant_diff(name: str) -> str | None:
    """mutmut's diff of the mutant against the original function, or None when mutants/ has no such mutant."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = Path.cwd()
    os.chdir(ROOT)  # mutmut finds mutants/ from the working directory
    try:
        return get_diff_for_mutant(name)
    except (FileNotFoundError, OSError):
        return None
    finally:
        os.chdir(cwd)


def changed_lines(diff: str) -> list[str]:
    """The lines a diff removes and adds, without its file header and context."""
    return [line for line in diff.splitlines() if line[:1] in ("-", "+") and not line.startswith(("---", "+++"))]


def fingerprint(diff: str) -> str:
    """8 hex digits of the lines a mutant removes and adds (indentation aside)."""
    changed = [line[0] + line[1:].strip() for line in changed_lines(diff)]
    return hashlib.sha1("\n".join(changed).encode()).hexdigest()[:8]


def applicable_exclusions(listed: dict[str, tuple[str, str, str]]) -> tuple[dict[str, str], list[str]]:
    """({name: section} of the entries whose mutant is still the change they were written for, [names of
    the entries whose mutant has changed or is gone])."""
    applied, stale = {}, []
    for name, (section, recorded, _) in listed.items():
        diff = mutant_diff(name)
        if diff is not None and fingerprint(diff) == recorded:
            applied[name] = section
        else:
            stale.append(name)
    return applied, stale


def column_of(status: str, exclusion: str | None) -> str:
    """One column of the table for one mutant."""
    if status == "not checked":
        return "not run"
    if status in KILLED:
        return "killed"
    if exclusion is not None:  # a survivor or a time-out someone has explained
        return exclusion
    return "timed out" if status == "timeout" else "survived"


def markdown(raw: dict) -> str:
    """The table per module, the core's and the joins' lines, and what never ran, from a raw file's
    `results` ({name: status}) and `exclusions` ({name: section} applied)."""
    results, exclusions = raw["results"], raw["exclusions"]
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in results.items():
        per_module[module_of(name)][column_of(status, exclusions.get(name))] += 1
    lines = [f"| module | mutants | {' | '.join(COLUMNS)} | score |", "|---" * (len(COLUMNS) + 3) + "|"]
    core, joins = Counter(), Counter()
    for module, counts in sorted(per_module.items()):
        (joins if module in JOINS else core).update(counts)
        lines.append(_row(module, counts))
    lines.append(_row("**core computations**", core))
    if joins:
        lines.append(_row("**where figures are assembled**", joins))
    total = core + joins
    lines.append(_row("**all**", total))
    not_run = {module: counts["not run"] for module, counts in per_module.items() if counts["not run"]}
    if not_run:
        where = ", ".join(f"{module} {count}" for module, count in sorted(not_run.items()))
        lines.append(
            f"\n{total['not run']} of {len(results)} mutants never ran ({where}): the score covers only those that ran."
        )
    stale = raw.get("stale_exclusions", [])
    if stale:
        lines.append(
            f"\n{len(stale)} listed exclusions were not applied: their mutant is now another change or gone "
            f"({', '.join(stale)})."
        )
    if raw.get("minutes"):
        lines.append(f"\nWall time of the mutmut run: {raw['minutes']:.0f} min.")
    carried = raw.get("carried_over")
    if carried:
        lines.append(
            f"\n{carried['mutants']} results carried over from the run measured at {carried['commit']} "
            + (
                f"(of the files unchanged since; {', '.join(carried['changed_files'])} changed since: "
                "only this run's results count for them)."
                if carried.get("changed_files")
                else "(no mutated file has changed since)."
            )
        )
    return "\n".join(lines)


def _row(label: str, counts: Counter) -> str:
    scored = sum(counts[c] for c in ("killed", "survived", "timed out", "untestable"))
    score = f"{100 * counts['killed'] / scored:.1f}%" if scored else "-"
    return f"| {label} | {sum(counts.values())} | {' | '.join(str(counts[c]) for c in COLUMNS)} | {score} |"


def show_exclusions(listed: dict[str, tuple[str, str, str]]) -> None:
    for name, (section, recorded, reason) in listed.items():
        diff = mutant_diff(name)
        now = fingerprint(diff) if diff is not None else "gone"
        verdict = "matches" if now == recorded else f"NOW {now}: re-check the reason against this change"
        print(f"[{section}] {name} {recorded} ({verdict})\n  {reason}")
        print("".join(f"    {line}\n" for line in changed_lines(diff or "")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation")
    parser.add_argument("--results", type=Path, help="a raw file saved with --save-results, instead of mutants/")
    parser.add_argument("--save-results", action="store_true", help="write the raw file --out/results.json")
    parser.add_argument("--minutes", type=float, help="wall time of the mutmut run, for the report")
    parser.add_argument(
        "--carry-over",
        type=Path,
        metavar="RESULTS",
        help="a raw file saved earlier: the results of the mutants mutants/ has not run, when no mutated file changed",
    )
    parser.add_argument(
        "--not-run",
        type=Path,
        metavar="RESULTS",
        help="print the mutants with no result in RESULTS (nor in mutants/, when it exists), one per line, and stop; "
        "exit 3 when a mutated file changed since RESULTS' commit",
    )
    parser.add_argument(
        "--show-exclusions", action="store_true", help="print each listed exclusion's mutant as it is now, and stop"
    )
    args = parser.parse_args(argv)
    listed = listed_exclusions()
    if args.show_exclusions:
        show_exclusions(listed)
        return 0
    if args.not_run is not None:
        return print_not_run(json.loads(args.not_run.read_text()))
    block = provenance()
    if args.results is not None:
        raw = json.loads(args.results.read_text())
    else:
        applied, stale = applicable_exclusions(listed)
        raw = {"minutes": args.minutes, "results": live_results(), "exclusions": applied, "stale_exclusions": stale}
        if args.carry_over is not None:
            raw["results"], raw["carried_over"] = carry_over(raw["results"], json.loads(args.carry_over.read_text()))
    table = markdown(raw)
    not_killed = [
        f"{name}: {status}" + (f" ({listed[name][2]})" if name in raw["exclusions"] else "")
        for name, status in sorted(raw["results"].items())
        if column_of(status, raw["exclusions"].get(name)) in ("survived", "timed out", "untestable")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "survivors.txt").write_text("".join(f"{line}\n" for line in not_killed))
    if args.save_results:
        write_raw(args.out / "results.json", block, {key: raw[key] for key in raw if key != "provenance"})
    print(table)
    print(f"\n{len(not_killed)} mutants not killed: {args.out / 'survivors.txt'} (`mutmut show NAME` shows one)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
