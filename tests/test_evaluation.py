"""Evaluation: tree walk equals one-at-a-time evaluation exactly; BN recalibration; destruction."""

import copy
import re

import pytest
import torch
from conftest import perturb_bn, random_batches

from st_scale.evaluate.subnets import (
    destruction_tests,
    evaluate_main,
    evaluate_plan,
    evaluate_subnets,
    evaluate_subnets_naive,
    recalibrate_bn,
    summarise_destruction,
)
from st_scale.models import create_model, has_batch_norm
from st_scale.models.complexity import MacCounter
from st_scale.models.elastic import batchnorm_layers
from st_scale.sampling import SubnetSpace

CASES = [
    ("cifar_resnet20", 16, None),
    ("mobilenet_v3_small", 32, None),
    ("resnet18", 32, None),
    ("cifar_resnet56", 16, 40),
    ("cifar_densenet40", 16, 24),
    ("cifar_vit", 32, 12),
    ("cifar_swin", 16, 12),
]


def _bn_buffers(model):
    return [
        t.clone() for bn in batchnorm_layers(model) for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    ]


@pytest.mark.parametrize("name, size, sample", CASES)
@pytest.mark.parametrize("recalibrate", [True, False])
def test_tree_walk_equals_naive_evaluation_exactly(name, size, sample, recalibrate):
    model = create_model(name, 10)
    if name == "cifar_vit":  # torchvision starts its head at zero: every logit would be 0
        torch.nn.init.normal_(model.net.heads.head.weight, std=0.1)
    perturb_bn(model, size)
    space = SubnetSpace.full(model.stage_sizes)
    subnets = space.sample_subset(sample, seed=0) if sample else list(space)
    val = random_batches(2, 12, size, seed=1)
    calibration = random_batches(2, 12, size, seed=2) if recalibrate else None
    before = _bn_buffers(model)

    tree_logits = {}
    report = evaluate_subnets(
        model,
        subnets,
        val,
        calibration,
        on_logits=lambda d, logits: tree_logits.setdefault(d, []).append(logits.clone()),
    )
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
    assert [(r.depths, r.top1, r.top5, r.macs) for r in report.rows] == [
        (r.depths, r.top1, r.top5, r.macs) for r in naive.rows
    ]
    assert report.recalibrated == recalibrate
    # The costs are counted at the size of the images evaluated (16 px in some cases), and the report
    # knows whether the network had statistics to re-estimate (the figures' note reads it).
    macs = MacCounter(model, size)
    assert [r.macs for r in report.rows] == [macs.subnet_macs(r.depths) for r in report.rows]
    assert report.batch_norm is has_batch_norm(name)


def _statistics_by_hand(model, plan, calibration):
    """Per BatchNorm layer on the plan: the average over calibration batches of each batch's channel
    mean and unbiased variance, from the layer's inputs in a train-mode pass (batch statistics
    normalise there, so the inputs do not depend on running statistics)."""
    probe = copy.deepcopy(model).train()
    inputs = {}
    for name, bn in probe.named_modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for images, _ in calibration:
            probe.run(images, plan)
    return {
        name: (
            torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0),
            torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0),
            len(xs),
        )
        for name, xs in inputs.items()
    }


def _top1_by_hand(model, plan, val, statistics=None):
    """Top-1 (%) of `plan` in eval mode, with the BN statistics given (else the model's own)."""
    model = copy.deepcopy(model).eval()
    for name, (mean, var, _) in (statistics or {}).items():
        bn = model.get_submodule(name)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    with torch.no_grad():
        correct = sum((model.run(x, plan).argmax(-1) == y).sum().item() for x, y in val)
    return 100.0 * correct / sum(len(y) for _, y in val)


def test_reestimated_statistics_are_those_of_the_calibration_batches():
    """A cumulative average over the calibration batches (not an exponential one), from fresh."""
    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    calibration = random_batches(3, 10, 16, seed=2)
    plan = model.plan_for_depths((2, 1, 3))
    expected = _statistics_by_hand(model, plan, calibration)
    recalibrate_bn(model, plan, calibration)
    assert len(expected) == 1 + 2 * 6 + 2  # stem, two per block on the plan, two projection shortcuts
    for name, (mean, var, batches) in expected.items():
        bn = model.get_submodule(name)
        assert torch.allclose(bn.running_mean, mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5), name
        assert bn.num_batches_tracked.item() == batches == 3
        assert bn.momentum == 0.1  # the model's own momentum is back


