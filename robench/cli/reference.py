"""The command line's reference as Markdown, generated from the Typer app itself, for the docs site (the
hook in tools/mkdocs_hooks.py puts it into docs/reference/cli.md). Typer carries its own copy of click, so
a generator written against click's classes would find no options: this one asks the commands."""

from __future__ import annotations

from typing import Any, Iterator

import typer

from robench.cli import app


def cli_markdown() -> str:
    group = typer.main.get_command(app)
    root = group.make_context("robench", [], resilient_parsing=True)
    return "\n".join(_command("robench", group, root, level=2)) + "\n"


def _command(path: str, command: Any, ctx: Any, level: int) -> Iterator[str]:
    yield f"{'#' * level} `{path}`\n"
    if command.help:
        yield _plain(command.help) + "\n"
    yield f"```text\nUsage: {path} {' '.join(command.collect_usage_pieces(ctx))}\n```\n"
    yield from _options(command, ctx)
    for name in getattr(command, "list_commands", lambda _ctx: [])(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = sub.make_context(name, [], parent=ctx, resilient_parsing=True)
        yield from _command(f"{path} {name}", sub, sub_ctx, level + 1)


def _options(command: Any, ctx: Any) -> Iterator[str]:
    rows = [record for param in command.get_params(ctx) if (record := param.get_help_record(ctx))]
    if not rows:
        return
    yield "| argument or option | what it does |\n|---|---|"
    for names, help_text in rows:
        yield f"| `{_cell(names)}` | {_cell(_plain(help_text))} |"
    yield ""


def _plain(text: str) -> str:
    """Help text without Typer's rich markup and click's paragraph marks."""
    return text.replace("\b\n", "").replace("[bold]", "").replace("[/bold]", "").strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
