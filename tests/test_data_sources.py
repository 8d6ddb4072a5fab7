"""The data sources, checked against the files they read: Fashion-MNIST's IDX files (small ones
written here in the IDX format, some gzipped as Debian ships them), the unpacked-copy cache, seeded
class-proportional subsets, and the in-memory digits batches."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from st_scale.data.convert import fashion_mnist_source
from st_scale.data.digits import DigitsSplit, to_batches
from st_scale.data.fashion import FILES, load_fashion_mnist, seeded_subset

SIZES = {"train": 40, "t10k": 20}


def _idx(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, type 8 (unsigned byte), the number of dimensions, each size big-endian."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fashion(folder, seed=0, packed=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
    """Fashion-MNIST-shaped IDX files with random images and balanced labels; the names in `packed`
    gzipped (as Debian installs them), the others plain. Returns {prefix: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in SIZES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = f"{prefix}-{kind}"
            if name in packed:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(_idx(array))
            else:
                (folder / name).write_bytes(_idx(array))
        written[prefix] = (images, labels)
    return written


def test_fashion_mnist_reads_every_image_with_its_label_grey_as_rgb(tmp_path):
    written = _write_fashion(tmp_path / "src")
    out = load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")
    assert set(out) == {"train", "val"}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images, labels = out[split]
        source_images, source_labels = written[prefix]
        assert images.shape == (SIZES[prefix], 28, 28, 3) and images.dtype == np.uint8
        assert images.flags["C_CONTIGUOUS"] and labels.dtype == np.int64
        for channel in range(3):
            assert np.array_equal(images[..., channel], source_images)
        assert np.array_equal(labels, source_labels)
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir() if not p.name.endswith(".from")) == sorted(FILES)


def test_the_unpacked_copies_are_reused_until_their_source_changes(tmp_path):
    _write_fashion(tmp_path / "src")
    load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    unpacked = {name: raw / name for name in FILES}
    for path in unpacked.values():  # mark the copies: a second unpacking would overwrite them
        os.utime(path, ns=(1, 1))
    load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")
    assert all(path.stat().st_mtime_ns == 1 for path in unpacked.values())

    changed = _write_fashion(tmp_path / "src", seed=1)  # new contents (and sizes, times) at the same paths
    images, labels = load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")["train"]
    assert all(path.stat().st_mtime_ns != 1 for path in unpacked.values())
    assert np.array_equal(images[..., 0], changed["train"][0]) and np.array_equal(labels, changed["train"][1])
    assert not list(raw.glob("*.partial"))


