"""Paper-style comparison tables from result files: pivots of the long result table.

Layouts mirror the documents: ``fdd`` (FDD Table 3: rows attack x eps, a
column per model), ``alignment`` (feature-alignment Tables 2-5: a row per
model, Clean, each attack x eps, Mean), ``reid`` (LFM Table III: Original and
Attacked Rank-1/5/10/mAP per model; ``reid-rows`` holds the same values with
the metrics as columns and a row per setting and model, to fit a terminal)
``pixel`` (pixel paper Tables 5-8: Pi or misclassification per model,
setting and pixel count) and ``certify`` (randomized smoothing: clean and certified accuracy per
radius, a column per model). Accuracy-like
values are percentages, rounded as each paper prints them; the best model
for each setting is marked in the human formats.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import pandas as pd

from robench.errors import UsageError
from robench.registry import Registry
from robench.results.metric_table import metric_info, rank_keys
from robench.results.tidy import pixels_text


@dataclass
class ComparisonTable:
    frame: pd.DataFrame  # numbers as shown (percent where the metric is a fraction)
    title: str
    decimals: int
    higher_is_better: bool
    models_on: str  # "rows" or "columns": where the best is looked for
    notes: list[str] = field(default_factory=list)

    row_groups: list[str] | None = None  # with models on rows: compare only rows of the same group

    def best_mask(self) -> pd.DataFrame:
        """True where a model is the best of its setting (ties all marked); False where it has no rival."""
        values = self.frame.apply(pd.to_numeric, errors="coerce")
        pick = (lambda v, axis: v.max(axis=axis)) if self.higher_is_better else (lambda v, axis: v.min(axis=axis))
        if self.models_on == "columns":
            mask = values.eq(pick(values, 1), axis=0) & values.notna()
            return mask & (values.notna().sum(axis=1) > 1).to_numpy()[:, None]
        groups = pd.Series(self.row_groups or [""] * len(values), index=values.index)
        mask = pd.DataFrame(False, index=values.index, columns=values.columns)
        for _, members in groups.groupby(groups, sort=False):
            block = values.loc[members.index]
            if len(block) > 1:
                mask.loc[members.index] = block.eq(pick(block, 0), axis=1) & block.notna()
        return mask


class Layout(Protocol):
    """A layout's table of the long result rows; each layout has its own default metric."""

    def __call__(self, rows: pd.DataFrame, metric: str = ...) -> ComparisonTable: ...


LAYOUTS: Registry[Layout] = Registry("layout")


def _eps_label(eps: float | None, text: str | None = None) -> str:
    """As the suite wrote it (``8/255``) when it was an expression, else the number."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return ""
    return f"ε = {text}" if isinstance(text, str) and text else f"ε = {eps:g}"


def _scale(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    return frame * 100.0 if metric_info(metric).percent else frame


def _metric_table(frame: pd.DataFrame, metric: str, models_on: str, title: str | None = None,
                  row_groups: list[str] | None = None) -> ComparisonTable:
    """The pivoted values shown as the metric table says: percent or not, its decimals, its direction."""
    info = metric_info(metric)
    title = title or (f"{metric} (%)" if info.percent else metric)
    return ComparisonTable(_scale(frame, metric), title, info.decimals, info.higher_is_better, models_on,
                           row_groups=row_groups)


def _only(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    picked = rows[rows.metric == metric]
    if picked.empty:
        raise UsageError(f"no {metric!r} values in these results (metrics present: "
                         f"{', '.join(sorted(rows.metric.unique()))})")
    return picked


def _setting_labels(data: pd.DataFrame, names: dict[str, str]) -> list[str]:
    """"entry eps" per row, eps as the suite wrote it, or "entry N px" for an entry that sweeps pixel
    counts (it has no eps: without the count its settings would share one row); entries in ``names``
    get that label instead."""
    return [names[e] if e in names else f"{e} {_eps_label(x, t) or pixels_text(p)}".strip()
            for e, x, t, p in zip(data.entry, data.eps, data.eps_text, data.pixels)]


def _attack_rows(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The metric's rows per entry (the worst-case and mean summary rows left out)."""
    return _only(rows[~rows.entry.isin(["worst-case", "mean"])], metric).copy()


@LAYOUTS.register("fdd")
def fdd_layout(rows: pd.DataFrame, metric: str = "accuracy") -> ComparisonTable:
    data = _attack_rows(rows, metric)
    data["setting"] = _setting_labels(data, {"clean": "clean"})
    order = list(dict.fromkeys(data.setting))
    table = data.pivot_table(index="setting", columns="model", values="value", aggfunc="first", sort=False)
    table = table.reindex(order)[list(dict.fromkeys(data.model))]
    worst = rows[rows.metric == "robust_accuracy"].drop_duplicates("model").set_index("model").value
    if metric == "accuracy" and len(order) > 2 and worst.notna().any():
        # eval's table ends with it: the number a robustness claim quotes (a single attack is its own worst)
        table.loc["worst case"] = worst.reindex(table.columns)
    result = _metric_table(table, metric, "columns")
    if metric != "median_norm" and (rows.metric == "median_norm").any():  # a distance, not a percentage
        result.notes.append("minimum-norm entries: their median minimal perturbation is shown by "
                            "--metric median_norm")
    return result


