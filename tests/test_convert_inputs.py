"""The converter's own checks of what it is given, run in this process: write options, in-memory
arrays, ImageFolder trees, the decoded ImageFolder sample, the guard around a writer's source, and a
source that stops making progress."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from st_scale.data.convert import (
    ArrayDataset,
    ImageFolderDataset,
    WriteOptions,
    _check_arrays,
    _Guarded,
    imagefolder_source,
    write_beton,
)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"write_mode": "png"}, "write_mode='png': choose one of"),
        ({"jpeg_quality": 0}, "jpeg_quality=0: must be in 1..100"),
        ({"jpeg_quality": 101}, "jpeg_quality=101: must be in 1..100"),
        ({"max_resolution": 7}, "max_resolution=7: must be >= 8"),
    ],
)
def test_bad_write_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        WriteOptions(**options)


def test_the_edges_of_the_write_options_are_accepted():
    assert WriteOptions(jpeg_quality=1).jpeg_quality == 1 and WriteOptions(jpeg_quality=100).jpeg_quality == 100
    assert WriteOptions(max_resolution=8).max_resolution == 8


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, int), "images must be uint8 N x H x W x 3, got float32"),
        (
            np.zeros((2, 4, 4), np.uint8),
            np.zeros(2, int),
            "images must be uint8 N x H x W x 3, got uint8 \\(2, 4, 4\\)",
        ),
        (
            np.zeros((2, 4, 4, 1), np.uint8),
            np.zeros(2, int),
            "images must be uint8 N x H x W x 3, got uint8 \\(2, 4, 4, 1\\)",
        ),
        (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, int), "2 images but 3 labels"),
        (np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, int), "0 images but 0 labels"),
        (np.zeros((2, 4, 4, 3), np.uint8), np.array([0, -1]), "negative label -1"),
    ],
)
def test_bad_arrays_are_named_with_their_origin(images, labels, message):
    with pytest.raises(ValueError, match=f"^source.bin: {message}"):
        _check_arrays(images, labels, "source.bin")
    _check_arrays(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 0]), "fine")  # label 0 is a label


def _image(path, colour=(10, 20, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 5), colour if mode == "RGB" else colour[0]).save(path)


def test_an_imagefolder_sample_is_its_rgb_image_with_its_class_index(tmp_path):
    _image(tmp_path / "b" / "grey.png", mode="L")
    _image(tmp_path / "a" / "x.png")
    dataset = ImageFolderDataset(tmp_path, ["a", "b"])
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first[1] == 0 and np.asarray(first[0]).tolist()[0][0] == [10, 20, 30]
    assert second[1] == 1 and second[0].mode == "RGB" and np.asarray(second[0]).shape == (5, 6, 3)


def test_imagefolder_trees_that_cannot_be_converted_are_named(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="has no train/ folder: expected .*/train/<class>/"):
        imagefolder_source(root)
    (root / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        imagefolder_source(root)
    (root / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="train has no class folders"):
        imagefolder_source(root)
    _image(root / "train" / "cat" / "1.png")
    _image(root / "val" / "dog" / "1.png")
    with pytest.raises(ValueError, match="val has classes not in train/: \\['dog'\\]"):
        imagefolder_source(root)
    (root / "val" / "dog" / "1.png").unlink()
    (root / "val" / "dog").rmdir()
    (root / "val" / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="val holds no images"):
        imagefolder_source(root)
    _image(root / "val" / "cat" / "2.png")
    _image(root / "train" / "ant" / "1.png")
    seen = []
    splits = imagefolder_source(root, progress=lambda samples: seen.extend(samples) or samples)
    assert len(seen) == 3  # every image decoded once, both splits
    train, meta = splits["train"]
    assert meta["classes"] == ["ant", "cat"] and meta["num_classes"] == 2 and len(train) == 2
    assert [label for _, label in train.samples] == [0, 1] and meta["source"].endswith("train")
    assert imagefolder_source(root, validate=False, progress=lambda s: pytest.fail("validated"))["val"][1][
        "classes"
    ] == ["ant", "cat"]


def test_the_guard_passes_samples_through_and_reports_a_failure_before_ending_the_worker(tmp_path, monkeypatch):
    class Exit(Exception):
        pass

    def exit_(code):
        raise Exit(code)

    class Broken(ArrayDataset):
        def __getitem__(self, i):
            if i == 1:
                raise OSError("disk read error")
            return super().__getitem__(i)

    error_file = tmp_path / "error"
    guarded = _Guarded(Broken(np.zeros((3, 2, 2, 3), np.uint8), np.array([4, 5, 6])), str(error_file))
    assert len(guarded) == 3 and guarded[2][1] == 6 and not error_file.exists()
    monkeypatch.setattr("st_scale.data.convert.os._exit", exit_)
    with pytest.raises(Exit) as exited:
        guarded[1]
    assert exited.value.args == (3,)
    assert error_file.read_text() == "sample 1: OSError: disk read error"


def test_a_source_that_stops_making_progress_is_stopped_and_leaves_nothing(tmp_path):
    class Stuck(ArrayDataset):
        def __getitem__(self, i):
            time.sleep(60)

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="made no progress for 2 s; the source may be unreadable"):
        write_beton(Stuck(np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4, int)), tmp_path / "x.beton",
                    WriteOptions(num_workers=1, inactivity_timeout_s=2), {})  # fmt: skip
    assert time.monotonic() - start < 30  # the writer's process group was killed, not waited for
    assert sorted(p.name for p in tmp_path.iterdir()) == []


_CONTENT: list[bytes] = []  # what the slow writer adds: set before write_beton forks it


def _slow_writer(dataset, path, options, error_file):
    """A writer that keeps adding to its file for about 4.5 s: longer than the inactivity limit in all,
    but never idle for long. What it adds is a real dataset file of the same samples, 22 pieces of it."""
    os.setsid()
    content = _CONTENT[0]
    piece = -(-len(content) // 22)
    with open(path, "wb") as f:
        for start in range(0, len(content), piece):
            f.write(content[start : start + piece])
            f.flush()
            time.sleep(0.2)


def test_a_writer_that_keeps_making_progress_is_never_stopped(tmp_path, monkeypatch):
    """The watchdog measures the time since the partial file last grew, not the time since the start."""
    dataset = ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    write_beton(dataset, tmp_path / "real.beton", WriteOptions(num_workers=1), {"num_classes": 4})
    monkeypatch.setattr(sys.modules[__name__], "_CONTENT", [(tmp_path / "real.beton").read_bytes()])
    monkeypatch.setattr("st_scale.data.convert._write", _slow_writer)  # forked: the child runs it too
    written = write_beton(dataset, tmp_path / "x.beton", WriteOptions(num_workers=1, inactivity_timeout_s=3), {})
    assert written["num_samples"] == 4 and written["size_bytes"] == (tmp_path / "x.beton").stat().st_size


def _failing_writer(dataset, path, options, error_file):
    os._exit(3)  # dies before writing anything, and without a report (killed, out of memory, ...)


def test_a_writer_that_dies_without_a_report_is_named_by_its_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr("st_scale.data.convert._write", _failing_writer)
    with pytest.raises(RuntimeError, match=r"writing .*x\.beton failed \(writer exit code 3\)"):
        write_beton(
            ArrayDataset(np.zeros((4, 2, 2, 3), np.uint8), np.arange(4)), tmp_path / "x.beton", WriteOptions(), {}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_class_missing_from_val_keeps_the_training_class_indices(tmp_path):
    _image(tmp_path / "val" / "cat" / "1.png")
    dataset = ImageFolderDataset(tmp_path / "val", ["ant", "cat"])
    assert [label for _, label in dataset.samples] == [1]  # cat is class 1 of train's classes, not 0 of val's


def test_extra_val_classes_are_listed_five_at_most(tmp_path):
    _image(tmp_path / "train" / "a" / "1.png")
    for name in "bcdefg":
        _image(tmp_path / "val" / name / "1.png")
    with pytest.raises(ValueError, match=r"has classes not in train/: \['b', 'c', 'd', 'e', 'f'\]$"):
        imagefolder_source(tmp_path, validate=False)


def test_a_beton_goes_into_new_folders_and_clears_what_a_crashed_conversion_left(tmp_path):
    target = tmp_path / "new" / "nested" / "x.beton"
    write_beton(ArrayDataset(np.zeros((4, 2, 2, 3), np.uint8), np.arange(4)), target, WriteOptions(num_workers=1), {})
    assert target.is_file()
    # a conversion killed mid-way left its partial file and an error report: neither survives the next one
    target.with_name("x.beton.partial").write_bytes(b"half a file")
    target.with_name("x.beton.error").write_text("sample 3: OSError: from last time")
    written = write_beton(
        ArrayDataset(np.zeros((4, 2, 2, 3), np.uint8), np.arange(4)), target, WriteOptions(num_workers=1), {}
    )
    assert written["num_samples"] == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.beton", "x.beton.json", "x.beton.sha256"]


def test_the_writer_writes_each_field_as_its_options_say(tmp_path, monkeypatch):
    """The writer's own body, run in this process (write_beton runs it in a child of its own session):
    raw pixels cut to max_resolution, JPEG at the quality given, every label, and a failure reported
    in the error file before it is raised."""
    from ffcv.reader import Reader

    from st_scale.data.convert import _write

    monkeypatch.setattr("st_scale.data.convert.os.setsid", lambda: None)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
    dataset = ArrayDataset(images, np.array([0, 3, 5]))
    files = {}
    for name, options in (
        ("raw", WriteOptions(write_mode="raw", max_resolution=8, num_workers=1)),
        ("jpg95", WriteOptions(write_mode="jpg", jpeg_quality=95, num_workers=1)),
        ("jpg5", WriteOptions(write_mode="jpg", jpeg_quality=5, num_workers=1)),
    ):
        files[name] = tmp_path / f"{name}.beton"
        _write(dataset, str(files[name]), options, str(tmp_path / "error"))
    assert Reader(str(files["raw"])).field_names == ["image", "label"]  # the names every loader asks for
    raw, jpg = Reader(str(files["raw"])).metadata, Reader(str(files["jpg95"])).metadata
    assert [tuple(m[0])[:3] for m in raw] == [(1, 6, 8)] * 3  # raw mode, 16 x 12 cut to 8 on its longer side
    assert [tuple(m[0])[:3] for m in jpg] == [(0, 12, 16)] * 3  # JPEG, full size
    assert [int(m[1]) for m in raw] == [0, 3, 5] and [int(m[1]) for m in jpg] == [0, 3, 5]
    stored = {name: sum(int(row[2]) for row in Reader(str(path)).alloc_table) for name, path in files.items()}
    assert stored["raw"] == 3 * 6 * 8 * 3 and stored["jpg5"] < stored["jpg95"]  # bytes each sample occupies
    assert not (tmp_path / "error").exists()
    with pytest.raises(Exception):  # noqa: B017  (whatever FFCV raises for a folder that is not there)
        _write(dataset, str(tmp_path / "absent" / "x.beton"), WriteOptions(num_workers=1), str(tmp_path / "error"))
    assert "Traceback" in (tmp_path / "error").read_text()
