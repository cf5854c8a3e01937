"""Find, read and validate suites; errors name file, line and field."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from robench.attacks.registry import load_plugins
from robench.errors import UsageError
from robench.files import read_bounded_text
from robench.registry import did_you_mean
from robench.suites.schema import TRUST_CODE, AttackSpec, Suite, approx_target

# Suites are a few dozen lines. These bounds are checked on the YAML event stream, before
# anything is composed: a 1 KB file of nested aliases ("billion laughs") otherwise expands
# to gigabytes, and deep nesting overflows the recursive composer.
MAX_SUITE_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_NODES = 100_000  # with every alias expanded
MAX_DEPTH = 64


@dataclass
class LoadedSuite:
    suite: Suite
    path: str
    text: str
    # ``--eps``/``--norm`` applied on top of the file (see ``with_overrides``); None for the suite as written.
    overrides: dict[str, Any] | None = None

    @property
    def sha256(self) -> str:
        """Hash of the validated content, so comments and layout do not matter."""
        canon = json.dumps(_hash_form(self.suite), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()


# The attack fields every entry was hashed with (None when unset) before attacks declared their own
# parameters. Fixed, so existing hashes and the baselines compared by them stay valid; a parameter
# added since (by any attack, built in or not) enters the hash only where an entry sets it.
HASHED_FIELDS = ("steps", "step_size", "random_start", "restarts", "decay", "pixels", "delta", "area", "trials",
                 "shared_positions", "channels", "generator")


def _hash_form(suite: Suite) -> dict[str, Any]:
    """The validated content in the shape suites have always been hashed in."""
    doc = suite.model_dump(mode="json")
    for entry in doc["attacks"]:
        for name in HASHED_FIELDS:
            entry.setdefault(name, None)
    return doc


def with_overrides(loaded: LoadedSuite, *, eps: Sequence[str] | None = None,
                   norm: str | None = None, bpda: Sequence[str] | None = None) -> LoadedSuite:
    """A new suite whose entries with an eps budget run at ``eps`` (expressions) and under ``norm``, and
    whose gradient entries differentiate through the modules ``bpda`` names (identity approximations).

    Entries that name no eps (an attack without a budget, such as ``pixels``, or one that
    runs at its own, such as ``dmr`` without ``eps:``) keep their eps and norm; ``bpda`` replaces
    a gradient entry's own list. The record in ``overrides`` lists the entries that were changed
    (and the ``bpda`` names, when given). The changed entries are validated
    again, so every check that depends on eps or the norm (the radius, the step size at
    each eps, the norms the attack supports) runs on the values that will be used.
    ``loaded`` is not changed, and its hash stays that of the file's suite.
    """
    if eps is None and norm is None and bpda is None:
        return loaded
    suite, changed, attacks = loaded.suite, [], []
    flags = _flags(eps, norm, bpda)
    for index, spec in enumerate(suite.attacks):
        fields = _changed_fields(spec, eps, norm, bpda)
        if not fields:
            attacks.append(spec.model_copy(deep=True))
            continue
        attacks.append(_overridden_entry(suite.name, index, spec, fields, flags))
        changed.append({"index": index, "label": spec.display_name()})
    if bpda is not None and not any(spec.attack_class.family == "gradient" for spec in suite.attacks):
        raise UsageError(f"--bpda: suite {suite.name} has no gradient attack for it to apply to")
    fields = {name: getattr(suite, name) for name in Suite.model_fields}
    try:
        # The entries are validated instances (kept as they are): only the suite-wide checks run here.
        overridden = Suite.model_validate({**fields, "attacks": attacks})
    except ValidationError as exc:
        raise UsageError(f"{flags}: suite {suite.name}: {_message(exc)}") from None
    record: dict[str, Any] = {"eps": list(eps) if eps is not None else None, "norm": norm, "entries": changed}
    if bpda is not None:  # only when given: the records of --eps/--norm runs stay as they were
        record["bpda"] = list(bpda)
    return LoadedSuite(overridden, loaded.path, loaded.text, record)


def _changed_fields(spec: AttackSpec, eps: Sequence[str] | None, norm: str | None,
                    bpda: Sequence[str] | None) -> dict[str, Any]:
    """The fields the overrides give one entry (none: the entry is kept as it is)."""
    fields: dict[str, Any] = {}
    if spec.eps and eps is not None:
        fields["eps"] = list(eps)
    if spec.eps and norm is not None:
        fields["norm"] = norm
    if bpda is not None and spec.attack_class.family == "gradient":
        fields["bpda"] = list(bpda)
    return fields


def _overridden_entry(suite_name: str, index: int, spec: AttackSpec, changes: dict[str, Any],
                      flags: str) -> AttackSpec:
    fields = spec.model_dump(mode="json", exclude_none=True)
    if spec.eps:
        # The written text of each eps travels with it, so tables show "4/255" rather than its decimals.
        fields["eps"] = list(spec.eps_text or spec.eps)
    fields.update(changes)
    try:
        return AttackSpec.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(f"{flags}: suite {suite_name} attacks[{index}] ({spec.display_name()}): "
                         f"{_message(exc)}") from None


def _flags(eps: Sequence[str] | None, norm: str | None, bpda: Sequence[str] | None = None) -> str:
    given = ([f"--eps {','.join(eps)}"] if eps is not None else []) + ([f"--norm {norm}"] if norm else [])
    given += [f"--bpda {','.join(bpda)}"] if bpda is not None else []
    return " ".join(given)


def _message(exc: ValidationError) -> str:
    return exc.errors()[0]["msg"].removeprefix("Value error, ")


def builtin_dir(folder: str = "suites") -> Path:
    """Built-in YAML files (``suites``, ``recipes``): inside a wheel in the package, in a checkout at the top."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / f"_builtin_{folder}"
    return packaged if packaged.is_dir() else here.parent / folder