def test_shared_and_reestimated_evaluation_use_the_statistics_they_name():
    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    val, calibration = random_batches(2, 16, 16, seed=1), random_batches(2, 16, 16, seed=2)
    before = _bn_buffers(model)
    subnets = [(1, 1, 1), (3, 3, 3)]
    shared = evaluate_subnets(model, subnets, val)
    recal = evaluate_subnets(model, subnets, val, calibration)
    for depths in subnets:
        plan = model.plan_for_depths(depths)
        assert shared.row(depths).top1 == _top1_by_hand(model, plan, val)
        assert recal.row(depths).top1 == _top1_by_hand(model, plan, val, _statistics_by_hand(model, plan, calibration))
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
    assert lines[0] == "depths,blocks,macs,params,top1,top5,pareto,latency_ms,images_per_s" and len(lines) == 28
    assert lines[1].endswith(",,"), "no latency unless measured"
    assert lines[1].startswith("1-1-1,3,")
    macs = [r.macs for r in report.rows]
    assert report.row((3, 3, 3)).macs == max(macs) and report.row((1, 1, 1)).macs == min(macs)
    for depths in ((1, 1, 1), (2, 3, 1), (3, 3, 3)):  # a sub-network's parameters are its standalone model's
        alone = create_model("cifar_resnet20", 10, stage_depths=depths)
        assert report.row(depths).params == sum(p.numel() for p in alone.parameters())


def test_the_pareto_front_and_the_pick_within_a_budget_match_a_brute_force_search():
    from st_scale.evaluate.subnets import SubnetReport, SubnetRow

    g = torch.Generator().manual_seed(0)
    draws = [torch.randint(low, high, (60,), generator=g).tolist() for low, high in ((1, 30), (1, 30), (0, 20), (1, 9))]
    rows = [
        SubnetRow((i,), 1, macs, params, float(top1), 0.0, latency_ms=float(ms))
        for i, (macs, params, top1, ms) in enumerate(zip(*draws))
    ]
    report = SubnetReport(rows, recalibrated=True)
    for cost in ("macs", "params", "latency_ms"):

        def point(r, cost=cost):
            return (getattr(r, cost), r.top1)

        def dominated(r, cost=cost):
            return any(getattr(o, cost) <= getattr(r, cost) and o.top1 >= r.top1 and point(o) != point(r) for o in rows)

        front = report.pareto_front(cost)
        assert {point(r) for r in front} == {point(r) for r in rows if not dominated(r)}, cost
        assert len(front) == len({point(r) for r in front}), "one row per point"
    budgets = [
        (None, None, None),
        (10, None, None),
        (None, 7, None),
        (12, 12, None),
        (0, None, None),
        (None, None, 3.0),
    ]
    most_accurate = max(rows, key=lambda r: (r.top1, -r.macs))
    # budgets that the most accurate row meets exactly: within a budget includes the budget itself
    budgets += [(most_accurate.macs, None, None), (None, most_accurate.params, most_accurate.latency_ms)]
    for max_macs, max_params, max_ms in budgets:
        fits = [
            r
            for r in rows
            if all(
                v is None or getattr(r, c) <= v
                for c, v in (("macs", max_macs), ("params", max_params), ("latency_ms", max_ms))
            )
        ]
        best = report.best_within(max_macs, max_params, max_ms)
        if not fits:
            assert best is None
        else:
            assert best.top1 == max(r.top1 for r in fits)
            assert best.macs == min(r.macs for r in fits if r.top1 == best.top1)
    table = report.to_csv().strip().splitlines()
    on_front = [line.split(",")[0] for line in table[1:] if line.split(",")[6] == "1"]
    assert sorted(on_front) == sorted("-".join(map(str, r.depths)) for r in report.pareto_front())
    assert all(line.split(",")[7] for line in table[1:]) and report.has_latency
    assert report.best_within(most_accurate.macs) is most_accurate
    measured = SubnetReport([SubnetRow((1,), 1, 5, 5, 50.0, 90.0, latency_ms=1.25, images_per_s=812.34)], True)
    assert measured.to_csv().splitlines()[1].split(",")[7:] == ["1.2500", "812.3"]


