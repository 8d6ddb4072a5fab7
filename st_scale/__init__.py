"""st-scale: Stimulative Training of residual networks at cluster scale."""

import os
from importlib import metadata


def _quiet_local_defaults() -> None:
    """Loopback only, no usage reporting, Ray Train V2: for every process that imports st-scale.
    Ray reads these when it is first imported, so they are set here, before anything imports ray."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


_quiet_local_defaults()

try:
    __version__ = metadata.version("st-scale")  # pyproject.toml's version, as installed
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
