"""Where runs keep their checkpoints: a folder (on a cluster, one every node shares) or an
S3-compatible object store, `s3://bucket/prefix`, with `run.storage_endpoint` (else
$AWS_ENDPOINT_URL) naming a store other than AWS's (MinIO, Ceph, R2...).

The one module that knows how to reach either. Ray Train writes, keeps and downloads checkpoints
through the pyarrow filesystem built here; st-scale's own reads (which checkpoint is the newest
complete one, `st-scale eval` of a checkpoint) go through the same `Location`s.

S3 credentials follow AWS's chain on each node (a pod or instance role, ~/.aws, the AWS_* variables).
Keys set in the driver's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)
travel with the run's filesystem to its workers, so a run started from a laptop or a CI job reaches
the store from every node.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError

OBJECT_STORE_SCHEME = "s3://"
_PROBE_NAME = ".st_scale_write_check"


@dataclass(frozen=True)
class Location:
    """A file or folder on the run storage: the pyarrow filesystem that reaches it, its path in that
    filesystem and the URI a user recognises (an absolute path, or s3://bucket/key)."""

    filesystem: Any  # pyarrow.fs.FileSystem
    path: str
    uri: str

    @property
    def remote(self) -> bool:
        return self.uri.startswith(OBJECT_STORE_SCHEME)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> Location:
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    def _type(self):
        return self.filesystem.get_file_info(self.path).type

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._type() == FileType.File

    def is_dir(self) -> bool:
        """A folder; in an object store, a prefix that holds objects."""
        from pyarrow.fs import FileType

        return self._type() == FileType.Directory

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def children(self, pattern: str = "*") -> list[Location]:
        """The entries right under this folder whose names match `pattern`, by name; none if it does not exist."""
        from pyarrow.fs import FileSelector

        found = self.filesystem.get_file_info(FileSelector(self.path, allow_not_found=True))
        names = sorted(info.base_name for info in found if fnmatch(info.base_name, pattern))
        return [self / name for name in names]

    def download(self, names: list[str], into: Path) -> Path:
        """Copy the files `names` (relative to this folder) into the local folder `into`."""
        from pyarrow.fs import LocalFileSystem, copy_files

        for name in names:
            target = Path(into) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_files(
                (self / name).path,
                str(target),
                source_filesystem=self.filesystem,
                destination_filesystem=LocalFileSystem(),
            )
        return Path(into)


def is_object_store(path: str | Path) -> bool:
    return str(path).startswith(OBJECT_STORE_SCHEME)


def check_storage_fields(
    path: str, endpoint: str | None, *, field: str = "run.storage_path", endpoint_field: str = "run.storage_endpoint"
) -> None:
    """What a storage path and endpoint can get wrong without reaching anything (the config checks
    its run section with this; `st-scale eval` its arguments)."""
    if "://" in path and not is_object_store(path):
        raise ConfigError(
            f"{field}={path!r}: st-scale keeps checkpoints in a folder or an S3-compatible store; give a "
            f"folder path or an s3://bucket/prefix URI"
        )
    if is_object_store(path) and not path.removeprefix(OBJECT_STORE_SCHEME).split("/")[0]:
        raise ConfigError(f"{field}={path!r} names no bucket; give s3://<bucket>/<prefix>")
    if endpoint is not None:
        _check_endpoint(endpoint, endpoint_field)
        if not is_object_store(path):
            raise ConfigError(
                f"{endpoint_field}={endpoint!r} is set but {field}={path!r} is a folder; give an s3://<bucket>/... "
                f"URI for {field} to use that store, or drop the endpoint"
            )


def _check_endpoint(endpoint: str, field: str) -> None:
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
        raise ConfigError(
            f"{field}={endpoint!r} is not an S3 endpoint URL; give the store's address as http(s)://host[:port] "
            f"(e.g. http://minio.storage:9000)"
        )


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The S3 endpoint a run uses: the recipe's (checked with the config), else $AWS_ENDPOINT_URL
    (AWS's own variable), else None: AWS S3."""
    if endpoint:
        return endpoint
    from_env = os.environ.get("AWS_ENDPOINT_URL") or None
    if from_env is not None:
        _check_endpoint(from_env, "AWS_ENDPOINT_URL")
    return from_env


def s3_filesystem(bucket: str, endpoint: str | None, *, probe: bool = False):
    """pyarrow's S3 filesystem for `bucket` at `endpoint` (None: AWS, in the bucket's own region unless
    AWS_REGION says). `probe`: short timeouts and one retry, for checking the store answers before a
    run starts."""
    from pyarrow import fs

    options: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or _region(bucket, endpoint),
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID") or None,
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        "session_token": os.environ.get("AWS_SESSION_TOKEN") or None,
    }
    if not (options["access_key"] and options["secret_key"]):  # each node's own chain (role, ~/.aws)
        options.update(access_key=None, secret_key=None, session_token=None)
    if endpoint is not None:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if probe:
        options.update(
            connect_timeout=5, request_timeout=10, retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=2)
        )
    return fs.S3FileSystem(**options)


