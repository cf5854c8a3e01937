"""The names and the JSON Schemas of robench's documents; kept apart from the document builders so that
reading or checking a document (``gate``, ``compare``, ``plot``, ``report``) does not import torch.

The schema files (draft 2020-12) live beside this module in ``schemas/`` and ship in the wheel:

* ``results-1.schema.json``: ``robench.results/1``, classification and re-identification runs;
* ``pixel-index-1.schema.json``: ``robench.pixel-index/1``, Pixel-index runs;
* ``common-1.schema.json``: the blocks those two share (model, suite, env, ...), referenced by them;
* ``training-1.schema.json``: ``robench train``'s ``training.json`` (``"format": "robench-training-1"``);
* ``attack-check-1.schema.json``: ``robench.attack-check/1``, what ``robench check-attack`` writes;
* ``certify-1.schema.json``: ``robench.certify/1``, what ``robench certify`` writes;
* ``gate-1.schema.json``: what ``robench gate --json`` prints (``robench.reporting.gate/1``).

Versioning: the number in a document's name (the 1 of ``robench.results/1`` and ``results-1.schema.json``)
changes only for a change that could break a reader: a field removed, renamed or given another type, unit or
meaning, or a field that older documents lack made required. Within a version, fields are only added, as
optional ones, so the schema files of a robench release accept every document of the same version that
earlier releases wrote.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA = "robench.results/1"
PIXEL_SCHEMA = "robench.pixel-index/1"
TRAINING_FORMAT = "robench-training-1"
GATE_SCHEMA = "robench.reporting.gate/1"
CHECK_SCHEMA = "robench.attack-check/1"
CERTIFY_SCHEMA = "robench.certify/1"

SCHEMA_DIR = Path(__file__).with_name("schemas")
SCHEMA_FILES = {
    SCHEMA: "results-1.schema.json",
    PIXEL_SCHEMA: "pixel-index-1.schema.json",
    TRAINING_FORMAT: "training-1.schema.json",
    GATE_SCHEMA: "gate-1.schema.json",
    CHECK_SCHEMA: "attack-check-1.schema.json",
    CERTIFY_SCHEMA: "certify-1.schema.json",
}
SHARED_FILES = ("common-1.schema.json",)  # referenced by the document schemas, never chosen on its own
# Set to 1 (the test suite does), every document robench writes is validated first: a writer that drifts
# from its schema fails the run instead of publishing the drift.
CHECK_VARIABLE = "ROBENCH_CHECK_SCHEMA"
CONTROL_FREE = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"  # common-1's text: what the reader allows in strings
INSTALL_HINT = "pip install 'jsonschema>=4.18' (or robench's dev extra: pip install 'robench[dev]')"


class InvalidDocument(ValueError):
    """A document that its schema refuses; ``path`` names the field (``attacks[0].accuracy``, "" for the
    whole document)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path or '(document)'}: {problem}")
        self.path = path
        self.problem = problem


def document_name(document: Any) -> str:
    """The format a document says it is: its ``schema`` field (``format`` for ``training.json``)."""
    if not isinstance(document, dict):
        raise InvalidDocument("", f"must be a JSON object, got {type(document).__name__}")
    name = document.get("schema", document.get("format"))
    if name not in SCHEMA_FILES:
        known = ", ".join(SCHEMA_FILES)
        raise InvalidDocument("schema", f"{_shown(name)} is not a robench document schema (known: {known})")
    return name


def schema_for(document: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema (a fresh dict) ``document`` claims to follow, chosen by its ``schema`` field."""
    return _read_schema(SCHEMA_FILES[document_name(document)])


def validate_document(document: dict[str, Any]) -> None:
    """Raise ``InvalidDocument`` naming the first failing field unless ``document`` follows its schema.

    Two checks go beyond what a generic JSON Schema validator does on the file, so that robench's reader and
    this agree: a count written as a float (``40.0``) is not an integer, and NaN or infinity, which Python's
    json module writes but JSON has no spelling for, is refused wherever it appears.
    """
    name = document_name(document)
    _refuse_non_finite(document, "")
    errors = list(_validator(name).iter_errors(document))
    if errors:
        raise _described(_most_relevant(errors), name)


def check_before_writing(document: dict[str, Any]) -> None:
    """Validate ``document`` when ``ROBENCH_CHECK_SCHEMA=1``; the writers call it before writing a document."""
    if os.environ.get(CHECK_VARIABLE) == "1":
        validate_document(document)


# ------------------------------------------------------------------ loading
def _read_schema(filename: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / filename).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _validator(name: str) -> Any:
    try:
        # By name: jsonschema ships no type information (mypy would ask for stubs robench does not need).
        jsonschema = importlib.import_module("jsonschema")
        from referencing import Registry, Resource  # jsonschema's own resolver since 4.18
    except ImportError:
        raise ModuleNotFoundError(f"validating a robench document needs the jsonschema package: {INSTALL_HINT}",
                                  name="jsonschema") from None
    schemas = [_read_schema(f) for f in (*SCHEMA_FILES.values(), *SHARED_FILES)]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_strict_types(jsonschema))
    return strict(_read_schema(SCHEMA_FILES[name]), registry=registry)


def _strict_types(jsonschema: Any) -> Any:
    """JSON Schema counts 40.0 as an integer; the writers never write one and the reader refuses it."""
    def is_integer(_checker: Any, instance: Any) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    return jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", is_integer)


# ------------------------------------------------------------------ messages
def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _path_of(parts: Any) -> str:
    path = ""
    for key in parts:
        path = _join(path, key)
    return path


def _shown(value: Any) -> str:
    """A value as JSON spells it (Python's json writes NaN and Infinity too), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _most_relevant(errors: list[Any]) -> Any:
    """The error to report: an unexpected field (the likeliest mistake, a misspelling) or a wrong value
    before a missing one, deepest first, then in document order."""
    rank = {"additionalProperties": 0, "unevaluatedProperties": 0, "required": 2}
    return min(errors, key=lambda e: (rank.get(e.validator, 1), -len(e.absolute_path),
                                      [str(part) for part in e.absolute_path]))


def _described(error: Any, name: str) -> InvalidDocument:
    """One field path and one sentence; unexpected and missing fields are named by their own path."""
    path = _path_of(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        unexpected = _unexpected_keys(error)
        if unexpected:
            return InvalidDocument(_join(path, unexpected[0]), f"unexpected field (not in the {name} schema; "
                                   "misspelled?)")
    if error.validator in ("anyOf", "oneOf") and _alternatives(error):
        return _described(_most_relevant(_alternatives(error)), name)
    if error.validator == "pattern" and error.validator_value == CONTROL_FREE:
        return InvalidDocument(path, f"must not contain control characters, got {_shown(error.instance)}")
    if error.validator == "required":
        missing = next((k for k in error.validator_value if k not in error.instance), None)
        if missing is not None:
            return InvalidDocument(_join(path, missing), "field required")
    return InvalidDocument(path, error.message)


def _alternatives(error: Any) -> list[Any]:
    """Why a value fits none of ``anyOf``'s schemas, less "is not null": a nullable field's real complaint."""
    return [e for e in error.context or () if not (e.validator == "type" and e.validator_value == "null")]


def _unexpected_keys(error: Any) -> list[str]:
    """The keys an additionalProperties/unevaluatedProperties error is about: jsonschema names them, quoted,
    only in its message."""
    if not isinstance(error.instance, dict):
        return []
    return [key for key in error.instance if repr(key) in error.message]


def _refuse_non_finite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidDocument(path, f"{_shown(value)} is not a JSON number (write null for a missing value)")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, _join(path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_non_finite(item, _join(path, index))
