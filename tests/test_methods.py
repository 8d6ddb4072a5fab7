"""Objectives: CT, ST (prefix sharing, K sub-nets, KL-, small inputs) and the baselines."""

import copy
import math
import re

import numpy as np
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
from st_scale.sampling import STREAM_STOCHASTIC_DEPTH, SubnetSampler, SubnetSpace, step_rng


def _setup(name="cifar_resnet20", size=16, batch=8):
    model = create_model(name, 10).train()
    if name == "cifar_vit":  # torchvision starts its head at zero: every logit would be 0
        torch.nn.init.normal_(model.net.heads.head.weight, std=0.1)
        size = 32  # the only size a ViT takes
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


@pytest.mark.parametrize(
    "name, num_subnets, reduction",
    [
        ("cifar_resnet20", 1, "sum"),
        ("cifar_resnet20", 3, "sum"),
        ("cifar_resnet20", 2, "mean"),
        ("cifar_densenet40", 2, "sum"),
        ("cifar_vit", 2, "sum"),
        ("cifar_swin", 2, "mean"),
    ],
)
def test_prefix_sharing_gives_the_same_loss_and_gradients(name, num_subnets, reduction):
    model, images, labels = _setup(name)
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
            for name in grads:  # rounding grows with the gradient's scale (a ViT's class token sums 65 tokens)
                scale = max(1.0, float(ref_grads[name].abs().max()))
                assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6 * scale), name
        for depths in objective.sampler.sample_many(step, num_subnets):
            stages_seen.add(StimulativeTraining.divergence(depths, model.full_depths))
    assert {0, 1} <= stages_seen  # sub-nets diverging in different stages were exercised


def test_prefix_sharing_runs_shared_blocks_once():
    model, images, labels = _setup()
    stem_calls = []
    model.net.conv1.register_forward_hook(lambda *a: stem_calls.append(1))
    _st(model, num_subnets=3)(model, images, labels, 0)
    assert len(stem_calls) == 1


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
def test_auxiliary_supervision_head_count(method, heads):
    model, images, labels = _setup()
    objective = build_objective(method, model)
    assert len(objective.heads) == heads
    out = objective(model, images, labels, 0)
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
        ({"kl_weight": -1.0}, "kl_weight=-1.0: must be >= 0"),
        ({"kl_weight": float("inf")}, "kl_weight=inf: Input should be a finite number"),
        ({"temperature": 0.0}, "temperature=0.0: must be > 0"),
        ({"temperature": -2.0}, "temperature=-2.0: must be > 0"),
        ({"num_subnets": 0}, r"num_subnets=0: must be >= 1"),
        ({"subnet_reduction": "max"}, "unknown subnet_reduction 'max'; choose one of: sum, mean"),
        ({"subnet_batch_fraction": 0.0}, r"subnet_batch_fraction=0.0: must be in \(0, 1\]"),
        ({"subnet_batch_fraction": 1.5}, r"subnet_batch_fraction=1.5: must be in \(0, 1\]"),
        ({"subnet_every": 0}, r"subnet_every=0: must be >= 1"),
        ({"num_subnet": 2}, "num_subnet=2: Extra inputs are not permitted"),
    ],
)
def test_bad_st_options_are_named(options, message):
    model, _, _ = _setup()
    with pytest.raises(ValueError) as refused:
        _st(model, **options)
    assert re.fullmatch(message, str(refused.value)), str(refused.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"share": 1.0}, "share=1.0: must be in (0, 1)"),
        ({"share": 0}, "share=0: must be in (0, 1)"),
        ({"cap": 5.0}, "cap=5.0: must be <= 4"),
        ({"cap": np.float64(5.0)}, "cap=5.0: must be <= 4"),  # a number from the Python API shows as one
        ({"floor": 1}, "floor=1: must be < 1"),
        ({"share": "half"}, "share='half': Input should be a valid number, unable to parse string as a number"),
        ({"sizes": [1, "x"]}, "sizes.1='x': Input should be a valid integer, unable to parse string as an integer"),
        ({"sizes": [1, 2, 3]}, "sizes must hold at most 2 sizes"),
        ({"shares": 2}, "shares=2: Extra inputs are not permitted"),
    ],
)
def test_an_options_error_names_the_field_the_value_and_the_bound_declared_on_the_field(fields, message):
    """Every bound kind (open, closed, one-sided from above), a value given as text (quoted), a list
    item (its position in the field's name) and a validator's own message, word for word."""
    from pydantic import Field, field_validator

    from st_scale.methods.base import method_options
    from st_scale.schema import Section

    class Probe(Section):
        share: float = Field(0.5, gt=0, lt=1)
        cap: float = Field(1.0, le=4)
        floor: float = Field(0.0, lt=1)
        sizes: list[int] = Field(default_factory=list)

        @field_validator("sizes")
        @classmethod
        def _at_most_two(cls, sizes):
            if len(sizes) > 2:
                raise ValueError("sizes must hold at most 2 sizes")
            return sizes

    with pytest.raises(ValueError) as refused:
        method_options(Probe, None, fields)
    assert str(refused.value) == message


