"""A sub-network exported as a model of its own computes what the elastic model computes for it:
the blocks it keeps, BN statistics re-estimated for it, nothing of the model changed; TorchScript
reproduces it with torch alone."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_bn, random_batches

from st_scale.errors import ConfigError
from st_scale.evaluate.export import (
    check_onnx,
    check_same_outputs,
    parse_count,
    parse_depths,
    standalone_subnet,
    write_formats,
)
from st_scale.evaluate.subnets import evaluate_plan
from st_scale.models import create_model


@pytest.mark.parametrize("name, depths, size", [("cifar_resnet20", (1, 3, 2), 16), ("resnet18", (2, 1, 1, 2), 32)])
def test_the_exported_network_is_the_sub_network(name, depths, size, tmp_path):
    model = create_model(name, 10)
    perturb_bn(model, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration, val = random_batches(3, 8, size, seed=1), random_batches(2, 8, size, seed=2)

    standalone = standalone_subnet(model, 10, depths, calibration)
    for stage, d in enumerate(depths):
        assert len(getattr(standalone, f"layer{stage + 1}")) == d
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "the elastic model is untouched"
    top1 = check_same_outputs(model, depths, standalone, val, calibration)
    # an independent route: the evaluation's own accuracy of that plan, on its re-estimated statistics
    assert top1 == evaluate_plan(model, model.plan_for_depths(depths), val, calibration).top1
    # its BN statistics are the sub-network's, not the main net's
    trained_main = model.net.layer1[0].bn1.running_mean
    assert not torch.equal(standalone.layer1[0].bn1.running_mean, trained_main)

    files = write_formats(standalone, val[0][0][:1], ["state_dict", "pt2", "torchscript", "onnx"], tmp_path, "net")
    onnx_top1, worst = check_onnx(files["onnx"], standalone, val)  # onnxruntime, on the same batches
    assert worst < 1e-4 and abs(onnx_top1 - top1) <= 100 / 16
    scripted = torch.jit.load(files["torchscript"])
    program = torch.export.load(files["pt2"]).module()
    plain = create_model(name, 10, stage_depths=depths).net.eval()
    plain.load_state_dict(torch.load(files["state_dict"]))
    with torch.no_grad():
        images = val[1][0]
        expected = standalone(images)
        assert torch.equal(scripted(images), expected) and torch.equal(plain(images), expected)
        assert torch.equal(program(images), expected)


def test_a_model_built_shallower_exports_its_sub_networks():
    """A run of `model.stage_depths` trains the family's shallower net (named after its depths): its
    sub-networks are that family's, built by the family's name."""
    model = create_model("cifar_resnet20", 10, stage_depths=(2, 2, 2))
    assert (model.name, model.registry_name) == ("cifar_resnet20[2-2-2]", "cifar_resnet20")
    perturb_bn(model, 16)
    calibration, val = random_batches(2, 8, 16, seed=1), random_batches(1, 8, 16, seed=2)
    for depths in ((2, 2, 2), (1, 2, 1)):
        standalone = standalone_subnet(model, 10, depths, calibration)
        assert [len(getattr(standalone, f"layer{s + 1}")) for s in range(3)] == list(depths)
        check_same_outputs(model, depths, standalone, val, calibration)


def test_a_network_that_disagrees_is_not_written():
    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    calibration, val = random_batches(2, 8, 16, seed=1), random_batches(1, 8, 16, seed=2)
    standalone = standalone_subnet(model, 10, (1, 1, 1), calibration)
    with torch.no_grad():
        standalone.fc.bias.add_(1e-3)
    with pytest.raises(RuntimeError, match="logits differ from the trained sub-network's"):
        check_same_outputs(model, (1, 1, 1), standalone, val, calibration)


def test_a_sub_network_the_model_does_not_have_is_named():
    model = create_model("cifar_resnet20", 10)
    with pytest.raises(ConfigError, match="--subnet: depth vector \\[1, 4, 1\\]: stage 1 depth 4 is out of range"):
        standalone_subnet(model, 10, (1, 4, 1), None)
    with pytest.raises(ConfigError, match="--subnet 'one,two': give the blocks kept per stage"):
        parse_depths("one,two")
    assert [parse_count(t, "--budget-macs") for t in ("2.0G", "150M", "3e8", "40k", "12")] == [
        2_000_000_000,
        150_000_000,
        300_000_000,
        40_000,
        12,
    ]
    for bad in ("", "G", "-1M", "two", "0"):
        with pytest.raises(ConfigError, match="--budget-macs .*: give a positive, finite count"):
            parse_count(bad, "--budget-macs")
    with pytest.raises(ConfigError, match="--subnet: .*supported for ResNets, DenseNets, ViTs and Swins, not mobile"):
        standalone_subnet(create_model("mobilenet_v3_small", 10), 10, (1, 1, 1, 1), None)


def _plain_densenet(depths):
    return create_model("cifar_densenet40", 10, stage_depths=depths).net


def _plain_vit(depths):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(32, 4, sum(depths), 3, 96, 192, num_classes=10)


def _plain_swin(depths):
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([2, 2], 32, list(depths), [1, 2, 4, 8], [4, 4], stochastic_depth_prob=0.0, num_classes=10)


@pytest.mark.parametrize(
    "name, depths, plain_model",
    [
        ("cifar_densenet40", (2, 6, 3), _plain_densenet),
        ("cifar_vit", (1, 2, 3), _plain_vit),
        ("cifar_swin", (1, 2, 3, 1), _plain_swin),
    ],
)
def test_a_densenet_or_transformer_subnetwork_round_trips_through_every_format(name, depths, plain_model, tmp_path):
    """The exported file loads into the plain architecture of those depths (a torchvision ViT or Swin
    of that many blocks, a DenseNet with narrower transitions), and every format computes the
    sub-network's logits; ONNX through onnxruntime within tolerance."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    with torch.no_grad():  # every weight random (torchvision zero-initialises the ViT's head)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    perturb_bn(model, 32)
    calibration, val = random_batches(2, 8, 32, seed=1), random_batches(2, 8, 32, seed=2)
    standalone = standalone_subnet(model, 10, depths, calibration)
    top1 = check_same_outputs(model, depths, standalone, val, calibration)
    assert top1 == evaluate_plan(model, model.plan_for_depths(depths), val, calibration).top1
    files = write_formats(standalone, val[0][0][:1], ["state_dict", "pt2", "torchscript", "onnx"], tmp_path, "net")
    plain = plain_model(depths).eval()
    plain.load_state_dict(torch.load(files["state_dict"]))
    onnx_top1, worst = check_onnx(files["onnx"], standalone, val)
    assert worst < 1e-4 and abs(onnx_top1 - top1) <= 100 / 16
    with torch.no_grad():
        images = val[1][0]
        expected = standalone(images)  # the sub-network's logits: checked batch by batch above
        assert torch.equal(plain(images), expected)
        assert torch.equal(torch.jit.load(files["torchscript"])(images), expected)
        assert torch.equal(torch.export.load(files["pt2"]).module()(images), expected)
