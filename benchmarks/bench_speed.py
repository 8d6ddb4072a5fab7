"""Training-step speed of the switches that change speed only: memory layout (NCHW, channels_last),
compiled blocks, and the cheaper-ST options, in one process.

    python benchmarks/bench_speed.py [--model cifar_resnet56 --batch-size 128 --image-size 32 --steps 8]

Each variant has its own copy of the same initial weights and its own fused SGD; the variants run
interleaved step by step (the same global steps, so the same sampled sub-networks), and the table
gives the mean step time (forward, backward and optimizer step), its ratio to eager NCHW CT, and
the saved activations of the step (autograd's saved tensors, distinct storages). Compiled variants
compile during the warm-up steps; the compile time is reported apart.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from st_scale.methods import build_objective
from st_scale.models import create_model
from st_scale.models.regional_compile import compile_blocks
from st_scale.provenance import provenance, write_raw
from st_scale.sampling import SubnetSampler, SubnetSpace
from st_scale.train.memory import SavedTensorBytes

LAYOUTS = {
    "eager NCHW": (torch.contiguous_format, False),
    "eager channels_last": (torch.channels_last, False),
    "compiled NCHW": (torch.contiguous_format, True),
    "compiled channels_last": (torch.channels_last, True),
}
ST_OPTIONS = {
    "ST, subnet_batch_fraction 0.5": {"subnet_batch_fraction": 0.5},
    "ST, subnet_batch_fraction 0.25": {"subnet_batch_fraction": 0.25},
    "ST, small_inputs (ST++)": {"small_inputs": True},
    "ST, subnet_every 2": {"subnet_every": 2},
    "ST, subnet_every 3": {"subnet_every": 3},
    "ST, subnet_every 4": {"subnet_every": 4},
}


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    objective: torch.nn.Module
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer = None
    times: list[float] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)
    warmup_s: float = 0.0

    def __post_init__(self):
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9, fused=True)

    def step(self, images, labels, global_step: int) -> tuple[float, int]:
        images = images.contiguous(memory_format=self.memory_format)
        start = time.perf_counter()
        with SavedTensorBytes() as saved:
            loss = self.objective(self.model, images, labels, global_step).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start, saved.total


def build_variants(args) -> list[Variant]:
    torch.manual_seed(0)
    base = create_model(args.model, 10).train()
    sampler = SubnetSampler(SubnetSpace.full(base.stage_sizes), seed=0)
    variants = []
    for layout, (memory_format, compiled) in LAYOUTS.items():
        if compiled and args.no_compile:
            continue
        for method in ("CT", "ST"):
            model = copy.deepcopy(base)  # as in training: the batches carry the layout, the weights stay contiguous
            if compiled:
                compile_blocks(model)
            objective = build_objective(method.lower(), model, sampler if method == "ST" else None)
            variants.append(Variant(f"{method}, {layout}", model, objective, memory_format))
    for name, options in ST_OPTIONS.items():
        model = copy.deepcopy(base)
        objective = build_objective("st", model, sampler, **options)
        variants.append(Variant(f"{name}, eager NCHW", model, objective, torch.contiguous_format))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--steps",
        type=int,
        default=12,
        help="timed steps per variant; a multiple of 12 covers whole periods of subnet_every 2, 3 and 4",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiled variants compile here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variants")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON raw file, with their provenance")
    args = parser.parse_args()
    started = provenance()
    torch.set_num_threads(args.threads)

    variants = build_variants(args)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g)
    for i in range(args.warmup + args.steps):
        for variant in variants:
            seconds, saved = variant.step(images, labels, i)
            if i < args.warmup:
                variant.warmup_s += seconds
            else:
                variant.times.append(seconds)
                variant.saved.append(saved)
        print(f"step {i + 1}/{args.warmup + args.steps} done", flush=True)

    reference = next(v for v in variants if v.name == "CT, eager NCHW")
    # The mean, not the median: with subnet_every k only every k-th step has sub-network passes.
    ct_time, ct_saved = statistics.fmean(reference.times), statistics.fmean(reference.saved)
    st_time = statistics.fmean(next(v for v in variants if v.name == "ST, eager NCHW").times)
    print(
        f"\n{args.model}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
        f"mean of {args.steps} steps after {args.warmup} warm-up steps, torch {torch.__version__}"
    )
    print(
        "| variant | step time (s) | time / eager NCHW CT | time / same-layout CT | saved activations / CT "
        "| warm-up (s) |"
    )
    print("|---|---|---|---|---|---|")
    by_name = {v.name: v for v in variants}
    rows = []
    for v in variants:
        t = statistics.fmean(v.times)
        layout = v.name.split(", ")[-1]
        same_ct = statistics.fmean(by_name[f"CT, {layout}"].times)
        saved = statistics.fmean(v.saved) / ct_saved
        print(f"| {v.name} | {t:.3f} | {t / ct_time:.2f}x | {t / same_ct:.2f}x | {saved:.2f}x | {v.warmup_s:.1f} |")
        rows.append(
            {"variant": v.name, "step_s": v.times, "warmup_s": v.warmup_s, "saved_bytes": v.saved}
            | {"mean_step_s": t, "time_over_ct": t / ct_time, "time_over_same_layout_ct": t / same_ct}
        )
    print(f"\nST / CT, eager NCHW: {st_time / ct_time:.2f}x")
    if args.out:
        write_raw(args.out, started, {"args": vars(args), "variants": rows})


if __name__ == "__main__":
    main()
