"""The error a user fixes: kept free of heavy imports so the command line can catch it before torch loads."""


class ConfigError(ValueError):
    """A recipe, override or option the user must fix; the message names the field, the value and the fix."""


class RunFailedError(RuntimeError):
    """A run or sweep that started and then failed; the message says what failed, where the full log
    is and how to continue (exit code 1)."""