def test_top1_and_top5_count_where_each_label_ranks_worked_by_hand():
    """Labels ranked 1st and 5th, 6th and 4th, 1st and 1st among ten logits, in batches of two images
    (top-5 is five classes whatever the batch size): top-1 3 of 6, top-5 5 of 6. One image alone: 100%."""
    from st_scale.evaluate.subnets import _Counts

    logits = torch.arange(10, 0, -1).float().repeat(6, 1)  # class 0 ranks first, class 9 last
    labels = torch.tensor([0, 4, 5, 3, 0, 0])
    counts = _Counts()
    for batch in range(3):
        counts.add(logits[2 * batch : 2 * batch + 2], labels[2 * batch : 2 * batch + 2])
    result = counts.result()
    assert (result.top1, result.top5, result.samples) == (50.0, 100.0 * 5 / 6, 6)
    alone = _Counts()
    alone.add(logits[:1], labels[:1])
    assert (alone.result().top1, alone.result().top5, alone.result().samples) == (100.0, 100.0, 1)


def test_one_process_sums_its_own_counts_and_no_image_at_all_is_refused():
    """Out of a process group the sum is the process's own counts, from one image to more than 2^24;
    an evaluation that saw no image has no accuracy to report, not 0%."""
    from st_scale.evaluate.distributed import sum_accuracy
    from st_scale.evaluate.subnets import Accuracy

    cpu = torch.device("cpu")
    for own in (Accuracy(100 / 3, 200 / 3, 3), Accuracy(50.0, 75.0, 400), Accuracy(100.0, 100.0, 1)):
        summed = sum_accuracy(own, cpu)
        assert (summed.top1, summed.top5, summed.samples) == (own.top1, own.top5, own.samples)
    # counted in float64: float32 would lose the last image of a set of more than 2^24
    assert sum_accuracy(Accuracy(100.0, 100.0, 2**24 + 1), cpu).samples == 2**24 + 1
    with pytest.raises(RuntimeError) as refused:
        sum_accuracy(Accuracy(0.0, 0.0, 0), cpu)
    assert str(refused.value) == (
        "the evaluation saw no validation image on any rank: the validation set (data.val) yielded no batch; "
        "give it at least one image"
    )


def test_a_reports_statistics_are_those_of_its_rows_worked_by_hand():
    """Mean, population standard deviation, min, max and count of the rows' top-1, from one row up."""
    from st_scale.evaluate.subnets import SubnetReport, SubnetRow

    def stats(*top1: float) -> dict:
        return SubnetReport([SubnetRow((i + 1,), 1, 1, 1, t, 100.0) for i, t in enumerate(top1)], True).stats

    assert stats(50.0) == {"mean_top1": 50.0, "std_top1": 0.0, "min_top1": 50.0, "max_top1": 50.0, "num_subnets": 1.0}
    assert stats(50.0, 60.0) == {
        "mean_top1": 55.0,
        "std_top1": 5.0,  # sqrt((25 + 25) / 2): over the rows themselves, not a sample's n - 1
        "min_top1": 50.0,
        "max_top1": 60.0,
        "num_subnets": 2.0,
    }
    three = stats(70.0, 50.0, 60.0)
    assert three["std_top1"] == pytest.approx((200 / 3) ** 0.5, rel=1e-12)
    assert (three["mean_top1"], three["min_top1"], three["max_top1"], three["num_subnets"]) == (60.0, 50.0, 70.0, 3.0)


