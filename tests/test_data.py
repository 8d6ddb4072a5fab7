"""FFCV data: conversion from digits, CIFAR and ImageFolder sources; checksums catch damage that
FFCV itself would silently read; the writer cannot hang; loaders and augmentation are seeded."""

import hashlib
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_data import DIGITS_SIZE, digits_overrides

from st_scale.config import load_config
from st_scale.data.commands import convert
from st_scale.data.convert import ArrayDataset, WriteOptions, write_beton
from st_scale.data.integrity import DatasetFileError, read_metadata, verify_beton, verify_checksum
from st_scale.data.loaders import BatchPreparer, eval_loader, train_loader
from st_scale.errors import ConfigError


def test_digits_conversion_writes_checksums_and_metadata(digits_dir):
    for split, count in (("train", 1438), ("val", 359)):
        meta = verify_beton(digits_dir / f"{split}.beton")
        assert meta["num_samples"] == count and meta["num_classes"] == 10 and meta["image_size"] == DIGITS_SIZE
        assert (digits_dir / f"{split}.beton.sha256").read_text().split()[0] == meta["sha256"]


def _read_back(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every (image N x 3 x H x W uint8, label) of a .beton, in file order, as the loaders read it."""
    data = load_config("demo_ct", [f"data.val={path}"]).data
    images, labels = [], []
    for x, y in eval_loader(data, data.val, indices=None, num_workers=1, device=torch.device("cpu")):
        images.append(x.numpy().copy())  # FFCV reuses its batch buffers: copy before the next batch
        labels.append(y.numpy().copy())
    return np.concatenate(images), np.concatenate(labels)


def test_digits_splits_keep_every_image_with_its_label():
    """At 8x8 the images are sklearn's own (scaled to 0..255): the two splits together hold every
    (image, label) pair of the source exactly once."""
    from sklearn.datasets import load_digits

    from st_scale.data.digits import load_digits_splits

    source = load_digits()
    expected = sorted(
        (np.round(image / 16 * 255).astype(np.uint8).tobytes(), int(label))
        for image, label in zip(source.images, source.target)
    )
    train, val = load_digits_splits(image_size=8)
    assert len(val.labels) == round(0.2 * len(expected))
    got = sorted(
        (image[..., 0].tobytes(), int(label))
        for split in (train, val)
        for image, label in zip(split.images, split.labels)
    )
    assert got == expected


def _bilinear_by_hand(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resizing with half-pixel centres (align_corners=False), written out in numpy."""

    def axis(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), src - low

    r0, r1, wr = axis(image.shape[0])
    c0, c1, wc = axis(image.shape[1])
    top = image[r0][:, c0] * (1 - wc) + image[r0][:, c1] * wc
    bottom = image[r1][:, c0] * (1 - wc) + image[r1][:, c1] * wc
    return top * (1 - wr[:, None]) + bottom * wr[:, None]


def test_digits_upscaled_to_32_px_are_the_bilinear_resize_of_each_source_image():
    """Every (image, label) pair of the 32 px splits is sklearn's image resized bilinearly (half-pixel
    centres), as RGB, with its own label; the split is the seeded one (seed 0 by default)."""
    from sklearn.datasets import load_digits

    from st_scale.data.digits import load_digits_splits

    source = load_digits()
    expected = sorted(
        (np.round(np.clip(_bilinear_by_hand(image / 16, 32), 0, 1) * 255).astype(np.uint8).tobytes(), int(label))
        for image, label in zip(source.images, source.target)
    )
    train, val = load_digits_splits()
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == val.labels.dtype == np.int64
    assert all((split.images[..., :1] == split.images).all() for split in (train, val))  # grey as RGB
    got = sorted(
        (image[..., 0].tobytes(), int(label))
        for split in (train, val)
        for image, label in zip(split.images, split.labels)
    )
    assert got == expected
    assert np.array_equal(load_digits_splits(seed=0)[1].labels, val.labels)
    assert not np.array_equal(load_digits_splits(seed=1)[1].labels, val.labels)
    with pytest.raises(ValueError, match="image_size=7: digits are 8x8, choose 8 or more"):
        load_digits_splits(image_size=7)


def test_digits_files_hold_the_splits_pairs_in_order(digits_dir):
    from st_scale.data.digits import load_digits_splits

    splits = dict(zip(("train", "val"), load_digits_splits(image_size=DIGITS_SIZE)))
    for name, split in splits.items():
        images, labels = _read_back(digits_dir / f"{name}.beton")
        assert np.array_equal(images, split.images.transpose(0, 3, 1, 2))
        assert np.array_equal(labels, split.labels)
        meta = json.loads((digits_dir / f"{name}.beton.json").read_text())
        assert (meta["source"], meta["num_classes"], meta["image_size"]) == ("sklearn.load_digits", 10, DIGITS_SIZE)


def _copy(digits_dir, tmp_path):
    for suffix in ("", ".sha256", ".json"):
        shutil.copy(digits_dir / f"val.beton{suffix}", tmp_path / f"val.beton{suffix}")
    return tmp_path / "val.beton"


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(
        DatasetFileError, match=r"dataset file .*nothere.beton does not exist; rebuild it with `st-scale convert`"
    ):
        verify_beton(tmp_path / "nothere.beton")


def test_a_folder_given_as_a_dataset_file_is_named_as_a_folder(digits_dir):
    with pytest.raises(DatasetFileError) as refused:
        verify_beton(digits_dir)
    assert str(refused.value) == (
        f"{digits_dir} is a folder (it holds train.beton, val.beton); give the .beton file itself, "
        f"e.g. {digits_dir / 'train.beton'}"
    )


def test_a_missing_checksum_or_a_file_of_another_size_is_named_with_both_sizes(digits_dir, tmp_path):
    path = _copy(digits_dir, tmp_path)
    written = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(DatasetFileError) as refused:
        verify_beton(path)
    assert str(refused.value) == (
        f"{path} is {written + 10} bytes but was written as {written} bytes (truncated or overwritten); "
        "rebuild it with `st-scale convert`"
    )
    Path(f"{path}.sha256").unlink()
    with pytest.raises(DatasetFileError) as refused:
        verify_beton(path)
    assert str(refused.value) == (
        f"{path}: checksum file {path.name}.sha256 is missing; rebuild it with `st-scale convert`"
    )


def test_truncated_file_is_caught(digits_dir, tmp_path):
    path = _copy(digits_dir, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(DatasetFileError, match=r"\(truncated or overwritten\); rebuild it"):
        verify_beton(path)


def test_flipped_bytes_are_caught(digits_dir, tmp_path):
    path = _copy(digits_dir, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFileError, match="does not match its checksum .* \\(corrupted\\); rebuild it"):
        verify_beton(path)


def test_metadata_of_another_file_is_caught(digits_dir, tmp_path):
    path = _copy(digits_dir, tmp_path)
    train_meta = json.loads((digits_dir / "train.beton.json").read_text())
    (tmp_path / "val.beton.json").write_text(json.dumps(train_meta | {"size_bytes": path.stat().st_size}))
    with pytest.raises(DatasetFileError, match=r"val.beton.json describes another file \(its sha256 differs"):
        verify_beton(path)


@pytest.mark.parametrize(
    "edit, phrase",
    [
        ({"num_samples": 99999}, "val.beton.json says num_samples=99999 but the file holds 359 samples"),
        ({"num_classes": 5}, "val.beton.json says num_classes=5 but its labels reach 9"),
        ({"num_classes": "10"}, "val.beton.json is damaged (num_classes missing or not int)"),
        ({"sha256": None}, "val.beton.json is damaged (sha256 missing or not str)"),
        ({"image_size": 32}, f"val.beton.json says image_size=32 but the file stores images with sides {DIGITS_SIZE}"),
    ],
    ids=["count", "classes", "classes-as-text", "no-checksum", "image-size"],
)
def test_a_sidecar_that_disagrees_with_the_file_is_refused_naming_both_values(digits_dir, tmp_path, edit, phrase):
    """The loaders index a file by its count and the head is sized by its classes: both come from the
    file itself (the FFCV header, the labels), the sidecar only describes them."""
    path = _copy(digits_dir, tmp_path)
    metadata = json.loads((tmp_path / "val.beton.json").read_text())
    (tmp_path / "val.beton.json").write_text(json.dumps(metadata | edit))
    with pytest.raises(DatasetFileError, match=re.escape(phrase) + ".*rebuild .* with `st-scale convert`"):
        verify_beton(path)


def test_the_facts_of_a_file_are_what_ffcv_itself_reads(digits_dir, tmp_path):
    from ffcv.reader import Reader

    from st_scale.data.integrity import read_facts

    reader = Reader(str(digits_dir / "val.beton"))
    facts = read_facts(digits_dir / "val.beton")
    assert facts.num_samples == reader.num_samples == 359
    assert facts.max_label == reader.metadata["f1"].max() == 9
    assert facts.image_sides == tuple(np.unique(reader.metadata["f0"][["width", "height"]].tolist()))
    (tmp_path / "not.beton").write_bytes(b"\x02\x00" + bytes(100))  # version 2, no fields
    with pytest.raises(DatasetFileError, match="not an st-scale dataset file .*its fields are \\[\\]"):
        read_facts(tmp_path / "not.beton")


def test_a_file_unlike_an_st_scale_dataset_is_refused_by_what_its_bytes_say(digits_dir, tmp_path):
    """The facts are read from FFCV's layout with numpy: a file that differs from it, in its header, its
    fields, its per-sample table or a label, is refused with what differs; a file of one sample is not."""
    from st_scale.data.integrity import _FIELD, _FIELD_METADATA, _HEADER, read_facts

    good = (digits_dir / "val.beton").read_bytes()
    header = np.frombuffer(good, dtype=_HEADER, count=1).copy()
    fields = np.frombuffer(good, dtype=_FIELD, count=2, offset=_HEADER.itemsize).copy()
    table = good[_HEADER.itemsize + fields.nbytes :]
    names = [bytes(f["name"]).rstrip(b"\0").decode() for f in fields]
    assert names == ["image", "label"]
    record = np.dtype([(name, _FIELD_METADATA[int(f["type_id"])][1]) for name, f in zip(names, fields)], align=True)

    def written(name: str, header=header, fields=fields, table=table) -> Path:
        path = tmp_path / name
        path.write_bytes(header.tobytes() + fields.tobytes() + table)
        return path

    def refusal(path: Path) -> str:
        with pytest.raises(DatasetFileError) as refused:
            read_facts(path)
        return str(refused.value)

    rebuild = "rebuild it with `st-scale convert`"
    not_ours = "is not an st-scale dataset file (an FFCV file of images and labels)"
    (tmp_path / "empty.beton").write_bytes(b"")
    older = header.copy()
    older["version"] = 1
    for path in (tmp_path / "empty.beton", written("v1.beton", header=older)):
        assert refusal(path) == f"{path} {not_ours}: no FFCV format-2 header; {rebuild}"
    for name, shown in ((b"labelX", "labelX"), (b"\xff\xfeabel", "\ufffd\ufffdabel")):
        renamed = fields.copy()
        renamed[1]["name"][:] = 0
        renamed[1]["name"][: len(name)] = np.frombuffer(name, np.uint8)
        path = written("renamed.beton", fields=renamed)
        assert refusal(path) == f"{path} {not_ours}: its fields are [('image', 2), ({shown!r}, 1)]; {rebuild}"
    path = written("short.beton", table=table[: 3 * record.itemsize])
    assert refusal(path) == f"{path}: its header says 359 samples but 3 are described; {rebuild}"
    first = np.frombuffer(table, dtype=record, count=1).copy()
    first["label"] = -1
    path = written("negative.beton", table=first.tobytes() + table[record.itemsize :])
    assert refusal(path) == f"{path}: label -1 is negative; labels are class indices from 0"
    one = header.copy()
    one["num_samples"] = 1
    assert read_facts(written("one.beton", header=one)).num_samples == 1


def test_a_written_file_is_described_by_what_it_stores(tmp_path):
    """max_resolution shrinks what the writer stores: the sidecar's image size is the stored one."""
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    options = WriteOptions(num_workers=1, max_resolution=16)
    described = {"image_size": 32, "num_classes": 3}
    meta = write_beton(ArrayDataset(images, np.arange(6) % 3), tmp_path / "a.beton", options, described)
    assert (meta["image_size"], meta["num_samples"]) == (16, 6)
    assert verify_beton(tmp_path / "a.beton")["image_sides"] == [16]
    # The sidecar says how the file was written, as returned.
    digest = hashlib.sha256((tmp_path / "a.beton").read_bytes()).hexdigest()
    assert (
        read_metadata(tmp_path / "a.beton")
        == meta
        == {
            "image_size": 16,
            "num_classes": 3,
            "num_samples": 6,
            "write_mode": options.write_mode,
            "max_resolution": 16,
            "size_bytes": (tmp_path / "a.beton").stat().st_size,
            "sha256": digest,
        }
    )


def test_training_refuses_a_damaged_file_before_any_worker(digits_dir, tmp_path):
    from st_scale.train.driver import resolve_inputs

    path = _copy(digits_dir, tmp_path)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    cfg = load_config(
        "demo_st",
        [
            *digits_overrides(digits_dir),
            f"data.val={path}",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
        ],
    )
    with pytest.raises(ConfigError, match="data.val: .*val.beton does not match its checksum"):
        resolve_inputs(cfg)


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_split_with_more_classes_than_the_model_is_refused(digits_dir, tmp_path, split):
    """A 20-class file under a 10-class head would train and report figures that mean nothing."""
    from st_scale.train.driver import resolve_inputs

    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.beton"
    size = DIGITS_SIZE
    images, labels = rng.integers(0, 256, (40, size, size, 3), dtype=np.uint8), np.arange(40) % 20
    write_beton(
        ArrayDataset(images, labels), wide, WriteOptions(num_workers=1), {"num_classes": 20, "image_size": size}
    )
    paths = {"train": digits_dir / "train.beton", "val": digits_dir / "val.beton", split: wide}
    cfg = load_config(
        "demo_st",
        [
            *digits_overrides(digits_dir),
            f"data.train={paths['train']}",
            f"data.val={paths['val']}",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
        ],
    )
    with pytest.raises(ConfigError, match=rf"data.{split}: .*wide.beton has 20 classes but model.num_classes=10"):
        resolve_inputs(cfg)


def test_a_source_that_raises_fails_fast_instead_of_hanging(tmp_path):
    class Broken(ArrayDataset):
        def __getitem__(self, i):
            if i == 5:
                raise OSError("disk read error")
            return super().__getitem__(i)

    images = np.zeros((16, 8, 8, 3), np.uint8)
    dataset = Broken(images, np.arange(16) % 2)
    with pytest.raises(RuntimeError, match="the source raised.*disk read error"):
        write_beton(dataset, tmp_path / "broken.beton", WriteOptions(inactivity_timeout_s=60), {})
    assert not (tmp_path / "broken.beton").exists()


def _python2_pickle(batch: dict) -> bytes:
    """`batch` pickled as Python 2 pickled CIFAR's batches: its keys are Python 2 strings (SHORT_BINSTRING),
    which Python 3 reads back as the bytes keys CIFAR's readers use only with encoding="bytes"."""
    keys = {k.decode() for k in batch}
    data = pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=2)
    ops = list(pickletools.genops(data))
    out = bytearray()
    for (op, arg, start), end in zip(ops, [pos for _, _, pos in ops[1:]] + [len(data)]):
        if op.name == "BINUNICODE" and arg in keys:
            out += b"U" + struct.pack("<B", len(arg)) + arg.encode("ascii")
        else:
            out += data[start:end]
    return bytes(out)


def _fake_cifar(root, classes=10, per_batch=6):
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    key = b"labels" if classes == 10 else b"fine_labels"
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            key: list(rng.integers(0, classes, per_batch)),
        }
        (folder / name).write_bytes(_python2_pickle(batch))
    return folder


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_directory_conversion(tmp_path, classes):
    folder = _fake_cifar(tmp_path / "src", classes)
    written = convert("cifar", str(tmp_path / "src"), tmp_path / "out", quiet=True)
    expected_train = 30 if classes == 10 else 6
    assert written["train"]["num_samples"] == expected_train and written["val"]["num_samples"] == 6
    assert written["train"]["num_classes"] == classes
    # Pixels survive the round trip (raw mode).
    data = pickle.load(open(folder / ("test_batch" if classes == 10 else "test"), "rb"), encoding="bytes")
    loader = eval_loader(
        load_config("demo_st").data,
        str(tmp_path / "out" / "val.beton"),
        indices=None,
        num_workers=1,
        device=torch.device("cpu"),
    )
    images, labels = next(iter(loader))
    original = torch.from_numpy(data[b"data"].reshape(-1, 3, 32, 32))
    assert torch.equal(images.contiguous(), original)
    assert labels.tolist() == list(data[b"labels" if classes == 10 else b"fine_labels"])


