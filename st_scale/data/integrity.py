"""Checksums and metadata beside each .beton file.

FFCV returns silently wrong images for some kinds of damage (flipped bytes, a truncated allocation
table), so every file gets `<name>.beton.sha256` and `<name>.beton.json` when written, and is
verified before training. A verified file leaves a stamp (size + mtime + digest) so a multi-GB
ImageNet file is hashed once, not at every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 8 << 20


class DatasetFileError(RuntimeError):
    """A .beton file that is missing, incomplete or damaged."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    checksum_file, _, stamp_file = sidecars(path)
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
        _, metadata_file, _ = sidecars(path)
        raise DatasetFileError(
            f"{path}: {metadata_file.name} describes another file (its sha256 differs from {checksum_file.name}); "
            f"copy the three files together, or {rebuild}"
        )
    stamp = f"{stat.st_size} {stat.st_mtime_ns} {expected}"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return metadata
    if sha256_of(path) != expected:
        raise DatasetFileError(f"{path} does not match its checksum {checksum_file.name} (corrupted); {rebuild}")
    try:
        stamp_file.write_text(stamp)
    except OSError:
        pass  # read-only storage: verify again next time
    return metadata
