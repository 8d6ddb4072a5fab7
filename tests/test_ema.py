"""The weights' moving average against its formula, its swap in and out of the model, and its file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from st_scale.ema import WeightEma
from st_scale.models import create_model


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).to(dtype)


def _move(model, scale):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_the_average_follows_its_formula_step_by_step():
    model = _net()
    decay = 0.75
    ema = WeightEma(model, decay)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        _move(model, 0.5 + step)
        ema.update(model)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for name, e in zip(ema.names, expected):
        assert torch.allclose(ema.state_dict()[name], e, rtol=1e-6, atol=1e-7), name


def test_a_bf16_model_is_averaged_in_fp32():
    """Small steps of a bf16 model still move the fp32 average; a bf16 average would not move."""
    model = _net(torch.bfloat16)
    ema = WeightEma(model, 0.999)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    for _ in range(3):
        ema.update(model)
    for name, value in ema.state_dict().items():
        assert value.dtype == torch.float32
        moved = value - start[name]
        assert torch.allclose(moved, torch.full_like(moved, 0.25 * (1 - 0.999**3)), rtol=2e-2), name


def test_the_average_is_applied_inside_the_block_and_the_weights_are_back_after():
    model = create_model("cifar_resnet20", 10, stage_depths=[1, 1, 1]).eval()
    ema = WeightEma(model, 0.5)
    _move(model, 1.0)
    ema.update(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    with ema.applied(model):
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.state_dict()[name]), name
        averaged_out = model(x)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert not torch.allclose(averaged_out, model(x))
    with pytest.raises(RuntimeError, match="boom"), ema.applied(model):  # restored after an error too
        raise RuntimeError("boom")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_a_saved_average_loads_back_and_another_models_is_refused():
    model = _net()
    ema = WeightEma(model, 0.9)
    _move(model, 1.0)
    ema.update(model)
    restored = WeightEma(_net(), 0.9)
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(RuntimeError, match="written for another model"):
        WeightEma(nn.Linear(4, 2), 0.9).load_state_dict(ema.state_dict())
    for decay in (0, 1.0, -0.5):  # both ends of (0, 1) are refused: 0 would copy the weights, 1 never move
        with pytest.raises(ValueError) as refused:
            WeightEma(model, decay)
        assert str(refused.value) == f"EMA decay={decay}: give a number in (0, 1), e.g. 0.999"
