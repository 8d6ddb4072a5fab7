"""Ctrl-C and SIGTERM end a run within seconds, and everything it started with it.

Ray Train answers Ctrl-C (SIGINT) on the driver by aborting the run: the controller stops the workers,
the last complete checkpoint stays, and `fit()` exits. A SIGTERM (what `kill`, Kubernetes and batch
schedulers send) would instead hit the handler Ray's core installs, which aborts the driver with a
native stack dump; st-scale turns it into the same graceful stop.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import RunStoppedError


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[dict]:
    """Within the block, SIGTERM is handled as Ctrl-C; the yielded dict records which one came."""
    received: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield received
        return

    def on_sigterm(signum, frame) -> None:
        received["signal"] = signal.SIGTERM
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:  # a handler installed outside Python (Ray's) reads back as None: restore the default
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def stopped(received: dict, what: str, resume: str) -> RunStoppedError:
    """The error that ends the command: which signal stopped `what`, how to continue, and the exit code
    a shell expects after that signal (128 + its number)."""
    sig = received["signal"] or signal.SIGINT
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C (SIGINT)"
    return RunStoppedError(f"{what} stopped by {name}; {resume}", exit_code=128 + int(sig))
