"""Recipes and overrides: every bad input names its field before any worker starts."""

import json
from pathlib import Path

import numpy as np
import pytest

from st_scale.config import load_config, recipe_names
from st_scale.errors import ConfigError
from st_scale.train.engine import resolve_ds_config

DIGITS = ["data.train=/nonexistent/train.beton", "data.val=/nonexistent/val.beton"]


def test_packaged_recipes_all_validate():
    names = recipe_names()
    assert {
        "demo_ct",
        "demo_st",
        "cifar100_resnet56_ct",
        "cifar100_resnet56_st",
        "imagenet_resnet50_ct",
        "imagenet_resnet50_st",
        "imagenet_resnet50_stpp",
    } <= set(names)
    for name in names:
        cfg = load_config(name)
        resolve_ds_config(cfg)


def test_stpp_recipe_is_the_papers():
    cfg = load_config("imagenet_resnet50_stpp")
    assert cfg.method.num_subnets == 6 and cfg.method.logit_norm and cfg.method.small_inputs
    assert cfg.sampling.space == "restricted" and cfg.sampling.max_dropped == [0, 1, 3, 0]
    assert (cfg.data.image_size, cfg.data.val_image_size) == (200, 224)
    assert cfg.model.name == "resnet50" and cfg.optimizer.epochs == 200


