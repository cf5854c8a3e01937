"""The CI gate: does a run lose robustness against a baseline, beyond the allowed drop?

Entries are matched by (entry, attack settings, eps or pixel count, metric).
Each metric has a direction (accuracy, CMC, mAP: higher is better; attack
success rate, Pi, misclassification: lower is better), so a "drop" is always
a change for the worse. Thresholds: ``--max-drop`` in absolute fraction units
(0.01 = one percentage point) for every entry, overridden by the first
matching ``--rule METRIC@ENTRY:THRESHOLD`` (ENTRY a glob on the entry label,
THRESHOLD ``1pt``, ``2%`` of the baseline value, or a number). With
``require_significant`` a drop fails only if it also exceeds 1.96 standard
errors of the difference of two proportions, sqrt(p(1-p)/n) each.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pandas as pd

from robench.errors import UsageError
from robench.results.reading import HIGHER_IS_BETTER, ResultFile, comparability_problems, results_frame

KEY = ["entry", "settings", "eps", "pixels", "metric"]
Z_95 = 1.96
# Metrics that are a fraction of n samples (queries), where sqrt(p(1-p)/n) is their standard error.
PROPORTIONS = {"accuracy", "robust_accuracy", "success_rate", "rank1", "rank5", "rank10", "rank20", "recognition_rate"}
_RULE = re.compile(r"^\s*(?P<metric>[^@\s]+)@(?P<entry>[^:]+):\s*(?P<value>[0-9.]+)\s*(?P<unit>pt|%)?\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    entry: str
    value: float
    relative: bool
    text: str

    def matches(self, metric: str, entry: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.metric) and fnmatch.fnmatchcase(entry, self.entry)

    def threshold(self, baseline: float) -> float:
        return abs(baseline) * self.value / 100.0 if self.relative else self.value


def parse_rule(text: str) -> Rule:
    """``accuracy@pgd*:1pt`` (1 point absolute), ``mAP@*:2%`` (2% of the baseline), ``pi@*:0.5``."""
    m = _RULE.match(text)
    if not m:
        raise UsageError(f"--rule {text!r}: expected METRIC@ENTRY:THRESHOLD, e.g. 'accuracy@pgd*:1pt' or 'mAP@*:2%'")
    value, unit = float(m.group("value")), m.group("unit")
    if unit == "pt":
        value /= 100.0  # points of a percentage, values are fractions
    return Rule(m.group("metric"), m.group("entry").strip(), value, unit == "%", text)


def standard_error(metric: str, value: float, n: Any) -> float | None:
    if metric not in PROPORTIONS or n is None or not isinstance(n, (int, float)) or n <= 0 or math.isnan(n):
        return None
    p = min(max(value, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


@dataclass
class GateOutcome:
    rows: pd.DataFrame
    problems: list[str]

    @property
    def comparable(self) -> bool:
        return not self.problems

    @property
    def failed(self) -> bool:
        return bool((self.rows.verdict.isin(["regression", "missing"])).any())

    @property
    def exit_code(self) -> int:
        if not self.comparable:
            return 3
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        rows = self.rows.astype(object).where(self.rows.notna(), None)
        return {"schema": "robench.gate/1", "comparable": self.comparable, "problems": self.problems,
                "passed": self.exit_code == 0, "exit_code": self.exit_code,
                "regressions": int(self.rows.verdict.isin(["regression", "missing"]).sum()),
                "rows": rows.to_dict(orient="records")}


def gate(current: ResultFile, baseline: ResultFile, *, max_drop: float = 0.0, rules: list[Rule] | None = None,
         require_significant: bool = False) -> GateOutcome:
    if max_drop < 0:
        raise UsageError(f"--max-drop must be >= 0, got {max_drop}")
    rules = rules or []
    problems = comparability_problems([baseline, current])
    base = results_frame([baseline]).drop(columns=["model", "source"])
    cur = results_frame([current]).drop(columns=["model", "source"])
    for frame in (base, cur):
        frame["eps"] = frame["eps"].astype(float).round(10)
        frame["pixels"] = frame["pixels"].astype(float)
    merged = base.merge(cur, on=KEY, how="left", suffixes=("_baseline", "_current"))
    out = []
    for r in merged.itertuples(index=False):
        b, c = r.value_baseline, r.value_current
        higher = r.metric in HIGHER_IS_BETTER
        rule = next((x for x in rules if x.matches(r.metric, r.entry)), None)
        threshold = rule.threshold(b) if rule else max_drop
        row = {"entry": r.entry, "metric": r.metric, "eps": None if pd.isna(r.eps) else r.eps,
               "pixels": None if pd.isna(r.pixels) else int(r.pixels), "baseline": b,
               "current": None if pd.isna(c) else c, "delta": None, "threshold": threshold,
               "rule": rule.text if rule else f"max-drop {max_drop:g}",
               "direction": "higher is better" if higher else "lower is better", "stderr": None, "verdict": None}
        if pd.isna(c):
            row["verdict"] = "missing"
            out.append(row)
            continue
        delta = c - b
        drop = -delta if higher else delta
        se_b = standard_error(r.metric, b, r.n_baseline)
        se_c = standard_error(r.metric, c, r.n_current)
        row["delta"] = delta
        if se_b is not None and se_c is not None:
            row["stderr"] = math.sqrt(se_b ** 2 + se_c ** 2)
        row["drop"] = drop
        out.append(row)
    _mean_stderr(out)
    for row in out:
        if row["verdict"] is not None:
            continue
        drop, threshold = row.pop("drop"), row["threshold"]
        if drop > threshold + 1e-12:
            noise = require_significant and row["stderr"] is not None and drop <= Z_95 * row["stderr"]
            row["verdict"] = "within noise" if noise else "regression"
        elif drop < -1e-12:
            row["verdict"] = "improved"
        else:
            row["verdict"] = "ok"
    for row in out:
        row.pop("drop", None)
    columns = ["entry", "metric", "eps", "pixels", "baseline", "current", "delta", "threshold", "rule", "direction",
               "stderr", "verdict"]
    return GateOutcome(pd.DataFrame(out, columns=columns), problems)


def _mean_stderr(rows: list[dict[str, Any]]) -> None:
    """The papers' Mean column averages k attack accuracies: its error is sqrt(sum se_i^2) / k."""
    parts = [r["stderr"] for r in rows if r["metric"] == "accuracy" and r["entry"] != "clean"
             and r["stderr"] is not None]
    for r in rows:
        if r["metric"] == "mean_attack_accuracy" and parts and r["current"] is not None:
            r["stderr"] = math.sqrt(sum(se ** 2 for se in parts)) / len(parts)


