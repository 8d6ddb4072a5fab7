"""The paper's effect on real data (scikit-learn's digits): ST removes sub-network loafing.

CIFAR ResNet-20 at 16 px, 5 epochs each. Evaluated with per-network BN re-estimation, CT's
sub-networks are far worse than its main net, ST's are almost as good as it.
"""

import math

import pytest
import torch

from st_scale.data.digits import load_digits_splits, to_batches
from st_scale.evaluate.subnets import evaluate_main, evaluate_subnets
from st_scale.methods import build_objective
from st_scale.models import create_model
from st_scale.sampling import SubnetSampler, SubnetSpace

EPOCHS, BATCH, LR = 5, 64, 0.1


def _train(method: str):
    torch.manual_seed(0)
    train, val = load_digits_splits(image_size=16)
    model = create_model("cifar_resnet20", 10)
    space = SubnetSpace.full(model.stage_sizes)
    objective = build_objective(method, model, SubnetSampler(space, seed=0) if method == "st" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = EPOCHS * math.ceil(len(train.labels) / BATCH)
    step = 0
    model.train()
    for epoch in range(EPOCHS):
        for images, labels in to_batches(train, BATCH, shuffle_seed=epoch):
            for group in optimizer.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = objective(model, images, labels, step).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    calibration = to_batches(train, 128)[:4]
    val_batches = to_batches(val, 256)
    main = evaluate_main(model, val_batches, calibration).top1
    report = evaluate_subnets(model, list(space), val_batches, calibration)
    return main, report.stats


@pytest.mark.slow
def test_st_lifts_every_subnetwork_and_keeps_the_main_net():
    ct_main, ct = _train("ct")
    st_main, st = _train("st")
    assert ct_main > 95 and st_main > 95
    assert st["mean_top1"] > ct["mean_top1"] + 5
    assert st["std_top1"] < 0.5 * ct["std_top1"]
    assert st["min_top1"] > ct["min_top1"] + 10