def test_unknown_method_lists_the_choices():
    model, _, _ = _setup()
    with pytest.raises(ValueError) as refused:
        build_objective("kd", model)
    assert str(refused.value) == (
        "unknown method 'kd'; choose one of: ct, layer_supervision, stage_supervision, self_distillation, "
        "stochastic_depth, st"
    )


def test_options_given_both_in_the_model_and_as_keywords_are_refused():
    from st_scale.methods import ct

    model, _, _ = _setup()
    with pytest.raises(ValueError) as refused:
        build_objective(ct.Options(), model, label_smoothing=0.1, kl_weight=0.5)
    assert (
        str(refused.value) == "options ['kl_weight', 'label_smoothing'] given twice: they belong in the options model"
    )


def test_stochastic_depth_follows_the_run_seed():
    """Every stochastic choice follows run.seed: two seeds draw different masks, one seed twice the same."""
    from st_scale.assembly import build_model_and_objective
    from st_scale.config import load_config

    def plans(seed):
        cfg = load_config("demo_ct", ["method={name: stochastic_depth}", f"run.seed={seed}"])
        model, _, objective = build_model_and_objective(cfg)
        return [objective.sample_plan(model, step) for step in range(20)]

    assert plans(3) == plans(3)
    assert plans(3) != plans(4)


# ----------------------------------------------------------------------------------------------
# Every objective against a hand-written computation: the network is run block by block with the
# residual blocks written out (no ElasticNet, no plans, no hooks), the losses are written from
# their formulas, and autograd on that reference gives the gradients each parameter must get.


def _block_by_hand(block, x, scale=1.0):
    """torchvision's BasicBlock written out; `scale` multiplies the residual branch."""
    identity = x if block.downsample is None else block.downsample(x)
    branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    return F.relu(identity + scale * branch)


def _forward_by_hand(net, images, blocks_per_stage, scales=None, features=None):
    """The CIFAR ResNet `net` running, in stage s, the blocks listed in blocks_per_stage[s]."""
    x = F.relu(net.bn1(net.conv1(images)))
    for stage, blocks in enumerate(blocks_per_stage):
        layer = getattr(net, f"layer{stage + 1}")
        for index in blocks:
            x = _block_by_hand(layer[index], x, (scales or {}).get((stage, index), 1.0))
            if features is not None:
                features[(stage, index)] = x
    return net.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _plain_copy(model):
    """The same weights in a fresh model: no hooks, nothing an objective set on the original."""
    copy_ = create_model(model.name, 10).train(model.training)
    copy_.load_state_dict(model.state_dict())
    return copy_


def _depths_by_hand(net, images, depths):
    return _forward_by_hand(net, images, [range(d) for d in depths])


def _kl_by_hand(student, teacher, t):
    """T^2 * sum_c p_teacher (log p_teacher - log p_student), averaged over the batch."""
    p = torch.softmax(teacher / t, dim=-1)
    return (p * (torch.log(p) - torch.log_softmax(student / t, dim=-1))).sum(-1).mean() * t * t


def _ce_by_hand(logits, labels):
    return -torch.log_softmax(logits, dim=-1)[torch.arange(len(labels)), labels].mean()


def _layer_norm_by_hand(logits, amplitude):
    centred = logits - logits.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * amplitude


def _loss_and_grads(objective, model, images, labels, step):
    out = objective(model, images, labels, step)
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params, allow_unused=True)


