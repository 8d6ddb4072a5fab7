"""Elastic ViT and Swin against torchvision's own models: the sub-network is the torchvision model
built with the kept blocks, a dropped block is the identity, a scaled one scales its residual, the
costs are the published ones, and evaluation has no BatchNorm statistics to re-estimate."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches
from torchvision.models import Swin_T_Weights, ViT_B_16_Weights
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from st_scale.config import load_config
from st_scale.errors import ConfigError
from st_scale.evaluate.subnets import evaluate_subnets, evaluate_subnets_naive, recalibrate_bn
from st_scale.models import create_model
from st_scale.models.complexity import MacCounter
from st_scale.sampling import SubnetSpace


def _trained_like(name: str):
    """A model with every weight random (torchvision zero-initialises the ViT's head)."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _torchvision_vit_of(model, depths) -> VisionTransformer:
    """torchvision's ViT of sum(depths) blocks holding the model's first d blocks of each group, in order."""
    net = model.net
    plain = VisionTransformer(32, 4, sum(depths), 3, 96, 192, num_classes=10)
    kept = [b for g, d in enumerate(depths) for b in list(net.encoder.layers)[3 * g : 3 * g + d]]
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("encoder.layers.")}
    for i, block in enumerate(kept):
        state |= {f"encoder.layers.encoder_layer_{i}.{k}": v for k, v in block.state_dict().items()}
    plain.load_state_dict(state)
    return plain


def _torchvision_swin_of(model, depths) -> SwinTransformer:
    """torchvision's Swin of those stage depths; its block j of stage s is the model's (same keys)."""
    plain = SwinTransformer([2, 2], 32, list(depths), [1, 2, 4, 8], [4, 4], stochastic_depth_prob=0.0, num_classes=10)
    trained = model.net.state_dict()
    plain.load_state_dict({k: trained[k] for k in plain.state_dict()})
    return plain


@pytest.mark.parametrize(
    "name, depths, reference",
    [
        ("cifar_vit", (1, 2, 3), _torchvision_vit_of),
        ("cifar_vit", (3, 1, 1), _torchvision_vit_of),
        ("cifar_swin", (1, 2, 3, 1), _torchvision_swin_of),
        ("cifar_swin", (2, 1, 6, 2), _torchvision_swin_of),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_a_subnetwork_is_the_torchvision_model_of_its_blocks(name, depths, reference, training):
    model = _trained_like(name).train(training)
    plain = reference(model, depths).train(training)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, depths), plain(x))
        assert not torch.allclose(model(x, depths), model(x), atol=1e-3)
    # the standalone architecture create_model builds for training it alone is the same network
    alone = create_model(name, 10, stage_depths=depths)
    assert alone.stage_sizes == depths
    assert {k: v.shape for k, v in alone.net.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }


@pytest.mark.parametrize("name", ["cifar_vit", "cifar_swin"])
def test_a_scaled_block_scales_its_residual_and_zero_drops_it(name):
    model = _trained_like(name).eval()
    x = torch.randn(2, 3, 32, 32)
    shallow = (1,) * model.num_stages
    with torch.no_grad():
        h = model.segments[0].blocks[0](x)  # the input of stage 0's block 1
        h = model.stage_blocks(0)[0](h)
        block = model.stage_blocks(0)[1]
        expected = h + 0.25 * (block(h) - h)  # x + s * f(x), by hand
        model.set_branch_scales({(0, 1): 0.25})
        assert torch.allclose(block(h), expected, atol=1e-6)
        model.set_branch_scales({(s, i): 0.0 for s, i, _ in model.droppable_blocks()})
        assert torch.allclose(model(x), model(x, shallow), atol=1e-5)
        with model.unscaled_branches():
            assert torch.equal(model(x), model.net(x))
        model.set_branch_scales(None)
        assert torch.equal(model(x), model.net(x))


def test_costs_are_torchvisions_published_ones():
    """torchvision's model cards: ViT-B/16 17.564 GFLOPs (multiply-adds, attention included), Swin-T 4.491."""
    for name, weights in (("vit_b_16", ViT_B_16_Weights.IMAGENET1K_V1), ("swin_t", Swin_T_Weights.IMAGENET1K_V1)):
        model = create_model(name, 1000)
        counter = MacCounter(model, 224)
        assert counter.subnet_macs(model.full_depths) / 1e9 == pytest.approx(weights.meta["_ops"], abs=5e-4)
        assert counter.subnet_params(model.full_depths) == weights.meta["num_params"]


