"""``robench gate CURRENT --baseline BASELINE``: fail CI when robustness drops."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from robench.cli.common import handle_errors, stderr, stdout_console

# robench.reporting.gate (pandas, the sanity checks) is imported on use: --help stays fast.

METRIC_HELP = ("Metrics to gate, repeatable or comma-separated, globs allowed (e.g. "
               "accuracy,robust_accuracy,success_rate or 'rank*,mAP'). Default: the accuracy metrics: accuracy "
               "and robust_accuracy; ReID CMC ranks (rank1, rank5, ...) and mAP; Pixel-index recognition_rate. "
               "median_norm gates minimum-norm entries (fmn, fab) on their median minimal perturbation.")


def run_gate(current: Path | str, baseline: Path | str, max_drop: float, rules: list[str],
             require_significant: bool, junit: Optional[Path], as_json: bool, quiet: bool = False,
             allow_flags: Optional[list[str]] = None, metrics: Optional[list[str]] = None,
             tracking_uri: Optional[str] = None) -> int:
    """The gate's exit code; ``baseline`` may be ``mlflow:EXPERIMENT[@RUN_ID|@latest|@best]`` (fetched from
    ``tracking_uri``, default MLflow's own)."""
    from robench.cli.track import local_baseline
    from robench.reporting.gate import gate, junit_xml, parse_metrics, parse_rule
    from robench.reporting.gate_text import explain, flag_lines, gate_table, metric_line
    from robench.results.reading import read_result

    result = read_result(current)
    outcome = gate(result, read_result(local_baseline(str(baseline), tracking_uri)), max_drop=max_drop,
                   rules=[parse_rule(r) for r in rules], require_significant=require_significant,
                   allow_flags=allow_flags or [], metrics=parse_metrics(metrics) or None)
    if junit:
        junit.write_text(junit_xml(outcome), encoding="utf-8")
    if as_json:
        sys.stdout.write(json.dumps(outcome.to_dict(), indent=2, default=str) + "\n")
    elif not quiet and outcome.comparable:  # verdicts between runs that cannot be compared would mislead
        stdout_console().print(gate_table(outcome))
    # markup=False: entry labels and flag messages come from the documents.
    lines = [explain(outcome), *flag_lines(outcome)]
    if outcome.comparable:
        lines.append(metric_line(outcome))
    for line in lines:
        stderr.print(f"robench gate: {line}", highlight=False, markup=False)
    return outcome.exit_code


@handle_errors
def gate_command(
    current: str = typer.Argument(..., help="The new run's results.json or run directory."),
    baseline: str = typer.Option(..., "--baseline", "-b", help="The reference run's results.json or directory, or "
                                 "a run logged to MLflow: mlflow:EXPERIMENT (its most recent finished run), "
                                 "mlflow:EXPERIMENT@best (the highest robust_accuracy; Pixel-index runs: the "
                                 "highest worst-case recognition_rate) or mlflow:EXPERIMENT@RUN_ID."),
    max_drop: float = typer.Option(0.0, "--max-drop", help="Allowed change for the worse, in absolute fraction "
                                   "units (0.01 = one percentage point), for every gated value."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help=METRIC_HELP),
    rule: Optional[List[str]] = typer.Option(None, "--rule", help="METRIC@ENTRY:THRESHOLD, e.g. 'accuracy@pgd*:1pt' "
                                             "or 'mAP@*:2%'; the first matching rule wins over --max-drop. "
                                             "A rule naming one metric (success_rate@...) also gates it."),
    require_significant: bool = typer.Option(False, "--require-significant",
                                             help="Fail only on drops beyond 1.96 standard errors."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON to stdout."),
    allow_flag: Optional[List[str]] = typer.Option(None, "--allow-flag", help="A sanity flag of the current run "
                                                   "that may pass (e.g. gradient_masking); 'all' allows every flag."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", metavar="URI", help="With an mlflow: "
                                               "baseline: the MLflow tracking store (default: "
                                               "MLFLOW_TRACKING_URI, else MLflow's default)."),
) -> None:
    """CI gate against a baseline: exit 1 when robustness dropped.

    Exit 0: every gated value within its allowed change, no sanity flag (or only allowed ones).
    Exit 1: a regression or a flag. Exit 3: the runs are not comparable."""
    code = run_gate(current, baseline, max_drop, rule or [], require_significant, junit, as_json,
                    allow_flags=allow_flag or [], metrics=metric or [], tracking_uri=tracking_uri)
    raise typer.Exit(code)
