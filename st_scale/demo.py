"""`st-scale demo`: the embedded default. Digits -> .beton once, CT then ST on a local Ray with 2
CPU workers through DeepSpeed, both in one MLflow experiment, then a side-by-side table."""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config
from .data.commands import convert
from .data.integrity import DatasetFileError, verify_beton
from .provenance import provenance
from .storage import check_writable
from .train.driver import train, write_summary_json
from .train.summary import print_summaries

DEMO_RECIPES = ("demo_ct", "demo_st")


def ensure_digits(data_dir: Path, image_size: int = 32) -> None:
    """Convert the bundled digits set unless a verified copy is already there."""

    try:
        for split in ("train", "val"):
            verify_beton(data_dir / f"{split}.beton")
    except DatasetFileError:
        convert("digits", None, data_dir, image_size=image_size)


def run_demo(
    *,
    recipes: tuple[str, str] = DEMO_RECIPES,
    epochs: int | None = None,
    overrides: list[str] = (),
    data_dir: str = "~/.cache/st_scale/digits32",
    address: str | None = None,
    summary_json: str | None = None,
    verbose: bool = False,
):
    started = provenance()
    data = check_writable(data_dir, "--data-dir", folder=True)  # the digits are written there when missing
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"data.train={data / 'train.beton'}", f"data.val={data / 'val.beton'}", *overrides]
    if epochs is not None:
        common.append(f"optimizer.epochs={epochs}")
    # Every recipe is loaded and validated before the first one trains.
    configs = {
        recipe: load_config(recipe, [*common, f"run.name={recipe.replace('_', '-')}-{stamp}"]) for recipe in recipes
    }
    ensure_digits(data)
    summaries, cfg = [], None
    for recipe, cfg in configs.items():
        print(
            f"\n=== {recipe}: {cfg.method.name.upper()} {cfg.model.name}, {cfg.optimizer.epochs} epochs, "
            f"{cfg.scaling.describe()} workers ===",
            flush=True,
        )
        summaries.append(train(cfg, address=address, verbose=verbose))
    print_summaries(summaries, cfg)
    if summary_json:
        write_summary_json(summary_json, summaries, started)
    return summaries
