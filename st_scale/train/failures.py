"""Which worker failures a run retries. Retries (`run.max_failures`) are for faults that can pass: a
lost worker, a node that went away. An error in the recipe, the data or the run itself (a loss that
diverges) recurs on every attempt, so retrying it only restarts the worker group again and again
(forever under `max_failures: -1`): such a run fails at the first one, with the worker's message."""

from __future__ import annotations

from ray.train import ControllerError, UserCallback

from ..data.integrity import DatasetFileError
from ..errors import ConfigError
from .step_window import NonFiniteLossError


class RecurringWorkerError(RuntimeError):
    """A worker failed in a way every retry would repeat."""


def _recurring_kinds() -> tuple[type[BaseException], ...]:

    return (ConfigError, DatasetFileError, NonFiniteLossError)


def recurring_cause(error: BaseException | None) -> BaseException | None:
    """The error, or what caused it (Ray wraps a worker's exception), if it would recur on a retry."""
    kinds = _recurring_kinds()
    for _ in range(8):  # a bounded walk down the chain of causes
        if error is None:
            return None
        if isinstance(error, kinds):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


class FailOnRecurringErrors(UserCallback):
    """Runs on the Ray Train controller: an exception raised here fails the run without a retry."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            cause = recurring_cause(error)
            if cause is not None:
                # Raised as the ControllerError Ray Train would wrap it in: its failure policy does not
                # retry a controller failure of this kind, and does not log its own traceback around it.
                raise ControllerError(
                    RecurringWorkerError(
                        f"worker {rank} failed with {type(cause).__name__}: {cause} (it would recur on every "
                        f"retry, so the run stops now instead of restarting the workers)"
                    )
                )
