"""Elastic DenseNets against torchvision's own DenseNet: the full network, a sub-network built as a
standalone torchvision DenseNet with sliced transitions, deleted layers and BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.densenet import _Transition

from st_scale.models import create_model
from st_scale.models.elastic import batchnorm_layers


def _standalone(model, depths) -> nn.Module:
    """Sub-network `depths` of an elastic DenseNet as torchvision's DenseNet class runs it: dense
    blocks of the first d layers, each transition (and norm5, classifier) built for the channels
    those layers produce, holding the leading input slices of the trained weights."""
    net = copy.deepcopy(model.net)
    features = net.features
    stage = 0
    while hasattr(features, f"denseblock{stage + 1}"):
        block = getattr(features, f"denseblock{stage + 1}")
        for name in list(block.keys())[depths[stage] :]:
            del block[name]
        last = block[list(block.keys())[-1]]
        width = last.norm1.num_features + last.conv2.out_channels
        after = getattr(features, f"transition{stage + 1}", None)
        if after is not None:
            sliced = _Transition(width, after.conv.out_channels)
            sliced.conv.weight.data = after.conv.weight.data[:, :width].clone()
            _copy_bn_slice(after.norm, sliced.norm, width)
            setattr(features, f"transition{stage + 1}", sliced)
        else:
            norm5 = nn.BatchNorm2d(width)
            _copy_bn_slice(features.norm5, norm5, width)
            features.norm5 = norm5
            classifier = nn.Linear(width, net.classifier.out_features)
            classifier.weight.data = net.classifier.weight.data[:, :width].clone()
            classifier.bias.data = net.classifier.bias.data.clone()
            net.classifier = classifier
        stage += 1
    return net.train(model.net.training)  # the new modules in the model's mode


def _copy_bn_slice(full: nn.BatchNorm2d, into: nn.BatchNorm2d, width: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(into, name).data = getattr(full, name).data[:width].clone()
    into.num_batches_tracked.data = full.num_batches_tracked.data.clone()


def _perturbed(name: str) -> nn.Module:
    """A model whose BN layers are not the identity (random affine and running statistics)."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    for bn in batchnorm_layers(model):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "name, depths",
    [("cifar_densenet40", (2, 6, 3)), ("cifar_densenet40", (1, 1, 1)), ("densenet121", (3, 5, 24, 2))],
)
def test_a_subnetwork_is_the_standalone_densenet_with_sliced_transitions(name, depths):
    model = _perturbed(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(x))  # the full network is torchvision's forward
        reference = _standalone(model, depths)
        assert torch.allclose(model(x, depths), reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, depths), model(x), atol=1e-3)


def test_densenet264_holds_densenet121s_depths():
    model = create_model("densenet264", 10).eval()
    assert model.stage_sizes == (6, 12, 64, 48)
    assert create_model("densenet121", 10).stage_sizes == (6, 12, 24, 16)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x, (6, 12, 24, 16)).shape == (1, 10)


def test_training_updates_the_sliced_running_statistics_as_the_standalone_network():
    """In training mode a sub-network's transition BN updates the leading channels' running
    statistics exactly as the standalone network's own BN does, and leaves the others alone."""
    model = _perturbed("cifar_densenet40")
    depths = (2, 4, 3)
    reference = _standalone(model, depths).train()
    model.train()
    full_norm = model.net.features.transition1.norm
    untouched = full_norm.running_mean.clone()
    x = torch.randn(4, 3, 16, 16)
    out, expected = model(x, depths), reference(x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    width = reference.features.transition1.norm.num_features
    assert width < full_norm.num_features
    assert torch.allclose(full_norm.running_mean[:width], reference.features.transition1.norm.running_mean, atol=1e-6)
    assert torch.allclose(full_norm.running_var[:width], reference.features.transition1.norm.running_var, atol=1e-6)
    assert torch.equal(full_norm.running_mean[width:], untouched[width:])


def test_a_deleted_layer_leaves_zeros_where_its_features_were():
    """Deleting a layer from the middle of a dense block: the full network with that layer's output
    replaced by zeros (torchvision's block forward), every later channel where it was."""

    class Zeros(nn.Module):
        def __init__(self, growth):
            super().__init__()
            self.growth = growth

        def forward(self, features):
            x = torch.cat(features, 1) if isinstance(features, list) else features
            return x.new_zeros(x.shape[0], self.growth, *x.shape[2:])

    model = _perturbed("cifar_densenet40").eval()
    plan = ((0, 1, 2, 3, 4, 5), (0, 2, 5), (0, 1, 2, 3, 4, 5))
    reference = copy.deepcopy(model.net)
    for name in ("denselayer2", "denselayer4", "denselayer5"):
        reference.features.denseblock2[name] = Zeros(12)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.run(x, model.check_plan(plan)), reference(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="widen their input, so they run in their own order"):
        model.check_plan(((0, 2, 1), (0,), (0,)))


def test_a_zero_branch_scale_equals_deleting_the_layer():
    """Stochastic depth's test-time scaling acts on a layer's new features: scale 0 on every layer
    but the first and last of each block is those layers deleted."""
    model = _perturbed("cifar_densenet40").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        deleted = model.run(x, model.check_plan(((0, 5), (0, 5), (0, 5))))
        model.set_branch_scales({(s, i): 0.0 for s, i, _ in model.droppable_blocks() if i < 5})
        assert torch.allclose(model(x), deleted, rtol=1e-5, atol=1e-6)
        model.set_branch_scales(None)
        assert not torch.allclose(model(x), deleted, atol=1e-3)


def test_macs_and_parameters_of_a_subnetwork_are_the_standalone_networks():
    from torch.utils.flop_counter import FlopCounterMode

    from st_scale.models.complexity import MacCounter

    model = create_model("cifar_densenet40", 10)
    counter = MacCounter(model, 32)
    for depths in ((2, 6, 3), (6, 6, 6), (1, 1, 1)):
        reference = _standalone(model, depths).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            reference(torch.zeros(1, 3, 32, 32))
        assert counter.subnet_macs(depths) == flops.get_total_flops() // 2, depths
        assert counter.subnet_params(depths) == sum(p.numel() for p in reference.parameters()), depths
    # torchvision's published DenseNet-121 figures: 2.83 G multiply-adds at 224 px, 7,978,856 parameters
    full = create_model("densenet121", 1000)
    big = MacCounter(full, 224)
    assert big.subnet_macs(full.full_depths) / 1e9 == pytest.approx(2.83, rel=0.01)
    assert big.subnet_params(full.full_depths) == 7_978_856
