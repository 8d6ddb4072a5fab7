"""GPU check: bf16 DeepSpeed on NCCL, the FFCV GPU pipeline, and images/s of CT vs ST on ResNet-50
for each speed switch.

    python benchmarks/bench_gpu.py --out results/ [--batch-size 256 --steps 30 --images 4096]

One process, world size 1 (NCCL). Writes a small ImageNet-like JPEG ImageFolder, converts it with
`st-scale convert`'s code, then measures: (1) FFCV loading + on-GPU normalisation alone, (2) training
steps on a fixed on-GPU batch (model-bound) for every combination of precision (`zero1_bf16`: the
model cast to bf16; `zero1_autocast_bf16`: fp32 weights, bf16 compute), layout and compilation (eager
NCHW, eager channels_last, compiled blocks in channels_last) and objective (CT, ST with prefix sharing,
ST with its sub-network passes on half the batch), with images/s and model FLOPs utilisation against
the card's dense bf16 peak, (3) CT and ST fed by the FFCV loader in the fastest setting (end to end).
On a machine without CUDA it runs the same code on the CPU with gloo and fp32 (for checking the
script, not for numbers); `--quick` runs a few variants only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def write_image_folder(root: Path, images: int, classes: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(images):
        split = "val" if (i // classes) % 8 == 0 else "train"
        folder = root / split / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(1, 6, 3)
        phase = rng.uniform(0, 6.3, 3)
        pixels = np.stack([np.sin(2 * np.pi * f[c] * (x + y * (c + 1) / 3) + phase[c]) for c in range(3)], -1)
        pixels = ((pixels + 1) * 127.5 + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def init_process_group(cuda: bool) -> None:
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29517"),
    ):
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_throughput(cfg, device, epochs: int) -> float:
    from st_scale.data.loaders import BatchPreparer, train_loader

    loader = train_loader(
        cfg.data,
        batch_size=cfg.data.batch_size,
        seed=0,
        num_workers=cfg.data.num_workers,
        device=device,
        distributed=False,
    )
    preparer = BatchPreparer(cfg.data, device, torch.bfloat16 if device.type == "cuda" else torch.float32, 0, 0)
    for images, _ in loader:  # first pass compiles the pipeline
        preparer.train(images, 0)
    sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for step, (images, _) in enumerate(loader):
            preparer.train(images, step)
            seen += images.shape[0]
    sync(device)
    return seen / (time.perf_counter() - start)


def train_throughput(cfg, device, steps: int, warmup: int, loader=None) -> dict:
    from st_scale.assembly import build_model_and_objective, speed_up
    from st_scale.data.loaders import BatchPreparer, memory_format
    from st_scale.models.utilisation import mfu, peak_bf16_flops, training_flops_per_image
    from st_scale.train.engine import build_engine, resolve_ds_config, set_lr

    torch.manual_seed(0)
    model, _, objective = build_model_and_objective(cfg)
    flops_per_image = training_flops_per_image(model, cfg.data.image_size)
    speed_up(model, cfg)
    engine = build_engine(model, objective, cfg, resolve_ds_config(cfg))
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    layout = memory_format(cfg.model)
    batch = cfg.data.batch_size
    fixed_x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device).to(dtype)
    fixed_x = fixed_x.contiguous(memory_format=layout)
    fixed_y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    preparer = BatchPreparer(cfg.data, device, dtype, 0, 0, memory_format=layout)

    def batches():
        if loader is None:
            while True:
                yield fixed_x, fixed_y
        while True:
            for images, labels in loader:
                yield preparer.train(images, 0), labels.long()

    engine.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    source = batches()
    warmup_started = time.perf_counter()
    warmup_s = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            warmup_s = time.perf_counter() - warmup_started
        x, y = next(source)
        sync(device)
        start = time.perf_counter()
        set_lr(engine, 0.01)
        loss, _, _ = engine(x, y, step)
        engine.backward(loss)
        engine.step()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    images_per_s = batch * len(times) / sum(times)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {
        "images_per_s": images_per_s,
        "mfu": mfu(images_per_s, flops_per_image, peak) if peak else None,
        "median_step_s": statistics.median(times),
        "warmup_s": round(warmup_s, 1),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "bf16": engine.bfloat16_enabled(),
        "zero_stage": engine.zero_optimization_stage(),
    }
    del engine, model, objective
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4096, help="JPEGs in the synthetic ImageFolder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="a few variants only (checking the script)")
    args = parser.parse_args()

    from st_scale.config import load_config
    from st_scale.data.commands import convert
    from st_scale.provenance import provenance, write_raw

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    init_process_group(cuda)
    started = provenance()
    report: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "model": args.model,
    }
    import deepspeed

    report["deepspeed"] = deepspeed.__version__
    report["backend"] = torch.distributed.get_backend()

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "st_scale_gpu_bench"
    common = [
        f"data.train={work / 'beton' / 'train.beton'}",
        f"data.val={work / 'beton' / 'val.beton'}",
        f"data.batch_size={args.batch_size}",
        f"data.image_size={args.image_size}",
        f"data.num_workers={args.workers}",
        f"model.name={args.model}",
        "scaling.num_workers=1",
        "run.name=bench",
    ]
    common += ["scaling.gpus_per_worker=1"] if cuda else ["scaling.gpus_per_worker=0"]
    precisions = (
        {"bf16_cast": "deepspeed.config=zero1_bf16.json", "autocast": "deepspeed.config=zero1_autocast_bf16.json"}
        if cuda
        else {"fp32": "deepspeed.config=cpu_fp32.json"}
    )
    cfg = load_config("imagenet_resnet50_st", common + [next(iter(precisions.values()))])
    loader = None
    try:  # FFCV is measured when it imports; the model-bound numbers do not depend on it
        from st_scale.data.loaders import train_loader

        start = time.perf_counter()
        write_image_folder(work / "images", args.images, classes=10, size=320)
        convert(
            "imagefolder",
            str(work / "images"),
            work / "beton",
            write_mode="jpg",
            max_resolution=256,
            workers=args.workers,
            quiet=True,
        )
        report["dataset_prep_s"] = round(time.perf_counter() - start, 1)
        report["ffcv_loader_images_per_s"] = round(loader_throughput(cfg, device, epochs=2), 1)
        print("ffcv loader:", report["ffcv_loader_images_per_s"], "images/s", flush=True)
        loader = train_loader(
            cfg.data, batch_size=args.batch_size, seed=0, num_workers=args.workers, device=device, distributed=False
        )
    except Exception as error:  # noqa: BLE001  (reported, not hidden)
        report["ffcv_error"] = f"{type(error).__name__}: {error}"
        print("FFCV part failed:", report["ffcv_error"], flush=True)

    layouts = {
        "eager_nchw": ["model.channels_last=false", "model.compile=false"],
        "eager_channels_last": ["model.channels_last=true", "model.compile=false"],
        "compiled_channels_last": ["model.channels_last=true", "model.compile=true"],
    }
    objectives = {
        "ct": ["method.name=ct"],
        "st": ["method.name=st", "method.share_prefix=true"],
        "st_half_batch": ["method.name=st", "method.subnet_batch_fraction=0.5"],
    }
    if args.quick:
        layouts = {k: layouts[k] for k in ("eager_nchw", "eager_channels_last")}
    report["train"] = {}
    for precision, ds in precisions.items():
        for layout, layout_set in layouts.items():
            for objective, objective_set in objectives.items():
                name = f"{precision}/{layout}/{objective}"
                cfg_v = load_config("imagenet_resnet50_st", common + [ds] + layout_set + objective_set)
                report["train"][name] = train_throughput(cfg_v, device, args.steps, args.warmup)
                print(name, report["train"][name], flush=True)
    best = max((n for n in report["train"] if n.endswith("/ct")), key=lambda n: report["train"][n]["images_per_s"])
    report["fastest_ct"] = best
    setting = best.removesuffix("/ct")
    for n in report["train"]:
        if n.startswith(setting + "/") and not n.endswith("/ct"):
            ct = report["train"][best]["images_per_s"]
            report[f"st_time_ratio/{n}"] = round(ct / report["train"][n]["images_per_s"], 3)
    if loader is not None:  # end to end in the fastest setting
        precision, layout = setting.split("/")
        for objective in ("ct", "st"):
            cfg_v = load_config(
                "imagenet_resnet50_st", common + [precisions[precision]] + layouts[layout] + objectives[objective]
            )
            report["train"][f"{setting}/{objective}/ffcv_fed"] = train_throughput(
                cfg_v, device, args.steps, args.warmup, loader
            )
            print(f"{setting}/{objective} fed by ffcv", report["train"][f"{setting}/{objective}/ffcv_fed"], flush=True)
    write_raw(out / "gpu_bench.json", started, report)
    print(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