def test_cifar_conversion_of_a_wrong_folder_says_what_it_expects(tmp_path):
    with pytest.raises(ConfigError, match="holds no CIFAR data: expected cifar-10-batches-py/"):
        convert("cifar", str(tmp_path), tmp_path / "out", quiet=True)
    folder = _fake_cifar(tmp_path / "src")
    (folder / "data_batch_3").unlink()  # a training file missing, the test file there
    with pytest.raises(ConfigError, match="holds no CIFAR data"):
        convert("cifar", str(tmp_path / "src"), tmp_path / "out", quiet=True)


def test_the_cifar_source_reads_the_batches_folder_itself_and_names_it(tmp_path):
    from st_scale.data.convert import cifar_source

    folder = _fake_cifar(tmp_path / "src")
    for given in (tmp_path / "src", folder):  # the folder holding cifar-10-batches-py/, or that folder
        train, meta = cifar_source(given)["train"]
        assert meta == {"source": str(folder), "num_classes": 10, "image_size": 32} and len(train) == 30
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"labels"][2] = -1
    (folder / "test_batch").write_bytes(_python2_pickle(batch))
    with pytest.raises(ValueError, match=f"^{folder}: negative label -1"):
        cifar_source(folder)


def test_the_digits_source_says_what_it_is():
    from st_scale.data.convert import digits_source

    sources = digits_source(16)
    for split in ("train", "val"):
        assert sources[split][1] == {"source": "sklearn.load_digits", "num_classes": 10, "image_size": 16}
    assert sources["train"][0][0][0].shape == (16, 16, 3)
    assert digits_source()["val"][0][0][0].shape == (32, 32, 3)  # the demo's size by default


