"""``robench suites`` and ``robench suites show NAME``."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from robench.cli.common import handle_errors, stdout_console

app = typer.Typer(help="List the built-in suites or print one.", invoke_without_command=True,
                  no_args_is_help=False)


@app.callback()
@handle_errors
def list_suites(ctx: typer.Context) -> None:
    """List the built-in suites."""
    from robench.suites import builtin_suites, load_suite  # on use: --help must not load torch

    if ctx.invoked_subcommand is not None:
        return
    suites = {name: load_suite(str(path)).suite for name, path in builtin_suites().items()}
    table = Table(title="built-in suites")
    # A name is what users type: never cut or wrapped. The description wraps instead.
    table.add_column("name", no_wrap=True, min_width=max(map(len, suites), default=4))
    table.add_column("dataset", overflow="fold")
    table.add_column("attacks", overflow="fold")
    table.add_column("description", overflow="fold", ratio=1)
    for name, suite in suites.items():
        attacks = ", ".join(sorted({a.display_name() for a in suite.attacks})) or "(clean only)"
        table.add_row(Text(name), Text(suite.dataset or "-"), Text(attacks), Text(suite.description))
    console = stdout_console()
    # Too wide for the terminal: fill it, the description taking what the other columns leave.
    table.expand = console.measure(table).maximum > console.width
    console.print(table)


@app.command("show")
@handle_errors
def show(name: str = typer.Argument(..., help="Suite name or path to a YAML file.")) -> None:
    """Print one suite's YAML (after checking that it is valid)."""
    from robench.suites import load_suite
    from robench.suites.loader import find_suite

    load_suite(name)
    typer.echo(find_suite(name).read_text(encoding="utf-8"), nl=False)
