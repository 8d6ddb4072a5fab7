"""st-scale: Stimulative Training of residual networks at cluster scale."""

from importlib import metadata

try:
    __version__ = metadata.version("st-scale")  # pyproject.toml's version, as installed
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
