"""The command line itself: `--help` and `--version` answer at once, without loading the training stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "deepspeed", "mlflow", "ffcv")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sweep", "--help"], ["--version"]])
def test_help_and_version_do_not_import_the_training_stack(argv):
    probe = (
        "import sys\n"
        "from st_scale.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
