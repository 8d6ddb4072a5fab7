"""Objectives: CT, ST (prefix sharing, K sub-nets, KL-, small inputs) and the baselines."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from st_scale.methods import (
    CommonTraining,
    StimulativeTraining,
    StochasticDepth,
    build_objective,
    distillation_kl,
)
from st_scale.models import create_model
from st_scale.sampling import SubnetSampler, SubnetSpace


def _setup(name="cifar_resnet20", size=16, batch=8):
    model = create_model(name, 10).train()
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    return model, images, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _st(model, **kw):
    sampler = SubnetSampler(SubnetSpace.full(model.stage_sizes), seed=kw.pop("seed", 0))
    return StimulativeTraining(sampler, **kw)


def test_distillation_kl_is_forward_kl_with_temperature_squared():
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    t = 2.0
    p = F.softmax(teacher / t, -1)
    manual = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert torch.allclose(distillation_kl(student, teacher, t), manual, atol=1e-6)
    assert distillation_kl(teacher, teacher, 1.0).abs() < 1e-6


def test_ct_runs_no_subnet_pass():
    model, images, labels = _setup()
    calls = []
    model.net.fc.register_forward_hook(lambda *a: calls.append(1))
    out = CommonTraining()(model, images, labels, step=0)
    assert len(calls) == 1
    assert torch.allclose(out.loss, F.cross_entropy(model.net(images), labels), atol=1e-6)
    assert set(out.parts) == {"ce"}


def test_st_runs_main_plus_k_subnets():
    model, images, labels = _setup()
    calls = []
    model.net.fc.register_forward_hook(lambda *a: calls.append(1))
    objective = _st(model, num_subnets=3, share_prefix=False)
    objective(model, images, labels, step=0)
    assert len(calls) == 4


def _reference_two_backward(model, objective, images, labels, step):
    """The reference implementation: separate backward per pass, gradients accumulated."""
    model.zero_grad()
    main = model(images)
    ce = F.cross_entropy(main, labels)
    ce.backward()
    teacher = main.detach()
    subnets = objective.sampler.sample_many(step, objective.num_subnets)
    total = ce.detach()
    scale = 1.0 if objective.subnet_reduction == "sum" else 1.0 / len(subnets)
    for depths in subnets:
        kl = objective.kl_weight * scale * distillation_kl(model(images, depths), teacher, objective.temperature)
        kl.backward()
        total = total + kl.detach()
    return total, _grads(model)


@pytest.mark.parametrize("num_subnets, reduction", [(1, "sum"), (3, "sum"), (2, "mean")])
def test_prefix_sharing_gives_the_same_loss_and_gradients(num_subnets, reduction):
    model, images, labels = _setup()
    stages_seen = set()
    for step in range(12):
        results = []
        for share in (True, False):
            m = copy.deepcopy(model)
            objective = _st(m, num_subnets=num_subnets, subnet_reduction=reduction, kl_weight=0.7, share_prefix=share)
            m.zero_grad()
            out = objective(m, images, labels, step)
            out.loss.backward()
            results.append((out.loss.detach(), _grads(m)))
        ref_model = copy.deepcopy(model)
        ref_loss, ref_grads = _reference_two_backward(ref_model, objective, images, labels, step)
        for loss, grads in results:
            assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name
        for depths in objective.sampler.sample_many(step, num_subnets):
            stages_seen.add(StimulativeTraining.divergence(depths, model.full_depths))
    assert {0, 1} <= stages_seen  # sub-nets diverging in different stages were exercised


def test_prefix_sharing_runs_shared_blocks_once():
    model, images, labels = _setup()
    stem_calls = []
    model.net.conv1.register_forward_hook(lambda *a: stem_calls.append(1))
    _st(model, num_subnets=3)(model, images, labels, 0)
    assert len(stem_calls) == 1


def test_subnet_gradient_reaches_shared_weights():
    model, images, labels = _setup()
    objective = _st(model, kl_weight=1.0)
    step = next(s for s in range(50) if objective.sampler.sample(s) != model.full_depths)
    stem = model.net.conv1.weight
    st_grad = torch.autograd.grad(objective(model, images, labels, step).loss, stem)[0]
    ct_grad = torch.autograd.grad(CommonTraining()(model, images, labels, step).loss, stem)[0]
    assert not torch.allclose(st_grad, ct_grad)  # the KL term's gradient flows into the stem


def test_kl_weight_zero_is_ct_loss():
    model, images, labels = _setup()
    st = _st(model, kl_weight=0.0)(model, images, labels, 3)
    ct = CommonTraining()(model, images, labels, 3)
    assert torch.allclose(st.loss, ct.loss, atol=1e-6)


def test_kl_minus_normalises_logit_direction():
    model, images, labels = _setup()
    objective = _st(model, logit_norm=True, logit_norm_amplitude=2.0)
    logits = torch.randn(5, 10) * 7 + 3
    normalised = objective._normalise(logits)
    assert torch.allclose(normalised.mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(normalised.std(-1, unbiased=False), torch.full((5,), 2.0), atol=1e-3)
    assert torch.allclose(objective._normalise(logits * 3), normalised, atol=1e-4)  # only direction counts
    out = objective(model, images, labels, 0)
    expected_ce = F.cross_entropy(objective._normalise(model(images)), labels)
    assert torch.allclose(out.parts["ce"], expected_ce, atol=1e-5)


def test_small_inputs_resize_the_original_batch_within_range():
    model, images, labels = _setup(size=32)
    objective = _st(model, small_inputs=True)
    sizes = {objective._subnet_input(images, step, 0).shape[-1] for step in range(300)}
    assert min(sizes) == math.ceil(0.43 * 32) and max(sizes) == 32
    # Resizing commutes with per-channel normalisation: normalising once is enough.
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.3, 0.25])[:, None, None]
    raw = torch.rand(2, 3, 32, 32)

    def resize(x):
        return F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False, antialias=True)

    assert torch.allclose(resize((raw - mean) / std), (resize(raw) - mean) / std, atol=1e-5)
    out = objective(model, images, labels, 1)
    assert torch.isfinite(out.loss)


def test_stochastic_depth_survival_decays_to_half():
    model, images, labels = _setup(name="cifar_resnet56")
    sd = StochasticDepth(model, final_survival=0.5)
    survival = [sd.survival[k] for k in sorted(sd.survival)]
    assert survival == sorted(survival, reverse=True)
    assert sd.survival[(2, 8)] == pytest.approx(0.5)
    assert sd.survival[(0, 1)] == pytest.approx(1 - 2 / 27 * 0.5)
    # Over many steps each block is kept with its survival probability.
    kept = torch.zeros(3, 9)
    steps = 2000
    for step in range(steps):
        for s, blocks in enumerate(sd.sample_plan(model, step)):
            kept[s, list(blocks)] += 1
    for (s, i), p in sd.survival.items():
        assert kept[s, i] / steps == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / steps) + 1e-3)
    assert (kept[:, 0] == steps).all()


def test_stochastic_depth_scales_branches_at_test_time_only():
    model, images, labels = _setup()
    plain = copy.deepcopy(model).eval()
    StochasticDepth(model)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(images), plain(images))
        with model.unscaled_branches():
            assert torch.equal(model(images), plain(images))
    model.train()
    assert torch.isfinite(build_objective("stochastic_depth", model)(model, images, labels, 0).loss)


@pytest.mark.parametrize(
    "method, heads", [("layer_supervision", 8), ("stage_supervision", 2), ("self_distillation", 2)]
)
def test_auxiliary_supervision_heads_train(method, heads):
    model, images, labels = _setup()
    objective = build_objective(method, model)
    assert len(objective.heads) == heads
    optimizer = torch.optim.SGD(list(model.parameters()) + list(objective.parameters()), lr=0.05)
    first = None
    for step in range(15):
        out = objective(model, images, labels, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first
    assert ("aux_kl" in out.parts) == (method == "self_distillation")


def test_st_learns_a_batch():
    model, images, labels = _setup()
    objective = _st(model, num_subnets=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(15):
        out = objective(model, images, labels, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kl_weight": -1.0}, "kl_weight=-1.0: must be a finite number >= 0"),
        ({"temperature": 0.0}, "temperature=0.0: must be > 0"),
        ({"temperature": -2.0}, "temperature=-2.0: must be > 0"),
        ({"num_subnets": 0}, r"num_subnets=0: must be >= 1"),
        ({"subnet_reduction": "max"}, "subnet_reduction='max': choose one of"),
    ],
)
def test_bad_st_options_are_named(options, message):
    model, _, _ = _setup()
    with pytest.raises(ValueError, match=message):
        _st(model, **options)


def test_unknown_method_lists_the_choices():
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="unknown method 'kd'.*stochastic_depth"):
        build_objective("kd", model)


def test_stochastic_depth_follows_the_run_seed():
    """Every stochastic choice follows run.seed: two seeds draw different masks, one seed twice the same."""
    from st_scale.config import load_config
    from st_scale.train_loop import build_model_and_objective

    def plans(seed):
        cfg = load_config("demo_ct", ["method={name: stochastic_depth}", f"run.seed={seed}"])
        model, _, objective = build_model_and_objective(cfg)
        return [objective.sample_plan(model, step) for step in range(20)]

    assert plans(3) == plans(3)
    assert plans(3) != plans(4)
