"""Where a figure came from: the block every raw file that feeds a document carries (benchmarks, study
reports, demo summaries). A figure is only as good as what can be said about the run that made it: the
command, the code (commit, and whether the tree had uncommitted changes), when, on what machine, with
which versions of the stack, and what else was running (the load average as the run started and ended)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
STACK = ("torch", "deepspeed", "ray", "ffcv", "mlflow")


def provenance(command: str | list[str] | None = None, *, commit: str | None = None) -> dict:
    """The block, as the run starts. `command` defaults to this process's command line; `commit` names
    the commit that was measured when it is not the checkout's HEAD (a table built from an older run)."""
    if command is None:  # `st-scale ...` (the console script or `python -m st_scale`), or a script's path
        program = sys.argv[0]
        if Path(program).name in ("st-scale", "__main__.py"):
            program = "st-scale"
        command = [program, *sys.argv[1:]]
    if not isinstance(command, str):
        command = shlex.join(command)
    return {
        "command": command,
        "commit": commit or _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": False if commit else code_changed(),
        "date": _now(),
        "machine": machine(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in STACK},
        "load_average_start": _load(),
    }


def finished(block: dict) -> dict:
    """`block` with the end of the run: the date and the load average then."""
    return block | {"finished": _now(), "load_average_end": _load()}


def machine() -> str:
    """The CPU model and core count, and the GPU (name, count, driver) when this process uses CUDA."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    described = f"{cpu}, {os.cpu_count()} cores"
    torch = sys.modules.get("torch")  # only when the run imported it: a GPU it never used says nothing
    if torch is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        driver = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()
        described += f"; {count} x {torch.cuda.get_device_name(0)}, driver {driver[0] if driver else 'unknown'}"
    return described


RESULTS = "benchmarks/results"  # raw files: one benchmark's output does not make the next one's code dirty


def code_changed() -> bool:
    """Whether the checkout differs from HEAD outside the raw results (untracked files aside)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS}"))


def _git(*args: str) -> str:
    return _command("git", "-C", str(REPOSITORY), *args)


def _command(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_raw(path: str | Path, block: dict, figures: dict) -> Path:
    """`figures` as indented JSON at `path` (its folder created), under the run's provenance block
    (finished now): a benchmark's raw file, or a command's --summary-json. Values JSON does not know
    (paths) are written as text."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": finished(block), **figures}, indent=2, default=str) + "\n")
    return path
