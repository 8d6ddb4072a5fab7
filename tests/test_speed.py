"""The speed switches change speed only: channels_last batches and weights, compiled blocks and the
per-window read-back of the loss give what the plain path gives, and compiling blocks bounds the
number of graphs whatever sub-networks are drawn."""

import copy
import math

import pytest
import torch

from st_scale.config import load_config
from st_scale.data.loaders import BatchPreparer
from st_scale.evaluate.subnets import evaluate_subnets
from st_scale.methods import StimulativeTraining
from st_scale.models import create_model
from st_scale.models.regional_compile import GRAPHS_PER_BLOCK_SHAPE, block_shapes, compile_blocks
from st_scale.sampling import SubnetSampler, SubnetSpace
from st_scale.train.step_window import NonFiniteLossError, StepWindow


def _ffcv_like_batch(n=6, size=16, seed=0):
    """uint8 images shaped N x 3 x H x W but laid out N x H x W x 3, as FFCV's ToTorchImage gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)


def _st(model, seed=0, **options):
    return StimulativeTraining(SubnetSampler(SubnetSpace.full(model.stage_sizes), seed=seed), **options)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize(
    "overrides",
    [["data.pipeline=cifar"], ["data.pipeline=imagenet", "data.color_jitter=0.3", "data.pca_lighting=0.1"]],
    ids=["cifar", "imagenet"],
)
def test_channels_last_batches_hold_the_same_values_in_nhwc_memory(overrides):
    data = load_config("demo_st", overrides).data
    cpu = torch.device("cpu")
    plain = BatchPreparer(data, cpu, torch.float32, seed=3, rank=1)
    nhwc = BatchPreparer(data, cpu, torch.float32, seed=3, rank=1, memory_format=torch.channels_last)
    raw = _ffcv_like_batch()
    for make in (lambda p: p.eval(raw), lambda p: p.train(raw, 7), lambda p: p.calibration(raw, 2)):
        expected, got = make(plain), make(nhwc)
        assert expected.is_contiguous() and not expected.is_contiguous(memory_format=torch.channels_last)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, expected)


def test_a_channels_last_st_step_equals_the_nchw_step_and_runs_nhwc_throughout():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10).train()
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    nhwc_model = copy.deepcopy(model)
    layouts = []
    nhwc_model.net.layer3[2].conv2.register_forward_hook(
        lambda module, inputs, output: layouts.append(output.is_contiguous(memory_format=torch.channels_last))
    )
    results = []
    for m, x in ((model, images), (nhwc_model, images.contiguous(memory_format=torch.channels_last))):
        out = _st(m, seed=4, num_subnets=2, kl_weight=0.8)(m, x, labels, 3)
        out.loss.backward()
        results.append((out.loss.detach(), _grads(m)))
    assert layouts and all(layouts)  # the last block's convolution still sees and gives NHWC
    (loss, grads), (nhwc_loss, nhwc_grads) = results
    assert torch.allclose(nhwc_loss, loss, rtol=1e-5)
    assert grads.keys() == nhwc_grads.keys()
    for name, g in grads.items():
        assert (nhwc_grads[name] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, name


# ------------------------------------------------------------------------------------ compiled blocks
class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts graphs and calls."""

    def __init__(self):
        self.graphs, self.calls = 0, 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


