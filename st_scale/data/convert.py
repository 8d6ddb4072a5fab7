"""Writing FFCV .beton files: from the bundled digits set, a CIFAR-10/100 directory as torchvision
stores it, or an ImageFolder tree (ImageNet layout: root/train/<class>/*.JPEG, root/val/<class>/...).

The source is validated before writing, and the writer runs in a child process watched for
progress: FFCV's writer hangs forever when the source raises in one of its workers.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import digits, fashion
from .integrity import read_facts, write_sidecars

WRITE_MODES = ("raw", "jpg", "smart", "proportion")


@dataclass
class WriteOptions:
    write_mode: str = "raw"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    num_workers: int = 2
    inactivity_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode={self.write_mode!r}: choose one of {WRITE_MODES}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: must be in 1..100")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise ValueError(f"max_resolution={self.max_resolution}: must be >= 8")


class ArrayDataset:
    """(HWC uint8 image, label) pairs from in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class _Guarded:
    """Wraps a dataset so that an exception in a writer worker is reported and ends the worker,
    instead of leaving FFCV's writer waiting forever."""

    def __init__(self, dataset, error_file: str):
        self.dataset, self.error_file = dataset, error_file

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except Exception as error:
            Path(self.error_file).write_text(f"sample {i}: {type(error).__name__}: {error}")
            os._exit(3)


def _write(dataset, path: str, options: WriteOptions, error_file: str) -> None:
    os.setsid()  # own process group: the parent can stop the writer's pool with it
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(
            write_mode=options.write_mode, max_resolution=options.max_resolution, jpeg_quality=options.jpeg_quality
        ),
        "label": IntField(),
    }
    writer = DatasetWriter(path, fields, num_workers=options.num_workers)
    try:
        writer.from_indexed_dataset(_Guarded(dataset, error_file))
    except Exception:
        Path(error_file).write_text(traceback.format_exc(limit=5))
        raise


def write_beton(dataset, path: str | Path, options: WriteOptions, metadata: dict[str, Any]) -> dict:
    """Write `dataset` to `path` (atomically: a complete file or none) and its sidecars."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    error_file = path.with_name(path.name + ".error")
    for stale in (partial, error_file):
        stale.unlink(missing_ok=True)
    process = multiprocessing.get_context("fork").Process(
        target=_write, args=(dataset, str(partial), options, str(error_file))
    )
    process.start()
    last_size, last_change = -1, time.monotonic()
    try:
        while process.is_alive() and not error_file.exists():
            process.join(timeout=0.5)
            size = partial.stat().st_size if partial.exists() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > options.inactivity_timeout_s:
                raise RuntimeError(
                    f"writing {path} made no progress for {options.inactivity_timeout_s:.0f} s; "
                    f"the source may be unreadable (raise inactivity_timeout_s for very slow storage)"
                )
        if error_file.exists():
            raise RuntimeError(f"writing {path} failed: the source raised at {error_file.read_text()}")
        if process.exitcode != 0:
            raise RuntimeError(f"writing {path} failed (writer exit code {process.exitcode})")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if process.is_alive():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.join()
        error_file.unlink(missing_ok=True)
    os.replace(partial, path)
    facts = read_facts(path)  # what the writer stored (max_resolution may have shrunk the source's images)
    described = {k: v for k, v in metadata.items() if k != "image_size"}
    if len(facts.image_sides) == 1:
        described["image_size"] = facts.image_sides[0]
    return write_sidecars(
        path,
        {
            **described,
            "num_samples": facts.num_samples,
            "write_mode": options.write_mode,
            "max_resolution": options.max_resolution,
        },
    )


# ------------------------------------------------------------------------------------ sources
def _check_arrays(images: np.ndarray, labels: np.ndarray, origin: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{origin}: images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"{origin}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0:
        raise ValueError(f"{origin}: negative label {labels.min()}")


def digits_source(image_size: int = 32) -> dict[str, tuple[ArrayDataset, dict]]:

    train, val = digits.load_digits_splits(image_size)
    meta = {"source": "sklearn.load_digits", "num_classes": digits.NUM_CLASSES, "image_size": image_size}
    return {split: (ArrayDataset(s.images, s.labels), meta) for split, s in (("train", train), ("val", val))}


def cifar_source(directory: str | Path) -> dict[str, tuple[ArrayDataset, dict]]:
    """torchvision's CIFAR layout: cifar-10-batches-py/ or cifar-100-python/ (or the folder holding it)."""
    directory = Path(directory)
    for name, files, key, classes in (  # noqa: B007  (the matching layout's key and classes are used below)
        ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]), b"labels", 10),
        ("cifar-100-python", (["train"], ["test"]), b"fine_labels", 100),
    ):
        root = directory / name if (directory / name).is_dir() else directory
        if all((root / f).is_file() for f in files[0] + files[1]):
            break
    else:
        raise FileNotFoundError(
            f"{directory} holds no CIFAR data: expected cifar-10-batches-py/ (data_batch_1..5, test_batch) "
            f"or cifar-100-python/ (train, test) as torchvision's download writes them"
        )
    out = {}
    for split, names in zip(("train", "val"), files):
        images, labels = [], []
        for f in names:
            with open(root / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[key], dtype=np.int64))
        x, y = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
        _check_arrays(x, y, str(root))
        out[split] = (ArrayDataset(x, y), {"source": str(root), "num_classes": classes, "image_size": 32})
    return out