def _reference_grads(loss, model, objective):
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_same_grads(grads, reference, names):
    for name, g, r in zip(names, grads, reference, strict=True):
        g = torch.zeros(()) if g is None else g
        r = torch.zeros(()) if r is None else r
        # Relative to the tensor's largest entry: float sums in another order differ by ~1e-6 of it.
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7, name


def _names(model, objective):
    return [f"model.{n}" for n, _ in model.named_parameters()] + [
        f"objective.{n}" for n, _ in objective.named_parameters()
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"kl_weight": 0.7},
        {"kl_weight": 1.3, "num_subnets": 3, "temperature": 2.0},
        {"kl_weight": 0.5, "num_subnets": 2, "subnet_reduction": "mean", "share_prefix": False},
        {"kl_weight": 1.0, "num_subnets": 2, "logit_norm": True, "logit_norm_amplitude": 2.0},
    ],
    ids=["k1", "k3-temperature", "k2-mean-unshared", "k2-kl-minus"],
)
def test_st_loss_and_gradients_equal_the_formula(options):
    """loss = CE(main) + lambda * reduce_k T^2 KL(main.detach() || sub_k), each sub-net k keeping the
    first d_s blocks of stage s; with KL- both logits are layer-normalised (times the amplitude)."""
    model, images, labels = _setup(size=8, batch=6)
    objective = _st(model, seed=3, **options)
    reference_model = _plain_copy(model)
    w, t = options["kl_weight"], options.get("temperature", 1.0)
    k, amplitude = options.get("num_subnets", 1), options.get("logit_norm_amplitude", 1.0)

    def normalise(z):
        return _layer_norm_by_hand(z, amplitude) if options.get("logit_norm") else z

    for step in (0, 5):
        subnets = objective.sampler.sample_many(step, k)
        out, grads = _loss_and_grads(objective, model, images, labels, step)
        main = normalise(_depths_by_hand(reference_model.net, images, model.full_depths))
        ce = _ce_by_hand(main, labels)
        kls = [
            _kl_by_hand(normalise(_depths_by_hand(reference_model.net, images, d)), main.detach(), t) for d in subnets
        ]
        kl = sum(kls) if options.get("subnet_reduction", "sum") == "sum" else sum(kls) / len(kls)
        loss = ce + w * kl
        assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
        assert torch.allclose(out.parts["ce"], ce, rtol=1e-5) and torch.allclose(
            out.parts["kl"], kl, rtol=1e-4, atol=1e-7
        )
        assert out.parts["subnet_blocks"].item() == pytest.approx(sum(sum(d) for d in subnets) / k)
        _assert_same_grads(grads, _reference_grads(loss, reference_model, objective), _names(model, objective))


def _continue_by_hand(net, x, depths, stage):
    """The CIFAR ResNet `net` from stage `stage`'s output on: stages after it, their first d blocks."""
    for later in range(stage + 1, len(depths)):
        layer = getattr(net, f"layer{later + 1}")
        for index in range(depths[later]):
            x = _block_by_hand(layer[index], x)
    return net.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared", "unshared"])
def test_st_on_a_fraction_of_the_batch_equals_the_formula(share_prefix):
    """subnet_batch_fraction f: the KL is averaged over the batch's first round(f x batch) images only.
    Shared, a sub-network continues from the main pass's activations of those images where it
    diverges (normalised with the whole batch); unshared, it runs on those images from the stem."""
    model, images, labels = _setup(size=8, batch=10)
    objective = _st(model, seed=6, kl_weight=0.9, num_subnets=3, subnet_batch_fraction=0.4, share_prefix=share_prefix)
    assert objective.subnet_batch(10) == 4 and objective.subnet_batch(2) == 1
    reference_model = _plain_copy(model)
    stages = set()
    for step in (0, 3):
        subnets = objective.sampler.sample_many(step, 3)
        out, grads = _loss_and_grads(objective, model, images, labels, step)
        features = {}
        main = _forward_by_hand(reference_model.net, images, [range(n) for n in model.full_depths], features=features)
        kls = []
        for depths in subnets:
            stage = StimulativeTraining.divergence(depths, model.full_depths)
            stages.add(stage)
            if not share_prefix:
                sub = _depths_by_hand(reference_model.net, images[:4], depths)
            elif stage is None:
                sub = main[:4]
            else:
                sub = _continue_by_hand(reference_model.net, features[(stage, depths[stage] - 1)][:4], depths, stage)
            kls.append(_kl_by_hand(sub, main.detach()[:4], 1.0))
        loss = _ce_by_hand(main, labels) + 0.9 * sum(kls)
        assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
        _assert_same_grads(grads, _reference_grads(loss, reference_model, objective), _names(model, objective))
    assert len(stages - {None}) >= 2  # continuations from more than one stage were checked


