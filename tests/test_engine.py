"""DeepSpeed engine in one process (gloo, world size 1): every packaged CPU config trains, the LR
schedule, parameter groups, and checkpoints that restore exactly or refuse when incomplete."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from st_scale.checkpoint import load as load_checkpoint
from st_scale.checkpoint import save as save_checkpoint
from st_scale.config import load_config
from st_scale.engine import build_engine, parameter_groups, resolve_ds_config, set_lr
from st_scale.errors import ConfigError
from st_scale.models import create_model
from st_scale.schedule import lr_at
from st_scale.train_loop import build_model_and_objective

# One gloo process group for the whole session: DeepSpeed caches its groups, so a group torn down
# and made again (a module fixture run twice when tests are selected out of order) breaks it.
pytestmark = pytest.mark.usefixtures("gloo_process_group")


def _engine(ds_config="cpu_fp32.json", method="st", workers=1):
    cfg = load_config(
        "demo_st",
        [
            f"scaling.num_workers={workers}",
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


def _sgd_by_hand(params, grads, buffers, lr, opt, decays):
    """Nesterov SGD with momentum and decoupled-from-nothing (L2) weight decay, written out."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g + (opt.weight_decay * p if decays[i] else 0)
        buffers[i] = g.clone() if buffers[i] is None else opt.momentum * buffers[i] + g
        step = g + opt.momentum * buffers[i] if opt.nesterov else buffers[i]
        params[i] = p - lr * step


@pytest.mark.parametrize("ds_config", ["cpu_fp32.json", "cpu_zero1_fp32.json"])
def test_engine_steps_equal_sgd_written_out(ds_config):
    """Three DeepSpeed steps of the CT objective move every weight exactly as SGD with Nesterov
    momentum does, weight decay on conv and linear weights only, at the learning rate set."""
    cfg, model, engine = _engine(ds_config, method="ct")
    assert engine.zero_optimization_stage() == (1 if "zero1" in ds_config else 0)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    decays = [p.ndim > 1 for p in params]
    buffers = [None] * len(params)
    reference = create_model(model.name, 10).train()
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    for step, lr in enumerate((0.05, 0.02, 0.08)):
        images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        for p, value in zip(reference.parameters(), params):
            p.data.copy_(value)
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(reference(images), labels), list(reference.parameters())
        )
        _sgd_by_hand(params, grads, buffers, lr, cfg.optimizer, decays)
        set_lr(engine, lr)
        loss, _, _ = engine(images, labels, step)
        engine.backward(loss)
        engine.step()
    for name, p, expected in zip(names, model.parameters(), params):
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-6), name


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