def fashion_mnist_source(
    directory: str | Path | None, *, train_subset: int | None = None, val_subset: int | None = None, seed: int = 0
) -> dict[str, tuple[ArrayDataset, dict]]:
    """Fashion-MNIST from its IDX files (default: where Debian's package puts them), 28 x 28 grey
    as RGB; optional seeded, class-proportional subsets of either split."""

    out = {}
    for split, (images, labels) in fashion.load_fashion_mnist(directory).items():
        size = train_subset if split == "train" else val_subset
        keep = fashion.seeded_subset(labels, size, seed)
        x, y = np.ascontiguousarray(images[keep]), labels[keep]
        _check_arrays(x, y, f"fashion-mnist {split}")
        out[split] = (
            ArrayDataset(x, y),
            {
                "source": "fashion-mnist",
                "num_classes": fashion.NUM_CLASSES,
                "image_size": 28,
                "subset": {"size": len(y), "of": len(labels), "seed": seed},
            },
        )
    return out


class ImageFolderDataset:
    """An ImageFolder split, images decoded with PIL as RGB."""

    def __init__(self, root: Path, classes: Sequence[str]):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        self.samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def imagefolder_source(
    root: str | Path, *, validate: bool = True, progress: Callable[[Sequence], Sequence] = lambda x: x
) -> dict[str, tuple[Any, dict]]:
    root = Path(root)
    splits = {"train": root / "train", "val": root / "val"}
    for split, folder in splits.items():
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{root} has no {split}/ folder: expected {root}/train/<class>/... and {root}/val/<class>/..."
            )
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{splits['train']} has no class folders")
    val_classes = sorted(p.name for p in splits["val"].iterdir() if p.is_dir())
    if not set(val_classes) <= set(classes):
        raise ValueError(f"{splits['val']} has classes not in train/: {sorted(set(val_classes) - set(classes))[:5]}")
    out = {}
    for split, folder in splits.items():
        dataset = ImageFolderDataset(folder, classes)
        if len(dataset) == 0:
            raise FileNotFoundError(f"{folder} holds no images")
        if validate:
            _validate_images(dataset, progress)
        out[split] = (dataset, {"source": str(folder), "num_classes": len(classes), "classes": classes})
    return out


def _validate_images(dataset: ImageFolderDataset, progress) -> None:
    from PIL import Image

    for path, _ in progress(dataset.samples):
        try:
            with Image.open(path) as image:
                image.load()  # decode it all: a truncated file opens, and fails only here
        except Exception as error:
            raise ValueError(
                f"{path} is not a readable image ({error}); remove or replace it before converting"
            ) from None
