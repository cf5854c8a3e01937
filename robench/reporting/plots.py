"""Curves from result files: accuracy vs eps (FDD Fig. 7) and misclassification vs pixel count (pixel paper Fig. 8).

A minimum-norm attack's entry (``fmn``, ``fab``) is drawn as its full step curve, read from the
per-sample minimal perturbations the document keeps, with markers at the suite's eps.

Pixel-index counts are drawn as percentages of each setting's own number of images (the
attack experiment changes only the adversarial images, the others every image), with error
bars of one standard deviation over the trials the document saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from robench.errors import UsageError
from robench.results import minimum_norm
from robench.results.metric_table import metric_info
from robench.results.reading import ResultFile, results_frame

SUFFIXES = (".png", ".svg", ".pdf")
# Pixel metrics that are linear in the mean misclassified count: their spread over trials follows from
# misclassified_std (recognition_rate = 1 - misclassified / total).
_FROM_MISCLASSIFIED = ("misclassified", "recognition_rate")


@dataclass
class Plot:
    path: Path
    metric: str
    left_out: list[ResultFile] = field(default_factory=list)  # runs with nothing to draw on this axis
    # What was drawn: a row per point (model, entry, x value, y as plotted, err: the error bar, NaN for none).
    points: pd.DataFrame | None = None


def _literal(label: str) -> str:
    """Labels come from result files; a "$" would start matplotlib's math mode (and can fail to parse)."""
    return label.replace("$", r"\$")


def plot_results(results: list[ResultFile], x: str, metric: str | None, out: Path) -> Plot:
    """Draw ``metric`` against ``x`` (eps or pixels) for every run that has it; the others are listed."""
    if x not in ("eps", "pixels"):
        raise UsageError(f"--x must be eps or pixels, got {x!r}")
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--out must end in {', '.join(SUFFIXES)}, got {out.name}")
    metric = metric or ("accuracy" if x == "eps" else "misclassified")
    rows = results_frame(results)
    data = rows[(rows.metric == metric) & rows[x].notna()]
    if x == "eps":
        data = data[data.entry != "clean"]
    if data.empty:
        raise UsageError(f"no {metric!r} values with a {x} in these results")
    plotted = set(data.model)
    left_out = [r for r in results if r.label not in plotted]
    data = _shown(data, metric, _trial_spread(results))
    clean = _shown(rows[(rows.metric == metric) & (rows.entry == "clean")], metric, {})
    steps = _step_curves(results, float(data[x].max())) if (x, metric) == ("eps", "accuracy") else {}
    _draw(data, clean, x, metric, out, steps)
    return Plot(out, metric, left_out, data[["model", "entry", x, "y", "err"]].reset_index(drop=True))


def _percent_of_n(data: pd.DataFrame, metric: str) -> bool:
    """Pixel-index counts become percentages of the setting's own images."""
    return metric == "misclassified" and bool((data.kind == "pixel").any())


def _shown(data: pd.DataFrame, metric: str, spread: dict[tuple, float]) -> pd.DataFrame:
    """The values as drawn (``y``) and their error bars (``err``, NaN where the run saved none)."""
    data = data.copy()
    n = pd.to_numeric(data.n, errors="coerce")
    if _percent_of_n(data, metric):
        data["y"] = data.value / n * 100
    else:
        data["y"] = data.value * (100 if metric_info(metric).percent else 1)
    std = [spread.get((m, e, p), float("nan")) for m, e, p in zip(data.model, data.entry, data.pixels)]
    # The std is of the misclassified count; both drawn metrics are that count over n, in percent.
    data["err"] = pd.Series(std, index=data.index, dtype=float) / n * 100 if metric in _FROM_MISCLASSIFIED \
        else float("nan")
    return data


# A step curve reaches past the suite's largest eps to show where the last samples break, up to this factor.
STEP_REACH = 2.0


def _step_curves(results: list[ResultFile], largest_eps: float) -> dict[tuple[str, str], tuple[list, list]]:
    """(run label, entry label) -> the step curve (eps, accuracy in %) of each minimum-norm entry."""
    curves = {}
    for r in results:
        for block in minimum_norm.blocks(r.doc) if r.kind == "classification" else []:
            reach = max([v for v in block["norms"] if v <= STEP_REACH * largest_eps] or [0.0])
            xs, ys = minimum_norm.step_curve(block, max(largest_eps, reach))
            curves[(r.label, block["label"])] = (xs, [100 * y for y in ys])
    return curves


def _trial_spread(results: list[ResultFile]) -> dict[tuple, float]:
    """(run label, ``EXPERIMENT:SETTING``, pixels) -> the standard deviation of misclassified over trials."""
    spread = {}
    for r in results:
        if r.kind != "pixel":
            continue
        for exp in r.doc["experiments"]:
            for row in exp["results"]:
                std = row.get("misclassified_std")
                if isinstance(std, (int, float)):
                    spread[(r.label, f"{exp['experiment']}:{exp['setting']}", row["pixels"])] = float(std)
    return spread


def _y_label(metric: str, data: pd.DataFrame) -> str:
    if _percent_of_n(data, metric):
        return "misclassified (% of the setting's images)"
    return f"{metric} (%)" if metric_info(metric).percent else metric


def _x_label(x: str, metric: str) -> str:
    if x == "pixels":
        return "changed pixels"
    # Certified accuracy sits in the eps column of the tidy rows, but it is read at an L2 radius.
    return "L2 radius ([0,1] pixel units)" if metric == "certified_accuracy" else "eps ([0,1] pixel units)"


def _draw(data: pd.DataFrame, clean: pd.DataFrame, x: str, metric: str, out: Path,
          steps: dict[tuple[str, str], tuple[list, list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # One colour per model, one line style per attack: curves of a model read as a family.
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(data.model))}
    styles = {e: ("-", "--", ":", "-.")[i % 4] for i, e in enumerate(dict.fromkeys(data.entry))}
    markers = {e: "osD^v<>"[i % 7] for i, e in enumerate(dict.fromkeys(data.entry))}
    for (model, entry), curve in data.groupby(["model", "entry"], sort=False):
        curve = curve.sort_values(x)
        xs, ys, errs = list(curve[x].astype(float)), list(curve.y), list(curve.err)
        if x == "eps":
            # Each curve starts at the model's clean value (eps 0), as accuracy-vs-eps plots do.
            start = clean[clean.model == model]
            if not start.empty:
                xs, ys, errs = [0.0] + xs, [float(start.y.iloc[0])] + ys, [float("nan")] + errs
        style: dict[str, Any] = {"color": colours[model], "linestyle": styles[entry], "marker": markers[entry],
                                 "label": _literal(f"{model} · {entry}")}
        if (model, entry) in steps:  # the whole curve, with the suite's eps marked on it
            step_x, step_y = steps[(model, entry)]
            ax.step(step_x, step_y, where="post", color=colours[model], linestyle=styles[entry],
                    label=style["label"])
            ax.plot(xs[1:], ys[1:], color=colours[model], marker=markers[entry], linestyle="none")
        elif any(e == e for e in errs):  # error bars where the run saved a spread over trials
            ax.errorbar(xs, ys, yerr=[0.0 if e != e else e for e in errs], capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)
    ax.set_xlabel(_x_label(x, metric))
    ax.set_ylabel(_y_label(metric, data))
    if data.err.notna().any():
        ax.set_title("error bars: ±1 standard deviation over trials", fontsize=8)
    if x == "pixels":
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