def _image_folder(root, corrupt=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 8 * i, 30 + 4 * i)
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    if corrupt:
        (root / "train" / "dog" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def test_imagefolder_conversion_and_an_unreadable_image(tmp_path):
    _image_folder(tmp_path / "src")
    written = convert("imagefolder", str(tmp_path / "src"), tmp_path / "out", max_resolution=32, quiet=True)
    assert written["train"]["num_samples"] == 8 and written["val"]["num_samples"] == 4
    assert written["train"]["classes"] == ["cat", "dog"]
    _image_folder(tmp_path / "bad", corrupt=True)
    with pytest.raises(ConfigError, match=r"train/dog/1.jpg is not a readable image"):
        convert("imagefolder", str(tmp_path / "bad"), tmp_path / "out2", quiet=True)


def test_imagefolder_conversion_keeps_every_image_with_its_class(tmp_path):
    """Each class folder holds images of its own colour: every image read back carries the label
    of the folder it came from, and each split holds each class as often as its folder does."""
    from PIL import Image

    colours = {"ant": (220, 40, 40), "bee": (40, 220, 40), "cow": (40, 40, 220)}
    counts = {"train": (3, 1, 2), "val": (1, 2, 1)}
    for split, per_class in counts.items():
        for (name, colour), count in zip(colours.items(), per_class):
            (tmp_path / "src" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), colour).save(tmp_path / "src" / split / name / f"{i}.png")
    written = convert("imagefolder", str(tmp_path / "src"), tmp_path / "out", max_resolution=32, quiet=True)
    assert written["train"]["classes"] == list(colours)
    palette = np.array(list(colours.values()), dtype=np.float64)
    for split, per_class in counts.items():
        images, labels = _read_back(tmp_path / "out" / f"{split}.beton")
        mean_colour = images.reshape(len(images), 3, -1).mean(-1)
        nearest = np.abs(mean_colour[:, None, :] - palette[None]).sum(-1).argmin(1)
        assert nearest.tolist() == labels.tolist()
        assert np.bincount(labels, minlength=3).tolist() == list(per_class)


