"""DeepSpeed engine in one process (gloo, world size 1): every packaged CPU config trains, the LR
schedule, parameter groups, and checkpoints that restore exactly or refuse when incomplete."""

import copy
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from digits_data import CHECKPOINT_V1

from st_scale.assembly import build_model_and_objective, speed_up
from st_scale.checkpoint import TrainState
from st_scale.checkpoint import load as load_checkpoint
from st_scale.checkpoint import save as save_checkpoint
from st_scale.config import Config, load_config
from st_scale.errors import ConfigError
from st_scale.models import create_model
from st_scale.train.engine import build_engine, parameter_groups, resolve_ds_config, set_lr
from st_scale.train.schedule import lr_at

# One gloo process group for the whole session: DeepSpeed caches its groups, so a group torn down
# and made again (a module fixture run twice when tests are selected out of order) breaks it.
pytestmark = pytest.mark.usefixtures("gloo_process_group")


def _engine(ds_config="cpu_fp32.json", method="st", workers=1, implementation="fused", extra=()):
    cfg = load_config(
        "demo_st",
        [
            f"scaling.num_workers={workers}",
            f"deepspeed.config={ds_config}",
            f"method.name={method}",
            "data.batch_size=16",
            "optimizer.lr=0.05",
            f"optimizer.implementation={implementation}",
            "run.name=engine",
            *extra,
        ],
    )
    torch.manual_seed(0)
    model, _, objective = build_model_and_objective(cfg)
    speed_up(model, cfg)  # as a worker does
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


@pytest.mark.parametrize(
    "ds_config, implementation",
    [
        ("cpu_fp32.json", "fused"),
        ("cpu_zero1_fp32.json", "fused"),
        ("cpu_fp32.json", "foreach"),
        ("cpu_zero1_fp32.json", "for_loop"),
    ],
)
def test_engine_steps_equal_sgd_written_out(ds_config, implementation):
    """Three DeepSpeed steps of the CT objective move every weight exactly as SGD with Nesterov
    momentum does, weight decay on conv and linear weights only, at the learning rate set, whichever
    of torch's SGD kernels runs it. Each step starts the hand-written one from the engine's weights: a
    freshly initialised ResNet's gradients change by a percent under a 1e-8 change of its weights, so two
    copies stepped apart would drift with the CPU's rounding."""
    cfg, model, engine = _engine(ds_config, method="ct", implementation=implementation)
    assert engine.zero_optimization_stage() == (1 if "zero1" in ds_config else 0)
    sgd = engine.optimizer.optimizer if engine.zero_optimization_stage() else engine.optimizer
    assert (bool(sgd.defaults["fused"]), bool(sgd.defaults["foreach"])) == (
        implementation == "fused",
        implementation == "foreach",
    )
    decays = [p.ndim > 1 for p in model.parameters()]
    buffers = [None] * len(decays)
    _steps_match(
        engine, model, lambda params, grads, lr, step: _sgd_by_hand(params, grads, buffers, lr, cfg.optimizer, decays)
    )


def _steps_match(engine, model, update_by_hand) -> None:
    """Three CT steps at three learning rates: after each, every weight is where `update_by_hand(params,
    grads, lr, step)` moves the step's starting weights given the cross-entropy gradient of a plain copy."""
    names = [n for n, _ in model.named_parameters()]
    reference = create_model(model.name, 10).train()
    g = torch.Generator().manual_seed(1)
    for step, lr in enumerate((0.05, 0.02, 0.08)):
        images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        reference.load_state_dict(model.state_dict())
        params = [p.detach().clone() for p in model.parameters()]
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(reference(images), labels), list(reference.parameters())
        )
        update_by_hand(params, grads, lr, step)
        set_lr(engine, lr)
        loss, _, _ = engine(images, labels, step)
        engine.backward(loss)
        engine.step()
        for name, p, expected in zip(names, model.parameters(), params):
            assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-6), f"step {step}: {name}"