@pytest.mark.parametrize("lr_min", [0.0, 0.01])
def test_lr_schedule_warms_up_then_follows_a_cosine_to_lr_min(lr_min):
    cfg = load_config("demo_st", ["optimizer.warmup_epochs=1", "optimizer.lr=0.4", f"optimizer.lr_min={lr_min}"])
    opt = cfg.optimizer
    lrs = [lr_at(s, 110, 10, opt) for s in range(130)]
    assert lrs[:10] == pytest.approx([0.4 * (s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert lrs[10] == pytest.approx(0.4)  # the cosine starts at the peak
    quarter = lr_min + (0.4 - lr_min) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lrs[35] == pytest.approx(quarter) and lrs[60] == pytest.approx((0.4 + lr_min) / 2)
    assert lrs[110] == pytest.approx(lr_min, abs=1e-12) and lrs[129] == pytest.approx(lr_min, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and min(lrs) >= lr_min


def test_a_one_step_cosine_ends_at_lr_min():
    cfg = load_config("demo_st", ["optimizer.lr=0.4", "optimizer.lr_min=0.01"])
    assert [lr_at(s, 1, 1, cfg.optimizer) for s in range(3)] == pytest.approx([0.4, 0.01, 0.01])


def test_constant_schedule_holds_the_peak_after_warm_up():
    cfg = load_config("demo_st", ["optimizer.warmup_epochs=0.5", "optimizer.schedule=constant", "optimizer.lr=0.3"])
    lrs = [lr_at(s, 100, 10, cfg.optimizer) for s in range(100)]
    assert lrs[:5] == pytest.approx([0.3 * (s + 1) / 5 for s in range(5)]) and set(lrs[5:]) == {0.3}


def test_checkpoint_restores_weights_optimizer_and_rng(tmp_path):
    _, model, engine = _engine()
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    for step in range(3):
        _step(engine, step, images, labels)
    save_checkpoint(engine, tmp_path / "ckpt", 0, 1, {"epoch": 1, "step": 3})
    expected_rng = torch.rand(3)
    continued = [_step(engine, 3 + s, images, labels) for s in range(2)]

    _, _, fresh = _engine()
    state = load_checkpoint(fresh, tmp_path / "ckpt", 0, 1)
    assert state["epoch"] == 1 and state["step"] == 3
    assert torch.equal(torch.rand(3), expected_rng)
    assert [_step(fresh, 3 + s, images, labels) for s in range(2)] == continued


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_each_rank_gets_its_own_rng_state_back(tmp_path):
    """Ranks draw from different generator states; each resumes from its own (torch, numpy, python)."""
    _, _, engine = _engine()
    expected = {}
    for rank, seed in ((0, 11), (1, 22)):
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        save_checkpoint(engine, tmp_path / "ckpt", rank, 2, {"epoch": 1, "step": 0})
        expected[rank] = _draws()
    assert expected[0] != expected[1]
    for rank in (1, 0):
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
        load_checkpoint(engine, tmp_path / "ckpt", rank, 2)
        assert _draws() == expected[rank], f"rank {rank} resumed another rank's generators"


def test_a_checkpoint_gives_back_its_run_info_and_weights(tmp_path):
    from st_scale.checkpoint import RunInfo, committed_ranks, load_weights, model_weights, read_run

    cfg, model, engine = _engine()
    _step(engine, 0, torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    info = RunInfo(cfg.model_dump(mode="json"), 2, 7, "run-id", "sqlite:////x.db", "3")
    folder = tmp_path / "run" / "checkpoint_000001"  # its parent does not exist yet
    save_checkpoint(engine, folder, 0, 2, {"epoch": 2, "step": 7}, info)
    save_checkpoint(engine, folder, 1, 2, {"epoch": 2, "step": 7})
    assert committed_ranks(folder) == [0, 1]
    assert read_run(folder) == info and read_run(folder).config_model() == cfg
    weights = model_weights(folder)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = create_model(model.name, 10)
    load_weights(folder, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="is not an st-scale checkpoint folder"):
        read_run(tmp_path)
    (folder / "COMMITTED.rank0").unlink()
    with pytest.raises(ConfigError, match=r"no commit marker from ranks \[0\] of the 2 that wrote it"):
        read_run(folder)


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    _, _, engine = _engine()
    save_checkpoint(engine, tmp_path / "ckpt", 0, 1, {"epoch": 1, "step": 0})
    shutil.copytree(tmp_path / "ckpt", tmp_path / "partial")
    (tmp_path / "partial" / "COMMITTED.rank0").unlink()
    with pytest.raises(RuntimeError, match=r"is incomplete \(no commit markers\)"):
        load_checkpoint(engine, tmp_path / "partial", 0, 1)
    # rank 0 of two committed, rank 1 did not: whatever the number of workers resuming it
    marker = tmp_path / "ckpt" / "COMMITTED.rank0"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"world_size": 2}))
    for resuming_with in (1, 2):
        with pytest.raises(RuntimeError, match=r"no commit marker from ranks \[1\] of the 2 that wrote it"):
            load_checkpoint(engine, tmp_path / "ckpt", 0, resuming_with)


def test_a_checkpoint_interrupted_while_saving_is_passed_over_for_the_one_before(tmp_path):
    """What a resume (and Ray Train) counts: the newest folder every writer committed."""
    from st_scale.checkpoint import RunInfo, latest

    cfg, _, engine = _engine()
    info = RunInfo(cfg.model_dump(mode="json"), 1, 4, None, "sqlite:////x.db", "0")
    older, newer = tmp_path / "checkpoint_2026-01-01_00-00-00", tmp_path / "checkpoint_2026-01-01_00-10-00"
    for folder in (older, newer):
        for rank in (0, 1):
            save_checkpoint(engine, folder, rank, 2, {"epoch": 1, "step": 4}, info if rank == 0 else None)
    assert latest(tmp_path).path == str(newer)
    (newer / "COMMITTED.rank1").unlink()  # rank 1 died before its marker
    assert latest(tmp_path).path == str(older)
    (older / "COMMITTED.rank0").unlink()
    assert latest(tmp_path) is None


def _full_zero_state(engine) -> dict:
    """Every parameter's whole fp32 master weight and momentum, gathered by DeepSpeed from the ranks'
    ZeRO partitions (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from st_scale.checkpoint import link_optimizer_state

    link_optimizer_state(engine.optimizer)
    return {
        name: (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "momentum_buffer").clone())
        for name, p in engine.module.named_parameters()
    }


def _zero1_on_ranks(rank: int, world: int, port: int, folder, role: str) -> None:
    """A rank of a `world`-process gloo group: `write` trains two steps (each rank on its own
    micro-batch) and saves a ZeRO-1 checkpoint with the gathered state beside it; `read` loads the
    checkpoint (written by another number of ranks) and compares the gathered state with that."""
    os.environ |= {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
    }
    torch.distributed.init_process_group("gloo")
    try:
        if role == "write":
            _write_zero1(rank, world, folder)
        else:
            _read_zero1(rank, world, folder)
    finally:
        torch.distributed.destroy_process_group()


def _write_zero1(rank, world, folder):
    _, _, engine = _engine("cpu_zero1_fp32.json", workers=world)
    generator = torch.Generator().manual_seed(rank)
    micro = 16 // world
    for step in range(2):
        _step(engine, step, torch.randn(micro, 3, 16, 16, generator=generator), torch.arange(micro) % 10)
    state = _full_zero_state(engine)
    if rank == 0:
        torch.save(state, folder / "gathered.pt")
    save_checkpoint(engine, folder / "ckpt", rank, world, {"epoch": 1, "step": 2})


def _read_zero1(rank, world, folder):
    _, _, engine = _engine("cpu_zero1_fp32.json", workers=world)
    assert load_checkpoint(engine, folder / "ckpt", rank, world)["step"] == 2
    expected, restored = torch.load(folder / "gathered.pt"), _full_zero_state(engine)
    assert expected.keys() == restored.keys()
    for name, (weight, momentum) in expected.items():
        assert torch.equal(restored[name][0], weight), f"{name}: fp32 master weight"
        assert torch.equal(restored[name][1], momentum), f"{name}: momentum"
    for name, p in engine.module.named_parameters():  # the module's own weights agree too
        assert torch.equal(p.detach(), expected[name][0]), name
    micro = 16 // world
    _step(engine, 2, torch.randn(micro, 3, 16, 16), torch.arange(micro) % 10)  # and it trains on


@pytest.mark.parametrize("written_by, read_by", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_a_zero1_checkpoint_is_resharded_for_another_number_of_ranks(tmp_path, written_by, read_by):
    """Each ZeRO-1 rank saves only its partition of the fp32 weights and the momentum; loaded by another
    number of ranks, the whole state DeepSpeed gathers from the new partitions equals the writers'.
    One side runs in this process (a world of one), the other in spawned processes."""
    from processes import free_port

    for role, world in (("write", written_by), ("read", read_by)):
        if world == 1:
            (_write_zero1 if role == "write" else _read_zero1)(0, 1, tmp_path)
        else:
            torch.multiprocessing.spawn(_zero1_on_ranks, args=(world, free_port(), tmp_path, role), nprocs=world)