@functools.lru_cache
def _region(bucket: str, endpoint: str | None) -> str:
    """AWS answers for a bucket only in its region; other stores take any name."""
    if endpoint is None and bucket:
        from pyarrow.fs import resolve_s3_region

        try:
            return resolve_s3_region(bucket)
        except OSError:  # unknown or unreachable: the store check says so with the bucket's name
            pass
    return "us-east-1"


def resolve(path: str | Path | Location, endpoint: str | None = None, *, probe: bool = False) -> Location:
    """The Location of a local path (made absolute) or of an s3:// URI, reached through `endpoint`
    (else $AWS_ENDPOINT_URL)."""
    if isinstance(path, Location):
        return path
    if is_object_store(path):
        uri = str(path).rstrip("/")
        key = uri[len(OBJECT_STORE_SCHEME) :]
        return Location(s3_filesystem(key.split("/")[0], resolve_endpoint(endpoint), probe=probe), key, uri)
    from pyarrow.fs import LocalFileSystem

    local = Path(path).expanduser().resolve()
    return Location(LocalFileSystem(), str(local), str(local))


def ray_storage(location: Location) -> dict[str, Any]:
    """RunConfig's storage arguments: Ray Train takes an object store as its filesystem and the path in it."""
    if location.remote:
        return {"storage_path": location.path, "storage_filesystem": location.filesystem}
    return {"storage_path": location.path}


def check_object_store(
    uri: str, endpoint: str | None, *, field: str = "run.storage_path", write: bool = True
) -> str | None:
    """Reach the store before any work starts: the bucket exists and, with `write`, these credentials
    can write under the prefix (a probe object is written and deleted). Returns the endpoint used
    (`resolve_endpoint`'s), for the caller to record."""
    from pyarrow.fs import FileType

    endpoint = resolve_endpoint(endpoint)
    where = endpoint or "AWS S3"
    location = resolve(uri, endpoint, probe=True)
    bucket = location.path.split("/")[0]
    try:
        if location.filesystem.get_file_info(bucket).type == FileType.NotFound:
            raise ConfigError(
                f"{field}={uri}: bucket {bucket!r} does not exist at {where}; create it first "
                f"(aws s3 mb s3://{bucket}{f' --endpoint-url {endpoint}' if endpoint else ''}) or name another"
            )
        if write:
            probe = location / _PROBE_NAME
            with location.filesystem.open_output_stream(probe.path) as stream:
                stream.write(b"st-scale checks it can write here\n")
            location.filesystem.delete_file(probe.path)
    except OSError as error:
        said = str(error).splitlines()[0][:300]
        raise ConfigError(
            f"{field}={uri}: cannot {'write to' if write else 'read'} the object store at {where} ({said}); check "
            f"the endpoint (run.storage_endpoint, --storage-endpoint or AWS_ENDPOINT_URL) and the credentials "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or the node's role)"
        ) from None
    return endpoint


# Errors an object store recovers from (pyarrow's AWS error names): worth waiting for, unlike a
# refused permission or a missing bucket.
_TRANSIENT = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "INTERNAL_FAILURE", "UNKNOWN", "Timeout")


def with_retries(action, what: str, deadline_s: float, *, sleep=time.sleep, clock=time.monotonic):
    """`action()`, repeated while the store fails with a transient error, backing off 1, 2, 4 ... 30 s,
    for at most `deadline_s` seconds; the last error is raised after that (each wait is printed: a
    worker's output reaches the driver's console and Ray's logs)."""
    started, wait = clock(), 1.0
    while True:
        try:
            return action()
        except OSError as error:
            said = str(error).splitlines()[0][:200]
            left = deadline_s - (clock() - started)
            if not any(token in str(error) for token in _TRANSIENT) or left <= 0:
                raise
            wait = min(wait, left)
            print(f"st-scale: {what} failed ({said}); retrying in {wait:.0f} s", file=sys.stderr, flush=True)
            sleep(wait)
            wait = min(2 * wait, 30.0)


def checkpoint_upload(deadline_s: float):
    """Ray Train's `checkpoint_upload_fn`: Ray's own upload (its few quick retries included), repeated
    for up to `deadline_s` seconds while the store is unreachable, so a restarting store delays a
    checkpoint instead of failing the worker group."""

    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        storage = ray.train.get_context().get_storage()
        return with_retries(
            lambda: storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name),
            f"writing {checkpoint_dir_name} to the run storage",
            deadline_s,
        )

    return upload


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """Refuse before any work starts a path st-scale will write later (a summary file, a storage
    folder): one under a regular file, a folder where a file goes, or no write permission."""
    if "\x00" in str(path):
        raise ConfigError(f"{what}: {str(path)!r} holds a NUL character, which no path can; give a path without it")
    path = Path(path).expanduser().resolve()
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{what}: {path} is {'a file' if folder else 'a folder'}; give a {kind} path")
    parent = path if path.exists() and folder else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what}: {path} cannot be created because {parent} is a file; give a {kind} path elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {parent} is not writable; give a {kind} path you can write to")
    return path
