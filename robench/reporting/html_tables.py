"""The paper-layout tables of ``robench compare`` as HTML, each number tied to its source value.

A table is built by the very layout function ``compare`` uses, and its cells are printed with
``compare``'s own formatting, so text and rounding are those of ``robench compare``. To tie each
cell back to the value in results.json, the layout is applied a second time to the same rows
with every value replaced by the row's number (and a third time with every value 1, which gives
the scale the layout applied): the pivot puts row numbers exactly where it put the values. Each
cell then carries ``data-value`` (the document's value at full precision) and ``data-run``,
``data-entry``, ``data-metric``, ``data-eps``/``data-pixels`` naming it.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from robench.errors import UsageError
from robench.reporting.compare import LAYOUTS, ComparisonTable, _cells

# Per kind: (layout, metric) pairs shown, in order; a pair without values in these runs is left out.
KIND_TABLES = {
    "classification": [("fdd", "accuracy"), ("fdd", "success_rate"), ("alignment", "accuracy")],
    # The narrow layout first (readable at any width), then the paper's wide one.
    "reid": [("reid-rows", "rank1"), ("reid", "rank1")],
    "pixel": [("pixel", "pi"), ("pixel", "misclassified"), ("pixel", "recognition_rate")],
    "certify": [("certify", "certified_accuracy")],
}
LAYOUT_NOTES = {
    "fdd": "attack × eps, a column per model (Feature-Density Dropout, Table 3)",
    "alignment": "a row per model: Clean, each attack × eps, Mean of the attack columns "
                 "(hierarchical feature alignment, Tables 2-5)",
    "reid": "a row per model: Original and each attack's CMC and mAP (LFM, Table III)",
    "reid-rows": "the values of the LFM Table III layout with a row per setting and model",
    "pixel": "setting × model, a column per pixel count (pixel-change paper, Tables 5-8)",
    "certify": "clean accuracy, then certified accuracy per L2 radius, a column per model (randomized smoothing)",
}
# Layouts with a column per setting and metric (dozens of columns): shown folded, after the narrow one.
FOLDED_LAYOUTS = {"reid"}
# Columns a layout computes from other cells rather than reads from a document.
DERIVED_COLUMNS = {"alignment": {"Mean": ("mean", "mean_attack_accuracy", "Clean")}}


@dataclass
class TableView:
    layout: str
    metric: str
    table: ComparisonTable
    positions: pd.DataFrame  # per cell: the row number in ``rows`` it shows (NaN: none)
    rows: pd.DataFrame


def build_view(rows: pd.DataFrame, layout: str, metric: str) -> TableView | None:
    """The layout's table of ``rows`` with the source row of every cell; None when it has no values."""
    rows = rows.reset_index(drop=True)
    try:
        build = LAYOUTS.get(layout)
        table = build(rows, metric)
    except UsageError:  # no such metric in these runs (e.g. nothing attacked: no success rate)
        return None
    numbered = build(rows.assign(value=np.arange(len(rows), dtype=float)), metric).frame
    scale = build(rows.assign(value=1.0), metric).frame
    positions = numbered / scale
    if positions.shape != table.frame.shape or table.frame.empty:
        return None
    return TableView(layout, metric, table, positions, rows)


def table_html(view: TableView, table_id: str) -> str:
    table = view.table
    texts = _cells(table, lambda text: text)  # compare's own rounding and placeholders
    best = table.best_mask()
    derived = DERIVED_COLUMNS.get(view.layout, {})
    header = "".join(f'<th scope="col">{_esc(c)}</th>' for c in table.frame.columns)
    body = []
    for i, name in enumerate(table.frame.index):
        cells = []
        for j, column in enumerate(table.frame.columns):
            classes = ["num"]
            if bool(best.iat[i, j]):
                classes.append("best")
            if str(column) in derived:
                attrs = _derived_attrs(view, i, derived[str(column)])
            else:
                attrs = _source_attrs(view, view.positions.iat[i, j])
            text = texts[i][j]
            cells.append(f'<td class="{" ".join(classes)}"{attrs}>{_esc(text)}</td>')
        body.append(f'<tr><th scope="row">{_esc(name)}</th>{"".join(cells)}</tr>')
    caption = f'{_esc(table.title)} <span class="layout">{_esc(view.layout)} layout</span>'
    figure = (f'<figure class="table-figure" id="{_esc(table_id)}"><table class="paper">'
              f"<caption>{caption}</caption>"
              f'<thead><tr><th scope="col"></th>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'
              f'<figcaption>{_esc(LAYOUT_NOTES.get(view.layout, ""))}; best of each setting in bold.</figcaption>'
              "</figure>")
    if view.layout in FOLDED_LAYOUTS:
        return (f"<details><summary>{_esc(view.layout)} layout, as the paper prints it "
                f"({len(table.frame.columns)} columns)</summary>{figure}</details>")
    return figure


def _source_attrs(view: TableView, position: float) -> str:
    """data-* attributes naming the document value a cell shows (none for an empty cell)."""
    if position is None or (isinstance(position, float) and math.isnan(position)):
        return ""
    row = view.rows.iloc[int(round(position))]
    return metric_attributes(row["model"], row["entry"], row["metric"], row["value"], eps=row["eps"],
                             pixels=row["pixels"])


def _derived_attrs(view: TableView, i: int, spec: tuple[str, str, str]) -> str:
    """A computed cell (the alignment layout's Mean): the mean of the row's source values, named as such."""
    entry, metric, excluded = spec
    frame = view.positions
    sources = [frame.iat[i, j] for j, c in enumerate(frame.columns)
               if str(c) not in (excluded, *DERIVED_COLUMNS[view.layout]) and not math.isnan(frame.iat[i, j])]
    if not sources:
        return ""
    values = pd.Series([float(view.rows.iloc[int(round(p))]["value"]) for p in sources])
    run = view.rows.iloc[int(round(sources[0]))]["model"]
    return metric_attributes(run, entry, metric, float(values.mean()), derived=True)


def metric_attributes(run: Any, entry: Any, metric: str, value: Any, *, eps: Any = None, pixels: Any = None,
                      part: str | None = None, derived: bool = False) -> str:
    """The data-* attributes of one metric value; ``data-value`` round-trips the float exactly."""
    attrs = {"data-run": run, "data-entry": entry, "data-metric": metric,
             "data-value": "" if value is None else repr(float(value))}
    if _present(eps):
        attrs["data-eps"] = repr(float(eps))
    if _present(pixels):
        attrs["data-pixels"] = str(int(pixels))
    if part is not None:  # a member of a composite attack (AutoAttack's log)
        attrs["data-part"] = part
    if derived:
        attrs["data-derived"] = "mean"
    return "".join(f' {k}="{_esc(str(v))}"' for k, v in attrs.items())


def _present(value: Any) -> bool:
    if value is None or value is pd.NA:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)
