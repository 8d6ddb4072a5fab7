"""`st-scale convert`: pick the source, validate it, write train/val .beton files with sidecars."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .convert import WriteOptions, cifar_source, digits_source, fashion_mnist_source, imagefolder_source, write_beton


def convert(
    source: str,
    path: str | None,
    out: Path,
    *,
    write_mode: str | None = None,
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    workers: int = 2,
    image_size: int = 32,
    validate: bool = True,
    train_subset: int | None = None,
    val_subset: int | None = None,
    subset_seed: int = 0,
    quiet: bool = False,
) -> dict[str, dict]:
    from tqdm import tqdm

    if source in ("cifar", "imagefolder") and not path:
        raise ConfigError(f"convert {source}: give the source folder")
    try:
        if source == "digits":
            splits = digits_source(image_size)
        elif source == "fashion-mnist":
            splits = fashion_mnist_source(path, train_subset=train_subset, val_subset=val_subset, seed=subset_seed)
        elif source == "cifar":
            splits = cifar_source(Path(path).expanduser())
        else:
            splits = imagefolder_source(
                Path(path).expanduser(),
                validate=validate,
                progress=lambda items: tqdm(items, desc="checking images", disable=quiet),
            )
        options = WriteOptions(
            write_mode=write_mode or ("proportion" if source == "imagefolder" else "raw"),
            max_resolution=max_resolution,
            jpeg_quality=jpeg_quality,
            num_workers=workers,
        )
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"convert {source}: {error}") from None
    if source != "fashion-mnist" and (train_subset or val_subset):
        raise ConfigError(f"convert {source}: --train-subset/--val-subset apply to fashion-mnist only")
    written = {}
    for split, (dataset, metadata) in splits.items():
        target = out / f"{split}.beton"
        if not quiet:
            print(f"writing {target} ({len(dataset)} samples, {options.write_mode})", flush=True)
        written[split] = write_beton(dataset, target, options, metadata)
    return written
