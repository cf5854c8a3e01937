"""``robench compare`` and ``robench plot``: tables and curves from result files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from robench.cli.common import handle_errors, stderr, stdout_console, warn
from robench.errors import UsageError

# Reading and drawing modules (pandas, matplotlib) are imported on use: --help stays fast.


def _read_all(results: list[str], labels: list[str] | None):
    from robench.results.reading import read_result, skip_unfinished_dirs

    if labels and len(labels) != len(results):
        raise UsageError(f"--label was given {len(labels)} time(s) for {len(results)} result(s)")
    if not labels:  # with labels, positions matter: a missing result stays an error
        results = skip_unfinished_dirs(results, warn)
    read = [read_result(r, labels[i] if labels else None) for i, r in enumerate(results)]
    names = [r.label for r in read]
    if len(set(names)) < len(names):
        # Two runs of the same model: tell them apart by their run directory.
        read = [r if names.count(r.label) == 1 else read_result(r.path, f"{r.label} ({r.path.parent.name})")
                for r in read]
    return read


@handle_errors
def compare_command(
    results: Optional[List[str]] = typer.Argument(None, help="results.json files or run directories."),
    metric: Optional[str] = typer.Option(None, help="accuracy, success_rate, robust_accuracy, median_norm, rank1, mAP, "
                                         "pi, misclassified, recognition_rate (default: the layout's)."),
    layout: Optional[str] = typer.Option(None, help="fdd, alignment, reid, reid-rows or pixel (default: by result "
                                         "kind; ReID: reid-rows in the terminal, reid in files)."),
    rows: Optional[str] = typer.Option(None, help="Free pivot: comma-separated columns for rows (e.g. entry,eps)."),
    cols: Optional[str] = typer.Option(None, help="Free pivot: columns for columns (e.g. model)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Name per result, in order (default: model)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, markdown, csv, latex or html."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of stdout."),
    paper: Optional[List[str]] = typer.Option(None, "--paper", help="A paper's reported numbers beside the measured "
                                              "ones: NAME[:DATASET] (e.g. fdd-table3:fashion-mnist); `--paper list` "
                                              "lists them."),
) -> None:
    """Side-by-side tables in the papers' layouts."""
    from robench.reporting.compare import LAYOUTS, default_layout, pivot_table, render, rich_table
    from robench.results.reading import comparability_problems, results_frame

    if paper and "list" in paper:
        from robench.reporting.paper import listing

        sys.stdout.write(listing())
        return
    if not results:
        raise UsageError("give at least one result (a results.json file or a run directory)")
    read = _read_all(results, label)
    frame = results_frame(read)
    # Only the runs are checked for comparability: the paper's rows are not runs.
    problems = comparability_problems(read)
    paper_notes = []
    if paper:
        frame, paper_notes = _with_paper_rows(frame, paper)
    if rows or cols:
        if layout:
            raise UsageError("give either --layout or --rows/--cols")
        table = pivot_table(frame, (rows or "entry,eps").split(","), (cols or "model").split(","),
                            metric or "accuracy")
    else:
        name = layout or default_layout(read[0].kind, fmt)
        build = LAYOUTS.get(name)
        table = build(frame, metric) if metric else build(frame)
        _warn_layout_misfit(paper or [], name)
    table.notes.extend(paper_notes)
    for problem in problems:
        table.notes.append(f"not comparable: {problem}")
        stderr.print(f"robench: warning: not comparable: {problem}", highlight=False, markup=False)
    if fmt == "table":
        if out:
            raise UsageError("--format table prints to the terminal; choose markdown, csv, latex or html with --out")
        stdout_console().print(rich_table(table))
        return
    text = render(table, fmt)
    if out:
        out.write_text(text, encoding="utf-8")
        stderr.print(f"table written to {out}", highlight=False, markup=False)
    else:
        sys.stdout.write(text)


def _with_paper_rows(frame, specs: list[str]):
    """The measured rows followed by each paper table's rows, and a note per table."""
    import pandas as pd

    from robench.reporting.paper import paper_rows, table_note

    parts = [paper_rows(spec) for spec in specs]
    return pd.concat([frame, *parts], ignore_index=True), [table_note(spec) for spec in specs]


def _warn_layout_misfit(specs: list[str], layout: str) -> None:
    """A paper table shown in a layout it was not written for may land in rows of its own."""
    from robench.reporting.paper import PAPER_TABLES, parse_spec

    for spec in specs:
        table = PAPER_TABLES[parse_spec(spec)[0]]
        if layout not in table.layouts:
            fits = ", ".join(table.layouts)
            stderr.print(f"robench: warning: {table.title} fits the {fits} layout, not {layout}: its rows may not "
                         "line up with the measured ones", highlight=False, markup=False)


@handle_errors
def plot_command(
    results: List[str] = typer.Argument(..., help="results.json files or run directories."),
    x: Optional[str] = typer.Option(None, "--x", help="eps or pixels (default: by result kind)."),
    metric: Optional[str] = typer.Option(None, help="Default: accuracy (eps) or misclassified (pixels)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Name per result, in order (default: model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Figure file: .png, .svg or .pdf."),
) -> None:
    """Accuracy-vs-eps curves per model and attack, or misclassification vs pixel count (Pixel-index runs:
    percent of each setting's images, with ±1 s.d. over trials)."""
    from robench.reporting.plots import plot_results
    from robench.results.reading import comparability_problems

    read = _read_all(results, label)
    axis = x or ("pixels" if read[0].kind == "pixel" else "eps")
    plot = plot_results(read, axis, metric, out)
    if plot.left_out:
        # Runs of another kind (a pixel run has no eps, a classification run no pixel counts) are not drawn.
        names = "; ".join(f"{r.label}, a {r.kind} run" for r in plot.left_out)
        stderr.print(f"robench: warning: left out {len(plot.left_out)} run(s) with no {plot.metric} "
                     f"values against {axis}: {names}", highlight=False, markup=False)
    drawn = [r for r in read if all(r is not gone for gone in plot.left_out)]
    for problem in comparability_problems(drawn):
        stderr.print(f"robench: warning: not comparable: {problem}", highlight=False, markup=False)
    stderr.print(f"figure written to {plot.path}", highlight=False, markup=False)
