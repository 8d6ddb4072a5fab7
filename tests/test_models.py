"""Elastic models: the full-depth forward is the plain model; sub-nets keep stage prefixes."""

import copy
import pickle

import pytest
import torch
from torch import nn

from st_scale.models import FIXED_IMAGE_SIZES, MODEL_NAMES, create_model

STAGE_SIZES = {
    "cifar_resnet20": (3, 3, 3),
    "cifar_resnet32": (5, 5, 5),
    "cifar_resnet44": (7, 7, 7),
    "cifar_resnet56": (9, 9, 9),
    "cifar_resnet110": (18, 18, 18),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "cifar_densenet40": (6, 6, 6),
    "cifar_densenet100": (16, 16, 16),
    "densenet121": (6, 12, 24, 16),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
    "densenet264": (6, 12, 64, 48),
    "mobilenet_v3_small": (2, 3, 2, 3),
    "mobilenet_v3_large": (2, 2, 3, 4, 2, 3),
    "cifar_vit": (3, 3, 3),
    "vit_b_16": (3, 3, 3, 3),
    "cifar_swin": (2, 2, 6, 2),
    "swin_t": (2, 2, 6, 2),
}


def test_every_model_has_its_stage_sizes():
    assert set(STAGE_SIZES) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("training", [False, True])
def test_full_depth_forward_equals_the_plain_model(name, training):
    model = create_model(name, num_classes=7)
    assert model.stage_sizes == STAGE_SIZES[name]
    model.train(training)
    if name.startswith("mobilenet"):
        model.net.classifier[-2].p = 0.0  # dropout would make two train-mode passes differ
    size = FIXED_IMAGE_SIZES.get(name, 32)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(x))
        assert torch.equal(model(x, model.full_depths), model.net(x))


def test_state_dict_keys_are_the_plain_models():
    model = create_model("resnet18", 10)
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}


def test_subnet_forward_runs_the_first_blocks_of_each_stage():
    model = create_model("resnet18", 10).eval()
    net = model.net
    plain = nn.Sequential(
        net.conv1,
        net.bn1,
        net.relu,
        net.maxpool,
        net.layer1[0],
        net.layer2[0],
        net.layer2[1],
        net.layer3[0],
        net.layer4[0],
        net.layer4[1],
        net.avgpool,
        nn.Flatten(1),
        net.fc,
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, (1, 2, 1, 2)), plain(x))


def test_mobilenet_drops_only_identity_shortcut_blocks():
    model = create_model("mobilenet_v3_large", 10)
    for stage in range(model.num_stages):
        blocks = model.stage_blocks(stage)
        assert all(b.use_res_connect for b in blocks[1:])
        assert not getattr(blocks[0], "use_res_connect", False)


@pytest.mark.parametrize(
    "depths, message",
    [
        ((3, 3), "has 2 entries but cifar_resnet20 has 3 stages"),
        ((3, 3, 3, 3), "has 4 entries"),
        ((0, 3, 3), "stage 0 depth 0 is out of range; cifar_resnet20 allows 1..3"),
        ((3, 4, 3), "stage 1 depth 4 is out of range"),
    ],
)
def test_bad_depth_vectors_are_named(depths, message):
    model = create_model("cifar_resnet20", 10)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        model(torch.randn(1, 3, 16, 16), depths)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown model name 'resnet51'.*resnet50"):
        create_model("resnet51", 10)


def test_plans_must_keep_the_first_block():
    model = create_model("cifar_resnet20", 10)
    with pytest.raises(ValueError, match="stage 1 must start with block 0"):
        model.check_plan([(0, 1), (1, 2), (0,)])
    with pytest.raises(ValueError, match="outside 0..2"):
        model.check_plan([(0, 3), (0,), (0,)])


def test_zero_branch_scale_equals_dropping_the_block():
    model = create_model("cifar_resnet20", 10).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        shallow = model(x, (1, 1, 1))
        model.set_branch_scales({(s, i): 0.0 for s, i, _ in model.droppable_blocks()})
        assert torch.allclose(model(x), shallow, atol=1e-6)
        with model.unscaled_branches():
            assert torch.equal(model(x), model.net(x))
        model.set_branch_scales(None)
        assert not torch.allclose(model(x), shallow, atol=1e-3)


def test_models_survive_deepcopy_and_pickle():
    model = create_model("cifar_resnet20", 10).eval()
    model.set_branch_scales({(0, 1): 0.5})
    x = torch.randn(2, 3, 16, 16)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            clone.net.fc.weight.add_(1.0)  # the clone's segments must point at the clone's weights
            assert not torch.equal(clone(x), model(x))
            scaled = clone(x)
            with clone.unscaled_branches():  # the copied hooks obey the copy's switch
                assert not torch.equal(clone(x), scaled)


def test_complexity_matches_known_macs():
    from st_scale.models.complexity import MacCounter

    # Published figures: ResNet-18 1.82 GMACs, ResNet-50 4.09 GMACs at 224 px.
    for name, gmacs in (("resnet18", 1.82), ("resnet50", 4.09)):
        model = create_model(name, 1000)
        counter = MacCounter(model, 224)
        assert counter.subnet_macs(model.full_depths) / 1e9 == pytest.approx(gmacs, rel=0.01)
    small = MacCounter(create_model("resnet50", 1000), 224)
    assert small.subnet_macs((1, 1, 1, 1)) < small.subnet_macs((3, 4, 6, 3))


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_densenet40"])
def test_complexity_of_a_bf16_model_is_counted_in_its_dtype(name):
    """A model cast to bf16 (DeepSpeed's bf16 configs) is counted as its fp32 self: the blank probe
    image takes the model's dtype (and device)."""
    from st_scale.models.complexity import MacCounter

    model = create_model(name, 10)
    fp32 = MacCounter(model, 16)
    bf16 = MacCounter(copy.deepcopy(model).to(torch.bfloat16), 16)
    for depths in (model.full_depths, (1,) * model.num_stages):
        assert bf16.subnet_macs(depths) == fp32.subnet_macs(depths) > 0
        assert bf16.subnet_params(depths) == fp32.subnet_params(depths) > 0