def _imagenet_size_config(tmp_path, *overrides: str):
    """The ImageNet recipe over a small converted ImageFolder, with `overrides`."""
    _image_folder(tmp_path / "src")
    convert("imagefolder", str(tmp_path / "src"), tmp_path / "out", quiet=True)
    files = [f"data.train={tmp_path}/out/train.beton", f"data.val={tmp_path}/out/val.beton", "data.val_batch_size=4"]
    return load_config("imagenet_resnet50_st", [*files, *overrides])


def test_imagenet_size_pipeline_decodes_crops(tmp_path):
    cfg = _imagenet_size_config(tmp_path, "data.image_size=24", "data.val_image_size=28")
    device = torch.device("cpu")
    train = train_loader(cfg.data, batch_size=4, seed=0, num_workers=1, device=device, distributed=False)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.uint8
    val_images, _ = next(iter(eval_loader(cfg.data, cfg.data.val, indices=None, num_workers=1, device=device)))
    assert val_images.shape == (4, 3, 28, 28)


def test_progressive_resizing_crops_each_epoch_at_its_resolution(tmp_path):
    """The real FFCV loader, one object over the epochs: its crops follow the schedule, and the
    evaluation crops keep their own size."""
    cfg = _imagenet_size_config(
        tmp_path,
        "data.image_size=32",
        "data.val_image_size=24",
        "optimizer.epochs=5",
        "data.progressive_resizing={min_size: 16, start_epoch: 2, end_epoch: 4, multiple: 8}",
    )
    device = torch.device("cpu")
    train = train_loader(cfg.data, batch_size=4, seed=0, num_workers=1, device=device, distributed=False)
    seen = []
    for epoch in range(5):
        size = train.set_epoch(epoch)
        shapes = {tuple(images.shape) for images, _ in train}
        assert shapes == {(4, 3, size, size)}, epoch
        seen.append(size)
    assert seen == [16, 16, 24, 32, 32]
    val_images, _ = next(iter(eval_loader(cfg.data, cfg.data.val, indices=None, num_workers=1, device=device)))
    assert val_images.shape == (4, 3, 24, 24)


