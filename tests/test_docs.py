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
