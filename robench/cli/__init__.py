"""The ``robench`` command line (thin Typer commands over the Python API)."""

from __future__ import annotations

import typer

from robench import __version__
from robench.cli import dmr_cmd, suites_cmd
from robench.cli.attacks_cmd import attacks_command
from robench.cli.certify_cmd import certify_command
from robench.cli.check_cmd import check_command
from robench.cli.compare_cmd import compare_command, plot_command
from robench.cli.eval_cmd import eval_command
from robench.cli.gate_cmd import gate_command
from robench.cli.group import RobenchGroup
from robench.cli.pixel_index_cmd import pixel_index_command
from robench.cli.report_cmd import report_command
from robench.cli.train_cmd import train_command

app = typer.Typer(
    name="robench",
    help="Adversarial-robustness evaluation for PyTorch checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=RobenchGroup,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)
app.command("eval")(eval_command)
app.command("pixel-index")(pixel_index_command)
app.command("check-attack")(check_command)
app.command("certify")(certify_command)
app.command("compare")(compare_command)
app.command("plot")(plot_command)
app.command("report")(report_command)
app.command("gate")(gate_command)
app.command("train")(train_command)
app.add_typer(suites_cmd.app, name="suites")
app.command("attacks")(attacks_command)
app.add_typer(dmr_cmd.app, name="dmr")


@app.command("version")
def version() -> None:
    """Print the robench version."""
    typer.echo(__version__)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the robench version and exit."),
) -> None:
    """Adversarial-robustness evaluation for PyTorch checkpoints."""


def main() -> None:
    app()