def test_train_order_and_augmentation_are_functions_of_seed_and_epoch(digits_dir):
    cfg = load_config("demo_st", digits_overrides(digits_dir))
    device = torch.device("cpu")

    def first_batches(epoch, seed=0):
        loader = train_loader(cfg.data, batch_size=32, seed=seed, num_workers=1, device=device, distributed=False)
        loader.set_epoch(epoch)
        preparer = BatchPreparer(cfg.data, device, torch.float32, seed=seed, rank=0)
        out = []
        for step, (x, y) in enumerate(loader):
            out.append((preparer.train(x, step), y.clone()))
            if step == 2:
                return out

    a, b = first_batches(1), first_batches(1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = first_batches(2)
    assert not torch.equal(a[0][1], c[0][1])  # another epoch, another order
    # The pad-crop moved pixels: the augmented batch differs from the plain normalised one.
    loader = train_loader(cfg.data, batch_size=32, seed=0, num_workers=1, device=device, distributed=False)
    loader.set_epoch(1)
    raw, _ = next(iter(loader))
    plain = BatchPreparer(cfg.data, device, torch.float32, seed=0, rank=0).eval(raw)
    assert a[0][0].shape == plain.shape and not torch.equal(a[0][0], plain)


FASHION = Path("/usr/share/datasets/fashion-mnist")


def _image_label_pairs(path: Path) -> list[tuple[str, int]]:
    """(sha1 of the grey image, label) of every sample, in file order; checks the image is grey as RGB."""
    import hashlib

    data = load_config("demo_ct", [f"data.val={path}"]).data
    pairs = []
    for images, labels in eval_loader(data, data.val, indices=None, num_workers=1, device=torch.device("cpu")):
        for image, label in zip(images.numpy(), labels.numpy()):
            assert (image[0] == image[1]).all() and (image[0] == image[2]).all()
            pairs.append((hashlib.sha1(np.ascontiguousarray(image[0]).tobytes()).hexdigest(), int(label)))
    return pairs


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist (`make fashion-mnist`)")
def test_fashion_mnist_conversion_keeps_every_image_with_its_label(tmp_path):
    """Every (image, label) of the written files is a pair of the source as torchvision's own
    reader returns it; subsets are seeded and class-proportional."""
    import hashlib

    from torchvision.datasets import FashionMNIST

    from st_scale.data.fashion import load_fashion_mnist

    written = convert("fashion-mnist", None, tmp_path / "out", train_subset=600, val_subset=200, quiet=True)
    assert written["train"]["num_samples"] == 600 and written["val"]["num_samples"] == 200
    assert written["train"]["subset"] == {"size": 600, "of": 60000, "seed": 0}
    load_fashion_mnist(None, cache=tmp_path / "idx")  # unpacks the IDX files where torchvision looks
    convert("fashion-mnist", None, tmp_path / "again", train_subset=600, val_subset=200, quiet=True)
    for split, train in (("train", True), ("val", False)):
        source = FashionMNIST(str(tmp_path / "idx"), train=train, download=False)
        labels_of: dict[str, set[int]] = {}
        for image, label in zip(source.data.numpy(), source.targets.numpy()):
            labels_of.setdefault(hashlib.sha1(image.tobytes()).hexdigest(), set()).add(int(label))
        pairs = _image_label_pairs(tmp_path / "out" / f"{split}.beton")
        assert all(label in labels_of[digest] for digest, label in pairs)
        counts = np.bincount([label for _, label in pairs], minlength=10)
        assert (counts == len(pairs) // 10).all(), counts  # Fashion-MNIST is balanced: so is the subset
        assert _image_label_pairs(tmp_path / "again" / f"{split}.beton") == pairs  # seeded: the same samples, in order


def test_fashion_mnist_from_a_folder_without_it_says_how_to_install(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        convert("fashion-mnist", str(tmp_path), tmp_path / "out", quiet=True)


def test_colour_augmentation_matches_torchvision_colorjitter_and_alexnet_lighting():
    """The reference's ColorJitter(0.4, 0.4, 0.4) + Lighting(0.1), checked against torchvision's
    functional ops with the same drawn factors."""
    import torchvision.transforms.functional as TF

    from st_scale.data.loaders import PCA_EIGVAL, PCA_EIGVEC
    from st_scale.sampling import STREAM_AUGMENT, step_rng

    data = load_config("imagenet_resnet50_st_reference").data
    preparer = BatchPreparer(data, torch.device("cpu"), torch.float32, seed=5, rank=1)
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = preparer.train(images, step=7)
    rng = step_rng(5, 7, rank=1, stream=STREAM_AUGMENT)
    brightness, contrast, saturation = (rng.uniform(0.6, 1.4, 4) for _ in range(3))
    alpha = torch.as_tensor(rng.normal(0, 0.1, (4, 3)), dtype=torch.float32)
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    for i in range(4):
        x = images[i].float() / 255
        x = TF.adjust_brightness(x, float(brightness[i]))
        x = TF.adjust_contrast(x, float(contrast[i]))
        x = TF.adjust_saturation(x, float(saturation[i]))
        x = x + (PCA_EIGVEC @ (alpha[i] * PCA_EIGVAL)).view(3, 1, 1)
        assert torch.allclose(out[i], (x - mean) / std, atol=1e-4)


def test_colour_augmentation_is_refused_where_it_would_be_ignored():
    with pytest.raises(ConfigError, match="data.color_jitter=0.4 applies to the imagenet pipeline only"):
        load_config("demo_ct", ["data.color_jitter=0.4"])


def _file_with_sidecars(path: Path, size: int) -> Path:
    """Random bytes with their sidecars: the checksum policy, apart from what an FFCV file holds."""
    from st_scale.data.integrity import write_sidecars

    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    write_sidecars(path, {"num_classes": 10, "num_samples": 1})
    return path


def _overwrite_keeping_mtime(path: Path, offset: int) -> None:
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_small_file_changed_in_place_with_its_mtime_kept_is_caught(tmp_path):
    path = _file_with_sidecars(tmp_path / "small.beton", 100_000)
    verify_checksum(path)
    _overwrite_keeping_mtime(path, 54_321)
    with pytest.raises(DatasetFileError, match="does not match its checksum"):
        verify_checksum(path)


def test_a_large_file_changed_with_a_new_mtime_is_checked_in_full(tmp_path, monkeypatch):
    """A stamp is for the file as it was (size, mtime, digest): a change anywhere, even outside the
    sampled blocks, that moves the mtime sends the file to the full check."""
    from st_scale.data import integrity

    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 0)
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(integrity, "SAMPLED_BLOCKS", 8)
    path = _file_with_sidecars(tmp_path / "large.beton", 80_000)
    verify_checksum(path)
    offsets = sorted(int(o) for o in json.loads((tmp_path / "large.beton.verified").read_text())["blocks"])
    _overwrite_keeping_mtime(path, offsets[1] + 2000)  # outside every sampled block
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(DatasetFileError, match="does not match its checksum"):
        verify_checksum(path)


def test_a_file_of_exactly_the_full_check_size_counts_as_large(tmp_path, monkeypatch):
    """Files from FULL_CHECK_BYTES up are stamped after their full check (and later re-checked by
    sampled blocks); smaller ones are checked in full every time and never stamped."""
    from st_scale.data import integrity

    monkeypatch.setattr(integrity, "BLOCK_BYTES", 1000)
    path = _file_with_sidecars(tmp_path / "edge.beton", 5000)
    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 5001)
    verify_checksum(path)
    assert not (tmp_path / "edge.beton.verified").exists()
    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 5000)
    verify_checksum(path)
    assert (tmp_path / "edge.beton.verified").is_file()