def test_a_missing_idx_file_is_named_with_the_install_command(tmp_path):
    _write_fashion(tmp_path / "src")
    (tmp_path / "src" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"src has no t10k-images-idx3-ubyte\[\.gz\].*apt-get install -y"):
        load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere does not exist; install it with `apt-get"):
        load_fashion_mnist(tmp_path / "nowhere", cache=tmp_path / "cache")


def test_fashion_source_subsets_keep_pairs_and_class_shares(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the unpacked copies go under ~/.cache
    written = _write_fashion(tmp_path / "src")
    sources = fashion_mnist_source(tmp_path / "src", train_subset=20, val_subset=None, seed=3)
    assert (tmp_path / "home" / ".cache" / "st_scale" / "fashion-mnist-idx" / "FashionMNIST" / "raw").is_dir()
    train, train_meta = sources["train"]
    assert train_meta == {
        "source": "fashion-mnist",
        "num_classes": 10,
        "image_size": 28,
        "subset": {"size": 20, "of": 40, "seed": 3},
    }
    assert sources["val"][1]["subset"] == {"size": 20, "of": 20, "seed": 3}
    pairs = {written["train"][0][i].tobytes(): int(written["train"][1][i]) for i in range(40)}
    got = [(train[i][0][..., 0].tobytes(), train[i][1]) for i in range(len(train))]
    assert len(got) == 20 and len({image for image, _ in got}) == 20
    assert all(pairs[image] == label for image, label in got)  # every image keeps its own label
    assert np.bincount([label for _, label in got], minlength=10).tolist() == [2] * 10
    default = fashion_mnist_source(tmp_path / "src", train_subset=10)  # seed 0; the val split untouched
    assert default["train"][1]["subset"] == {"size": 10, "of": 40, "seed": 0}
    assert default["val"][1]["subset"] == {"size": 20, "of": 20, "seed": 0}
    again = fashion_mnist_source(tmp_path / "src", train_subset=20, seed=3)["train"][0]
    other = fashion_mnist_source(tmp_path / "src", train_subset=20, seed=4)["train"][0]
    assert np.array_equal(again.images, train.images) and not np.array_equal(other.images, train.images)


def test_seeded_subsets_are_stratified_distinct_and_shuffled():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    subset = seeded_subset(labels, 40, seed=7)
    assert len(set(subset.tolist())) == len(subset) == 40
    # each class in proportion: 40 x 50/100, 40 x 30/100, ...
    assert np.bincount(labels[subset], minlength=4).tolist() == [20, 12, 6, 2]
    assert not np.array_equal(subset, np.sort(subset))  # random order, not file order
    assert np.array_equal(seeded_subset(labels, 40, seed=7), subset)
    assert not np.array_equal(seeded_subset(labels, 40, seed=8), subset)
    for size in (None, 100, 150):  # everything, shuffled: the same shuffle however the size is spelt
        everything = seeded_subset(labels, size, seed=1)
        assert sorted(everything.tolist()) == list(range(100)) and not np.array_equal(everything, np.arange(100))
        assert np.array_equal(everything, seeded_subset(labels, None, seed=1))
    with pytest.raises(ValueError, match="subset size 0: must be >= 1"):
        seeded_subset(labels, 0, seed=1)


@pytest.mark.parametrize("class_sizes", [[50, 30, 15, 5], [4] * 10, [7, 1, 3]])
def test_a_subset_has_exactly_the_size_asked_for_each_class_within_one_of_its_quota(class_sizes):
    """Rounding each class's share alone gives 0 of every class for 5 of 10 balanced classes; the
    subset must hold exactly `size` distinct images, each class within one of size x its fraction."""
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    n = len(labels)
    for size in range(1, n):
        subset = seeded_subset(labels, size, seed=size)
        assert len(subset) == len(set(subset.tolist())) == size, size
        quotas = size * np.array(class_sizes) / n
        assert np.all(np.abs(np.bincount(labels[subset], minlength=len(class_sizes)) - quotas) < 1), size


def test_leftover_images_of_a_subset_go_to_the_largest_remainders():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    # quotas 3.5, 2.1, 1.05, 0.35: one image left over after the whole parts, to class 0
    assert np.bincount(labels[seeded_subset(labels, 7, seed=0)], minlength=4).tolist() == [4, 2, 1, 0]
    # quotas 0.5, 0.3, 0.15, 0.05
    assert np.bincount(labels[seeded_subset(labels, 1, seed=0)], minlength=4).tolist() == [1, 0, 0, 0]
    balanced = np.repeat(np.arange(10), 4)  # equal remainders: the lower labels first
    assert np.bincount(balanced[seeded_subset(balanced, 5, seed=0)], minlength=10).tolist() == [1] * 5 + [0] * 5
    unequal = np.repeat(np.arange(2), [1, 3])  # quotas 0.5 and 1.5, equal remainders: the larger class
    assert np.bincount(unequal[seeded_subset(unequal, 2, seed=0)], minlength=2).tolist() == [0, 2]


def test_without_a_folder_the_debian_package_folder_is_read(tmp_path, monkeypatch):
    import st_scale.data.fashion as fashion

    written = _write_fashion(tmp_path / "debian")
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "debian")
    images, labels = load_fashion_mnist(None, cache=tmp_path / "cache")["val"]
    assert np.array_equal(images[..., 0], written["t10k"][0]) and np.array_equal(labels, written["t10k"][1])


def test_only_the_copy_whose_source_changed_is_unpacked_again(tmp_path):
    written = _write_fashion(tmp_path / "src")
    load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    for name in FILES:
        os.utime(raw / name, ns=(1, 1))
    relabelled = written["t10k"][1][::-1].copy()  # the last file of the four, gzipped as Debian ships it
    with gzip.open(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx(relabelled))
    labels = load_fashion_mnist(tmp_path / "src", cache=tmp_path / "cache")["val"][1]
    assert np.array_equal(labels, relabelled)
    assert [(raw / name).stat().st_mtime_ns == 1 for name in FILES] == [True, True, True, False]


def test_digits_batches_are_normalised_nchw_with_their_labels():
    rng = np.random.default_rng(0)
    split = DigitsSplit(rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8), np.arange(10, dtype=np.int64))
    batches = to_batches(split, 4)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    images = torch.cat([x for x, _ in batches])
    expected = (torch.from_numpy(split.images).double() / 255 - 0.5) / 0.5
    assert images.shape == (10, 3, 4, 4)
    assert torch.allclose(images.double(), expected.permute(0, 3, 1, 2), atol=1e-6)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))

    shuffled = to_batches(split, 4, shuffle_seed=5)
    labels = torch.cat([y for _, y in shuffled])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    for x, y in shuffled:  # each image still with its own label (the label is the image's index here)
        assert torch.equal(x, images[y])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(shuffled, to_batches(split, 4, shuffle_seed=5)))