def test_st_every_kth_step_equals_the_formula():
    """subnet_every k: on steps that are not multiples of k the loss is the main net's CE alone (no
    sub-network drawn, no KL logged); on multiples of k it is CE + k * lambda * KL, the sub-networks
    drawn for that global step, so the pull averaged over k steps equals full ST's."""
    model, images, labels = _setup(size=8, batch=6)
    objective = _st(model, seed=2, kl_weight=0.7, num_subnets=2, subnet_every=3)
    reference_model = _plain_copy(model)
    for step in (0, 1, 2, 3, 7, 9):
        out, grads = _loss_and_grads(objective, model, images, labels, step)
        main = _forward_by_hand(reference_model.net, images, [range(n) for n in model.full_depths])
        loss = _ce_by_hand(main, labels)
        if step % 3 == 0:
            subnets = objective.sampler.sample_many(step, 2)
            kls = [_kl_by_hand(_depths_by_hand(reference_model.net, images, d), main.detach(), 1.0) for d in subnets]
            loss = loss + 3 * 0.7 * sum(kls)
            assert set(out.parts) == {"ce", "kl", "subnet_blocks"}
        else:
            assert set(out.parts) == {"ce"}
        assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
        assert torch.allclose(out.logits, main, rtol=1e-5, atol=1e-6), "the main net's logits, either kind of step"
        _assert_same_grads(grads, _reference_grads(loss, reference_model, objective), _names(model, objective))


def test_st_kl_term_reaches_exactly_the_subnetworks_parameters():
    """The main net's logits are the KL's detached target: the KL's gradient reaches the blocks the
    sub-network runs and no other; blocks the sub-network drops learn from the CE alone."""
    model, images, labels = _setup(size=8, batch=6)
    objective = _st(model, kl_weight=1.0, seed=1)
    step = next(s for s in range(100) if objective.sampler.sample(s)[0] < model.full_depths[0])
    depths = objective.sampler.sample(step)
    names = [n for n, _ in model.named_parameters()]
    _, st_grads = _loss_and_grads(objective, model, images, labels, step)
    _, ct_grads = _loss_and_grads(CommonTraining(), model, images, labels, step)
    dropped = [f"net.layer{s + 1}.{i}." for s, d in enumerate(depths) for i in range(d, model.full_depths[s])]
    kept = [f"net.layer{s + 1}.{i}." for s, d in enumerate(depths) for i in range(d)] + ["net.conv1", "net.fc"]
    for name, g_st, g_ct in zip(names, st_grads, ct_grads):
        if name.startswith(tuple(dropped)):
            assert torch.allclose(g_st, g_ct, rtol=1e-5, atol=1e-8), f"the KL reached dropped block parameter {name}"
        elif name.startswith(tuple(kept)) and name.endswith("weight") and "bn" not in name:
            assert not torch.allclose(g_st, g_ct, rtol=1e-3, atol=1e-6), f"the KL did not reach {name}"


def test_st_small_inputs_run_each_subnetwork_on_a_resize_of_the_original_batch():
    model, images, labels = _setup(size=16, batch=6)
    objective = _st(model, small_inputs=True, kl_weight=0.8, seed=2)
    reference_model = _plain_copy(model)
    steps = [s for s in range(60) if objective._subnet_input(images, s, 0).shape[-1] < 16][:2]
    for step in steps:
        resized = objective._subnet_input(images, step, 0)
        size = resized.shape[-1]
        expected = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        assert torch.equal(resized, expected)
        out, grads = _loss_and_grads(objective, model, images, labels, step)
        main = _depths_by_hand(reference_model.net, images, model.full_depths)
        sub = _depths_by_hand(reference_model.net, expected, objective.sampler.sample(step))
        loss = _ce_by_hand(main, labels) + 0.8 * _kl_by_hand(sub, main.detach(), 1.0)
        assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
        _assert_same_grads(grads, _reference_grads(loss, reference_model, objective), _names(model, objective))


