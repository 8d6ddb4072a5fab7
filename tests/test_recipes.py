"""Every packaged recipe trains: built as a user runs it on a laptop (one CPU worker, `cpu_fp32.json`,
a batch of 8, ImageNet recipes at 64 px, one epoch) over small generated files of its kind, through the
driver's checks and the worker's own code: model, objective, DeepSpeed engine, the recipe's data
pipeline, two optimizer steps, and one evaluation of the main net and two sub-networks. In one process
(a one-process gloo group): Ray would add a minute per recipe and nothing this test checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from st_scale.config import load_config, recipe_names
from st_scale.data.convert import ArrayDataset, WriteOptions, write_beton
from st_scale.train.driver import resolve_inputs
from st_scale.train.loop import build_worker_context, evaluate_epoch, train_epoch

# Slow: about 3 minutes of test time for the 24 (a DenseNet-264 and a ViT-B/16 at 224 px among them).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("gloo_process_group")]

BATCH = 8
STEPS = 2
IMAGENET_SIZE = 64  # the crop; the generated JPEGs are larger, of several aspect ratios
# Models that take one input size only (a position embedding per patch), and the batch that keeps
# their two steps to seconds on one CPU thread.
FIXED_SIZE = {"vit_b_16": (224, 2)}
LAPTOP = (
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=1",
    "scaling.gpus_per_worker=0",
    "deepspeed.config=cpu_fp32.json",
    "data.num_workers=1",
    "optimizer.epochs=1",
    "optimizer.warmup_epochs=0",  # a recipe's warm-up may not outlast the one epoch
    "eval.max_subnets=2",
    "eval.shared_stats=false",  # the figures on shared statistics take the same path for every recipe
    "tracking.system_metrics=false",
)


def _write_arrays(folder: Path, size: int, classes: int, batch: int) -> None:
    """CIFAR-kind files: raw `size` x `size` RGB arrays, two steps' worth of training images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", STEPS * batch), ("val", batch)):
        images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        labels = np.arange(count) % classes
        metadata = {"num_classes": classes, "image_size": size, "source": "generated"}
        write_beton(ArrayDataset(images, labels), folder / f"{split}.beton", WriteOptions(num_workers=1), metadata)


def _write_jpegs(folder: Path, batch: int) -> None:
    """ImageNet-kind files: an image folder of JPEGs of several sizes and aspect ratios, converted as a
    user converts ImageNet (FFCV's JPEG fields, decoded by the recipe's random-resized-crop pipeline)."""
    from PIL import Image

    from st_scale.data.commands import convert

    rng = np.random.default_rng(0)
    for split, count in (("train", STEPS * batch), ("val", batch)):
        for i in range(count):
            width, height = 72 + 8 * (i % 4), 96 - 8 * (i % 3)
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            (folder / "src" / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            image.save(folder / "src" / split / f"class{i % 2}" / f"{i}.jpg", quality=90)
    convert("imagefolder", str(folder / "src"), folder, quiet=True, workers=1)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """{kind: the overrides that point a recipe at generated files of that kind}, written once."""
    made = {}

    def files_for(cfg) -> list[str]:
        size, batch = FIXED_SIZE.get(cfg.model.name, (IMAGENET_SIZE, BATCH))
        sizes = [f"data.batch_size={batch}", f"data.val_batch_size={batch}", f"data.calibration_images={batch}"]
        if cfg.data.pipeline == "imagenet":
            kind, extra = f"imagenet-batch{batch}", [*sizes, f"data.image_size={size}", f"data.val_image_size={size}"]
        else:
            kind, extra = f"cifar{cfg.data.image_size}x{cfg.model.num_classes}", sizes
        if kind not in made:
            folder = tmp_path_factory.mktemp(kind)
            if cfg.data.pipeline == "imagenet":
                _write_jpegs(folder, batch)
            else:
                _write_arrays(folder, cfg.data.image_size, cfg.model.num_classes, batch)
            made[kind] = [f"data.train={folder / 'train.beton'}", f"data.val={folder / 'val.beton'}"]
        return made[kind] + extra

    return files_for


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory) -> str:
    """One SQLite MLflow store for every recipe (a new store's schema takes about a second to create)."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_takes_two_steps_and_evaluates(recipe, recipe_data, tracking_store, tmp_path_factory):
    root = tmp_path_factory.mktemp(recipe)
    local = (f"run.storage_path={root / 'runs'}", f"tracking.tracking_uri={tracking_store}")
    cfg = load_config(recipe, [*recipe_data(load_config(recipe)), *LAPTOP, *local])
    inputs = resolve_inputs(cfg)
    ctx, resumed = build_worker_context(inputs, rank=0, world=1, local_rank=0)
    assert resumed.epoch == 0 and ctx.tracker is not None
    try:
        before = [p.detach().clone() for p in ctx.model.parameters()]
        step, figures = train_epoch(ctx, epoch=0, step=0)
        assert step == STEPS and len(ctx.data.train) == STEPS
        assert math.isfinite(figures["train/epoch_loss"]) and figures["train/epoch_loss"] > 0
        moved = [not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters())]
        assert sum(moved) > len(moved) // 2, "the optimizer steps moved most parameters"
        metrics = evaluate_epoch(ctx, epoch=0)
    finally:
        ctx.tracker.finish("FINISHED")
    assert 0 <= metrics["val/main_top1"] <= 100 and 0 <= metrics["val/main_top5"] <= 100
    assert metrics["val/num_subnets"] == 2
    assert 0 <= metrics["val/subnets_min_top1"] <= metrics["val/subnets_max_top1"] <= 100