def junit_xml(outcome: GateOutcome, name: str = "robench gate") -> str:
    """One test case per compared value; regressions and missing entries are failures."""
    cases = []
    failures = 0
    for r in outcome.rows.itertuples(index=False):
        where = f"@eps={r.eps:g}" if r.eps is not None and not pd.isna(r.eps) else (
            f"@{r.pixels}px" if r.pixels is not None and not pd.isna(r.pixels) else "")
        case = f'  <testcase classname={quoteattr(name)} name={quoteattr(f"{r.metric} {r.entry}{where}")}>'
        if r.verdict in ("regression", "missing"):
            failures += 1
            text = (f"baseline {r.baseline:.6g}, current "
                    f"{'missing' if r.current is None or pd.isna(r.current) else f'{r.current:.6g}'}, "
                    f"allowed drop {r.threshold:.6g} ({r.rule}), {r.direction}")
            case += f"<failure message={quoteattr(r.verdict)}>{escape(text)}</failure>"
        cases.append(case + "</testcase>")
    if not outcome.comparable:
        failures += 1
        cases.append(f'  <testcase classname={quoteattr(name)} name="comparable"><failure message="not comparable">'
                     f"{escape('; '.join(outcome.problems))}</failure></testcase>")
    head = (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name={quoteattr(name)} tests="{len(cases)}" '
            f'failures="{failures}">')
    return "\n".join([head, *cases, "</testsuite>"]) + "\n"