def test_stochastic_depth_loss_and_gradients_equal_the_kept_blocks_network():
    """Training: CE of the network running only the kept blocks, branches unscaled; evaluation: every
    block, each residual branch scaled by its survival probability."""
    model, images, labels = _setup(size=8, batch=6)
    objective = StochasticDepth(model, final_survival=0.6, seed=4)
    reference_model = _plain_copy(model)
    for step in (0, 1, 2):
        plan = objective.sample_plan(model, step)
        out, grads = _loss_and_grads(objective, model, images, labels, step)
        loss = _ce_by_hand(_forward_by_hand(reference_model.net, images, plan), labels)
        assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
        assert out.parts["kept_blocks"].item() == sum(len(b) for b in plan)
        _assert_same_grads(grads, _reference_grads(loss, reference_model, objective), _names(model, objective))
    total = sum(model.stage_sizes)
    survival = {
        (s, i): 1 - (sum(model.stage_sizes[:s]) + i + 1) / total * 0.4
        for s in range(3)
        for i in range(1, model.stage_sizes[s])
    }
    model.eval(), reference_model.eval()
    with torch.no_grad():
        expected = _forward_by_hand(reference_model.net, images, [range(n) for n in model.stage_sizes], survival)
        assert torch.allclose(model(images), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method, alpha, temperature",
    [("layer_supervision", 0.0, 1.0), ("stage_supervision", 0.0, 1.0), ("self_distillation", 0.3, 2.5)],
)
def test_auxiliary_objectives_equal_the_formula(method, alpha, temperature):
    """loss = CE(main) + (1 - alpha) sum_h CE(head_h) + alpha sum_h T^2 KL(main.detach() || head_h):
    a head after every block but the last (layer supervision) or after every stage but the last
    (stage and self-distillation); the KL never reaches the main network through its target."""
    model, images, labels = _setup(size=8, batch=6)
    options = {"distill_alpha": alpha, "distill_temperature": temperature} if method == "self_distillation" else {}
    objective = build_objective(method, model, **options)
    reference_model, reference_objective = copy.deepcopy((model, objective))
    n = model.stage_sizes
    if method == "layer_supervision":
        positions = [(s, i) for s in range(3) for i in range(n[s])][:-1]
    else:
        positions = [(0, n[0] - 1), (1, n[1] - 1)]
    out, grads = _loss_and_grads(objective, model, images, labels, 0)
    features = {}
    main = _forward_by_hand(reference_model.net, images, [range(d) for d in n], features=features)
    heads = [head(features[p]) for head, p in zip(reference_objective.heads, positions, strict=True)]
    aux_ce = sum(_ce_by_hand(h, labels) for h in heads)
    loss = _ce_by_hand(main, labels) + (1 - alpha) * aux_ce
    expected_parts = {"ce": _ce_by_hand(main, labels), "aux_ce": aux_ce}
    if alpha:
        aux_kl = sum(_kl_by_hand(h, main.detach(), temperature) for h in heads)
        loss = loss + alpha * aux_kl
        expected_parts["aux_kl"] = aux_kl
    assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert out.parts.keys() == expected_parts.keys()
    for name, value in expected_parts.items():
        assert torch.allclose(out.parts[name], value, rtol=1e-5, atol=1e-6), name
    _assert_same_grads(grads, _reference_grads(loss, reference_model, reference_objective), _names(model, objective))