def builtin_files(folder: str = "suites") -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_dir(folder).glob("*.yaml"))}


def builtin_suites() -> dict[str, Path]:
    return builtin_files("suites")


def find_yaml(name_or_path: str, known: dict[str, Path], what: str) -> Path:
    """A YAML file's path, or a built-in one's by name (with a did-you-mean when neither)."""
    path = Path(name_or_path)
    try:
        # A folder named like a built-in (the digits saved as images in digits/) does not hide it.
        shadowed = name_or_path in known and path.is_dir()
        if path.suffix in (".yaml", ".yml") or (path.exists() and not shadowed):
            if not path.exists():
                raise UsageError(f"{what} file not found: {name_or_path}")
            return path  # a folder, pipe or device is refused, with what it is, when it is read
    except OSError as exc:  # e.g. a folder on the way that we may not enter
        raise UsageError(f"cannot read {what} file {name_or_path}: {exc.strerror or exc}") from None
    if name_or_path in known:
        return known[name_or_path]
    raise UsageError(f"unknown {what} {name_or_path!r}" + did_you_mean(name_or_path, list(known)))


def find_suite(name_or_path: str) -> Path:
    return find_yaml(name_or_path, builtin_suites(), "suite")


def load_suite(name_or_path: str, *, trust_code: bool = False, plugins: tuple[str, ...] = ()) -> LoadedSuite:
    """Read and validate a suite; ``trust_code`` lets it name ``module:factory`` architectures and import
    any of its ``plugins:``, ``plugins`` the modules the user named (``--plugin``)."""
    path = find_suite(name_or_path)
    return parse_suite(_read_suite_text(path), str(path), trust_code=trust_code, plugins=plugins)


def _read_suite_text(path: Path, what: str = "suite") -> str:
    # Never more than the limit: the file may be huge, endless (a device) or a pipe.
    return read_bounded_text(path, f"{what} file", MAX_SUITE_BYTES)


def read_yaml_document(path: Path, what: str) -> tuple[Any, dict[tuple, int], str]:
    """A bounded, safely loaded YAML file (suites, recipes): its data, each key's line, its text."""
    text = _read_suite_text(path, what)
    data, lines = _parse_yaml(text, str(path), what)
    return data, lines, text