def _adamw_by_hand(params, grads, moments, lr, opt, decays, t):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) written out: decoupled decay, bias-corrected moments."""
    b1, b2 = opt.betas
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = moments[i] if moments[i] is not None else (torch.zeros_like(p), torch.zeros_like(p))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        moments[i] = (m, v)
        p = p * (1 - lr * opt.weight_decay) if decays[i] else p
        params[i] = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + opt.eps)


@pytest.mark.parametrize("ds_config", ["cpu_fp32.json", "cpu_zero1_fp32.json"])
def test_engine_steps_equal_adamw_written_out(ds_config):
    """Three DeepSpeed steps with optimizer.name=adamw move every weight as AdamW does, decoupled weight
    decay on conv and linear weights only, at the learning rate set."""
    extra = ("optimizer.name=adamw", "optimizer.betas=[0.8,0.95]", "optimizer.eps=1e-6", "optimizer.weight_decay=0.05")
    cfg, model, engine = _engine(ds_config, method="ct", extra=extra)
    adamw = engine.optimizer.optimizer if engine.zero_optimization_stage() else engine.optimizer
    assert isinstance(adamw, torch.optim.AdamW)
    decays = [p.ndim > 1 for p in model.parameters()]
    moments = [None] * len(decays)
    _steps_match(
        engine,
        model,
        lambda params, grads, lr, step: _adamw_by_hand(params, grads, moments, lr, cfg.optimizer, decays, step + 1),
    )


def test_each_optimizer_refuses_the_others_options():
    with pytest.raises(ConfigError, match="optimizer.momentum=0.8 is set but optimizer.name=adamw does not use it"):
        load_config("demo_st", ["optimizer.name=adamw", "optimizer.momentum=0.8"])
    with pytest.raises(ConfigError, match=r"optimizer.betas=\(0.9, 0.98\) is set but optimizer.name=sgd does not use"):
        load_config("demo_st", ["optimizer.betas=[0.9,0.98]"])
    # set at all, even to the value the other optimizer would take by default: never ignored in silence
    with pytest.raises(ConfigError, match="optimizer.momentum=0.9 is set but optimizer.name=adamw"):
        load_config("demo_st", ["optimizer.name=adamw", "optimizer.momentum=0.9", "optimizer.nesterov=true"])
    with pytest.raises(ConfigError, match="optimizer.nesterov=True is set but optimizer.name=adamw"):
        load_config("demo_st", ["optimizer.name=adamw", "optimizer.nesterov=true"])


def test_an_optimizer_field_left_unset_takes_that_optimizers_default_and_survives_a_round_trip():
    sgd, adamw = load_config("demo_st"), load_config("demo_st", ["optimizer.name=adamw"])
    assert (sgd.optimizer.momentum, sgd.optimizer.nesterov, sgd.optimizer.betas, sgd.optimizer.eps) == (
        0.9, True, None, None
    )  # fmt: skip
    assert (adamw.optimizer.momentum, adamw.optimizer.betas, adamw.optimizer.eps) == (None, (0.9, 0.999), 1e-8)
    for cfg in (sgd, adamw):  # what a checkpoint stores and a worker validates again
        assert Config.model_validate(cfg.model_dump(mode="json")).optimizer == cfg.optimizer
    with pytest.raises(ConfigError, match="optimizer.betas=\\[0.9, 1.0\\]: each must lie in \\[0, 1\\)"):
        load_config("demo_st", ["optimizer.name=adamw", "optimizer.betas=[0.9,1.0]"])


def test_autocast_computes_in_bf16_and_keeps_weights_and_batchnorm_statistics_in_fp32():
    """zero1_autocast_bf16.json: convolutions and the classifier run in bf16, parameters, BN running
    statistics and the optimizer's weights stay fp32; the loss is fp32 training's within bf16 precision."""
    cfg, model, engine = _engine("zero1_autocast_bf16.json", method="ct")
    reference = create_model(model.name, 10).train()
    reference.load_state_dict(model.state_dict())
    seen = []
    model.net.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    loss, _, logits = engine(images, labels, 0)
    expected = torch.nn.functional.cross_entropy(reference(images), labels)
    assert seen == [torch.bfloat16] and logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2) and loss.item() != expected.item()
    engine.backward(loss)
    engine.step()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}
    for name, buffer in model.named_buffers():  # one training forward: the same batch statistics
        if name.endswith("running_mean"):
            expected_mean = dict(reference.named_buffers())[name]
            assert torch.allclose(buffer, expected_mean, rtol=5e-2, atol=5e-3), name
    moved = [not torch.equal(p, r) for p, r in zip(model.parameters(), reference.parameters())]
    assert all(moved)


@pytest.mark.parametrize("ds_config", ["cpu_fp32.json", "cpu_zero1_fp32.json"])
def test_a_channels_last_run_trains_through_deepspeed_like_an_nchw_run(ds_config):
    """model.channels_last: the batches are NHWC from the preparer on and the convolutions run NHWC
    inside the DeepSpeed engine (whose weights stay contiguous); the steps equal the NCHW run's."""
    from st_scale.data.loaders import BatchPreparer, memory_format

    raw = torch.randint(0, 256, (16, 16, 16, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    raw = raw.permute(0, 3, 1, 2)  # NCHW-shaped, NHWC in memory, as FFCV decodes
    labels = torch.arange(16) % 10
    losses = {}
    for layout in ("false", "true"):
        cfg, model, engine = _engine(ds_config, method="st", extra=[f"model.channels_last={layout}"])
        layout_format = memory_format(cfg.model)
        preparer = BatchPreparer(cfg.data, torch.device("cpu"), torch.float32, 0, 0, memory_format=layout_format)
        seen: list[bool] = []

        def record(module, inputs, output, seen=seen):
            seen.append(output.is_contiguous(memory_format=torch.channels_last))

        model.net.layer2[1].conv1.register_forward_hook(record)
        losses[layout] = [_step(engine, step, preparer.train(raw, step), labels) for step in range(2)]
        assert all(seen) == (layout == "true") and seen
        assert all(p.is_contiguous() for p in model.parameters())
    # The first step's loss to float precision; after an update the two layouts' different summation
    # orders have moved the weights apart by rounding (measured up to 6e-5 of the loss).
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-5)
    assert losses["true"][1] == pytest.approx(losses["false"][1], rel=1e-3)


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


@pytest.mark.parametrize("name, embeddings", [("cifar_vit", 2), ("cifar_swin", 12)])
def test_no_weight_decay_on_transformer_embeddings(name, embeddings):
    """The class token, the position embedding and every relative position bias table, as torchvision's recipes."""
    cfg = load_config("demo_st", [f"model.name={name}"])
    model = create_model(name, 10)
    groups = parameter_groups(model, cfg.optimizer)
    no_decay = {id(p) for p in groups[1]["params"]}
    exempt = [n for n, p in model.named_parameters() if p.ndim > 1 and id(p) in no_decay]
    assert len(exempt) == embeddings
    assert all(n.endswith(("class_token", "pos_embedding", "relative_position_bias_table")) for n in exempt)
    everything = parameter_groups(model, cfg.optimizer.model_copy(update={"decay_norm_and_bias": True}))
    assert len(everything) == 1


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
    save_checkpoint(engine, tmp_path / "ckpt", 0, 1, TrainState(epoch=1, step=3))
    expected_rng = torch.rand(3)
    continued = [_step(engine, 3 + s, images, labels) for s in range(2)]

    _, _, fresh = _engine()
    state = load_checkpoint(fresh, tmp_path / "ckpt", 0, 1)
    assert (state.epoch, state.step) == (1, 3)
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
        save_checkpoint(engine, tmp_path / "ckpt", rank, 2, TrainState(epoch=1, step=0))
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
    info = RunInfo(cfg.model_dump(mode="json"), "sqlite:////x.db", "3")
    state = TrainState(epoch=2, step=7, mlflow_run_id="run-id", metrics={"val/main_top1": 12.5})
    folder = tmp_path / "run" / "checkpoint_000001"  # its parent does not exist yet
    save_checkpoint(engine, folder, 0, 2, state, info)
    save_checkpoint(engine, folder, 1, 2, state)
    assert committed_ranks(folder) == [0, 1]
    for rank in (0, 1):  # what each rank committed
        assert json.loads((folder / f"COMMITTED.rank{rank}").read_text()) == {"world_size": 2}
    assert read_run(folder) == RunInfo(info.config, info.tracking_uri, info.experiment_id, state)
    assert read_run(folder).config_model() == cfg
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


def test_a_checkpoint_gives_back_the_weights_average_it_was_saved_with(tmp_path):
    from st_scale.checkpoint import read_ema

    _, model, engine = _engine()
    average = {name: torch.randn_like(value, dtype=torch.float32) for name, value in model.state_dict().items()}
    save_checkpoint(engine, tmp_path / "with", 0, 1, TrainState(epoch=1, step=1), ema_state=average)
    read = read_ema(tmp_path / "with")
    assert read.keys() == average.keys() and all(torch.equal(read[k], v) for k, v in average.items())
    save_checkpoint(engine, tmp_path / "without", 0, 1, TrainState(epoch=1, step=1))
    assert read_ema(tmp_path / "without") is None


def test_a_zero3_checkpoint_of_another_world_size_is_refused_naming_both(tmp_path):
    """ZeRO-3 shards the parameters themselves: `load` refuses before touching the engine, naming the
    number of workers that wrote the checkpoint and how to resume it."""
    from types import SimpleNamespace

    from st_scale.checkpoint import _commit_marker

    for rank in range(2):
        _commit_marker(tmp_path, rank).write_text(json.dumps({"world_size": 2}))
    engine = SimpleNamespace(zero_optimization_stage=lambda: 3)
    with pytest.raises(ConfigError, match="written by 2 workers under ZeRO-3.* for 1; .*scaling.num_workers=2"):
        load_checkpoint(engine, tmp_path, rank=0, world_size=1)
    with pytest.raises(ConfigError, match=f"checkpoint {tmp_path} was written by 2 workers"):
        load_checkpoint(engine, tmp_path, rank=0, world_size=1)


def test_the_driver_refuses_a_group_that_cannot_resume_the_runs_checkpoint(tmp_path):
    """`check_resumable`, on the driver before any worker starts: an elastic group under ZeRO-3 is refused
    outright (it would resume on another number of workers); a fixed group of another size than the one
    that wrote a ZeRO-3 checkpoint is refused naming the checkpoint and both sizes; ZeRO-1 resumes an
    elastic group on any size."""
    from st_scale.checkpoint import RUN_FILE, _commit_marker, check_resumable

    run_dir = tmp_path / "zero3-run"
    written = run_dir / "checkpoint_2026-11-30_10-00-00.000000"
    written.mkdir(parents=True)
    (written / RUN_FILE).write_text(json.dumps({}))
    for rank in range(2):
        _commit_marker(written, rank).write_text(json.dumps({"world_size": 2}))

    with pytest.raises(ConfigError) as refused:
        check_resumable(tmp_path / "no-checkpoint-yet", zero_stage=3, num_workers=(1, 2))
    assert str(refused.value) == (
        "scaling.num_workers=[1, 2] with ZeRO-3: an elastic group resumes on another number of workers, and ZeRO-3 "
        "checkpoints cannot be re-sharded; use ZeRO-0/1/2 or a fixed count"
    )
    with pytest.raises(ConfigError) as refused:
        check_resumable(run_dir, zero_stage=3, num_workers=1)
    assert str(refused.value) == (
        f"checkpoint {written} was written by 2 workers under ZeRO-3, whose parameters are sharded per worker and "
        "cannot be re-sharded for 1; resume it with scaling.num_workers=2 (runs under ZeRO-0/1/2 resume on any "
        "number of workers)"
    )
    check_resumable(run_dir, zero_stage=3, num_workers=2)  # the size that wrote it
    for stage in (0, 1, 2):  # the whole state on rank 0, or re-sharded on load
        check_resumable(run_dir, zero_stage=stage, num_workers=(1, 3))
        check_resumable(run_dir, zero_stage=stage, num_workers=1)


def test_commit_markers_that_disagree_on_the_number_of_writers_are_refused(tmp_path):
    from st_scale.checkpoint import _commit_marker, writer_world_size

    _commit_marker(tmp_path, 0).write_text(json.dumps({"epoch": 1, "step": 5, "world_size": 2}))
    _commit_marker(tmp_path, 1).write_text(json.dumps({"epoch": 1, "step": 5, "world_size": 3}))
    with pytest.raises(RuntimeError, match=r"commit markers disagree on the number of ranks \(\{2, 3\}\)"):
        writer_world_size(tmp_path)


def test_weights_saved_in_bf16_are_read_back_as_fp32(tmp_path):
    from st_scale.checkpoint import _MODEL_STATES, ENGINE_TAG, model_weights

    (tmp_path / ENGINE_TAG).mkdir()
    state = {"model.net.fc.weight": torch.randn(3, 4).bfloat16(), "model.net.bn1.num_batches_tracked": torch.tensor(7)}
    torch.save({"module": state | {"objective.head.weight": torch.zeros(2)}}, tmp_path / ENGINE_TAG / _MODEL_STATES)
    weights = model_weights(tmp_path)
    assert set(weights) == {"net.fc.weight", "net.bn1.num_batches_tracked"}
    assert weights["net.fc.weight"].dtype == torch.float32
    assert torch.equal(weights["net.fc.weight"], state["model.net.fc.weight"].float())
    assert weights["net.bn1.num_batches_tracked"].dtype == torch.int64


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    _, _, engine = _engine()
    save_checkpoint(engine, tmp_path / "ckpt", 0, 1, TrainState(epoch=1, step=0))
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
    info = RunInfo(cfg.model_dump(mode="json"), "sqlite:////x.db", "0")
    older, newer = tmp_path / "checkpoint_2026-01-01_00-00-00", tmp_path / "checkpoint_2026-01-01_00-10-00"
    for folder in (older, newer):
        for rank in (0, 1):
            save_checkpoint(engine, folder, rank, 2, TrainState(epoch=1, step=4), info if rank == 0 else None)
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
    save_checkpoint(engine, folder / "ckpt", rank, world, TrainState(epoch=1, step=2))


def _read_zero1(rank, world, folder):
    _, _, engine = _engine("cpu_zero1_fp32.json", workers=world)
    assert load_checkpoint(engine, folder / "ckpt", rank, world).step == 2
    expected, restored = torch.load(folder / "gathered.pt"), _full_zero_state(engine)
    assert expected.keys() == restored.keys()
    for name, (weight, momentum) in expected.items():
        assert torch.equal(restored[name][0], weight), f"{name}: fp32 master weight"
        assert torch.equal(restored[name][1], momentum), f"{name}: momentum"
    for name, p in engine.module.named_parameters():  # the module's own weights agree too
        assert torch.equal(p.detach(), expected[name][0]), name
    micro = 16 // world
    _step(engine, 2, torch.randn(micro, 3, 16, 16), torch.arange(micro) % 10)  # and it trains on


def test_a_zero1_checkpoint_of_another_layout_or_model_or_without_a_shard_is_refused(tmp_path):
    """The writers' parameters were padded otherwise (zero_optimization's alignment changed): cutting
    their flat buffers at this run's boundaries would misplace every weight after the first padding.
    Shards of another model, and a missing shard, are named too."""
    from st_scale.checkpoint import _zero_shards, reshard_zero_state

    _, _, engine = _engine("cpu_zero1_fp32.json")
    save_checkpoint(engine, tmp_path, 0, 1, TrainState(epoch=1, step=0))
    shards = _zero_shards(tmp_path, 1)
    assert shards[0]["param_alignment_paddings"] == engine.optimizer.round_robin_bit16_padding
    shards[0]["param_alignment_paddings"] = [[p + 4 for p in group] for group in shards[0]["param_alignment_paddings"]]
    with pytest.raises(ConfigError) as refused:
        reshard_zero_state(engine.optimizer, shards)
    assert str(refused.value) == (
        "the ZeRO checkpoint's parameter layout differs from this run's (zero_optimization.parameter_alignment "
        "changed); resume with the DeepSpeed config that wrote it"
    )
    shards = _zero_shards(tmp_path, 1)  # the layout agrees, the values do not: a shard of another model
    held = shards[0]["single_partition_of_fp32_groups"][0].numel()
    shards[0]["single_partition_of_fp32_groups"][0] = torch.zeros(held - 3)
    with pytest.raises(RuntimeError) as refused:
        reshard_zero_state(engine.optimizer, shards)
    assert str(refused.value) == f"ZeRO checkpoint: parameter group 0 holds {held - 3} values, this model {held}"
    (next((tmp_path / "checkpoint").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))).unlink()
    with pytest.raises(RuntimeError) as missing:
        _zero_shards(tmp_path, 1)
    assert str(missing.value) == f"checkpoint {tmp_path}: the ZeRO optimizer shard of rank 0 is missing"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_zero0_checkpoint_resumes_on_more_workers_with_its_whole_optimizer_state(tmp_path, rank):
    """ZeRO-0 keeps the whole optimizer state on rank 0's file: a group of another size loads it as it
    is (nothing to re-shard), every rank the same momentum and weights; the RNG state is restored on the
    ranks the writer had, and a rank it did not have keeps its own."""
    _, model, trained = _engine("cpu_fp32.json")
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        _step(trained, step, torch.randn(16, 3, 16, 16, generator=g), torch.arange(16) % 10)
    torch.manual_seed(11)
    written_rng = torch.get_rng_state()
    save_checkpoint(trained, tmp_path, 0, 1, TrainState(epoch=1, step=2))

    _, fresh_model, fresh = _engine("cpu_fp32.json")  # seeds torch with 0
    seeded_rng = torch.get_rng_state()
    assert load_checkpoint(fresh, tmp_path, rank=rank, world_size=2).step == 2
    assert torch.equal(torch.get_rng_state(), written_rng if rank == 0 else seeded_rng)
    for (name, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), name
    theirs, ours = trained.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert theirs.keys() == ours.keys() and theirs
    for index, state in theirs.items():
        assert torch.equal(ours[index]["momentum_buffer"], state["momentum_buffer"]), index


