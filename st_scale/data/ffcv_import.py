"""FFCV, imported without the JIT compilation it does at import for nothing.

`ffcv.fields.rgb_image` keeps its image modes ('jpg' -> 0, 'raw' -> 1) in a numba typed Dict built at
import; its first insert JIT-compiles numba's dict implementation: 5-10 s of CPU in every process that
imports FFCV, each Ray worker of each run and each restart among them. Only Python code reads that
dict (the decoders hand the mode to their compiled pipeline as an int, the writer stores it in a
record), so a plain dict in its place reads and writes the same bytes.
"""

from __future__ import annotations

import sys


def import_ffcv() -> None:
    """Import FFCV (once per process) with a plain dict for its image modes. The loaders call this
    first, as every worker builds them; a conversion's writer process imports FFCV once per conversion."""
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict  # read by `from numba.typed import Dict` in FFCV's modules as they load
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