def test_latency_is_the_median_time_of_the_blocks_a_sub_network_runs():
    import time

    from torch import nn

    from st_scale.models import ElasticNet, Segment
    from st_scale.models.complexity import measure_latency_ms

    class Sleeps(nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x

    stem, first, second = Sleeps(0.002), Sleeps(0.004), Sleeps(0.008)
    model = ElasticNet(
        "sleeps", nn.Sequential(stem, first, second), [Segment([stem]), Segment([first, second], 0)], lambda b: b
    )
    x = torch.zeros(1, 3, 4, 4)
    short, long = measure_latency_ms(model, (1,), x), measure_latency_ms(model, (2,), x)
    assert 6 <= short < 6 + 10 and 14 <= long < 14 + 10, (short, long)
    assert long - short == pytest.approx(8, abs=5)


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
    intact = by_test["intact"][0]
    assert (intact.damage, intact.detail) == (0, "")
    assert {r.damage for r in by_test["delete_one"]} == {1}
    assert {r.damage for r in by_test["swap_adjacent"]} == {1}  # one swap
    assert [r.damage for r in by_test["delete_k"]] == [1, 1, 2, 2, 3, 3]
    again = destruction_tests(model, val, val, max_deleted=3, trials=2)
    assert [r.detail for r in again] == [r.detail for r in rows]  # seeded: the same random deletions
    other = destruction_tests(model, val, val, max_deleted=3, trials=2, seed=1)
    assert [r.detail for r in other if r.test == "delete_k"] != [r.detail for r in by_test["delete_k"]]
    summary = summarise_destruction(rows)
    assert summary["intact/0"] == evaluate_main(model, val, val).top1
    # Deleting block 2 of stage 0 is the sub-network (2, 3, 3).
    deleted = next(r for r in by_test["delete_one"] if r.detail == "stage0.block2")
    assert deleted.top1 == evaluate_plan(model, model.plan_for_depths((2, 3, 3)), val, val).top1
    by_default = destruction_tests(model, val, val)  # five seeded draws of each k = 1..4 by default
    random_deletions = [r for r in by_default if r.test == "delete_k"]
    assert [r.damage for r in random_deletions] == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
    for r in random_deletions:  # k distinct blocks, each named
        named = r.detail.split(",")
        assert len(set(named)) == r.damage and all(re.fullmatch(r"stage[0-2]\.block[12]", n) for n in named), r


def test_destruction_tests_of_a_densenet_delete_layers_and_keep_their_order():
    model = create_model("cifar_densenet40", 10)
    perturb_bn(model, 16)
    val = random_batches(1, 8, 16)
    rows = destruction_tests(model, val, val, max_deleted=2, trials=1)
    tests = {r.test for r in rows}
    assert tests == {"intact", "delete_one", "delete_k"}  # dense layers widen their input: no swaps
    assert {r.detail for r in rows if r.test == "delete_one"} == {
        f"stage{s}.block{i}" for s in range(3) for i in range(1, 6)
    }
    # Deleting the last layer of a block is the sub-network without it (the transition reads fewer channels).
    deleted = next(r for r in rows if r.detail == "stage1.block5")
    assert deleted.top1 == evaluate_plan(model, model.plan_for_depths((6, 5, 6)), val, val).top1


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_an_evaluation_pass_leaves_the_model_and_its_shared_figures_describe_the_same_statistics():
    """Both shared-statistics figures (main net and sub-nets) use the running statistics training
    left, measured independently on an untouched copy; the model's buffers are unchanged."""
    import copy

    from st_scale.evaluate.passes import SHARED, main_metrics, subnet_metrics, subnet_reports

    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    model.eval()
    reference = copy.deepcopy(model)
    val, calibration = random_batches(2, 16, 16, seed=1), random_batches(2, 16, 16, seed=2)
    before = _state(model)
    subnets = [(1, 1, 1), (2, 3, 1), (3, 3, 3)]
    main = main_metrics(model, lambda: val, calibration, torch.device("cpu"), prefix="val", shared_stats=True)
    reports = subnet_reports(model, subnets, lambda: val, calibration, shared_stats=True)
    metrics = subnet_metrics("val", reports)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert main[f"val/main_top1{SHARED}"] == evaluate_main(reference, val).top1
    shared_rows = {d: evaluate_plan(reference, reference.plan_for_depths(d), val).top1 for d in subnets}
    assert [r.top1 for r in reports[SHARED].rows] == [shared_rows[d] for d in sorted(subnets)]
    assert reports[SHARED].row((3, 3, 3)).top1 == main[f"val/main_top1{SHARED}"]
    assert metrics[f"val/subnets_mean_top1{SHARED}"] == pytest.approx(sum(shared_rows.values()) / 3)
    assert main["val/main_top1"] == evaluate_main(reference, val, calibration).top1
    assert reports[""].row((3, 3, 3)).top1 == main["val/main_top1"]


def test_each_sub_network_is_timed_on_one_image_and_on_the_first_validation_batch(monkeypatch):
    """With `latency`, every sub-network's row (on either statistics) carries the median time of one
    image through that sub-network and the throughput of the first validation batch (1 warm-up, 3
    timed forwards); the timer is a recorder here, so each figure is known exactly."""
    import st_scale.evaluate.passes as passes

    calls = []

    def timer(timed_model, depths, images, *, warmup=2, repeats=5):
        assert timed_model is model
        calls.append((depths, len(images), warmup, repeats))
        return 2.0 * len(images) + sum(depths)

    monkeypatch.setattr(passes, "measure_latency_ms", timer)
    model = create_model("cifar_resnet20", 10)
    model.eval()
    val, calibration = random_batches(2, 16, 16, seed=1), random_batches(1, 16, 16, seed=2)
    subnets = [[2, 3, 1], (1, 1, 1)]  # as a user writes them: checked into tuples
    reports = passes.subnet_reports(model, subnets, lambda: val, calibration, shared_stats=True, latency=True)
    assert calls == [((2, 3, 1), 1, 2, 5), ((2, 3, 1), 16, 1, 3), ((1, 1, 1), 1, 2, 5), ((1, 1, 1), 16, 1, 3)]
    for report in reports.values():
        for depths in ((2, 3, 1), (1, 1, 1)):
            row = report.row(depths)
            assert row.latency_ms == 2.0 + sum(depths)
            assert row.images_per_s == 1000 * 16 / (32.0 + sum(depths))
    calls.clear()
    untimed = passes.subnet_reports(model, subnets, lambda: val, calibration, shared_stats=False)
    assert calls == [] and untimed[""].row((1, 1, 1)).latency_ms is None


@pytest.mark.parametrize(
    "limit, sizes", [(None, [4, 4, 3]), (6, [4, 2]), (8, [4, 4]), (11, [4, 4, 3]), (50, [4, 4, 3]), (0, [])]
)
def test_the_destruction_tests_images_are_the_first_ones_up_to_the_limit_and_copied(limit, sizes):
    """`eval.destruction_images`: the first `limit` validation images, whole batches then part of one,
    copied (FFCV reuses its batch buffers for the next batches)."""
    from st_scale.evaluate.passes import first_images

    batches = [
        (torch.arange(n * 2.0).reshape(n, 2) + 100 * i, torch.arange(n) + 10 * i) for i, n in enumerate([4, 4, 3])
    ]
    kept = first_images(iter(batches), limit)
    assert [len(y) for _, y in kept] == sizes
    for (x, y), (x0, y0), n in zip(kept, batches, sizes):
        assert torch.equal(x, x0[:n]) and torch.equal(y, y0[:n])
    for x0, y0 in batches:
        x0.fill_(-1), y0.fill_(-1)
    assert all((x >= 0).all() and (y >= 0).all() for x, y in kept), "a kept batch shares its loader's buffer"


def test_figures_of_the_other_calibration_protocol_carry_its_suffix_but_the_count_does_not():
    from st_scale.evaluate.passes import calibration_suffix, with_suffix

    metrics = {"val/main_top1": 90.0, "val/subnets_mean_top1": 80.0, "val/num_subnets": 27}
    assert with_suffix(metrics, calibration_suffix("train")) == {
        "val/main_top1_calib_train": 90.0,
        "val/subnets_mean_top1_calib_train": 80.0,
        "val/num_subnets": 27,
    }


def test_one_evaluation_measures_each_network_as_its_parts_do_and_leaves_the_model():
    """`evaluate`, the pass of training's epochs and of `st-scale eval`: the main net, the weights'
    average on statistics re-estimated for it, the sub-networks, the other calibration protocol and
    the destruction tests, each the figure its own part computes; the model's weights and buffers
    are as they were."""
    from st_scale.evaluate.passes import EvalData, EvalOptions, evaluate

    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    model.eval()
    val, calibration, other = (random_batches(2, 16, 16, seed=s) for s in (1, 2, 3))
    average = {name: p.detach() + 0.5 * torch.randn_like(p) for name, p in model.named_parameters()}
    before = _state(model)
    data = EvalData(lambda: val, lambda: val, calibration, torch.device("cpu"), other, "_calib_train")
    options = EvalOptions("eval", shared_stats=True, subnets=[(1, 1, 1), (3, 3, 3)], destruction=True)
    result = evaluate(model, data, options, averaged=average)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    m = result.metrics
    assert m["eval/main_top1"] == evaluate_main(model, val, calibration).top1
    assert m["eval/main_top1_shared_stats"] == evaluate_main(model, val).top1
    assert m["eval/main_top1_calib_train"] == evaluate_main(model, val, other).top1
    assert m["eval/subnets_min_top1_calib_train"] == result.reports["_calib_train"].stats["min_top1"]
    assert set(result.reports) == {"", "_shared_stats", "_calib_train"} and result.other_suffix == "_calib_train"
    averaged = create_model("cifar_resnet20", 10)
    averaged.load_state_dict(model.state_dict())
    averaged.load_state_dict(average, strict=False)
    assert m["eval/ema/main_top1"] == evaluate_main(averaged.eval(), val, calibration).top1
    assert m["eval/destruction/intact/0"] == m["eval/main_top1"] and len(result.destruction) > 0
    # Without re-estimated statistics the average is not measured: its weights have none of their own.
    plain = evaluate(model, EvalData(lambda: val, lambda: val, None, torch.device("cpu")), options, averaged=average)
    assert "eval/ema/main_top1" not in plain.metrics and "eval/main_top1_calib_train" not in plain.metrics


def test_destruction_is_reported_with_and_without_reestimation():
    from st_scale.evaluate.passes import destruction_metrics, run_destruction
    from st_scale.evaluate.subnets import RECALIBRATED, SHARED_STATS, destruction_csv

    model = create_model("cifar_resnet20", 10)
    perturb_bn(model, 16)
    val, calibration = random_batches(1, 16, 16, seed=1), random_batches(2, 16, 16, seed=2)
    rows = run_destruction(model, val, calibration)
    shared = [r for r in rows if r.statistics == SHARED_STATS]
    recal = [r for r in rows if r.statistics == RECALIBRATED]
    assert len(shared) == len(recal) and len(rows) == 2 * len(shared)
    deleted = next(r for r in shared if r.detail == "stage1.block1")  # keeps blocks 0 and 2 of stage 1
    plan = tuple((0, 1, 2) if s != 1 else (0, 2) for s in range(3))
    assert deleted.top1 == evaluate_plan(model, plan, val).top1  # no re-estimation: the damage as it is
    assert (
        next(r for r in recal if r.detail == "stage1.block1").top1 == evaluate_plan(model, plan, val, calibration).top1
    )
    summary = destruction_metrics("eval", rows)
    assert summary["eval/destruction/intact/0_shared_stats"] == evaluate_main(model, val).top1
    assert summary["eval/destruction/intact/0"] == evaluate_main(model, val, calibration).top1
    lines = destruction_csv(rows).splitlines()
    assert lines[0] == "test,damage,detail,statistics,top1" and len(lines) == len(rows) + 1


def test_bn_reestimation_and_the_tree_walk_record_no_autograd_graph():
    """Both run under no_grad: a calibration pass that kept the graph would hold every activation."""
    model = create_model("cifar_resnet20", 10)
    seen = []
    model.net.layer3[2].register_forward_hook(lambda module, inputs, output: seen.append(output.requires_grad))
    batches = random_batches(2, 8, 16)
    recalibrate_bn(model, model.plan_for_depths(None), batches)
    evaluate_subnets(model, [(3, 3, 3)], batches, batches)
    assert seen and not any(seen)
