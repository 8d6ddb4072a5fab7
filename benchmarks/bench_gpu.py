"""GPU check: bf16 DeepSpeed on NCCL, the FFCV GPU pipeline, and images/s of CT vs ST on ResNet-50.

    python benchmarks/bench_gpu.py --out results/ [--batch-size 256 --steps 30 --images 4096]

One process, world size 1 (NCCL). Writes a small ImageNet-like JPEG ImageFolder, converts it with
`st-scale convert`'s code, then measures: (1) FFCV loading + on-GPU normalisation alone, (2) training
steps of CT, ST with prefix sharing and ST without, on a fixed on-GPU batch (model-bound), (3) ST fed
by the FFCV loader (end to end). On a machine without CUDA it runs the same code on the CPU with gloo
(for checking the script, not for numbers).
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
    from st_scale.data.loaders import BatchPreparer
    from st_scale.engine import build_engine, resolve_ds_config, set_lr
    from st_scale.train_loop import build_model_and_objective

    torch.manual_seed(0)
    model, _, objective = build_model_and_objective(cfg)
    engine = build_engine(model, objective, cfg, resolve_ds_config(cfg))
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    batch = cfg.data.batch_size
    fixed_x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device).to(dtype)
    fixed_y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    preparer = BatchPreparer(cfg.data, device, dtype, 0, 0)

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
    for step in range(warmup + steps):
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
    result = {
        "images_per_s": batch * len(times) / sum(times),
        "median_step_s": statistics.median(times),
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
    args = parser.parse_args()

    from st_scale.config import load_config
    from st_scale.data.commands import convert

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    init_process_group(cuda)
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
    if cuda:
        common += ["scaling.gpus_per_worker=1", "deepspeed.config=zero1_bf16.json"]
    else:
        common += ["deepspeed.config=cpu_fp32.json", "scaling.gpus_per_worker=0"]
    cfg = load_config("imagenet_resnet50_st", common)
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

    variants = {
        "ct": ["method.name=ct"],
        "st_shared": ["method.name=st", "method.share_prefix=true"],
        "st_unshared": ["method.name=st", "method.share_prefix=false"],
    }
    report["train"] = {}
    for name, extra in variants.items():
        report["train"][name] = train_throughput(
            load_config("imagenet_resnet50_st", common + extra), device, args.steps, args.warmup
        )
        print(name, report["train"][name], flush=True)
    if loader is not None:
        report["train"]["st_shared_ffcv_fed"] = train_throughput(
            load_config("imagenet_resnet50_st", common + variants["st_shared"]), device, args.steps, args.warmup, loader
        )
        print("st_shared fed by ffcv", report["train"]["st_shared_ffcv_fed"], flush=True)
    ct = report["train"]["ct"]["images_per_s"]
    report["st_time_ratio_shared"] = round(ct / report["train"]["st_shared"]["images_per_s"], 3)
    report["st_time_ratio_unshared"] = round(ct / report["train"]["st_unshared"]["images_per_s"], 3)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
