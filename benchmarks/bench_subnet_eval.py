"""All-sub-network evaluation with per-network BN re-estimation: tree walk vs one network at a time.

    python benchmarks/bench_subnet_eval.py [--model cifar_resnet56 --image-size 32] [--images 128]

Both paths see the same calibration and validation images (random, since only time matters here;
tests/test_evaluation.py checks that the two give identical logits).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from st_scale.evaluate.subnets import evaluate_subnets, evaluate_subnets_naive
from st_scale.models import create_model
from st_scale.provenance import provenance, write_raw
from st_scale.sampling import SubnetSpace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="calibration images, and as many validation images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON raw file, with their provenance")
    args = parser.parse_args()
    started = provenance()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = create_model(args.model, 10)
    subnets = list(SubnetSpace.full(model.stage_sizes))
    g = torch.Generator().manual_seed(0)

    def batches():
        out, left = [], args.images
        while left > 0:
            n = min(args.batch_size, left)
            out.append(
                (
                    torch.randn(n, 3, args.image_size, args.image_size, generator=g),
                    torch.randint(0, 10, (n,), generator=g),
                )
            )
            left -= n
        return out

    calibration, val = batches(), batches()
    start = time.perf_counter()
    tree = evaluate_subnets(model, subnets, val, calibration)
    tree_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = evaluate_subnets_naive(model, subnets, val, calibration)
    naive_s = time.perf_counter() - start
    same = [r.top1 for r in tree.rows] == [r.top1 for r in naive.rows]
    print(
        f"{args.model} ({len(subnets)} sub-nets, {args.image_size} px, {args.images} calibration + "
        f"{args.images} val images, {args.threads} threads): tree {tree_s:.1f} s, naive {naive_s:.1f} s, "
        f"speed-up {naive_s / tree_s:.1f}x (identical results: {same})"
    )
    if args.out:
        figures = {"subnets": len(subnets), "tree_s": tree_s, "naive_s": naive_s, "identical_results": same}
        write_raw(args.out, started, {"args": vars(args)} | figures)


if __name__ == "__main__":
    main()
