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
from pathlib import Path

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
    return json.loads(metadata_file.read_text())


def verify_beton(path: str | Path) -> dict:
    """Check a .beton against its checksum; return its metadata. Raises DatasetFileError naming
    the file and what to do."""
    path = Path(path)
    rebuild = "rebuild it with `st-scale convert`"
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
    if metadata.get("sha256", expected) != expected:
        raise DatasetFileError(
            f"{path}: {metadata_file.name} describes another file (its sha256 differs from {checksum_file.name}); "
            f"copy the three files together, or {rebuild}"
        )
    large = stat.st_size >= FULL_CHECK_BYTES
    if large and _stamp_still_holds(path, stamp_file, stat, expected):
        return metadata
    if sha256_of(path) != expected:
        raise DatasetFileError(f"{path} does not match its checksum {checksum_file.name} (corrupted); {rebuild}")
    if large:
        try:
            stamp_file.write_text(json.dumps(_stamp(path, stat, expected)))
        except OSError:
            pass  # read-only storage: verify in full next time
    return metadata