def test_stochastic_depth_draws_its_own_seeded_stream():
    """Block i of stage s is kept when its uniform draw from the (seed, step, stochastic-depth) stream
    is below its survival probability; the seed defaults to 0, as the run's does."""
    model = create_model("cifar_resnet20", 10)
    objective = StochasticDepth(model, final_survival=0.5, seed=4)
    for step in (0, 7):
        rng = step_rng(4, step, stream=STREAM_STOCHASTIC_DEPTH)
        expected = []
        for stage, size in enumerate(model.stage_sizes):
            draws = rng.random(size)
            expected.append((0,) + tuple(i for i in range(1, size) if draws[i] < objective.survival[(stage, i)]))
        assert objective.sample_plan(model, step) == tuple(expected)
    default, seeded = StochasticDepth(model), StochasticDepth(model, seed=0)
    assert [default.sample_plan(model, s) for s in range(20)] == [seeded.sample_plan(model, s) for s in range(20)]
    built = build_objective("stochastic_depth", model)  # the run's seed, 0 unless given
    assert [built.sample_plan(model, s) for s in range(20)] == [seeded.sample_plan(model, s) for s in range(20)]


@pytest.mark.parametrize("survival", [0.0, -0.5, 1.5])
def test_a_final_survival_outside_0_1_is_refused(survival):
    model = create_model("cifar_resnet20", 10)
    with pytest.raises(ValueError, match=rf"final_survival={survival}: must be in \(0, 1\]"):
        StochasticDepth(model, final_survival=survival)


def test_a_final_survival_of_one_keeps_every_block():
    model = create_model("cifar_resnet20", 10)
    objective = StochasticDepth(model, final_survival=1.0)
    assert all(objective.sample_plan(model, s) == model.plan_for_depths(None) for s in range(10))


def test_st_is_built_for_its_rank():
    model = create_model("cifar_resnet20", 10)
    sampler = SubnetSampler(SubnetSpace.full(model.stage_sizes), seed=0, per_rank=True)
    objective = build_objective("st", model, sampler, rank=3)
    assert objective.rank == 3
    assert objective.sampler.sample_many(5, 2, rank=3) != objective.sampler.sample_many(5, 2, rank=0)
    assert build_objective("st", model, sampler).rank == 0  # a single process is rank 0


def test_st_trains_the_sub_networks_its_rank_draws():
    """With per-rank sampling each rank trains its own draws: the blocks the step's sub-networks kept
    are rank 3's, which differ from rank 0's at some step."""
    model, images, labels = _setup(size=8, batch=4)
    sampler = SubnetSampler(SubnetSpace.full(model.stage_sizes), seed=1, per_rank=True)
    objective = StimulativeTraining(sampler, num_subnets=2, rank=3)
    mean_blocks = {}
    for step in range(6):
        blocks = objective(model, images, labels, step).parts["subnet_blocks"].item()
        for rank in (0, 3):
            mean_blocks.setdefault(rank, []).append(sum(sum(d) for d in sampler.sample_many(step, 2, rank)) / 2)
        assert blocks == pytest.approx(mean_blocks[3][-1]), step
    assert mean_blocks[0] != mean_blocks[3]


def test_the_st_constructors_defaults_are_the_recipes_defaults():
    """StimulativeTraining built directly (tests, notebooks) behaves as a recipe that sets nothing."""
    from st_scale.methods import st

    sampler = SubnetSampler(SubnetSpace.full((3, 3, 3)), seed=0)
    assert StimulativeTraining(sampler).options == st.Options()  # the options model's defaults, declared once
    assert StimulativeTraining(sampler).rank == 0  # draws as rank 0 unless told (a single process)
    built = StimulativeTraining(sampler, st.Options(kl_weight=0.5))
    assert (built.kl_weight, built.options) == (0.5, st.Options(kl_weight=0.5))
    with pytest.raises(ValueError, match=r"^\['num_subnets'\] given beside the options model: set them in it$"):
        StimulativeTraining(sampler, st.Options(), num_subnets=2)
    with pytest.raises(ValueError, match="logit_norm_amplitude=0: must be > 0"):
        StimulativeTraining(sampler, logit_norm_amplitude=0)


def test_st_without_a_sampler_is_refused():
    with pytest.raises(ValueError, match="^method 'st' needs a sub-network sampler$"):
        build_objective("st", create_model("cifar_resnet20", 10))


def test_st_built_by_name_carries_every_option_given():
    """build_objective("st", ...) with options unlike the defaults: the objective holds them, not the defaults."""
    from st_scale.methods import st

    sampler = SubnetSampler(SubnetSpace.full((3, 3, 3)), seed=0)
    given = {"kl_weight": 0.25, "temperature": 2.0, "num_subnets": 3, "subnet_every": 2, "share_prefix": False}
    objective = build_objective("st", create_model("cifar_resnet20", 10), sampler, rank=1, **given)
    assert objective.options == st.Options(name="st", **given) != st.Options()
    assert (objective.kl_weight, objective.temperature, objective.num_subnets) == (0.25, 2.0, 3)
    assert (objective.subnet_every, objective.share_prefix, objective.rank) == (2, False, 1)