def _parse_yaml(text: str, source: str, what: str) -> tuple[Any, dict[tuple, int]]:
    try:
        _check_yaml_bounds(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            raise UsageError(f"{source}: the {what} is empty")
        lines: dict[tuple, int] = {}
        _index_lines(root, (), lines, source)
        # Safe loading only: tags such as !!python/object are refused, never constructed.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{where}: malformed YAML: {problem}") from None
    return data, lines


def validation_message(exc: ValidationError, lines: dict[tuple, int], source: str) -> str:
    """``file:line field: problem`` for the first error of a validated YAML document."""
    return _first_error(exc, lines, source)


def parse_suite(text: str, source: str = "<suite>", *, trust_code: bool = False,
                plugins: tuple[str, ...] = ()) -> LoadedSuite:
    """Validate suite text. Without ``trust_code``, architectures and plugins that import Python code are
    refused, except the plugin modules the caller names in ``plugins`` (``--plugin``)."""
    if len(text) > MAX_SUITE_BYTES:
        raise UsageError(f"{source}: suite is larger than {MAX_SUITE_BYTES} characters; a suite is a short YAML file")
    data, lines = _parse_yaml(text, source, "suite")
    if not isinstance(data, dict):
        raise UsageError(f"{source}:1: a suite is a mapping with name: and attacks:")
    _import_plugins(data.get("plugins"), lines, source, trust_code, plugins)
    _import_approximations(data.get("attacks"), lines, source, trust_code, plugins)
    try:
        suite = Suite.model_validate(data, context={TRUST_CODE: trust_code})
    except ValidationError as exc:
        raise UsageError(_first_error(exc, lines, source)) from None
    return LoadedSuite(suite, source, text)


def _import_plugins(modules: Any, lines: dict[tuple, int], source: str, trust_code: bool,
                    named: tuple[str, ...]) -> None:
    """A suite's ``plugins:`` are imported before its entries are validated, when the user allows it."""
    if modules is None:
        return
    where = f"{source}:{lines.get(('plugins',), 1)} plugins"
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise UsageError(f"{where}: a list of module names")
    for module in modules:
        _check_import_allowed(module, where, trust_code, named)
    load_plugins(modules, where)


def _check_import_allowed(module: str, where: str, trust_code: bool, named: tuple[str, ...]) -> None:
    if not (trust_code or module in named or module in sys.modules):
        raise UsageError(f"{where}: importing {module} runs its code; pass --plugin {module} (or "
                         "--trust-suite) to allow it")


def _import_approximations(entries: Any, lines: dict[tuple, int], source: str, trust_code: bool,
                           named: tuple[str, ...]) -> None:
    """The modules of the entries' BPDA approximations (``approx: file.py:function``) are plugins too:
    imported before validation, under the same rule as ``plugins:``. Malformed entries are left to it."""
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        specs = entry.get("bpda") if isinstance(entry, dict) else None
        for j, spec in enumerate(specs if isinstance(specs, list) else []):
            text = spec.get("approx") if isinstance(spec, dict) else None
            if not isinstance(text, str):
                continue
            loc = ("attacks", i, "bpda", j, "approx")
            try:
                module, _ = approx_target(text)
            except ValueError:
                continue  # validation names the field and the problem
            where = field_location(source, loc, lines)
            _check_import_allowed(module, where, trust_code, named)
            load_plugins([module], where)


def _check_yaml_bounds(text: str, source: str) -> None:
    """Count aliases, depth and expanded size on the event stream (yaml.parse is not recursive)."""
    aliases, depth, total = 0, 0, 0
    open_collections: list[tuple[str | None, int]] = []  # (anchor, nodes counted before it)
    anchor_sizes: dict[str, int] = {}
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        mark = event.start_mark  # the parser marks every event; the type allows none
        where = source if mark is None else f"{source}:{mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise UsageError(f"{where}: too many YAML aliases ({aliases}; at most {MAX_ALIASES})")
            if any(anchor == event.anchor for anchor, _ in open_collections):
                raise UsageError(f"{where}: YAML alias *{event.anchor} refers to the collection it is in")
            total += anchor_sizes.get(event.anchor, 1) if event.anchor else 1
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                anchor_sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise UsageError(f"{where}: nesting deeper than {MAX_DEPTH} levels")
            open_collections.append((event.anchor, total))
            total += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, before = open_collections.pop()
            if anchor:
                anchor_sizes[anchor] = total - before
        if total > MAX_NODES:
            raise UsageError(f"{where}: the YAML expands to more than {MAX_NODES} values (aliases expanded); "
                             "write the entries out instead of nesting aliases")


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise UsageError(f"{source}:{line} {_dotted(path)}: keys must be plain names, not lists or mappings")
            key = key_node.value
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


def field_location(source: str, loc: tuple, lines: dict[tuple, int]) -> str:
    """``file:line field`` of a field of a YAML document: the line of the longest part of ``loc`` in it."""
    line = next((lines[loc[:cut]] for cut in range(len(loc), -1, -1) if loc[:cut] in lines), None)
    return f"{source}:{line or 1} {_dotted(loc)}"


def _first_error(exc: ValidationError, lines: dict[tuple, int], source: str) -> str:
    err = exc.errors()[0]
    # pydantic adds union-member names to loc; keep only keys present in the file.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not str(p).startswith(("float", "int", "str", "bool")))
    loc = _drop_union_tags(loc, lines)
    line = next((lines[loc[:cut]] for cut in range(len(loc), -1, -1) if loc[:cut] in lines), None)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "field required"
    loc, line, msg = _point_at_named_field(loc, line, msg, lines)
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}:{line or 1} {_dotted(loc)}: {msg}{more}"


def _drop_union_tags(loc: tuple, lines: dict[tuple, int]) -> tuple:
    """pydantic puts a tagged union's tag in loc (``defenses.0.lfm.p``); the file has no such key."""
    kept: tuple = ()
    for i, part in enumerate(loc):
        following = loc[i + 1] if i + 1 < len(loc) else None
        if (isinstance(part, str) and kept + (part,) not in lines and following is not None
                and kept + (following,) in lines):
            continue
        kept += (part,)
    return kept


def _point_at_named_field(loc: tuple, line: int | None, msg: str, lines: dict[tuple, int]) -> tuple:
    """Checks across fields report ``field: problem`` on the entry; point at that field's own line."""
    field, sep, rest = msg.partition(": ")
    if sep and field.isidentifier() and loc + (field,) in lines:
        return loc + (field,), lines[loc + (field,)], rest
    return loc, line, msg