def test_a_first_format_checkpoint_resumes_where_its_engine_state_says(tmp_path):
    """Before the run file, where training stood was kept beside DeepSpeed's state in its model-states
    file: `load` reads it from there (epoch 1, step 22 of the shipped checkpoint)."""
    folder = tmp_path / "run"
    shutil.copytree(next(CHECKPOINT_V1.glob("checkpoint_*")), folder)
    saved = torch.load(folder / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    _, _, engine = _engine("cpu_fp32.json", extra=("model.stage_depths=[2,2,2]",))
    state = load_checkpoint(engine, folder, rank=0, world_size=1)
    assert (state.epoch, state.step) == (1, 22)
    assert state == TrainState(
        epoch=saved["epoch"], step=saved["step"], mlflow_run_id=saved["mlflow_run_id"], metrics=saved["metrics"]
    )


def _cut_for_writers(shard: dict, written_by: int, pad: int = 0) -> list[dict]:
    """One rank's ZeRO shard as `written_by` writers would have saved it, in DeepSpeed's layout: each
    group's flat buffer cut into equal partitions, the last one padded at the end (`pad` more values of
    padding on a single writer); fp32 partitions saved without their padding, optimizer state tensors
    with it, a step count whole on every writer."""
    shards = [copy.deepcopy(shard) for _ in range(written_by)]
    for group, whole in enumerate(shard["single_partition_of_fp32_groups"]):
        n = whole.numel()
        size = -(-n // written_by) + (pad if written_by == 1 else 0)  # every writer's partition, padding included
        for rank, cut in enumerate(shards):
            lean = whole[rank * size : (rank + 1) * size]
            cut["single_partition_of_fp32_groups"][group] = lean.clone()
            cut["group_paddings"][group] = size - lean.numel()
            for key, value in shard["base_optimizer_state"]["state"][group].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    mine = torch.zeros(size, dtype=value.dtype)
                    mine[: lean.numel()] = value[:n][rank * size : (rank + 1) * size]
                    cut["base_optimizer_state"]["state"][group][key] = mine
    return shards


@pytest.mark.parametrize("written_by, pad", [(1, 3), (2, 0), (3, 0)], ids=["1-padded", "2", "3"])
def test_adamw_state_cut_by_other_writers_is_joined_again(tmp_path, written_by, pad):
    """AdamW's ZeRO-1 state (two moments and a step count per group) as other numbers of writers would
    have saved it, padding included, re-sharded for one rank: every fp32 weight and moment is the
    trained rank's again, the step count whole."""
    from st_scale.checkpoint import _zero_shards, reshard_zero_state

    adamw = ("optimizer.name=adamw",)
    _, _, trained = _engine("cpu_zero1_fp32.json", extra=adamw)
    g = torch.Generator().manual_seed(2)
    for step in range(2):
        _step(trained, step, torch.randn(16, 3, 16, 16, generator=g), torch.arange(16) % 10)
    save_checkpoint(trained, tmp_path, 0, 1, TrainState(epoch=1, step=2))
    (shard,) = _zero_shards(tmp_path, 1)
    assert all(p == 0 for p in shard["group_paddings"]), "a world of one pads nothing here"

    _, _, fresh = _engine("cpu_zero1_fp32.json", extra=adamw)
    reshard_zero_state(fresh.optimizer, _cut_for_writers(shard, written_by, pad))
    for group, partition in enumerate(trained.optimizer.single_partition_of_fp32_groups):
        assert torch.equal(fresh.optimizer.single_partition_of_fp32_groups[group], partition), group
        theirs = trained.optimizer.optimizer.state[trained.optimizer.optimizer.param_groups[group]["params"][0]]
        ours = fresh.optimizer.optimizer.state[fresh.optimizer.optimizer.param_groups[group]["params"][0]]
        assert ours.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"group {group}: {key}"


def test_only_deepspeeds_zero_optimizer_is_resharded():
    from st_scale.checkpoint import reshard_zero_state

    with pytest.raises(ConfigError) as refused:
        reshard_zero_state(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), [])
    assert str(refused.value) == (
        "a ZeRO checkpoint is re-sharded for another number of workers only with DeepSpeed's ZeRO-1/2 optimizer "
        "without round_robin_gradients (this run uses SGD); resume it with the number of workers that wrote it"
    )


@pytest.mark.parametrize("rank, expected", [(0, [1, 2, 3, 4]), (1, [5, 6, 7, 8]), (2, [9, 0, 0, 0])])
def test_a_ranks_new_partition_is_its_cut_of_the_writers_data_without_their_padding(rank, expected):
    """Two writers' partitions of 6 (data 5 and 4, then padding) joined are 9 values; three readers
    with partitions of 4 take 4, 4 and the last one with zero padding; the dtype is the writers'."""
    from st_scale.checkpoint import _recut

    pieces = [torch.tensor(values, dtype=torch.float64) for values in ([1, 2, 3, 4, 5, -1], [6, 7, 8, 9, -1, -1])]
    mine = _recut(pieces, [5, 4], rank, 4)
    assert mine.dtype == torch.float64 and mine.tolist() == expected


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
