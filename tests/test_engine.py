"""DeepSpeed engine in one process (gloo, world size 1): every packaged CPU config trains, the LR
schedule, parameter groups, and checkpoints that restore exactly or refuse when incomplete."""

import os
import shutil

import pytest
import torch

from st_scale.checkpoint import load as load_checkpoint
from st_scale.checkpoint import save as save_checkpoint
from st_scale.config import load_config
from st_scale.engine import build_engine, lr_at, parameter_groups, resolve_ds_config, set_lr
from st_scale.train_loop import build_model_and_objective


@pytest.fixture(scope="module", autouse=True)
def process_group():
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29533"),
        ("DS_ACCELERATOR", "cpu"),
    ):
        os.environ[key] = value
    torch.distributed.init_process_group("gloo")
    yield
    torch.distributed.destroy_process_group()


def _engine(ds_config="cpu_fp32.json", method="st"):
    cfg = load_config(
        "demo_st",
        [
            "scaling.num_workers=1",
            f"deepspeed.config={ds_config}",
            f"method.name={method}",
            "data.batch_size=16",
            "optimizer.lr=0.05",
            "run.name=engine",
        ],
    )
    torch.manual_seed(0)
    model, _, objective = build_model_and_objective(cfg)
    return cfg, model, build_engine(model, objective, cfg, resolve_ds_config(cfg))


def _step(engine, step, images, labels):
    set_lr(engine, 0.05)
    loss, _, _ = engine(images, labels, step)
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("ds_config", ["cpu_fp32.json", "cpu_zero1_fp32.json"])
def test_packaged_cpu_configs_train(ds_config):
    _, model, engine = _engine(ds_config)
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = [_step(engine, step, images, labels) for step in range(8)]
    assert losses[-1] < losses[0]
    assert engine.zero_optimization_stage() == (1 if "zero1" in ds_config else 0)


def test_auxiliary_heads_are_optimised_too():
    _, _, engine = _engine(method="layer_supervision")
    head = engine.module.objective.heads[0][-1].weight
    before = head.detach().clone()
    _step(engine, 0, torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    assert not torch.equal(before, head.detach())


def test_no_weight_decay_on_any_norm_or_bias_parameter():
    cfg, model, _ = _engine()
    groups = parameter_groups(model, cfg.optimizer)
    no_decay = {id(p) for p in groups[1]["params"]}
    shortcut_bn = model.net.layer2[0].downsample[1]
    assert id(shortcut_bn.weight) in no_decay and id(shortcut_bn.bias) in no_decay
    assert id(model.net.fc.bias) in no_decay and id(model.net.fc.weight) not in no_decay
    assert groups[0]["weight_decay"] == cfg.optimizer.weight_decay and groups[1]["weight_decay"] == 0


def test_lr_schedule_warms_up_then_follows_a_cosine():
    cfg = load_config("demo_st", ["optimizer.warmup_epochs=1", "optimizer.lr=0.4", "run.name=x"])
    opt = cfg.optimizer
    lrs = [lr_at(s, 100, 10, opt) for s in range(100)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert lrs[10] == pytest.approx(0.4) and lrs[55] == pytest.approx(0.2, rel=0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001


def test_checkpoint_restores_weights_optimizer_and_rng(tmp_path):
    _, model, engine = _engine()
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    for step in range(3):
        _step(engine, step, images, labels)
    save_checkpoint(engine, tmp_path / "ckpt", 0, {"epoch": 1, "step": 3})
    expected_rng = torch.rand(3)
    continued = [_step(engine, 3 + s, images, labels) for s in range(2)]

    _, _, fresh = _engine()
    state = load_checkpoint(fresh, tmp_path / "ckpt", 0, 1)
    assert state["epoch"] == 1 and state["step"] == 3
    assert torch.equal(torch.rand(3), expected_rng)
    assert [_step(fresh, 3 + s, images, labels) for s in range(2)] == continued


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    _, _, engine = _engine()
    save_checkpoint(engine, tmp_path / "ckpt", 0, {"epoch": 1, "step": 0})
    shutil.copytree(tmp_path / "ckpt", tmp_path / "partial")
    (tmp_path / "partial" / "COMMITTED.rank0").unlink()
    with pytest.raises(RuntimeError, match=r"is incomplete \(no commit marker from ranks \[0\]\)"):
        load_checkpoint(engine, tmp_path / "partial", 0, 1)
    with pytest.raises(RuntimeError, match=r"no commit marker from ranks \[1\]"):
        load_checkpoint(engine, tmp_path / "ckpt", 0, 2)
