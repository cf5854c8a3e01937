"""``Options``: the base of every validated set of options a command and the Python API both build.

A bad value raises ``UsageError`` with pydantic's first problem on one line, naming the field
(and the nearest known name for a misspelled one): the same words from the command line and
from Python.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from robench.errors import UsageError
from robench.registry import did_you_mean


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise UsageError(first_problem(exc, list(type(self).model_fields))) from None


def first_problem(exc: ValidationError, fields: list[str]) -> str:
    """Pydantic's report, reduced to the first problem on one line, naming the field."""
    error = exc.errors()[0]
    name = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown option {name!r}" + did_you_mean(name, fields)
    if error["type"] == "missing":
        return f"{name} is required"
    return f"{name}: {error['msg']}, got {error.get('input')!r}"
