"""``robench suites`` and ``robench suites show NAME``."""

from __future__ import annotations

import typer
from rich.table import Table

from robench.cli.common import handle_errors, stdout_console
from robench.suites import builtin_suites, load_suite
from robench.suites.loader import find_suite

app = typer.Typer(help="List the built-in suites or print one.", invoke_without_command=True,
                  no_args_is_help=False)


@app.callback()
@handle_errors
def list_suites(ctx: typer.Context) -> None:
    """List the built-in suites."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table(title="built-in suites")
    for col in ("name", "dataset", "attacks", "description"):
        table.add_column(col)
    for name, path in builtin_suites().items():
        suite = load_suite(str(path)).suite
        attacks = ", ".join(sorted({a.display_name() for a in suite.attacks})) or "(clean only)"
        table.add_row(name, suite.dataset or "-", attacks, suite.description)
    stdout_console().print(table)


@app.command("show")
@handle_errors
def show(name: str = typer.Argument(..., help="Suite name or path to a YAML file.")) -> None:
    """Print one suite's YAML (after checking that it is valid)."""
    load_suite(name)
    typer.echo(find_suite(name).read_text(encoding="utf-8"), nl=False)
