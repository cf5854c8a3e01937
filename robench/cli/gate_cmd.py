"""``robench gate CURRENT --baseline BASELINE``: fail CI when robustness drops."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table
from rich.text import Text

from robench.cli.common import handle_errors, stderr, stdout_console
from robench.reporting.gate import GateOutcome, gate, junit_xml, parse_rule
from robench.results.reading import read_result

VERDICT_STYLE = {"regression": "bold red", "missing": "bold red", "not comparable": "bold red",
                 "sanity flag": "bold red", "improved": "green", "ok": "", "within noise": "yellow",
                 "allowed flag": "yellow"}


def _cell(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def gate_table(outcome: GateOutcome) -> Table:
    table = Table(title="robench gate")
    for col in ("metric", "entry", "eps/pixels", "baseline", "current", "delta", "allowed drop", "±1.96 se",
                "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "entry", "verdict") else "right")
    for r in outcome.rows.itertuples(index=False):
        where = f"{r.eps:g}" if r.eps is not None and r.eps == r.eps else (
            f"{r.pixels} px" if r.pixels is not None and r.pixels == r.pixels else "")
        stderr_95 = None if r.stderr is None or r.stderr != r.stderr else 1.96 * r.stderr
        # Labels come from the documents: shown as text, never read as rich markup.
        table.add_row(Text(r.metric), Text(r.entry), where, _cell(r.baseline), _cell(r.current),
                      _cell(r.delta, "+.4f"), f"{r.threshold:.4f}", _cell(stderr_95), _verdict_cell(r.verdict))
    for flag in outcome.flags:
        verdict = "allowed flag" if flag.allowed else "sanity flag"
        table.add_row("sanity flag", Text(flag.name), "", "", "", "", "", "", _verdict_cell(verdict))
    return table


def _verdict_cell(verdict: str) -> Text:
    return Text(verdict, style=VERDICT_STYLE.get(verdict, ""))


def explain(outcome: GateOutcome) -> str:
    """The verdict on the values: not comparable, regressions, or passed."""
    if not outcome.comparable:
        return "not comparable: " + "; ".join(outcome.problems)
    bad = outcome.rows[outcome.rows.verdict.isin(["regression", "missing"])]
    if bad.empty:
        if outcome.failing_flags:
            return f"FAILED: {len(outcome.failing_flags)} sanity flag(s); {len(outcome.rows)} value(s) within " \
                   "their allowed drop"
        return f"passed: {len(outcome.rows)} value(s) within their allowed drop"
    lines = [f"FAILED: {len(bad)} regression(s)"]
    for r in bad.itertuples(index=False):
        if r.verdict == "missing":
            lines.append(f"  {r.metric} of {r.entry} is in the baseline but missing from the current run")
        else:
            lines.append(f"  {r.metric} of {r.entry}{'' if r.eps is None or r.eps != r.eps else f' at eps {r.eps:g}'}: "
                         f"{r.baseline:.4f} -> {r.current:.4f} ({r.direction}; allowed drop {r.threshold:.4f}, {r.rule})")
    return "\n".join(lines)


def flag_lines(outcome: GateOutcome) -> list[str]:
    """One line per sanity flag: the current run's fail unless allowed; the baseline's are notes."""
    lines = []
    for flag in outcome.flags:
        if flag.allowed:
            lines.append(f"note: sanity flag {flag.name} in the current run, allowed by --allow-flag: {flag.message}")
        else:
            lines.append(f"FAILED: sanity flag {flag.name} in the current run: {flag.message}; "
                         f"pass --allow-flag {flag.name} if this is expected")
    for flag in outcome.baseline_flags:
        lines.append(f"note: the baseline has sanity flag {flag.name} (baseline flags do not fail the gate): "
                     f"{flag.message}")
    return lines


def run_gate(current: Path | str, baseline: Path | str, max_drop: float, rules: list[str],
             require_significant: bool, junit: Optional[Path], as_json: bool, quiet: bool = False,
             allow_flags: Optional[list[str]] = None) -> int:
    outcome = gate(read_result(current), read_result(baseline), max_drop=max_drop,
                   rules=[parse_rule(r) for r in rules], require_significant=require_significant,
                   allow_flags=allow_flags or [])
    if junit:
        junit.write_text(junit_xml(outcome), encoding="utf-8")
    if as_json:
        sys.stdout.write(json.dumps(outcome.to_dict(), indent=2, default=str) + "\n")
    elif not quiet:
        stdout_console().print(gate_table(outcome))
    # markup=False: entry labels and flag messages come from the documents.
    for line in [explain(outcome), *flag_lines(outcome)]:
        stderr.print(f"robench gate: {line}", highlight=False, markup=False)
    return outcome.exit_code


@handle_errors
def gate_command(
    current: str = typer.Argument(..., help="The new run's results.json or run directory."),
    baseline: str = typer.Option(..., "--baseline", "-b", help="The reference run's results.json or directory."),
    max_drop: float = typer.Option(0.0, "--max-drop", help="Allowed drop in absolute fraction units "
                                   "(0.01 = one percentage point) for every entry."),
    rule: Optional[List[str]] = typer.Option(None, "--rule", help="METRIC@ENTRY:THRESHOLD, e.g. 'accuracy@pgd*:1pt' "
                                             "or 'mAP@*:2%'; the first matching rule wins over --max-drop."),
    require_significant: bool = typer.Option(False, "--require-significant",
                                             help="Fail only on drops beyond 1.96 standard errors."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON to stdout."),
    allow_flag: Optional[List[str]] = typer.Option(None, "--allow-flag", help="A sanity flag of the current run "
                                                   "that may pass (e.g. gradient_masking); 'all' allows every flag."),
) -> None:
    """Exit 0 if every value is within its allowed drop and the current run has no sanity flag (or only
    allowed ones), 1 on a regression or a flag, 3 if the runs are not comparable."""
    code = run_gate(current, baseline, max_drop, rule or [], require_significant, junit, as_json,
                    allow_flags=allow_flag or [])
    raise typer.Exit(code)
