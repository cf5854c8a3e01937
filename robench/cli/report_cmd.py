"""``robench report RUN... --out report.html``: one self-contained HTML page of result files."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from robench.cli.common import handle_errors, stderr, warn


@handle_errors
def report_command(
    runs: List[str] = typer.Argument(..., help="Run directories or results.json files (any kind)."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o",
                             help="HTML file to write (.html or .htm); an existing one is replaced."),
    title: str = typer.Option("robench report", "--title", help="Heading and window title of the page."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Name per run, in order (default: model)."),
) -> None:
    """One self-contained HTML report: summaries, the papers' tables, curves, flags and examples."""
    from robench.reporting.html import write_report  # matplotlib and pandas load only for this command

    written = write_report(runs, out, title=title, labels=label or None, warn=warn)
    stderr.print(f"report written to {written}", highlight=False, markup=False)
