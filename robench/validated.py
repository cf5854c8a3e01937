"""``Options``: the base of every validated set of options a command and the Python API both build.

A bad value raises ``UsageError`` with pydantic's first problem on one line, naming the field
(and the nearest known name for a misspelled one): the same words from the command line and
from Python.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from robench.errors import UsageError
from robench.registry import did_you_mean

C = TypeVar("C", bound="Options")


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


def check_range(option: str, value: float, low: float, high: float) -> None:
    """Options are bounded and finite: nan slips through every comparison, 1e9 trials run for ever."""
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{option} must be between {low:g} and {high:g}, got {value:g}")


def one_of(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def choice_validator(table: Mapping[str, tuple[str, ...]]) -> Any:
    """A field validator for every field ``table`` names: its value is one of the listed ones, and the
    message names the command-line option (``--compile must be one of off, on, auto, got 'x'``)."""
    def check(cls: type, value: str, info: ValidationInfo) -> str:
        name = info.field_name or ""
        return one_of(f"--{name}", value, table[name])

    return field_validator(*table)(classmethod(check))


def parse_count(value: Any, option: str = "--save-adversarial") -> int | None:
    """``None`` (off), ``"all"`` or 0 (every sample: stored as 0), or a positive number of samples."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "all":
        return 0
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()):
        raise UsageError(f"{option} takes a number of samples or all, got {value!r}")
    return int(text)


def from_flat(cls: type[C], values: dict[str, Any], aliases: dict[str, str]) -> C:
    """A config made of ``Options`` parts, built from one flat set of named options, as the command
    line and ``robench.evaluate`` take them.

    Each name goes to the part that declares it (``aliases`` map the others, e.g. ``data`` to
    ``data.source``); a whole part may be given by its name instead. Parts are checked in ``cls``'s
    field order, so the first problem reported does not depend on the order the options came in.
    """
    parts = {name: kind for name, field in cls.model_fields.items() if (kind := _options_part(field.annotation))}
    declared = [(name, part) for part, kind in parts.items() for name in kind.model_fields]
    shared = {name for name, _ in declared if sum(other == name for other, _ in declared) > 1}
    # A name two parts declare (``source``) is reached only through an alias.
    owner = {name: (part, name) for name, part in declared if name not in shared}
    owner.update({name: (name, "") for name in cls.model_fields})
    owner.update({name: _part_and_field(target) for name, target in aliases.items()})
    grouped: dict[str, dict[str, Any]] = {part: {} for part in parts}
    top: dict[str, Any] = {}
    for name, value in values.items():
        if name not in owner:
            raise UsageError(f"unknown option {name!r}" + did_you_mean(name, list(owner)))
        part, field = owner[name]
        if field and isinstance(value, parts[part]):
            field = ""  # a whole part under its alias: model=ModelConfig(...)
        if field:
            grouped[part][field] = value
        else:
            top[part] = value
    for part, given in grouped.items():
        if part in top and given:
            raise UsageError(f"give either {part} or its options ({', '.join(given)}), not both")
    for name, (part, field) in ((n, _part_and_field(t)) for n, t in aliases.items()):
        if parts[part].model_fields[field].is_required() and field not in grouped[part] and part not in top:
            raise UsageError(f"{name} is required")
    built = {part: top.pop(part, None) or kind(**grouped[part]) for part, kind in parts.items()}
    return cls(**top, **built)


def _options_part(annotation: Any) -> type[Options] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Options) else None


def _part_and_field(target: str) -> tuple[str, str]:
    part, _, field = target.partition(".")
    return part, field