def test_a_file_smaller_than_a_block_is_stamped_with_one_block(tmp_path, monkeypatch):
    from st_scale.data import integrity

    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 0)
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 1000)
    path = _file_with_sidecars(tmp_path / "tiny.beton", 700)
    verify_checksum(path)
    assert list(json.loads((tmp_path / "tiny.beton.verified").read_text())["blocks"]) == ["0"]


def test_a_large_file_is_rechecked_by_sampled_blocks_and_in_full_when_its_stamp_is_old(tmp_path, monkeypatch):
    from st_scale.data import integrity

    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 0)  # every file counts as large
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(integrity, "SAMPLED_BLOCKS", 8)
    monkeypatch.setattr(integrity, "CHECKED_BLOCKS", 8)
    path = _file_with_sidecars(tmp_path / "large.beton", 80_000)
    verify_checksum(path)
    stamp_file = tmp_path / "large.beton.verified"
    stamp = json.loads(stamp_file.read_text())
    offsets = sorted(int(o) for o in stamp["blocks"])
    assert len(offsets) == 8 and offsets[0] == 0 and offsets[-1] == 79_000
    _overwrite_keeping_mtime(path, offsets[3] + 10)  # inside a sampled block
    with pytest.raises(DatasetFileError, match="does not match its checksum"):
        verify_checksum(path)
    _overwrite_keeping_mtime(path, offsets[3] + 10)  # restored
    verify_checksum(path)
    between = offsets[1] + 2000  # outside every sampled block: the accepted risk, until the stamp ages
    _overwrite_keeping_mtime(path, between)
    verify_checksum(path)
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps(stamp | {"verified_at": stamp["verified_at"] - integrity.STAMP_MAX_AGE_S - 1}))
    with pytest.raises(DatasetFileError, match="does not match its checksum"):
        verify_checksum(path)


