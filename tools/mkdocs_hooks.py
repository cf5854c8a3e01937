"""MkDocs hooks (mkdocs.yml, ``hooks:``): reference pages generated from what they describe, so they cannot
drift from it. ``<!-- cli-reference -->`` becomes every command and option (from the Typer app);
``<!-- schema-fields: NAME -->`` becomes the field table of robench/results/schemas/NAME.schema.json (or of
one of its ``$defs``, as ``NAME#DEF``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

SCHEMAS = Path(__file__).resolve().parent.parent / "robench" / "results" / "schemas"
CLI_MARKER = "<!-- cli-reference -->"
SCHEMA_MARKER = re.compile(r"<!-- schema-fields: ([\w-]+)(?:#(\w+))? -->")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs passes them by name)
    if CLI_MARKER in markdown:
        from robench.cli.reference import cli_markdown

        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    return SCHEMA_MARKER.sub(lambda m: schema_fields(m.group(1), m.group(2)), markdown)


def schema_fields(name: str, definition: str | None) -> str:
    schemas = {path.name.removesuffix(".schema.json"): json.loads(path.read_text())
               for path in SCHEMAS.glob("*.schema.json")}
    document = schemas[name]
    node = document["$defs"][definition] if definition else document
    rows = ["| field | type | description |", "|---|---|---|"]
    rows += [f"| `{path}`{' (required)' if required else ''} | {kind} | {text} |"
             for path, required, kind, text in _fields(node, "", document, schemas)]
    return "\n".join(rows) + "\n"


def _fields(node: dict, prefix: str, document: dict, schemas: dict) -> Iterator[tuple[str, bool, str, str]]:
    required = set(node.get("required", ()))
    for key, field in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        target, home = _resolve(field, document, schemas)
        text = field.get("description") or target.get("description", "")
        yield path, key in required, _kind(target, home, schemas), _cell(text)
        if "properties" in target:
            yield from _fields(target, f"{path}.", home, schemas)
        items, items_home = _resolve(target.get("items", {}), home, schemas)
        if "properties" in items:
            yield from _fields(items, f"{path}[].", items_home, schemas)


def _resolve(field: dict, document: dict, schemas: dict) -> tuple[dict, dict]:
    """The field with its ``$ref`` followed (within the document, or into common-1 by its $id), and the
    document the field now lies in (its own references are relative to that one)."""
    while "$ref" in field:
        where, _, pointer = field["$ref"].partition("#")
        base = schemas[where.removesuffix(".json")] if where else document
        target: Any = base
        for part in pointer.strip("/").split("/") if pointer.strip("/") else ():
            target = target[part]
        field = {**target, **{k: v for k, v in field.items() if k != "$ref"}}
        document = base
    return field, document


def _kind(field: dict, document: dict, schemas: dict) -> str:
    if "const" in field:
        return f"`{json.dumps(field['const'])}`"
    if "enum" in field:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in field["enum"])
    options = field.get("anyOf") or field.get("oneOf")
    if options:
        return " or ".join(_kind(*_resolve(o, document, schemas), schemas) for o in options)
    kind = field.get("type", "any")
    return " or ".join(kind) if isinstance(kind, list) else kind


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
