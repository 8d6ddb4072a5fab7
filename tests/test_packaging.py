"""The package as a user installs it: a wheel, installed outside the repository, finds its recipes
and its DeepSpeed configs (which live at the repository's top level, ds_configs/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_outside_the_repository_finds_its_configs(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "wheel").glob("st_scale-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600)
    probe = (
        "import json, st_scale; from st_scale.config import load_config; "
        "from st_scale.train.engine import DS_CONFIG_DIR, resolve_ds_config; "
        "cfg = load_config('demo_st', ['scaling.num_workers=2', 'deepspeed.config=cpu_zero1_fp32.json']); "
        "print(json.dumps({'package': st_scale.__file__, 'configs': str(DS_CONFIG_DIR), "
        "'names': sorted(p.name for p in DS_CONFIG_DIR.glob('*.json')), 'ds': resolve_ds_config(cfg)}))"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = os.environ | {"PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=outside, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(site)) and found["configs"].startswith(str(site))
    assert found["names"] == sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    packaged = json.loads((ROOT / "ds_configs" / "cpu_zero1_fp32.json").read_text())
    assert found["ds"]["zero_optimization"] == packaged["zero_optimization"]
    assert found["ds"]["train_batch_size"] == 2 * found["ds"]["train_micro_batch_size_per_gpu"]  # 2 workers