FFCV_ROUND_TRIP = """
import sys
from pathlib import Path

import numba.typed
import numpy as np
import torch

from st_scale.config import load_config
from st_scale.data.convert import ArrayDataset, WriteOptions, write_beton
from st_scale.data.loaders import eval_loader

folder = Path(sys.argv[1])
# Smooth images: JPEG keeps them within a few levels
ramp = np.linspace(0, 255, 32, dtype=np.float32)
planes = [[ramp[None, :] * (i + 1) / 8 + ramp[:, None] * c / 4 for c in range(3)] for i in range(6)]
images = np.clip(np.stack([np.stack(p, -1) for p in planes]), 0, 255).astype(np.uint8)
for mode in ("raw", "jpg"):
    path = folder / f"{mode}.beton"
    write_beton(ArrayDataset(images, np.arange(6) % 3), path, WriteOptions(num_workers=1, write_mode=mode), {})
    data = load_config("demo_ct", [f"data.val={path}"]).data
    loader = eval_loader(data, str(path), indices=None, num_workers=1, device=torch.device("cpu"))
    decoded = np.concatenate([x.numpy().transpose(0, 2, 3, 1) for x, _ in loader])
    error = np.abs(decoded.astype(int) - images.astype(int))
    print(mode, error.max(), error.mean())
import ffcv.fields.rgb_image

print(type(ffcv.fields.rgb_image.IMAGE_MODES).__name__, ffcv.fields.rgb_image.IMAGE_MODES, numba.typed.Dict.__name__)
"""


@pytest.mark.slow  # a process that loads torch and FFCV
def test_ffcv_imported_with_a_plain_dict_for_its_image_modes_writes_and_decodes_both_modes(tmp_path):
    """st-scale imports FFCV with a plain dict for its image modes (a numba typed Dict would be
    JIT-compiled in every worker): in a process where st-scale imported FFCV, a raw file decodes to
    the very pixels written and a JPEG one to within JPEG's error, and numba's own Dict is left as it was."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FFCV_ROUND_TRIP, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    raw, jpg, imported = done.stdout.strip().splitlines()
    assert raw.split()[1] == "0", raw  # the same bytes
    _, worst, mean = jpg.split()
    assert 0 < float(mean) < 2 and int(worst) < 16, jpg  # stored as JPEG: close, not equal
    assert imported == "dict {'jpg': 0, 'raw': 1} Dict"
