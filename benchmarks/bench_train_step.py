"""Training-step cost of ST vs CT in one process: time and activation memory, with and without
prefix sharing, next to the MAC estimate.

    python benchmarks/bench_train_step.py [--model cifar_resnet56 --batch-size 128 --image-size 32]

Memory is the bytes autograd keeps for the backward pass (saved activations, counted once per
storage): the part of peak memory that differs between the objectives; parameters, gradients and
optimizer state are the same for all and reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from st_scale.methods import build_objective
from st_scale.models import create_model
from st_scale.models.complexity import MacCounter
from st_scale.provenance import provenance, write_raw
from st_scale.sampling import SubnetSampler, SubnetSpace
from st_scale.train.memory import SavedTensorBytes


def expected_subnet_macs(model, sampler, counter, shared: bool) -> float:
    """E[MACs a sub-net pass adds], over the sampler's distribution."""
    full = model.full_depths
    total = 0.0
    for depths in sampler.space:
        p = sampler.probability(depths)
        if not shared:
            total += p * counter.subnet_macs(depths)
            continue
        stage = next((s for s, (d, n) in enumerate(zip(depths, full)) if d < n), None)
        if stage is None:
            continue
        # The shared prefix (stem, earlier stages, first d blocks of the diverging stage) is not rerun.
        total += p * (counter.subnet_macs(depths) - _prefix_macs(model, counter, depths, stage))
    return total


def _prefix_macs(model, counter, depths, stage) -> int:
    macs = 0
    for seg_index, segment in enumerate(model.segments):
        if segment.stage is None:
            macs += sum(counter.block_macs[(seg_index, j)] for j in range(len(segment.blocks)))
        elif segment.stage < stage:
            macs += sum(counter.block_macs[(seg_index, j)] for j in range(len(segment.blocks)))
        elif segment.stage == stage:
            macs += sum(counter.block_macs[(seg_index, j)] for j in range(depths[stage]))
            return macs
    return macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON raw file, with their provenance")
    args = parser.parse_args()
    started = provenance()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = create_model(args.model, 10).train()
    space = SubnetSpace.full(model.stage_sizes)
    sampler = SubnetSampler(space, seed=0)
    variants = {
        "CT": build_objective("ct", model),
        "ST shared prefix": build_objective("st", model, sampler, share_prefix=True),
        "ST unshared": build_objective("st", model, sampler, share_prefix=False),
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))

    def step(objective, global_step: int) -> tuple[float, int]:
        start = time.perf_counter()
        with SavedTensorBytes() as saved:
            loss = objective(model, images, labels, global_step).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start, saved.total

    times = {name: [] for name in variants}
    memory = {name: [] for name in variants}
    # Round-robin over variants, same global steps (so the same sub-nets) for both ST variants.
    for i in range(args.steps + 2):
        for name, objective in variants.items():
            seconds, saved = step(objective, i)
            if i >= 2:
                times[name].append(seconds)
                memory[name].append(saved)

    counter = MacCounter(model, args.image_size)
    main_macs = counter.subnet_macs(model.full_depths)
    estimate = {
        "CT": 1.0,
        "ST shared prefix": 1 + expected_subnet_macs(model, sampler, counter, True) / main_macs,
        "ST unshared": 1 + expected_subnet_macs(model, sampler, counter, False) / main_macs,
    }
    memory = {name: statistics.fmean(values) for name, values in memory.items()}
    ct_time, ct_mem = statistics.median(times["CT"]), memory["CT"]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
        f"median time and mean saved activations of {args.steps} steps; parameters {params / 2**20:.1f} MiB "
        f"(+ as much again for grads and momentum)"
    )
    print("| objective | step time (s) | time / CT | MAC estimate / CT | saved activations (MiB) | memory / CT |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        print(
            f"| {name} | {t:.3f} | {t / ct_time:.2f}x | {estimate[name]:.2f}x | "
            f"{memory[name] / 2**20:.0f} | {memory[name] / ct_mem:.2f}x |"
        )
        rows.append(
            {"objective": name, "step_s": times[name], "median_step_s": t, "time_over_ct": t / ct_time}
            | {
                "mac_estimate_over_ct": estimate[name],
                "saved_bytes": memory[name],
                "memory_over_ct": memory[name] / ct_mem,
            }
        )
    if args.out:
        figures = {"parameter_bytes": params, "objectives": rows}
        write_raw(args.out, started, {"args": vars(args)} | figures)


if __name__ == "__main__":
    main()
