"""Evaluation: tree walk equals one-at-a-time evaluation exactly; BN recalibration; destruction."""

import pytest
import torch

from conftest import perturb_bn, random_batches
from st_scale.evaluation import (
    destruction_tests, evaluate_main, evaluate_plan, evaluate_subnets, evaluate_subnets_naive,
    recalibrate_bn, summarise_destruction,
)
from st_scale.models import create_model
from st_scale.models.elastic import batchnorm_layers
from st_scale.sampling import SubnetSpace

CASES = [("cifar_resnet20", 16, None), ("mobilenet_v3_small", 32, None), ("resnet18", 32, None),
         ("cifar_resnet56", 16, 40)]


def _bn_buffers(model):
    return [t.clone() for bn in batchnorm_layers(model) for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


@pytest.mark.parametrize("name, size, sample", CASES)
@pytest.mark.parametrize("recalibrate", [True, False])
def test_tree_walk_equals_naive_evaluation_exactly(name, size, sample, recalibrate):
    model = create_model(name, 10)
    perturb_bn(model, size)
    space = SubnetSpace.full(model.stage_sizes)
    subnets = space.sample_subset(sample, seed=0) if sample else list(space)
    val = random_batches(2, 12, size, seed=1)
    calibration = random_batches(2, 12, size, seed=2) if recalibrate else None
    before = _bn_buffers(model)

    tree_logits = {}
    report = evaluate_subnets(model, subnets, val, calibration,
                              on_logits=lambda d, logits: tree_logits.setdefault(d, []).append(logits.clone()))
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_buffers(model))), "model statistics changed"

    for depths in subnets[:: max(1, len(subnets) // 12)]:
        plan = model.plan_for_depths(depths)
        reference = create_model(name, 10)
        reference.load_state_dict(model.state_dict())
        if recalibrate:
            recalibrate_bn(reference, plan, calibration)
        reference.eval()
        with torch.no_grad():
            for (images, _), logits in zip(val, tree_logits[depths]):
                assert torch.equal(reference.run(images, plan), logits), depths

    naive = evaluate_subnets_naive(model, subnets, val, calibration)
    assert [(r.depths, r.top1, r.top5, r.macs) for r in report.rows] == \
           [(r.depths, r.top1, r.top5, r.macs) for r in naive.rows]
    assert report.recalibrated == recalibrate


def test_recalibration_changes_results_and_restores_the_model():
    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    val, calibration = random_batches(2, 16, 16, seed=1), random_batches(2, 16, 16, seed=2)
    before = _bn_buffers(model)
    shared = evaluate_subnets(model, [(1, 1, 1), (3, 3, 3)], val)
    recal = evaluate_subnets(model, [(1, 1, 1), (3, 3, 3)], val, calibration)
    assert [r.top1 for r in shared.rows] != [r.top1 for r in recal.rows] or \
           [r.top5 for r in shared.rows] != [r.top5 for r in recal.rows]
    assert evaluate_main(model, val, calibration).top1 == recal.row((3, 3, 3)).top1
    assert evaluate_main(model, val).top1 == shared.row((3, 3, 3)).top1
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_buffers(model)))
    assert model.training


def test_report_statistics_and_table():
    model = create_model("cifar_resnet20", 10)
    val = random_batches(1, 20, 16)
    report = evaluate_subnets(model, list(SubnetSpace.full(model.stage_sizes)), val, val)
    top1 = torch.tensor([r.top1 for r in report.rows], dtype=torch.float64)
    assert report.stats["num_subnets"] == 27
    assert report.stats["mean_top1"] == pytest.approx(top1.mean().item())
    assert report.stats["std_top1"] == pytest.approx(top1.std(unbiased=False).item())
    assert report.stats["min_top1"] == top1.min().item() and report.stats["max_top1"] == top1.max().item()
    lines = report.to_csv().strip().splitlines()
    assert lines[0] == "depths,blocks,macs,top1,top5" and len(lines) == 28
    assert lines[1].startswith("1-1-1,3,")
    macs = [r.macs for r in report.rows]
    assert report.row((3, 3, 3)).macs == max(macs) and report.row((1, 1, 1)).macs == min(macs)


def test_bad_depths_in_evaluation_are_named():
    model = create_model("cifar_resnet20", 10)
    with pytest.raises(ValueError, match="stage 2 depth 5 is out of range"):
        evaluate_subnets(model, [(1, 1, 5)], random_batches(1, 4, 16))


def test_destruction_tests_cover_every_droppable_block():
    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    val = random_batches(1, 16, 16)
    rows = destruction_tests(model, val, val, max_deleted=3, trials=2)
    by_test = {}
    for r in rows:
        by_test.setdefault(r.test, []).append(r)
    assert len(by_test["intact"]) == 1
    assert {r.detail for r in by_test["delete_one"]} == {f"stage{s}.block{i}" for s in range(3) for i in (1, 2)}
    assert len(by_test["delete_k"]) == 3 * 2
    assert {r.detail for r in by_test["swap_adjacent"]} == {f"stage{s}.block1<->2" for s in range(3)}
    summary = summarise_destruction(rows)
    assert summary["intact/0"] == evaluate_main(model, val, val).top1
    # Deleting block 2 of stage 0 is the sub-network (2, 3, 3).
    deleted = next(r for r in by_test["delete_one"] if r.detail == "stage0.block2")
    assert deleted.top1 == evaluate_plan(model, model.plan_for_depths((2, 3, 3)), val, val).top1
