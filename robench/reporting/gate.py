"""The CI gate: does a run lose robustness against a baseline, beyond the allowed change?

Entries are matched by (entry, attack settings, eps or pixel count, metric). By
default only the accuracy metrics are gated (``DEFAULT_METRICS``: clean and
per-entry accuracy and the worst case; ReID CMC ranks and mAP; Pixel-index
recognition rate): one changed prediction moves an accuracy and the attack's
success rate together, and gating both would count it twice. ``metrics`` picks
others (``success_rate``, ``mean_attack_accuracy``, ``pi`` ...).

Each metric has a direction (accuracy, CMC, mAP: higher is better; attack
success rate, Pi, misclassification: lower is better), so a "drop" is always
a change for the worse. Thresholds: ``--max-drop`` in absolute fraction units
(0.01 = one percentage point) for every entry, overridden by the first
matching ``--rule METRIC@ENTRY:THRESHOLD`` (ENTRY a glob on the entry label,
THRESHOLD ``1pt``, ``2%`` of the baseline value, or a number). Values are
compared as exact fractions (k/n from the counts a proportion is made of, else
the decimal the document wrote), so a change exactly at the threshold passes
and a change no float rounding can show still counts. With
``require_significant`` a drop fails only if it also exceeds 1.96 standard
errors of the difference of two proportions, sqrt(p(1-p)/n) each.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable
from xml.sax.saxutils import escape, quoteattr

import pandas as pd

from robench.evaluation import findings
from robench.errors import UsageError
from robench.registry import did_you_mean
from robench.reporting.comparability import run_differences
from robench.results.metric_table import higher_is_better, is_proportion
from robench.results.reading import ResultFile, results_frame
from robench.results.tidy import pixels_text

KEY = ["entry", "settings", "eps", "pixels", "metric"]
Z_95 = 1.96
_RULE = re.compile(r"^\s*(?P<metric>[^@\s]+)@(?P<entry>[^:]+):\s*(?P<value>[0-9.]+)\s*(?P<unit>pt|%)?\s*$")
# What the gate checks unless told otherwise: the accuracy of each kind of run. Classification: clean and
# per-entry accuracy, robust_accuracy (the worst case); ReID: rank1 and mAP (plain and re-ranked);
# Pixel-index: recognition_rate; certification: the clean accuracies and certified_accuracy at each radius.
# Success rate, the mean, Pi and misclassification restate these changes.
DEFAULT_METRICS = ("accuracy", "robust_accuracy", "rank*", "mAP", "recognition_rate", "certified_accuracy")
_GLOB = re.compile(r"[*?\[]")


def is_default_metric(metric: str) -> bool:
    # Every CMC rank the run reports (--ranks): each is its own measurement, not a restatement.
    return any(fnmatch.fnmatchcase(metric, pattern) for pattern in DEFAULT_METRICS)


@dataclass(frozen=True)
class Rule:
    metric: str
    entry: str
    value: Fraction  # exact, as written: 1pt is 1/100, 0.3 is 3/10
    relative: bool
    text: str

    def matches(self, metric: str, entry: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.metric) and fnmatch.fnmatchcase(entry, self.entry)

    def threshold(self, baseline: Fraction) -> Fraction:
        return abs(baseline) * self.value / 100 if self.relative else self.value

    @property
    def names_one_metric(self) -> bool:
        """``success_rate@pgd:1pt`` asks for that metric to be gated; ``*@pgd:1pt`` only sets thresholds."""
        return not _GLOB.search(self.metric)


def parse_rule(text: str) -> Rule:
    """``accuracy@pgd*:1pt`` (1 point absolute), ``mAP@*:2%`` (2% of the baseline), ``pi@*:0.5``."""
    m = _RULE.match(text)
    if not m:
        raise UsageError(f"--rule {text!r}: expected METRIC@ENTRY:THRESHOLD, e.g. 'accuracy@pgd*:1pt' or 'mAP@*:2%'")
    try:
        value, unit = Fraction(m.group("value")), m.group("unit")
    except ValueError:  # the pattern lets "1.2.3" through
        raise UsageError(f"--rule {text!r}: {m.group('value')!r} is not a number") from None
    if unit == "pt":
        value /= 100  # points of a percentage, values are fractions
    return Rule(m.group("metric"), m.group("entry").strip(), value, unit == "%", text)


def parse_metrics(values: Iterable[str] | None) -> list[str]:
    """``--metric`` values, repeatable and comma-separated, in order and once each; empty: the defaults."""
    names = [part.strip() for value in values or () for part in value.split(",")]
    return list(dict.fromkeys(name for name in names if name))


def check_metrics(names: list[str], available: Iterable[str]) -> list[str]:
    """The reported metrics ``--metric`` names (globs such as ``rank*`` allowed), in the order asked; each
    name must match one (``accuracy`` is not a ReID metric)."""
    present = list(dict.fromkeys(available))
    chosen: list[str] = []
    for name in names:
        matched = [m for m in present if fnmatch.fnmatchcase(m, name)]
        if not matched:
            raise UsageError(f"--metric {name!r}: no such values in these results{did_you_mean(name, present)}")
        chosen += matched
    return list(dict.fromkeys(chosen))


def reported_metrics(result: ResultFile) -> list[str]:
    """The metrics a run reports, in its order: what ``--metric`` may name."""
    return list(dict.fromkeys(results_frame([result], keep_null=True).metric))


def gated_metrics(requested: list[str] | None, rules: list[Rule], available: Iterable[str]) -> list[str]:
    """The metrics the gate compares: those asked for (default: the accuracy metrics present), and the
    metric each rule names outright."""
    present = list(dict.fromkeys(available))
    chosen = check_metrics(requested, present) if requested else [m for m in present if is_default_metric(m)]
    named = [r.metric for r in rules if r.names_one_metric and r.metric in present]
    return list(dict.fromkeys([*chosen, *named]))


def exact_value(metric: str, value: float, n: Any) -> tuple[Fraction, str | None]:
    """The value as an exact fraction, and ``"k/n"`` when it is a proportion of a whole count.

    results.json stores k/n as a float; k is recovered when k/n gives back exactly that float (distinct
    counts over the same n are 1/n apart, far more than a float's rounding). Other values are taken as
    the decimal the document wrote.
    """
    if is_proportion(metric) and _whole(n):
        k = round(value * n)
        if k / n == value:
            return Fraction(k, int(n)), f"{k}/{int(n)}"
    return Fraction(repr(float(value))), None


def _whole(n: Any) -> bool:
    if not isinstance(n, numbers.Real) or isinstance(n, bool):
        return False
    value = float(n)  # a count (an int, a float or a numpy number) is exact as a float
    return math.isfinite(value) and value > 0 and value == int(value)


def standard_error(metric: str, value: float, n: Any) -> float | None:
    # Only a fraction of n samples (queries) has sqrt(p(1-p)/n) as its standard error.
    if not is_proportion(metric) or n is None or not isinstance(n, (int, float)) or n <= 0 or math.isnan(n):
        return None
    p = min(max(value, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


# Sanity flag names robench writes (``sanity.flag_names``), and "unnamed": what an older document's
# flag gets when its name cannot be worked out.
KNOWN_FLAGS = (*findings.FLAG_NAMES, "unnamed")
ALLOW_ALL = "all"
FAILING = ("regression", "missing")
# A value that is null in one run and a number in the other: the runs do not measure the same thing.
# (Values only the current run has are not rows; they are listed in the problems.)
MISMATCH = ("not comparable",)
REFRESH = ("if the change is intended, refresh the baseline: rerun the evaluation without --baseline and commit "
           "its results.json as the new baseline")
COLUMNS = ["entry", "metric", "eps", "pixels", "baseline", "current", "baseline_count", "current_count", "delta",
           "threshold", "allowed_change", "rule", "direction", "stderr", "verdict"]


@dataclass(frozen=True)
class SanityFlag:
    name: str
    message: str
    allowed: bool = False


@dataclass
class GateOutcome:
    rows: pd.DataFrame
    problems: list[str]
    flags: list[SanityFlag] = field(default_factory=list)  # the current run's
    baseline_flags: list[SanityFlag] = field(default_factory=list)  # reported, never failing
    metrics: list[str] = field(default_factory=list)  # the metrics gated
    not_gated: list[str] = field(default_factory=list)  # metrics the runs report that were not gated

    @property
    def comparable(self) -> bool:
        return not self.problems

    @property
    def failing_flags(self) -> list[SanityFlag]:
        return [f for f in self.flags if not f.allowed]

    @property
    def failed(self) -> bool:
        return bool((self.rows.verdict.isin(FAILING)).any()) or bool(self.failing_flags)

    @property
    def exit_code(self) -> int:
        if not self.comparable:
            return 3
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        rows = self.rows.astype(object).where(self.rows.notna(), None).to_dict(orient="records")
        for flag in self.flags:
            row = dict.fromkeys(self.rows.columns)
            row.update({"entry": "sanity", "metric": "sanity_flag", "flag": flag.name, "message": flag.message,
                        "verdict": "allowed flag" if flag.allowed else "sanity flag"})
            rows.append(row)
        return {"schema": "robench.reporting.gate/1", "comparable": self.comparable, "problems": self.problems,
                "passed": self.exit_code == 0, "exit_code": self.exit_code,
                "metrics": self.metrics, "not_gated": self.not_gated,
                "regressions": int(self.rows.verdict.isin(FAILING).sum()),
                "sanity_flags_failed": len(self.failing_flags),
                "baseline_sanity_flags": [{"flag": f.name, "message": f.message} for f in self.baseline_flags],
                "rows": rows}


def check_allowed_flags(names: list[str], extra: tuple[str, ...] = ()) -> set[str]:
    """``--allow-flag`` values: known flag names (or names the current document uses), or ``all``."""
    choices = list(dict.fromkeys([*KNOWN_FLAGS, *extra, ALLOW_ALL]))
    for name in names:
        if name not in choices:
            raise UsageError(f"--allow-flag {name!r}: unknown sanity flag{did_you_mean(name, choices)}")
    return set(names)


def document_flags(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, message) per sanity flag of a validated document; none without a ``sanity`` block."""
    sanity = doc.get("sanity")
    if not isinstance(sanity, dict):
        return []
    messages = sanity.get("flags") or []
    names = sanity.get("flag_names")
    if names is not None:
        return list(zip(names, messages))
    return list(zip(_derived_names(sanity, doc.get("attacks") or [], messages), messages))


def _derived_names(sanity: dict[str, Any], attacks: list[Any], messages: list[str]) -> list[str]:
    """Names for documents written before ``flag_names`` existed, worked out again from the report."""
    if not messages:
        return []
    try:
        pairs = findings.named_flags(sanity, attacks)
    # Naming is best effort: an older document may lack a field the current checks read.
    except Exception:  # noqa: BLE001
        return ["unnamed"] * len(messages)
    # Matched by message only: guessing a name by position could let --allow-flag pass an unrelated finding.
    by_message = {message: name for name, message in pairs}
    return [by_message.get(m, "unnamed") for m in messages]


def gate(current: ResultFile, baseline: ResultFile, *, max_drop: float = 0.0, rules: list[Rule] | None = None,
         require_significant: bool = False, allow_flags: list[str] | None = None,
         metrics: list[str] | None = None) -> GateOutcome:
    """Gate ``current`` against ``baseline``; ``metrics`` (default ``DEFAULT_METRICS``) are the ones compared."""
    if max_drop < 0 or math.isnan(max_drop):
        raise UsageError(f"--max-drop must be >= 0, got {max_drop}")
    rules = rules or []
    current_flags = document_flags(current.doc)
    allowed = check_allowed_flags(allow_flags or [], tuple(name for name, _ in current_flags))
    base, cur = _values(baseline), _values(current)
    reported = list(dict.fromkeys([*base.metric, *cur.metric]))
    chosen = gated_metrics(metrics, rules, reported)
    if not chosen:  # passing on nothing would hide a document the gate cannot read
        raise UsageError(f"nothing to gate: these results report none of {', '.join(DEFAULT_METRICS)}; "
                         f"choose with --metric ({', '.join(reported)})")
    compared = _compare_values(cur[cur.metric.isin(chosen)], base[base.metric.isin(chosen)],
                               Fraction(repr(float(max_drop))), rules, require_significant)
    problems = run_differences(baseline, current) + _mismatch_problems(compared, current, baseline)
    if problems:
        problems.append(REFRESH)
    # Values only the current run has are listed in the problems; the rows hold the baseline's values.
    out = [row for row in compared if row["verdict"] != "new"]
    flags = [SanityFlag(name, message, ALLOW_ALL in allowed or name in allowed) for name, message in current_flags]
    baseline_flags = [SanityFlag(name, message) for name, message in document_flags(baseline.doc)]
    return GateOutcome(pd.DataFrame(out, columns=COLUMNS), problems, flags, baseline_flags, chosen,
                       [m for m in reported if m not in chosen])


def _values(result: ResultFile) -> pd.DataFrame:
    frame = results_frame([result], keep_null=True).drop(columns=["model", "source"])
    frame["eps"] = frame["eps"].astype(float).round(10)
    frame["pixels"] = frame["pixels"].astype(float)
    frame["value"] = frame["value"].astype(float)
    frame["position"] = range(len(frame))
    return frame


def _compare_values(cur: pd.DataFrame, base: pd.DataFrame, max_drop: Fraction, rules: list[Rule],
                    require_significant: bool) -> list[dict[str, Any]]:
    """One row per value of either run, with its verdict."""
    merged = base.merge(cur, on=KEY, how="outer", suffixes=("_baseline", "_current"), indicator="present")
    # An outer merge sorts the keys; rows read better in the baseline's order, the current run's extras last.
    merged = merged.sort_values(["position_baseline", "position_current"], na_position="last", kind="stable")
    out = []
    for r in merged.itertuples(index=False):
        b, c = r.value_baseline, r.value_current
        if r.present == "both" and pd.isna(b) and pd.isna(c):
            continue  # null in both runs (e.g. mINP not computed): nothing to compare, nothing differs
        higher = higher_is_better(r.metric)
        rule = next((x for x in rules if x.matches(r.metric, r.entry)), None)
        b_exact, b_count = (None, None) if pd.isna(b) else exact_value(r.metric, b, r.n_baseline)
        c_exact, c_count = (None, None) if pd.isna(c) else exact_value(r.metric, c, r.n_current)
        threshold = rule.threshold(b_exact) if rule and b_exact is not None else (
            rule.value if rule and not rule.relative else max_drop)
        row = {"entry": r.entry, "metric": r.metric, "eps": None if pd.isna(r.eps) else r.eps,
               "pixels": None if pd.isna(r.pixels) else int(r.pixels), "baseline": None if pd.isna(b) else b,
               "current": None if pd.isna(c) else c, "baseline_count": b_count, "current_count": c_count,
               "delta": None, "threshold": float(threshold),
               "allowed_change": float(-threshold if higher else threshold),
               "rule": rule.text if rule else f"max-drop {float(max_drop):g}",
               "direction": "higher is better" if higher else "lower is better", "stderr": None, "verdict": None}
        out.append(row)
        if r.present != "both":
            row["verdict"] = "missing" if r.present == "left_only" else "new"
        elif b_exact is None or c_exact is None:
            row["verdict"] = "not comparable"
        else:
            row["delta"] = float(c_exact - b_exact)
            se_b = standard_error(r.metric, b, r.n_baseline)
            se_c = standard_error(r.metric, c, r.n_current)
            if se_b is not None and se_c is not None:
                row["stderr"] = math.sqrt(se_b ** 2 + se_c ** 2)
            row["drop"] = (b_exact - c_exact if higher else c_exact - b_exact, threshold)
    _mean_stderr(out)
    for row in out:
        if "drop" in row:
            drop, threshold = row.pop("drop")
            row["verdict"] = _verdict(drop, threshold, row["stderr"], require_significant)
    return out


def _verdict(drop: Fraction, threshold: Fraction, stderr: float | None, require_significant: bool) -> str:
    """Exact: a drop equal to the threshold is allowed, any drop beyond it is not."""
    if drop > threshold:
        noise = require_significant and stderr is not None and float(drop) <= Z_95 * stderr
        return "within noise" if noise else "regression"
    return "improved" if drop < 0 else "ok"


def _attack_entries(result: ResultFile) -> int:
    return len(result.doc["experiments"] if result.kind == "pixel" else result.doc.get("attacks", []))


def _describe(row: dict[str, Any]) -> str:
    where = f" eps {row['eps']:g}" if row["eps"] is not None and row["entry"] != "clean" else (
        f" {pixels_text(row['pixels'])}" if pixels_text(row["pixels"]) else "")
    return f"{row['metric']} of {row['entry']}{where}"


def _listing(rows: list[dict[str, Any]], most: int = 5) -> str:
    shown = ", ".join(_describe(r) for r in rows[:most])
    return shown + (f" and {len(rows) - most} more" if len(rows) > most else "")


def _mismatch_problems(rows: list[dict[str, Any]], current: ResultFile, baseline: ResultFile) -> list[str]:
    """Values the baseline cannot vouch for: the runs do not measure the same things."""
    if _attack_entries(baseline) == 0 and _attack_entries(current) > 0:
        return [f"the baseline has no attack entries while the current run has {_attack_entries(current)}"]
    problems = []
    new = [r for r in rows if r["verdict"] == "new"]
    if new:
        problems.append(f"the current run has {len(new)} value(s) the baseline lacks ({_listing(new)})")
    nulls = [r for r in rows if r["verdict"] == "not comparable"]
    if nulls:
        problems.append(f"{len(nulls)} value(s) are null in one run and a number in the other ({_listing(nulls)})")
    return problems


def _mean_stderr(rows: list[dict[str, Any]]) -> None:
    """The papers' Mean column averages k attack accuracies: its error is sqrt(sum se_i^2) / k."""
    parts = [r["stderr"] for r in rows if r["metric"] == "accuracy" and r["entry"] != "clean"
             and r["stderr"] is not None]
    for r in rows:
        if r["metric"] == "mean_attack_accuracy" and parts and r["current"] is not None:
            r["stderr"] = math.sqrt(sum(se ** 2 for se in parts)) / len(parts)


def _number(value: Any, spec: str = ".6g", missing: str = "missing") -> str:
    return missing if value is None or pd.isna(value) else format(value, spec)


def signed(value: float, spec: str = ".4f") -> str:
    """A change with its sign, never shown as +0.0000 when it is not zero (527/529 -> 528/530 is +7e-06)."""
    if value == 0:
        return "0"
    text = format(value, "+" + spec)
    return text if float(text) != 0 else f"{value:+.1e}"


def allowed_change(threshold: float, higher: bool, ascii_only: bool = False) -> str:
    """``≥ -0.01`` where a value may fall by 0.01 at most, ``≤ +0.01`` where it may rise by at most that."""
    sign = (">=" if ascii_only else "≥") if higher else ("<=" if ascii_only else "≤")
    if threshold == 0:
        return f"{sign} 0"
    return f"{sign} {'-' if higher else '+'}{threshold:.4g}"


def with_count(value: Any, count: Any, spec: str = ".4f") -> str:
    """``0.9962 (527/529)``: the exact count beside the rounded value, so equal-looking values are told apart."""
    text = _number(value, spec)
    return f"{text} ({count})" if isinstance(count, str) else text


def junit_xml(outcome: GateOutcome, name: str = "robench gate") -> str:
    """One test case per compared value and per sanity flag; regressions, missing or mismatched entries
    and flags not allowed are failures."""
    cases = []
    failures = 0
    for r in outcome.rows.itertuples(index=False):
        where = f"@eps={r.eps:g}" if r.eps is not None and not pd.isna(r.eps) else (
            f"@{pixels_text(r.pixels).replace(' ', '')}" if pixels_text(r.pixels) else "")
        case = f'  <testcase classname={quoteattr(name)} name={quoteattr(f"{r.metric} {r.entry}{where}")}>'
        if r.verdict in FAILING + MISMATCH:
            failures += 1
            counts = (f" ({r.baseline_count or '?'} -> {r.current_count or '?'})"
                      if r.baseline_count or r.current_count else "")
            change = "" if r.delta is None or pd.isna(r.delta) else f", change {signed(r.delta, '.6g')}{counts}"
            text = (f"baseline {_number(r.baseline)}, current {_number(r.current)}{change}, "
                    f"allowed change {allowed_change(r.threshold, r.direction == 'higher is better', True)} "
                    f"({r.rule}), {r.direction}")
            case += f"<failure message={quoteattr(r.verdict)}>{escape(text)}</failure>"
        cases.append(case + "</testcase>")
    for flag in outcome.flags:
        case = f'  <testcase classname={quoteattr(name)} name={quoteattr(f"sanity flag {flag.name}")}>'
        if not flag.allowed:
            failures += 1
            text = f"{flag.message}; pass --allow-flag {flag.name} if this is expected"
            case += f'<failure message="sanity flag">{escape(text)}</failure>'
        cases.append(case + "</testcase>")
    if not outcome.comparable:
        failures += 1
        cases.append(f'  <testcase classname={quoteattr(name)} name="comparable"><failure message="not comparable">'
                     f"{escape('; '.join(outcome.problems))}</failure></testcase>")
    head = (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name={quoteattr(name)} tests="{len(cases)}" '
            f'failures="{failures}">')
    return "\n".join([head, *cases, "</testsuite>"]) + "\n"