def _count_block_calls(model):
    """Forward pre-hooks on every block of an eager model: how many block executions a workload makes."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    for segment in model.segments:
        for block in segment.blocks:
            block.register_forward_pre_hook(count)
    return calls


def _workload(model, objective, first_step, steps, batch=8):
    """ST training steps (prefix sharing, two sub-networks each) and a tree evaluation of sub-networks."""
    g = torch.Generator().manual_seed(first_step)
    model.train()
    for step in range(first_step, first_step + steps):
        images, labels = torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)
        objective(model, images, labels, step).loss.backward()
    val = [(torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(2)]
    subnets = objective.sampler.space.sample_subset(6, seed=first_step)
    return evaluate_subnets(model, subnets, val)


def test_compiled_blocks_bound_the_graphs_whatever_subnetworks_are_drawn():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10)
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    shapes = compile_blocks(model, backend=backend)
    assert shapes == len(block_shapes(model)) == 7  # stem, head, stage 1's block, 2 x (first, other) after it
    objective, eager_objective = _st(model, seed=5, num_subnets=2), _st(eager, seed=5, num_subnets=2)

    _workload(model, objective, 0, steps=6)
    _workload(model, objective, 6, steps=2, batch=6)  # another batch size: the batch dimension turns dynamic
    calibration = [(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))]
    evaluate_subnets(model, [(1, 2, 3), (3, 3, 3)], calibration, calibration)  # BN re-estimation runs eager
    warmed = backend.graphs
    assert 0 < warmed <= GRAPHS_PER_BLOCK_SHAPE * shapes
    # Training and evaluation, each with a static and then a dynamic batch: counting MACs (hooks on
    # every block, a probe of one image) compiles nothing.
    assert warmed <= 4 * shapes, f"{warmed} graphs for {shapes} block shapes"

    calls_before = backend.calls
    report = _workload(model, objective, 100, steps=20)
    assert backend.graphs == warmed, "drawing more sub-networks compiled more graphs"
    eager_calls = _count_block_calls(eager)
    eager.load_state_dict(model.state_dict())
    eager_report = _workload(eager, eager_objective, 100, steps=20)
    mac_probe = sum(len(segment.blocks) for segment in model.segments)  # one eager forward of the full net
    assert backend.calls - calls_before == eager_calls[0] - mac_probe, (
        "some block calls ran outside the compiled graphs"
    )
    assert [r.top1 for r in report.rows] == [r.top1 for r in eager_report.rows]
    assert [(r.macs, r.params) for r in report.rows] == [(r.macs, r.params) for r in eager_report.rows]


@pytest.mark.slow
def test_inductor_compiled_blocks_train_and_evaluate_like_eager():
    torch.manual_seed(0)
    # ResNet-10: three block shapes (an identity block and the two downsampling ones), each compiled by
    # inductor for training and for evaluation; every graph costs seconds of CPU to compile.
    model = create_model("cifar_resnet20", 10, stage_depths=[2, 1, 1])
    eager = copy.deepcopy(model)
    compile_blocks(model)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    for step in (0, 1, 2):
        results = []
        for m in (model, eager):
            m.train().zero_grad()
            out = _st(m, seed=2, num_subnets=2)(m, images, labels, step)
            out.loss.backward()
            results.append((out.loss.detach(), _grads(m)))
        (loss, grads), (eager_loss, eager_grads) = results
        assert torch.allclose(loss, eager_loss, rtol=1e-4, atol=1e-5)
        for name, g_eager in eager_grads.items():
            assert (grads[name] - g_eager).abs().max() <= 1e-3 * g_eager.abs().max() + 1e-6, name
    val = [(images, labels)]
    subnets = [(1, 1, 1), (2, 1, 1)]
    logits, eager_logits = {}, {}
    evaluate_subnets(model, subnets, val, val, on_logits=lambda d, z: logits.__setitem__(d, z))
    evaluate_subnets(eager, subnets, val, val, on_logits=lambda d, z: eager_logits.__setitem__(d, z))
    for depths in subnets:
        assert torch.allclose(logits[depths], eager_logits[depths], rtol=1e-4, atol=1e-4), depths


# ------------------------------------------------------------------------------------ loss read-back
def test_a_window_reads_the_steps_means_once_and_starts_over():
    window = StepWindow(first_step=40)
    losses = [2.0, 1.5, 1.0, 0.25]
    for i, value in enumerate(losses):
        window.add(torch.tensor(value), {"ce": torch.tensor(value / 2), "kl": torch.tensor(float(i))})
    read = window.read(epoch=3)
    assert read.steps == 4 and read.loss_sum == pytest.approx(sum(losses))
    assert read.means == pytest.approx({"loss": 4.75 / 4, "ce": 4.75 / 8, "kl": 1.5})
    assert len(window) == 0 and window.first_step == 44
    window.add(torch.tensor(3.0), {"ce": torch.tensor(3.0)})
    assert window.read(epoch=3).means == {"loss": 3.0, "ce": 3.0}
    assert window.read(epoch=3).steps == 0  # nothing since


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_window_names_the_first_step_whose_loss_was_not_finite(bad):
    window = StepWindow(first_step=100)
    for value in (1.0, 0.9, bad, 0.8, math.nan):
        window.add(torch.tensor(value), {"ce": torch.tensor(value), "kl": torch.tensor(0.5)})
    with pytest.raises(
        NonFiniteLossError, match=rf"loss became {bad} at global step 102 \(epoch 2; ce={bad}, kl=0.5\)"
    ):
        window.read(epoch=1)


# ------------------------------------------------------------------------------------ utilisation
def test_training_flops_are_six_times_the_published_macs():
    """ResNet-50 at 224 px: torchvision publishes 4.09 G multiply-accumulates per image."""
    from torchvision.models import ResNet50_Weights

    from st_scale.models.utilisation import training_flops_per_image

    published = ResNet50_Weights.IMAGENET1K_V1.meta["_ops"] * 1e9
    assert training_flops_per_image(create_model("resnet50", 1000), 224) == pytest.approx(6 * published, rel=0.01)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_mfu_uses_the_cards_dense_bf16_peak_or_none(name, peak):
    from st_scale.models.utilisation import mfu, peak_bf16_flops

    assert peak_bf16_flops(name) == peak
    assert mfu(3000, 24.5e9, 989e12) == pytest.approx(3000 * 24.5e9 / 989e12)


@pytest.mark.usefixtures("gloo_process_group")
def test_compiled_blocks_train_through_deepspeed_zero1_like_eager():
    """Compiled before DeepSpeed takes the module (as a worker does): ZeRO-1 re-points the weights into
    its flat buffers afterwards, and the compiled blocks train exactly as the eager ones."""
    from st_scale.assembly import build_model_and_objective
    from st_scale.train.engine import build_engine, resolve_ds_config, set_lr

    losses, backend = {}, CountingBackend()
    for compiled in (False, True):
        cfg = load_config(
            "demo_st",
            ["scaling.num_workers=1", "deepspeed.config=cpu_zero1_fp32.json", "data.batch_size=16", "run.name=c"],
        )
        torch.manual_seed(0)
        model, _, objective = build_model_and_objective(cfg)
        if compiled:
            compile_blocks(model, backend=backend)
        engine = build_engine(model, objective, cfg, resolve_ds_config(cfg))
        g = torch.Generator().manual_seed(0)
        losses[compiled] = []
        for step in range(4):
            images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
            set_lr(engine, 0.05)
            loss, _, _ = engine(images, labels, step)
            engine.backward(loss)
            engine.step()
            losses[compiled].append(loss.item())
    assert backend.calls > 0 and losses[True] == losses[False]
