"""The base of every configuration model: unknown keys are errors, assignments are validated, numbers
are finite; and the one rule for the names a user gives (runs, experiments, models)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A name becomes a folder (run.name under run.storage_path), an MLflow experiment or run name, a Ray
# Train run name: letters, digits, '.', '_' and '-', starting with a letter or digit, so that it is
# one path component on every file system and object store and never leaves its parent folder.
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def checked_name(field: str, value: Any) -> str:
    """`value` as a name, or a ValueError naming `field` and the rule. A number is taken as its text
    (`--set run.name=2024` parses as YAML's integer)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{field}={value!r}: a name takes {NAME_RULE} (and no '..'); rename it")
    return value


def one_of(kind: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")
    return value
