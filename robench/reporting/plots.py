"""Curves from result files: accuracy vs eps (FDD Fig. 7) and misclassification vs pixel count (pixel paper Fig. 8)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robench.errors import UsageError
from robench.results.metric_table import metric_info

SUFFIXES = (".png", ".svg", ".pdf")


def _literal(label: str) -> str:
    """Labels come from result files; a "$" would start matplotlib's math mode (and can fail to parse)."""
    return label.replace("$", r"\$")


def plot_results(rows: pd.DataFrame, x: str, metric: str | None, out: Path) -> Path:
    if x not in ("eps", "pixels"):
        raise UsageError(f"--x must be eps or pixels, got {x!r}")
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--out must end in {', '.join(SUFFIXES)}, got {out.name}")
    metric = metric or ("accuracy" if x == "eps" else "misclassified")
    data = rows[(rows.metric == metric) & rows[x].notna()]
    if x == "eps":
        data = data[data.entry != "clean"]
    if data.empty:
        raise UsageError(f"no {metric!r} values with a {x} in these results")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    percent = metric_info(metric).percent
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    clean = rows[(rows.metric == metric) & (rows.entry == "clean")]
    # One colour per model, one line style per attack: curves of a model read as a family.
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(data.model))}
    styles = {e: ("-", "--", ":", "-.")[i % 4] for i, e in enumerate(dict.fromkeys(data.entry))}
    markers = {e: "osD^v<>"[i % 7] for i, e in enumerate(dict.fromkeys(data.entry))}
    for (model, entry), curve in data.groupby(["model", "entry"], sort=False):
        curve = curve.sort_values(x)
        xs, ys = list(curve[x].astype(float)), list(curve.value * (100 if percent else 1))
        if x == "eps":
            # Each curve starts at the model's clean value (eps 0), as accuracy-vs-eps plots do.
            start = clean[clean.model == model]
            if not start.empty:
                xs, ys = [0.0] + xs, [float(start.value.iloc[0]) * (100 if percent else 1)] + ys
        ax.plot(xs, ys, color=colours[model], linestyle=styles[entry], marker=markers[entry],
                label=_literal(f"{model} · {entry}"))
    ax.set_xlabel("eps ([0,1] pixel units)" if x == "eps" else "changed pixels")
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    if x == "pixels":
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