def test_vit_subnetwork_macs_follow_the_transformer_formula():
    """65 tokens of width 96: a block is 4 * 96^2 (attention projections) + 2 * 96 * 192 (MLP) per token and
    two 65 x 65 x 96 products (scores, weighted values); the patch projection 64 * 96 * 48; the head 96 * 10."""
    model = create_model("cifar_vit", 10)
    counter = MacCounter(model, 32)
    tokens, width = 65, 96
    block = tokens * (4 * width**2 + 2 * width * 192) + 2 * tokens**2 * width
    for depths in ((1, 1, 1), (1, 2, 3), (3, 3, 3)):
        assert counter.subnet_macs(depths) == 64 * width * 48 + sum(depths) * block + width * 10


class _NoBatches:
    def __iter__(self):
        raise AssertionError("a network without BatchNorm ran calibration batches")


def test_evaluation_of_a_layernorm_network_re_estimates_nothing_and_the_tree_equals_the_naive_walk():
    model = _trained_like("cifar_swin")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, model.plan_for_depths(None), _NoBatches())
    subnets = SubnetSpace.full(model.stage_sizes).sample_subset(6, seed=0)
    val = random_batches(2, 4, 32, seed=3)
    tree = evaluate_subnets(model, subnets, val, _NoBatches())
    naive = evaluate_subnets_naive(model, subnets, val, None)
    assert [(r.depths, r.top1, r.top5) for r in tree.rows] == [(r.depths, r.top1, r.top5) for r in naive.rows]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_vit_takes_only_its_own_image_size(tmp_path):
    with pytest.raises(ConfigError, match="data.image_size=64: cifar_vit takes 32 px images only"):
        load_config("demo_st", ["model.name=cifar_vit", "data.image_size=64"])
    with pytest.raises(ConfigError, match="data.val_image_size=256: vit_b_16 takes 224 px images only"):
        load_config("imagenet_resnet50_st", ["model.name=vit_b_16", "data.val_image_size=256"])
    assert load_config("demo_st", ["model.name=cifar_swin", "data.image_size=64"]).model.name == "cifar_swin"


def test_the_sub_network_figure_says_a_layernorm_network_has_no_statistics():
    from st_scale.evaluate.plots import subnet_figure

    model = _trained_like("cifar_vit")
    report = evaluate_subnets(model, [(1, 1, 1), (3, 3, 3)], random_batches(1, 4, 32, seed=3), _NoBatches())
    assert not report.batch_norm
    assert "no BN statistics (LayerNorm)" in subnet_figure(report, "vit")._suptitle.get_text()


def test_the_printed_summary_says_what_the_accuracies_were_measured_on():
    from st_scale.models import has_batch_norm
    from st_scale.train.summary import statistics_note

    assert [has_batch_norm(n) for n in ("cifar_vit", "swin_t", "densenet121", "cifar_resnet20")] == [0, 0, 1, 1]
    assert "LayerNorm" in statistics_note(load_config("demo_swin_st"))
    assert "own re-estimated" in statistics_note(load_config("demo_st"))
    assert "shared running" in statistics_note(load_config("demo_st", ["eval.recalibrate=false"]))


def test_a_layernorm_network_is_evaluated_once_not_again_on_shared_statistics():
    from st_scale.evaluate.passes import reported_metrics, subnet_reports

    model = _trained_like("cifar_swin")
    val = random_batches(1, 4, 32, seed=3)
    reports = subnet_reports(model, [(1, 1, 1, 1), (2, 2, 6, 2)], lambda: val, _NoBatches(), shared_stats=True)
    assert set(reports) == {""}
    every, some = reported_metrics(load_config("demo_swin_st"))
    assert not any(name.startswith("val/subnets_") and name.endswith("_shared_stats") for name in every | some)
    every, some = reported_metrics(load_config("demo_st"))
    assert "val/subnets_mean_top1_shared_stats" in every | some
