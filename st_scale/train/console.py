"""What a run shows on the console: one progress bar and one line per epoch, drawn by the driver.

Ray forwards every worker's output to the driver with a pid prefix, so progress bars drawn in the
workers arrive garbled (several lines per epoch) and Ray Train's own INFO messages arrive once per
rank. Instead, rank 0 posts its progress to a small Ray actor (the board) and the driver
draws it (`ConsoleView`); the workers keep only warnings and errors (`quiet_logs`). With
`--verbose` everything Ray and MLflow say is shown, as before.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

POLL_INTERVAL_S = 0.5  # how often the driver reads the board
POST_INTERVAL_S = 1.0  # rank 0 posts its step at most this often: one small actor call


class _Board:
    """A mailbox of progress events: rank 0 posts, the driver takes."""

    def __init__(self) -> None:
        self._events: list[dict] = []

    def post(self, event: dict) -> None:
        self._events.append(event)

    def take(self) -> list[dict]:
        events, self._events = self._events, []
        return events


class ProgressPoster:
    """Rank 0's side: its step at most once per POST_INTERVAL_S, and every epoch's figures. Without a
    board (the other ranks, Tune trials) every call does nothing."""

    def __init__(self, board: Any | None) -> None:
        self._board = board
        self._last = 0.0

    def step(self, step: int, total_steps: int, loss: float | None) -> None:
        now = time.monotonic()
        if self._board is None or now - self._last < POST_INTERVAL_S:
            return
        self._last = now
        self._board.post.remote({"kind": "step", "step": step, "total": total_steps, "loss": loss})

    def epoch(self, metrics: dict[str, Any], epochs: int) -> None:
        if self._board is not None:
            self._board.post.remote({"kind": "epoch", "epochs": epochs, "metrics": metrics})


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def epoch_line(metrics: dict[str, Any], epochs: int, seconds_left: float | None) -> str:
    """One epoch as a person reads it: loss, main top-1 (and the weights' average's), sub-network
    mean ± std (epochs that evaluated them), throughput, the epoch's time and the time left."""
    epoch = int(metrics["epoch"])
    parts = [f"epoch {epoch:>{len(str(epochs))}}/{epochs}"]
    if "train/epoch_loss" in metrics:
        parts.append(f"loss {metrics['train/epoch_loss']:.4f}")
    if "val/main_top1" in metrics:
        parts.append(f"main top-1 {metrics['val/main_top1']:.2f}%")
    if "val/ema/main_top1" in metrics:
        parts.append(f"EMA {metrics['val/ema/main_top1']:.2f}%")
    if "val/subnets_mean_top1" in metrics:
        parts.append(
            f"sub-nets {metrics['val/subnets_mean_top1']:.2f} ± {metrics['val/subnets_std_top1']:.2f}% "
            f"(min {metrics['val/subnets_min_top1']:.2f}, {int(metrics['val/num_subnets'])} nets)"
        )
    if "train/epoch_images_per_s" in metrics:
        parts.append(f"{metrics['train/epoch_images_per_s']:,.0f} img/s")
    if "train/epoch_time_s" in metrics:
        parts.append(format_duration(metrics["train/epoch_time_s"]))
    if seconds_left is not None and epoch < epochs:
        parts.append(f"{format_duration(seconds_left)} left")
    return "  ".join(parts)


class ConsoleView:
    """The driver's side: it starts the board (`board`, handed to the workers), and around
    `trainer.fit()` a thread reads it and draws one bar (on stderr) and one line per epoch (on
    stdout, above the bar). Leaving the block ends the board."""

    def __init__(self, label: str) -> None:
        import ray

        self.board = ray.remote(num_cpus=0)(_Board).remote()  # no CPU: it must never hold a worker's slot
        self._label = label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="st-scale-console", daemon=True)
        self._bar = None
        self._first_step_at: float | None = None  # worker start-up is not an epoch's time
        self._epochs_seen = 0

    def __enter__(self) -> ConsoleView:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * POLL_INTERVAL_S)
        self._drain()  # the last epoch's line, posted just before fit() returned
        if self._bar is not None:
            self._bar.close()
        import ray

        ray.kill(self.board)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            events = ray.get(self.board.take.remote(), timeout=30)
        except Exception:  # the board is best-effort: a run never fails because its display did
            return
        for event in events:
            if event["kind"] == "step":
                self._show_step(event)
            else:
                self._show_epoch(event)

    def _show_step(self, event: dict) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._first_step_at = time.monotonic()
            self._bar = tqdm(  # from the step it starts at: a resumed run's rate counts only its own steps
                total=event["total"],
                initial=event["step"],
                desc=self._label,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
        self._bar.n = event["step"]
        if event["loss"] is not None:
            self._bar.set_postfix(loss=f"{event['loss']:.3f}", refresh=False)
        self._bar.refresh()

    def _show_epoch(self, event: dict) -> None:
        from tqdm import tqdm

        self._epochs_seen += 1
        metrics, epochs = event["metrics"], event["epochs"]
        left = None
        if self._first_step_at is not None:  # epochs so far, training and evaluation, since the first step
            per_epoch = (time.monotonic() - self._first_step_at) / self._epochs_seen
            left = per_epoch * (epochs - int(metrics["epoch"]))
        line = epoch_line(metrics, epochs, left)
        tqdm.write(line, file=sys.stdout)


def quiet_logs() -> None:
    """On the driver and in every worker: Ray Train's per-rank INFO messages and MLflow's INFO lines
    off the console; warnings and errors stay. Ray names the logger of "Reporting training result ..." after its file,
    which `LoggingConfig` does not reach."""
    from ray._private.log import PlainRayHandler
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.train").handlers:  # a worker's: console, and Ray Train's log files
        if isinstance(handler, PlainRayHandler):
            handler.addFilter(_not_a_worker_traceback)
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # MLflow sets its loggers' level from this when imported
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _not_a_worker_traceback(record: logging.LogRecord) -> bool:
    """The failed worker's traceback stays in Ray Train's log files; the driver's failure message
    names the error and where those files are."""
    return not record.getMessage().startswith("Error in training function")