@LAYOUTS.register("alignment")
def alignment_layout(rows: pd.DataFrame, metric: str = "accuracy") -> ComparisonTable:
    data = _attack_rows(rows, metric)
    data["column"] = _setting_labels(data, {"clean": "Clean"})
    order = list(dict.fromkeys(data.column))
    table = data.pivot_table(index="model", columns="column", values="value", aggfunc="first", sort=False)
    table = table[order].reindex(list(dict.fromkeys(data.model)))
    attacks = [c for c in order if c != "Clean"]
    if attacks:
        # The paper's Mean: the mean of the attack columns, clean excluded.
        table["Mean"] = table[attacks].mean(axis=1)
    return _metric_table(table, metric, "rows")


@LAYOUTS.register("reid")
def reid_layout(rows: pd.DataFrame, metric: str = "rank1") -> ComparisonTable:
    # The CMC ranks the runs report (--ranks), then mAP: the paper's columns, mINP left out.
    present = set(rows.metric)
    metrics = rank_keys(present) + [m for m in ("mAP",) if m in present]
    data = rows[rows.metric.isin(metrics)].copy()
    if data.empty:
        raise UsageError("no re-identification metrics in these results")
    names = {m: f"Rank-{m[4:]}" for m in metrics if m != "mAP"} | {"mAP": "mAP"}
    data["group"] = _setting_labels(data, {"clean": "Original", "clean+rerank": "Original + re-ranking"})
    data["column"] = [f"{g} {names[m]}" for g, m in zip(data.group, data.metric)]
    order = [f"{g} {names[m]}" for g in dict.fromkeys(data.group) for m in metrics]
    table = data.pivot_table(index="model", columns="column", values="value", aggfunc="first", sort=False)
    table = table[[c for c in order if c in table.columns]].reindex(list(dict.fromkeys(data.model)))
    aps = sorted({a for a in data.ap_convention if isinstance(a, str)})
    # Every column is a CMC value or mAP: percentages, higher is better, as the table says for both.
    info = metric_info("mAP")
    return ComparisonTable(table * 100.0, f"CMC and mAP (%), AP {', '.join(aps) or '?'}", info.decimals,
                           info.higher_is_better, "rows")


@LAYOUTS.register("reid-rows")
def reid_rows_layout(rows: pd.DataFrame, metric: str = "rank1") -> ComparisonTable:
    """The ``reid`` values turned on their side: the paper's metrics as columns (CMC ranks, mAP) and a
    row per setting and run, the runs of one setting together.

    ``reid`` has a column per setting and metric (about 80 for a suite with re-ranking), which no
    terminal can show; this keeps four or five columns however many attacks a suite has.
    """
    present = set(rows.metric)
    metrics = rank_keys(present) + [m for m in ("mAP",) if m in present]
    data = rows[rows.metric.isin(metrics)].copy()
    if data.empty:
        raise UsageError("no re-identification metrics in these results")
    data["setting"] = _reid_settings(data)
    table = data.pivot_table(index=["setting", "model"], columns="metric", values="value", aggfunc="first",
                             sort=False)
    order = [(s, m) for s in dict.fromkeys(data.setting) for m in dict.fromkeys(data.model) if (s, m) in table.index]
    table = table.reindex(pd.MultiIndex.from_tuples(order))[[m for m in metrics if m in table.columns]]
    table.columns = [f"Rank-{m[4:]}" if m != "mAP" else "mAP" for m in table.columns]
    groups = [setting for setting, _ in table.index]
    table.index = [f"{setting} · {model}" for setting, model in table.index]
    aps = sorted({a for a in data.ap_convention if isinstance(a, str)})
    # Every column is a CMC value or mAP: percentages, higher is better, as the table says for both.
    info = metric_info("mAP")
    return ComparisonTable(table * 100.0, f"CMC and mAP (%), AP {', '.join(aps) or '?'}", info.decimals,
                           info.higher_is_better, "rows", row_groups=groups)


def _reid_settings(data: pd.DataFrame) -> list[str]:
    """``Original``, ``pgd-away ε = 4/255``, and `` + re-ranking`` for the re-ranked rows."""
    labels = []
    for entry, eps, text, settings in zip(data.entry, data.eps, data.eps_text, data.settings):
        reranked = isinstance(settings, str) and (settings == "rerank" or settings.endswith("|rerank"))
        base = entry[: -len("+rerank")] if reranked and entry.endswith("+rerank") else entry
        label = "Original" if base == "clean" else f"{base} {_eps_label(eps, text)}".strip()
        labels.append(label + (" + re-ranking" if reranked else ""))
    return labels