def test_ct_gradients_equal_the_cross_entropy_of_the_full_network():
    model, images, labels = _setup(size=8, batch=6)
    objective = CommonTraining()
    reference_model = _plain_copy(model)
    out, grads = _loss_and_grads(objective, model, images, labels, 0)
    loss = _ce_by_hand(_depths_by_hand(reference_model.net, images, model.full_depths), labels)
    assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, _reference_grads(loss, reference_model, objective), _names(model, objective))


def test_stochastic_depth_reports_its_logits_and_parts():
    model, images, labels = _setup(size=8, batch=6)
    objective = build_objective("stochastic_depth", model, final_survival=0.7, seed=2)
    assert objective.survival[(2, model.stage_sizes[2] - 1)] == pytest.approx(0.7)  # the option reaches it
    reference_model = _plain_copy(model)
    out = objective(model, images, labels, 3)
    expected = _forward_by_hand(reference_model.net, images, objective.sample_plan(model, 3))
    assert torch.allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
    assert set(out.parts) == {"ce", "kept_blocks"} and torch.equal(out.parts["ce"], out.loss.detach())


def test_small_input_sizes_follow_k_and_the_rank_when_per_rank():
    model, images, _ = _setup(size=32, batch=2)

    def sizes(per_rank, rank, k=0, min_fraction=0.43, seed=5):
        sampler = SubnetSampler(SubnetSpace.full(model.stage_sizes), seed=seed, per_rank=per_rank)
        objective = StimulativeTraining(sampler, small_inputs=True, rank=rank, small_input_min_fraction=min_fraction)
        return [objective._subnet_input(images, step, k).shape[-1] for step in range(40)]

    assert sizes(False, 0) == sizes(False, 3)  # one draw for every rank
    assert sizes(True, 0) != sizes(True, 3)  # each rank its own
    assert sizes(False, 0, k=0) != sizes(False, 0, k=1)  # each of the K sub-nets its own
    assert sizes(False, 0, seed=5) != sizes(False, 0, seed=6)  # the run's seed decides them
    # Its own random stream: drawn from the sub-network stream, size and sub-network would be correlated.
    low = math.ceil(0.43 * 32)
    assert sizes(False, 0) != [int(step_rng(5, step, 0).integers(low, 33)) for step in range(40)]
    assert min(sizes(False, 0, min_fraction=0.01) + sizes(False, 1, min_fraction=0.01)) >= 1
    assert 1 in {s for r in range(8) for s in sizes(True, r, min_fraction=0.02)}  # ceil(0.02 * 32) = 1


@pytest.mark.parametrize("method", ["layer_supervision", "stage_supervision", "self_distillation"])
def test_auxiliary_heads_sit_where_their_method_says_on_unequal_stages(method):
    """On stages of 1, 2 and 3 blocks: a head after every block but the network's last, or after the
    last block of every stage but the final one; each head maps that position's channels to the classes."""
    model = create_model("cifar_resnet20", 10, stage_depths=(1, 2, 3))
    objective = build_objective(method, model)
    assert objective.name == method
    if method == "layer_supervision":
        expected = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    else:
        expected = [(0, 0), (1, 1)]
    assert objective.positions == expected
    widths = {0: 16, 1: 32, 2: 64}
    assert [(h[-1].in_features, h[-1].out_features) for h in objective.heads] == [(widths[s], 10) for s, _ in expected]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"distill_alpha": 1.5}, r"distill_alpha=1.5: must be in \[0, 1\]"),
        ({"distill_alpha": -0.1}, r"distill_alpha=-0.1: must be in \[0, 1\]"),
        ({"distill_temperature": 0.0}, "distill_temperature=0.0: must be > 0"),
    ],
)
def test_bad_self_distillation_options_are_named(options, message):
    from st_scale.methods import AuxiliarySupervision

    model, _, _ = _setup()
    with pytest.raises(ValueError, match=message):
        AuxiliarySupervision(model, per="stage", name="self_distillation", **options)
    AuxiliarySupervision(model, per="stage", name="self_distillation", distill_alpha=1.0)  # the bounds themselves hold


