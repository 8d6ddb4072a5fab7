"""The error a user fixes: kept free of heavy imports so the command line can catch it before torch loads."""


class ConfigError(ValueError):
    """A recipe, override or option the user must fix; the message names the field, the value and the fix."""

    exit_code = 2


class RunFailedError(RuntimeError):
    """A run or sweep that started and then failed; the message says what failed, where the full log
    is and how to continue."""

    exit_code = 1


class RunStoppedError(RuntimeError):
    """A run stopped by Ctrl-C or SIGTERM, its workers stopped; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