@LAYOUTS.register("pixel")
def pixel_layout(rows: pd.DataFrame, metric: str = "pi") -> ComparisonTable:
    data = _only(rows, metric).copy()
    table = data.pivot_table(index=["entry", "model"], columns="pixels", values="value", aggfunc="first", sort=False)
    table.columns = [f"{int(c)} px" for c in table.columns]
    groups = [entry for entry, _ in table.index]
    table.index = [f"{e} · {m}" for e, m in table.index]
    title = {"pi": "Pixel-index Pi", "misclassified": "misclassified images",
             "recognition_rate": "recognition rate (%)"}.get(metric)
    return _metric_table(table, metric, "rows", title, row_groups=groups)


@LAYOUTS.register("certify")
def certify_layout(rows: pd.DataFrame, metric: str = "certified_accuracy") -> ComparisonTable:
    """Randomized smoothing (Cohen et al., Table 1's layout turned on its side): the base model's and the
    smoothed classifier's clean accuracy, then the certified accuracy per L2 radius; a column per model."""
    _only(rows, metric)  # none there: an error naming the metrics present
    data = rows[rows.metric.isin(["accuracy", metric])].copy()
    names = {"clean": "base model, clean", "smoothed": "smoothed, clean"}
    data["setting"] = [names[e] if e in names else f"certified r = {x:g}" for e, x in zip(data.entry, data.eps)]
    order = list(dict.fromkeys(data.setting))
    table = data.pivot_table(index="setting", columns="model", values="value", aggfunc="first", sort=False)
    table = table.reindex(order)[list(dict.fromkeys(data.model))]
    return _metric_table(table, metric, "columns", title="certified accuracy (%), L2 radius in pixel units")


def pivot_table(rows: pd.DataFrame, index: list[str], columns: list[str], metric: str) -> ComparisonTable:
    """A free pivot: ``--rows`` and ``--cols`` name columns of the long table."""
    for name in index + columns:
        if name not in rows.columns:
            raise UsageError(f"unknown column {name!r} for --rows/--cols; use {', '.join(rows.columns)}")
    data = _only(rows, metric)
    table = data.pivot_table(index=index, columns=columns, values="value", aggfunc="first", sort=False)
    table.index = [" · ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in table.index]
    table.columns = [" · ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in table.columns]
    models_on = "rows" if "model" in index else "columns"
    return _metric_table(table, metric, models_on, title=metric)


def default_layout(kind: str, fmt: str = "table") -> str:
    """By kind of run; ReID runs get the narrow ``reid-rows`` in the terminal and the paper's wide
    ``reid`` in files."""
    if kind == "reid" and fmt == "table":
        return "reid-rows"
    return {"classification": "fdd", "reid": "reid", "pixel": "pixel", "certify": "certify"}[kind]


# ------------------------------------------------------------------ rendering
def _cells(table: ComparisonTable, mark: Callable[[str], str]) -> list[list[str]]:
    best = table.best_mask()
    out = []
    for i, (_, row) in enumerate(table.frame.iterrows()):
        cells = []
        for j, value in enumerate(row):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
                continue
            text = f"{value:.{table.decimals}f}"
            if bool(best.iat[i, j]):
                text = mark(text)
            cells.append(text)
        out.append(cells)
    return out


def render(table: ComparisonTable, fmt: str) -> str:
    header = [""] + [str(c) for c in table.frame.columns]
    index = [str(i) for i in table.frame.index]
    if fmt == "csv":
        return table.frame.round(table.decimals).to_csv()
    if fmt == "markdown":
        body = _cells(table, lambda t: f"**{t}**")
        lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join([name] + cells) + " |" for name, cells in zip(index, body)]
        lines += [""] + [f"> {note}" for note in table.notes]
        return "\n".join(lines).rstrip() + "\n"
    if fmt == "latex":
        body = _cells(table, lambda t: f"\\textbf{{{t}}}")
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("ε", r"$\epsilon$")  # noqa: E731
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\hline",
                 " & ".join(esc(h) for h in header) + r" \\", r"\hline"]
        lines += [" & ".join([esc(name)] + cells) + r" \\" for name, cells in zip(index, body)]
        lines += [r"\hline", r"\end{tabular}"] + [f"% {note}" for note in table.notes]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        body = _cells(table, lambda t: f"<b>{t}</b>")
        lines = [f"<table>\n<caption>{html.escape(table.title)}</caption>",
                 "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
        lines += ["<tr><th>" + html.escape(name) + "</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                  for name, cells in zip(index, body)]
        lines.append("</table>")
        lines += [f"<p>{html.escape(note)}</p>" for note in table.notes]
        return "\n".join(lines) + "\n"
    raise UsageError(f"--format must be table, markdown, csv, latex or html, got {fmt!r}")


def rich_table(table: ComparisonTable):
    from rich.table import Table
    from rich.text import Text

    # Names, titles and notes carry labels from the result files: shown as text, never read as markup.
    out = Table(title=Text(table.title), caption=Text("\n".join(table.notes)) if table.notes else None)
    # The row names wrap when the terminal is narrow; numbers and their headers are never cut.
    out.add_column("", overflow="fold")
    for c in table.frame.columns:
        out.add_column(Text(str(c)), justify="right", no_wrap=True, min_width=len(str(c)))
    for name, cells in zip(table.frame.index, _cells(table, lambda t: f"[bold green]{t}[/]")):
        out.add_row(Text(str(name)), *cells)
    return out
