"""Fashion-MNIST (Zalando, 60,000 + 10,000 28x28 grey images, 10 classes) as Debian's
`dataset-fashion-mnist` package installs it: real benchmark data that needs no download.

The IDX files are read by torchvision's own `FashionMNIST` reader; it wants them uncompressed in
`<root>/FashionMNIST/raw/`, so the package's `.gz` files are unpacked into a cache folder first.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get install -y dataset-fashion-mnist (or `make fashion-mnist`)"
NUM_CLASSES = 10
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _unpacked_root(source: Path, cache: Path) -> Path:
    """A root torchvision's reader accepts: <cache>/FashionMNIST/raw/<uncompressed IDX files>."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        plain, packed = source / name, source / f"{name}.gz"
        found = plain if plain.is_file() else packed if packed.is_file() else None
        if found is None:
            raise FileNotFoundError(
                f"{source} has no {name}[.gz]: expected Fashion-MNIST's four IDX files there; "
                f"install them with `{APT_HINT}` or give the folder that holds them"
            )
        target = raw / name
        stamp = target.with_name(name + ".from")  # which source file the unpacked copy came from
        origin = f"{found.resolve()} {found.stat().st_size} {found.stat().st_mtime_ns}"
        if target.is_file() and stamp.is_file() and stamp.read_text() == origin:
            continue
        partial = target.with_name(name + ".partial")
        if found is plain:
            shutil.copyfile(plain, partial)
        else:
            with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        partial.replace(target)
        stamp.write_text(origin)
    return cache


def load_fashion_mnist(source: str | Path | None = None, cache: str | Path = "~/.cache/st_scale/fashion-mnist-idx"):
    """{'train': (images N x 28 x 28 x 3 uint8, labels), 'val': (...)} from the IDX files in `source`."""
    from torchvision.datasets import FashionMNIST

    source = Path(source).expanduser() if source else DEBIAN_DIR
    if not source.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {source} does not exist; install it with `{APT_HINT}`")
    root = _unpacked_root(source, Path(cache).expanduser())
    out = {}
    for split, train in (("train", True), ("val", False)):
        dataset = FashionMNIST(str(root), train=train, download=False)
        grey = dataset.data.numpy().astype(np.uint8)  # N x 28 x 28
        out[split] = (
            np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1)),
            dataset.targets.numpy().astype(np.int64),
        )
    return out


def seeded_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of exactly `size` images with every class in proportion
    (stratified), in random order; all indices, shuffled, when `size` is None or not smaller."""
    rng = np.random.default_rng(seed)
    if size is None or size >= len(labels):
        return rng.permutation(len(labels))
    if size < 1:
        raise ValueError(f"subset size {size}: must be >= 1")
    classes, class_sizes = np.unique(labels, return_counts=True)
    shares = class_shares(class_sizes, size)
    picked = [rng.choice(np.flatnonzero(labels == c), size=share, replace=False) for c, share in zip(classes, shares)]
    return rng.permutation(np.concatenate(picked))


def class_shares(class_sizes: np.ndarray, size: int) -> np.ndarray:
    """How many of each class a stratified subset of `size` takes: the largest-remainder method, so
    the shares add up to `size` exactly (rounding each class's share alone does not: 5 of 10 balanced
    classes would round to 0 each) and each differs from its exact quota by less than one. Ties go to
    the larger class, then the lower label."""
    total = int(class_sizes.sum())
    numerators = size * class_sizes.astype(np.int64)  # quota_c = numerators_c / total, kept exact
    shares = numerators // total
    leftover = size - int(shares.sum())
    by_remainder = np.lexsort((np.arange(len(shares)), -class_sizes, -(numerators % total)))
    shares[by_remainder[:leftover]] += 1
    return shares
