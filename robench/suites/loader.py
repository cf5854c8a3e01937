"""Find, read and validate suites; errors name file, line and field."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from robench.errors import UsageError
from robench.registry import did_you_mean
from robench.suites.schema import Suite


@dataclass
class LoadedSuite:
    suite: Suite
    path: str
    text: str

    @property
    def sha256(self) -> str:
        """Hash of the validated content, so comments and layout do not matter."""
        canon = json.dumps(self.suite.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()


def builtin_dir() -> Path:
    """Inside a wheel the suites sit in the package; in a checkout, at the top."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_builtin_suites"
    return packaged if packaged.is_dir() else here.parent / "suites"


def builtin_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def find_suite(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UsageError(f"suite file not found: {name_or_path}")
        return path
    known = builtin_suites()
    if name_or_path in known:
        return known[name_or_path]
    raise UsageError(f"unknown suite {name_or_path!r}" + did_you_mean(name_or_path, list(known)))


def load_suite(name_or_path: str) -> LoadedSuite:
    path = find_suite(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read suite {path}: {exc}") from exc
    return parse_suite(text, str(path))


def parse_suite(text: str, source: str = "<suite>") -> LoadedSuite:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            raise UsageError(f"{source}: the suite is empty")
        lines: dict[tuple, int] = {}
        _index_lines(root, (), lines, source)
        # Safe loading only: tags such as !!python/object are refused, never constructed.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{source}:1: a suite is a mapping with name: and attacks:")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        raise UsageError(_first_error(exc, lines, source)) from None
    return LoadedSuite(suite, source, text)


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UsageError(
                    f"{source}:{line} {_dotted(path + (key,))}: duplicate key (first at line {seen[key]})"
                )
            seen[key] = line
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, source)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), lines, source)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out or "(top level)"


def _first_error(exc: ValidationError, lines: dict[tuple, int], source: str) -> str:
    err = exc.errors()[0]
    # pydantic adds union-member names to loc; keep only keys present in the file.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not str(p).startswith(("float", "int", "str", "bool")))
    line = None
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            line = lines[loc[:cut]]
            break
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "field required"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}:{line or 1} {_dotted(loc)}: {msg}{more}"
