"""Checksums and metadata beside each .beton file.

FFCV returns silently wrong images for some kinds of damage (flipped bytes, a truncated allocation
table), so every file gets `<name>.beton.sha256` and `<name>.beton.json` when written, and is
verified before training.

The policy for re-verifying: a file under FULL_CHECK_BYTES (CIFAR, Fashion-MNIST, digits) is hashed
whole on every run. A larger one (ImageNet: tens of GB) leaves a stamp when verified: its size,
modification time, digest and the digests of SAMPLED_BLOCKS evenly spaced blocks. A run whose file
matches the stamp re-hashes CHECKED_BLOCKS of those blocks, drawn at random, which catches content
overwritten in place with the modification time kept, unless the change misses every block checked;
and the whole file is hashed again once the stamp is older than STAMP_MAX_AGE_S.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 8 << 20
FULL_CHECK_BYTES = 256 << 20
BLOCK_BYTES = 1 << 20
SAMPLED_BLOCKS = 64
CHECKED_BLOCKS = 8
STAMP_MAX_AGE_S = 7 * 24 * 3600


class DatasetFileError(RuntimeError):
    """A .beton file that is missing, incomplete or damaged."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _block_digests(path: Path, offsets) -> dict[str, str]:
    digests = {}
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(int(offset))
            digests[str(int(offset))] = hashlib.sha256(f.read(BLOCK_BYTES)).hexdigest()
    return digests


