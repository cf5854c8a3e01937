"""The gate's verdicts as people read them: the table, the one-line explanation, the metric and flag lines."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from robench.reporting.gate import GateOutcome

VERDICT_STYLE = {"regression": "bold red", "missing": "bold red", "not comparable": "bold red",
                 "sanity flag": "bold red", "improved": "green", "ok": "", "within noise": "yellow",
                 "allowed flag": "yellow"}

def _cell(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def _where(r: Any) -> str:
    if r.entry == "clean":
        return ""
    if r.eps is not None and r.eps == r.eps:
        return f"{r.eps:g}"
    from robench.results.tidy import pixels_text

    return pixels_text(r.pixels)


def _higher(r: Any) -> bool:
    return r.direction == "higher is better"


def gate_table(outcome: GateOutcome) -> Table:
    from robench.reporting.gate import allowed_change, signed, with_count

    table = Table(title="robench gate", caption=f"gated: {', '.join(outcome.metrics) or 'nothing'}")
    for col in ("metric", "entry", "eps/pixels", "baseline", "current", "change", "allowed change", "±1.96 se",
                "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "entry", "verdict") else "right")
    for r in outcome.rows.itertuples(index=False):
        stderr_95 = None if r.stderr is None or r.stderr != r.stderr else 1.96 * r.stderr
        change = "-" if r.delta is None or r.delta != r.delta else signed(r.delta)
        # Labels come from the documents: shown as text, never read as rich markup.
        table.add_row(Text(r.metric), Text(r.entry), _where(r), with_count(r.baseline, r.baseline_count),
                      with_count(r.current, r.current_count), change, allowed_change(r.threshold, _higher(r)),
                      _cell(stderr_95), _verdict_cell(r.verdict))
    for flag in outcome.flags:
        verdict = "allowed flag" if flag.allowed else "sanity flag"
        table.add_row("sanity flag", Text(flag.name), "", "", "", "", "", "", _verdict_cell(verdict))
    return table


def _verdict_cell(verdict: str) -> Text:
    return Text(verdict, style=VERDICT_STYLE.get(verdict, ""))


def _regression_line(r: Any) -> str:
    from robench.reporting.gate import allowed_change, signed

    where = _where(r)
    where = "" if not where else (f" at eps {where}" if r.eps == r.eps and r.eps is not None else f" at {where}")
    counts = f"{r.baseline_count} -> {r.current_count}, " if r.baseline_count and r.current_count else ""
    return (f"  {r.metric} of {r.entry}{where}: {r.baseline:.4f} -> {r.current:.4f} ({counts}change "
            f"{signed(r.delta)}; {r.direction}, allowed change {allowed_change(r.threshold, _higher(r), True)}, "
            f"{r.rule})")


def explain(outcome: GateOutcome) -> str:
    """The verdict on the values: not comparable, regressions, or passed."""
    if not outcome.comparable:
        return "not comparable: " + "; ".join(outcome.problems)
    bad = outcome.rows[outcome.rows.verdict.isin(["regression", "missing"])]
    if bad.empty:
        if outcome.failing_flags:
            return f"FAILED: {len(outcome.failing_flags)} sanity flag(s); {len(outcome.rows)} value(s) within " \
                   "their allowed change"
        return f"passed: {len(outcome.rows)} value(s) within their allowed change"
    lines = [f"FAILED: {len(bad)} regression(s)"]
    for r in bad.itertuples(index=False):
        if r.verdict == "missing":
            lines.append(f"  {r.metric} of {r.entry} is in the baseline but missing from the current run")
        else:
            lines.append(_regression_line(r))
    return "\n".join(lines)


def metric_line(outcome: GateOutcome) -> str:
    """Which metrics were gated, and which the runs report but were left out (and how to add them)."""
    line = f"gated metrics: {', '.join(outcome.metrics) or 'none'}"
    if outcome.not_gated:
        line += f"; not gated: {', '.join(outcome.not_gated)} (add with --metric)"
    return line


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