def test_overrides_parse_yaml_values():
    cfg = load_config(
        "demo_st", ["method.kl_weight=0.25", "eval.recalibrate=false", "sampling.max_dropped=[0, 1, 1]", "run.name=x"]
    )
    assert cfg.method.kl_weight == 0.25 and cfg.eval.recalibrate is False and cfg.sampling.max_dropped == [0, 1, 1]
    assert cfg.flat()["method.kl_weight"] == 0.25


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.kl_weigth=1"], "method.kl_weigth: unknown key"),
        (["method.kl_weight=-1"], r"method.kl_weight: Input should be greater than or equal to 0 \(got -1\)"),
        (["method.temperature=0"], "method.temperature: Input should be greater than 0"),
        (["method.num_subnets=0"], "method.num_subnets: Input should be greater than or equal to 1"),
        (["optimizer.epochs=ten"], r"optimizer.epochs: Input should be a valid integer.*\(got 'ten'\)"),
        (["model.name=resnet51"], "model.name: unknown model 'resnet51'"),
        (["method.name=kd"], "method.name: unknown method 'kd'"),
        (["data.batch_size=63"], "data.batch_size=63 is not divisible by scaling.num_workers=2"),
        (["scaling.num_workers=[2, 1]"], r"scaling.num_workers: .*\[2, 1\]: give N >= 1 or \[min, max\]"),
        (["scaling.num_workers=0"], r"scaling.num_workers: .*0: give N >= 1"),
        (
            ["scaling.num_workers=[1, 5]"],
            r"data.batch_size=64 is not divisible by scaling.num_workers=1-5 \(3, 5 workers\)",
        ),
        (["sampling.space=restricted"], "space 'restricted' needs max_dropped"),
        (["bogus.key=1"], "bogus: unknown key"),
        (["optimizer.ema_decay=0.99", "eval.recalibrate=false"], "optimizer.ema_decay=0.99 needs eval.recalibrate"),
        (["optimizer.ema_decay=1"], "optimizer.ema_decay: Input should be less than 1"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo_st", overrides)


def test_unknown_recipe_lists_the_packaged_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'demo_xx'; packaged recipes: .*demo_st"):
        load_config("demo_xx")
    with pytest.raises(ConfigError, match="is not of the form"):
        load_config("demo_st", ["method.kl_weight"])


def test_recipe_files_and_bases(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: demo_st\nmethod: {kl_weight: 3.0}\nrun: {name: mine}\n")
    cfg = load_config(str(recipe))
    assert cfg.method.name == "st" and cfg.method.kl_weight == 3.0 and cfg.model.name == "cifar_resnet20"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_deepspeed_batch_sizes_come_from_the_recipe():
    ds = resolve_ds_config(load_config("demo_st", ["data.batch_size=96"]))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        96,
        48,
        1,
    )
    ds = resolve_ds_config(load_config("imagenet_resnet50_st"))
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["bf16"]["enabled"]


def _ds_file(tmp_path: Path, content: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_deepspeed_config_errors_name_the_problem(tmp_path):
    with pytest.raises(
        ConfigError, match="deepspeed.config: file 'nope.json' not found; available in ds_configs/: .*cpu_fp32.json"
    ):
        resolve_ds_config(load_config("demo_st", ["deepspeed.config=nope.json"]))
    contradicting = _ds_file(tmp_path, {"train_batch_size": 32, "zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match="sets train_batch_size=32, which contradicts the recipe"):
        resolve_ds_config(load_config("demo_st", [f"deepspeed.config={contradicting}"]))
    with_optimizer = _ds_file(tmp_path, {"optimizer": {"type": "Adam"}})
    with pytest.raises(ConfigError, match="has an 'optimizer' block; remove it"):
        resolve_ds_config(load_config("demo_st", [f"deepspeed.config={with_optimizer}"]))
    with pytest.raises(ConfigError, match="enables bf16, which st-scale runs on GPUs only"):
        resolve_ds_config(load_config("demo_st", ["deepspeed.config=zero1_bf16.json"]))
    both = ["deepspeed.config=zero1_autocast_bf16.json", "deepspeed.overrides={bf16.enabled: true}"]
    with pytest.raises(ConfigError, match="enables both bf16 .* and torch_autocast .*: choose one"):
        resolve_ds_config(load_config("demo_st", both))
    accumulation = _ds_file(tmp_path, {"gradient_accumulation_steps": 3})
    with pytest.raises(
        ConfigError,
        match="data.batch_size=64 is not divisible by scaling.num_workers=2 x gradient_accumulation_steps=3",
    ):
        resolve_ds_config(load_config("demo_st", [f"deepspeed.config={accumulation}"]))


def test_version_is_the_installed_packages(capsys):
    from importlib import metadata

    from st_scale.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"st-scale {metadata.version('st-scale')}"


def test_an_elastic_group_keeps_the_global_batch_on_every_number_of_workers():
    """[min, max] workers: the DeepSpeed config is resolved for the full group, and a worker restates
    the batch sizes for the number it trains with; the global batch is the recipe's in every case."""
    from st_scale.train.engine import batch_sizes

    with pytest.raises(ConfigError, match=r"\(3 workers\)"):
        load_config("demo_st", ["scaling.num_workers=[1, 4]"])
    cfg = load_config("demo_st", ["scaling.num_workers=[1, 4]", "data.batch_size=48"])
    assert cfg.scaling.elastic and list(cfg.scaling.worker_counts) == [1, 2, 3, 4]
    ds = resolve_ds_config(cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (48, 12)
    for world, micro in ((1, 48), (2, 24), (3, 16), (4, 12)):
        assert batch_sizes(48, world, 1) == {
            "train_batch_size": 48,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
        }
    assert batch_sizes(48, 2, 3)["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ConfigError, match="data.batch_size=48 is not divisible by scaling.num_workers=5"):
        batch_sizes(48, 5, 1)


def _ffcv_imagenet_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet's get_resolution (0-based epochs), as its training script defines it."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def test_progressive_resizing_follows_ffcv_imagenets_schedule():
    """ffcv-imagenet's 88-epoch rn50 recipe: 160 px to (0-based) epoch 65, 192 from epoch 76 on."""
    cfg = load_config(
        "imagenet_resnet50_st",
        [
            "optimizer.epochs=88",
            "data.image_size=192",
            "data.progressive_resizing={min_size: 160, start_epoch: 66, end_epoch: 77}",
        ],
    )
    sizes = [cfg.data.train_image_size(e) for e in range(88)]
    assert sizes == [_ffcv_imagenet_resolution(e, 160, 192, 76, 65) for e in range(88)]
    assert sizes[65] == 160 and sizes[76] == 192 and len(set(sizes)) == 2
    wide = load_config(
        "imagenet_resnet50_st",
        ["optimizer.epochs=40", "data.progressive_resizing={min_size: 128, start_epoch: 10, end_epoch: 30}"],
    )
    sizes = [wide.data.train_image_size(e) for e in range(40)]
    assert sizes == [_ffcv_imagenet_resolution(e, 128, 224, 29, 9) for e in range(40)]
    assert sorted(set(sizes)) == [128, 160, 192, 224] and sizes == sorted(sizes)
    assert load_config("imagenet_resnet50_st").data.train_image_size(5) == 224  # off: the recipe's size


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.progressive_resizing={min_size: 16, start_epoch: 1, end_epoch: 2}"], "applies to the imagenet"),
        (
            ["data.pipeline=imagenet", "data.progressive_resizing={min_size: 32, start_epoch: 1, end_epoch: 2}"],
            "min_size=32 must be below data.image_size=32",
        ),
        (
            ["data.pipeline=imagenet", "data.progressive_resizing={min_size: 16, start_epoch: 2, end_epoch: 2}"],
            "end_epoch=2 must come after start_epoch=2",
        ),
        (
            ["data.pipeline=imagenet", "data.progressive_resizing={min_size: 16, start_epoch: 1, end_epoch: 99}"],
            r"end_epoch=99 is after the last epoch \(optimizer.epochs=",
        ),
    ],
)
def test_bad_progressive_resizing_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo_st", overrides)


@pytest.mark.parametrize("base", ["fashion_resnet20_st", "cifar100_resnet56_st", "imagenet_resnet50_st"])
def test_a_cheap_st_recipe_is_its_full_st_recipe_with_the_cheaper_option(base):
    full, cheap = load_config(base).flat(), load_config(f"{base}_cheap").flat()
    differs = {key for key in full.keys() | cheap.keys() if full.get(key) != cheap.get(key)}
    assert differs == {"method.subnet_batch_fraction", "run.name"}
    assert cheap["method.subnet_batch_fraction"] == 0.5 and full["method.subnet_batch_fraction"] == 1.0