def _stamp(path: Path, stat, digest: str) -> dict:
    last = max(0, stat.st_size - BLOCK_BYTES)  # evenly spaced, the first at the start, the last at the end
    offsets = sorted({i * last // max(1, SAMPLED_BLOCKS - 1) for i in range(SAMPLED_BLOCKS)})
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest,
        "verified_at": time.time(),
        "blocks": _block_digests(path, offsets),
    }


def _stamp_still_holds(path: Path, stamp_file: Path, stat, digest: str) -> bool:
    """The stamp matches the file as it is now, is recent, and a random sample of its blocks re-hashes
    to the same digests."""
    try:
        stamp = json.loads(stamp_file.read_text())
        if (stamp["size"], stamp["mtime_ns"], stamp["sha256"]) != (stat.st_size, stat.st_mtime_ns, digest):
            return False
        if time.time() - stamp["verified_at"] > STAMP_MAX_AGE_S:
            return False
        sample = random.sample(sorted(stamp["blocks"]), min(CHECKED_BLOCKS, len(stamp["blocks"])))
        return _block_digests(path, sample) == {k: stamp["blocks"][k] for k in sample}
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no stamp, an older format, or unreadable: verify in full


def sidecars(path: Path) -> tuple[Path, Path, Path]:
    path = Path(path)
    return (
        path.with_name(path.name + ".sha256"),
        path.with_name(path.name + ".json"),
        path.with_name(path.name + ".verified"),
    )


def write_sidecars(path: Path, metadata: dict) -> dict:
    path = Path(path)
    checksum_file, metadata_file, _ = sidecars(path)
    digest = sha256_of(path)
    metadata = {**metadata, "size_bytes": path.stat().st_size, "sha256": digest}
    checksum_file.write_text(f"{digest}  {path.name}\n")
    metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def read_metadata(path: Path) -> dict:
    _, metadata_file, _ = sidecars(Path(path))
    if not metadata_file.is_file():
        raise DatasetFileError(
            f"{path}: metadata file {metadata_file.name} is missing; rebuild the file with `st-scale convert`"
        )
    try:
        metadata = json.loads(metadata_file.read_text())
        problem = _sidecar_problem(metadata)
    except ValueError as error:
        problem = f"not JSON: {error}"
    if problem:
        raise DatasetFileError(
            f"{path}: metadata file {metadata_file.name} is damaged ({problem}); rebuild the file with "
            f"`st-scale convert`"
        )
    return metadata


# What every sidecar `st-scale convert` writes holds, and what st-scale reads from it.
DESCRIBED = {"size_bytes": int, "sha256": str, "num_samples": int, "num_classes": int}


def _sidecar_problem(metadata) -> str | None:
    if not isinstance(metadata, dict):
        return "not a JSON object"
    wrong = [key for key, kind in DESCRIBED.items() if type(metadata.get(key)) is not kind]  # bool is no count
    return f"{', '.join(wrong)} missing or not {'/'.join(DESCRIBED[k].__name__ for k in wrong)}" if wrong else None


def verify_beton(path: str | Path) -> dict:
    """Check a .beton against its checksum and its metadata against its contents; return the metadata
    (with the stored images' sides). Raises DatasetFileError naming the file and what to do."""
    return check_metadata(Path(path), verify_checksum(path), read_facts(path))


def verify_checksum(path: str | Path) -> dict:
    """Check a .beton against its checksum (in full, or by its stamp for a large file); return its
    metadata as its sidecar says it. Raises DatasetFileError naming the file and what to do."""
    path = Path(path)
    rebuild = "rebuild it with `st-scale convert`"
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.beton"))
        hint = f" (it holds {', '.join(found[:4])})" if found else ""
        raise DatasetFileError(f"{path} is a folder{hint}; give the .beton file itself, e.g. {path / 'train.beton'}")
    if not path.is_file():
        raise DatasetFileError(f"dataset file {path} does not exist; {rebuild} or fix the path")
    checksum_file, metadata_file, stamp_file = sidecars(path)
    if not checksum_file.is_file():
        raise DatasetFileError(f"{path}: checksum file {checksum_file.name} is missing; {rebuild}")
    metadata = read_metadata(path)
    stat = path.stat()
    if stat.st_size != metadata.get("size_bytes"):
        raise DatasetFileError(
            f"{path} is {stat.st_size} bytes but was written as {metadata.get('size_bytes')} bytes "
            f"(truncated or overwritten); {rebuild}"
        )
    expected = checksum_file.read_text().split()[0]
    if metadata["sha256"] != expected:
        raise DatasetFileError(
            f"{path}: {metadata_file.name} describes another file (its sha256 differs from {checksum_file.name}); "
            f"copy the three files together, or {rebuild}"
        )
    large = stat.st_size >= FULL_CHECK_BYTES
    if not (large and _stamp_still_holds(path, stamp_file, stat, expected)):
        if sha256_of(path) != expected:
            raise DatasetFileError(f"{path} does not match its checksum {checksum_file.name} (corrupted); {rebuild}")
        if large:
            try:
                stamp_file.write_text(json.dumps(_stamp(path, stat, expected)))
            except OSError:
                pass  # read-only storage: verify in full next time
    return metadata


@dataclass(frozen=True)
class FileFacts:
    """What a .beton holds, read from the file itself: its header's sample count, the labels' range and
    the stored images' sides."""

    num_samples: int
    max_label: int
    image_sides: tuple[int, ...]  # every distinct width and height stored


# FFCV's file layout (ffcv/types.py, format version 2): a header, one descriptor per field, then one
# metadata record per sample. Read here with numpy alone: importing FFCV loads numba, tens of seconds
# on a busy machine, for a check that needs a few bytes a sample.
FFCV_VERSION = 2
_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_FIELD_METADATA = {  # FFCV's type id -> (st-scale's field, its per-sample metadata)
    1: ("label", np.dtype("<i8")),  # IntField
    2: ("image", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
}


def read_facts(path: str | Path) -> FileFacts:
    """The sample count from the FFCV header, the labels and image sizes from the per-sample metadata
    (a few bytes a sample: no image is decoded)."""
    not_ours = f"{path} is not an st-scale dataset file (an FFCV file of images and labels)"
    header = np.fromfile(path, dtype=_HEADER, count=1)
    if len(header) == 0 or header[0]["version"] != FFCV_VERSION:
        raise DatasetFileError(f"{not_ours}: no FFCV format-{FFCV_VERSION} header; rebuild it with `st-scale convert`")
    fields = np.fromfile(path, dtype=_FIELD, count=int(header[0]["num_fields"]), offset=_HEADER.itemsize)
    layout = [(bytes(f["name"]).rstrip(b"\0").decode(errors="replace"), int(f["type_id"])) for f in fields]
    if sorted(layout) != [("image", 2), ("label", 1)]:
        raise DatasetFileError(f"{not_ours}: its fields are {layout}; rebuild it with `st-scale convert`")
    record = np.dtype([(name, _FIELD_METADATA[type_id][1]) for name, type_id in layout], align=True)
    num_samples = int(header[0]["num_samples"])
    table = np.fromfile(path, dtype=record, count=num_samples, offset=_HEADER.itemsize + fields.nbytes)
    if len(table) != num_samples or num_samples == 0:
        raise DatasetFileError(
            f"{path}: its header says {num_samples} samples but {len(table)} are described; "
            f"rebuild it with `st-scale convert`"
        )
    labels = table["label"]
    if labels.min() < 0:
        raise DatasetFileError(f"{path}: label {labels.min()} is negative; labels are class indices from 0")
    sides = np.unique(np.concatenate([table["image"]["width"], table["image"]["height"]]))
    return FileFacts(num_samples, int(labels.max()), tuple(int(side) for side in sides))


def check_metadata(path: Path, metadata: dict, facts: FileFacts) -> dict:
    """The sidecar's description held against the file's contents: a count, a class set or an image size
    that disagrees is refused naming both values (the loaders index the file by the count, the head is
    sized by the classes)."""
    _, metadata_file, _ = sidecars(path)
    fix = f"the sidecar was edited or belongs to another file; rebuild {path.name} with `st-scale convert`"
    said = metadata.get("num_samples")
    if said != facts.num_samples:
        raise DatasetFileError(
            f"{path}: {metadata_file.name} says num_samples={said} but the file holds {facts.num_samples} samples; "
            f"{fix}"
        )
    classes = metadata.get("num_classes")
    if facts.max_label >= classes:  # (read_metadata checked it is a count)
        raise DatasetFileError(
            f"{path}: {metadata_file.name} says num_classes={classes} but its labels reach {facts.max_label}; {fix}"
        )
    size = metadata.get("image_size")
    if size is not None and facts.image_sides != (size,):
        stored = " and ".join(str(s) for s in facts.image_sides)
        raise DatasetFileError(
            f"{path}: {metadata_file.name} says image_size={size} but the file stores images with sides {stored}; {fix}"
        )
    return {**metadata, "image_sides": list(facts.image_sides)}