def test_auxiliary_heads_placed_neither_per_block_nor_per_stage_are_refused():
    from st_scale.methods import AuxiliarySupervision

    model, _, _ = _setup()
    with pytest.raises(ValueError) as refused:
        AuxiliarySupervision(model, per="layer", name="layer_supervision")
    assert str(refused.value) == "per='layer': choose 'block' or 'stage'"


@pytest.mark.parametrize("recipe, words", [("demo_vit_ct", "tokens"), ("demo_swin_ct", "NHWC feature maps")])
@pytest.mark.parametrize("method", ["layer_supervision", "stage_supervision", "self_distillation"])
def test_auxiliary_heads_on_a_transformer_are_refused_before_training(recipe, words, method):
    """The heads pool NCHW feature maps: on a ViT's tokens the first step would fail, on Swin's NHWC
    maps they would pool over height and channels and train on nonsense. The driver refuses the recipe."""
    from st_scale.assembly import check_buildable
    from st_scale.config import load_config
    from st_scale.errors import ConfigError

    cfg = load_config(recipe, [f"method.name={method}"])
    with pytest.raises(ConfigError) as refused:
        check_buildable(cfg)
    model = cfg.model.name
    assert str(refused.value) == (
        f"method {method}: its heads read convolutional (NCHW) feature maps, and {model}'s blocks give {words}"
        + (" (batch x tokens x width)" if words == "tokens" else "")
        + f"; train {model} with ct, st or stochastic_depth"
    )


def _smoothed_ce_by_hand(logits, labels, smoothing):
    """(1 - e) * -log p(label) + e * mean over classes of -log p(class)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return ((1 - smoothing) * -log_p[torch.arange(len(labels)), labels] - smoothing * log_p.mean(-1)).mean()


@pytest.mark.parametrize("method", ["ct", "st", "stochastic_depth", "layer_supervision", "self_distillation"])
def test_label_smoothing_smooths_every_cross_entropy_and_no_kl(method):
    """Each CE term against the labels is the smoothed one; the distillation KLs do not change."""
    model, images, labels = _setup(size=8, batch=6)
    objective = build_objective(method, model, SubnetSampler(SubnetSpace.full(model.stage_sizes)), seed=1)
    smoothed = build_objective(
        method, model, SubnetSampler(SubnetSpace.full(model.stage_sizes)), seed=1, label_smoothing=0.2
    )
    if method in ("layer_supervision", "self_distillation"):
        smoothed.heads.load_state_dict(objective.heads.state_dict())
    model.eval()  # the same forward in both (stochastic depth's draw follows the seed and step)
    plain, out = objective(model, images, labels, 4), smoothed(model, images, labels, 4)
    assert torch.allclose(out.parts["ce"], _smoothed_ce_by_hand(out.logits.float(), labels, 0.2), rtol=1e-5)
    assert not torch.allclose(out.parts["ce"], plain.parts["ce"], rtol=1e-3)
    for name in ("kl", "aux_kl"):
        if name in plain.parts:
            assert torch.allclose(out.parts[name], plain.parts[name], rtol=1e-5), name
    if method == "layer_supervision":
        assert not torch.allclose(out.parts["aux_ce"], plain.parts["aux_ce"], rtol=1e-3)  # the heads' CEs too
    if method in ("ct", "stochastic_depth"):
        assert torch.allclose(out.loss, out.parts["ce"])


def test_label_smoothing_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        build_objective("ct", create_model("cifar_resnet20", 10), label_smoothing=1.0)


def test_a_distilling_head_built_directly_uses_the_recipes_default_temperature():
    """AuxiliarySupervision's own default is the one a recipe gets from self_distillation's options."""
    from st_scale.methods.auxiliary import AuxiliarySupervision, SelfDistillationOptions

    model, _, _ = _setup(size=8, batch=2)
    heads = AuxiliarySupervision(model, per="stage", distill_alpha=0.5, name="direct")
    assert heads.temperature == SelfDistillationOptions().distill_temperature == 3.0
