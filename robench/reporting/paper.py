"""The papers' reported numbers, as rows of the long result table, to show beside measured runs.

Each table robench mirrors is a small tidy CSV in ``paper_tables/`` (package data): one row per
printed value, with the columns ``dataset, model, entry, eps, eps_text, metric, value`` and, where
they apply, ``pixels`` and ``note``. Values are stored as robench stores them: accuracy-like metrics
as fractions (the paper's percent / 100), counts as counts. Entry labels follow the built-in suites
(``pgd-k10``, ``clean+rerank``, ``range:0-255``), so ``robench compare RUN --paper NAME[:DATASET]``
puts the paper's values in the same rows and columns of a layout as the measured ones. Lines that
start with ``#`` at the top of a CSV say how an ambiguous flattened table was read.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from importlib import resources

import pandas as pd

from robench.errors import UsageError
from robench.registry import did_you_mean
from robench.results.reading import ROW_COLUMNS

CSV_COLUMNS = ["dataset", "model", "entry", "eps", "eps_text", "metric", "value"]
OPTIONAL_COLUMNS = ["pixels", "note"]
MODEL_PREFIX = "paper: "


@dataclass(frozen=True)
class PaperTable:
    title: str  # as the paper names it, e.g. "FDD Table 3"
    paper: str
    layouts: tuple[str, ...]  # the compare layouts its rows line up in
    kind: str  # the run kind its rows stand beside: classification, reid or pixel
    caveat: str = ""  # why the fit is loose, where it is


_FDD = "Feature-Density Dropout"
_ALIGN = "Hierarchical feature alignment (Zhang et al.)"
_LFM = "Beyond Dropout: Local Feature Masking (Gong et al.)"
_PIXEL = "Robustness Augmentation Based on Pixel Change (Zhang & Cai)"
_REID = ("reid", "reid-rows")

PAPER_TABLES: dict[str, PaperTable] = {
    "fdd-table3": PaperTable("FDD Table 3", _FDD, ("fdd",), "classification"),
    "alignment-table2": PaperTable("Alignment Table 2", _ALIGN, ("alignment",), "classification"),
    "alignment-table3": PaperTable("Alignment Table 3", _ALIGN, ("alignment",), "classification"),
    "alignment-table4": PaperTable("Alignment Table 4", _ALIGN, ("alignment",), "classification"),
    "alignment-table5": PaperTable("Alignment Table 5", _ALIGN, ("alignment",), "classification"),
    "alignment-table6": PaperTable("Alignment Table 6", _ALIGN, ("alignment",), "classification"),
    "lfm-table1": PaperTable("LFM Table I", _LFM, _REID, "reid"),
    "lfm-table2": PaperTable("LFM Table II", _LFM, _REID, "reid"),
    "lfm-table3": PaperTable("LFM Table III", _LFM, _REID, "reid",
                             "the DMR budget is not printed; read as the default 16/255"),
    "pixel-table10": PaperTable("Pixel Table 10", _PIXEL, ("pixel",), "pixel",
                                "misclassified counts are out of the paper's 1000 images"),
    "pixel-table11": PaperTable("Pixel Table 11", _PIXEL, ("pixel",), "pixel",
                                "loose fit: unchanged FGSM examples as a 0 px column of attack:fgsm"),
}

# What the result reader writes in the settings column for a pixel setting without delta, area or eps.
_PIXEL_SETTINGS = json.dumps({"area": None, "delta": None, "eps": None}, sort_keys=True)


def available() -> list[str]:
    return list(PAPER_TABLES)


def _csv_text(name: str) -> str:
    """The table's CSV, ``paper_tables/NAME.csv`` inside the package."""
    return (resources.files("robench.reporting") / "paper_tables" / f"{name}.csv").read_text("utf-8")


def read_table(name: str) -> pd.DataFrame:
    """One paper table's CSV as stored: its ``#`` header lines skipped, every column read as text."""
    text = _csv_text(name)
    body = "".join(line for line in io.StringIO(text) if not line.startswith("#"))
    frame = pd.read_csv(io.StringIO(body), dtype=str, keep_default_na=False)
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    return frame


def header_lines(name: str) -> list[str]:
    """The ``#`` lines at the top of a table's CSV: how its flattened text was read."""
    return [line[1:].strip() for line in _csv_text(name).splitlines() if line.startswith("#")]


def datasets(name: str) -> list[str]:
    return list(dict.fromkeys(read_table(name).dataset))


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:DATASET`` -> (table name, dataset); the dataset is checked against the table."""
    name, _, dataset = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in PAPER_TABLES:
        hint = did_you_mean(name, available())
        listing = "" if "known:" in hint else f" (available: {', '.join(available())})"
        raise UsageError(f"unknown paper table {name!r}{hint}{listing}")
    present = datasets(name)
    if not dataset:
        if len(present) > 1:
            raise UsageError(f"paper table {name} has several datasets; give one as {name}:DATASET "
                             f"({', '.join(present)})")
        return name, present[0]
    by_lower = {d.lower(): d for d in present}
    if dataset.strip().lower() not in by_lower:
        raise UsageError(f"paper table {name} has no dataset {dataset!r}; it has {', '.join(present)}")
    return name, by_lower[dataset.strip().lower()]


def paper_rows(spec: str) -> pd.DataFrame:
    """The paper's values for ``NAME[:DATASET]`` in ``results_frame``'s columns, models named ``paper: ...``.

    The columns a run would fill are filled the same way (``kind``, ``attack``, ``norm``, clean eps 0,
    re-ranked settings), so every layout pivots them like measured rows; ``source`` names the table.
    """
    name, dataset = parse_spec(spec)
    table = PAPER_TABLES[name]
    stored = read_table(name)
    stored = stored[stored.dataset == dataset]
    rows = [_frame_row(name, table, record) for record in stored.to_dict("records")]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _frame_row(name: str, table: PaperTable, record: dict[str, str]) -> dict[str, object]:
    entry = record["entry"]
    clean = entry in ("clean", "clean+rerank")
    return {
        "model": MODEL_PREFIX + record["model"], "kind": table.kind, "suite": None, "entry": entry,
        "attack": _attack(entry, table.kind), "norm": None if clean or table.kind == "pixel" else "linf",
        "settings": _settings(entry, table.kind), "eps": _eps(record["eps"], clean),
        "eps_text": record["eps_text"] or None, "pixels": int(record["pixels"]) if record["pixels"] else None,
        "metric": record["metric"], "value": float(record["value"]), "n": None, "ap_convention": None,
        "source": f"paper:{name}",
    }


def _attack(entry: str, kind: str) -> str:
    """As the reader names it: the pixel experiment, ``clean`` for clean rows, else the attack of the label."""
    if kind == "pixel":
        return entry.split(":")[0]
    if entry.startswith("clean"):
        return "clean"
    return entry.split("-")[0]  # pgd-k10 is a pgd entry


def _settings(entry: str, kind: str) -> str:
    # The reid layouts find re-ranked rows by this key, as the reader writes it for clean_reranked.
    if entry == "clean+rerank":
        return "rerank"
    return _PIXEL_SETTINGS if kind == "pixel" else ""


def _eps(text: str, clean: bool) -> float | None:
    # The reader gives clean rows eps 0 and pixel rows none.
    if text:
        return float(text)
    return 0.0 if clean else None


def table_note(spec: str) -> str:
    """The line a comparison table carries for the paper rows it shows."""
    name, dataset = parse_spec(spec)
    table = PAPER_TABLES[name]
    caveat = f"; {table.caveat}" if table.caveat else ""
    return (f"paper rows: {table.title} of {table.paper} ({dataset}), models 'paper: ...': "
            f"values as printed, not measured{caveat}")


def listing() -> str:
    """``--paper list``: one line per table: name, title, datasets, layouts."""
    lines = []
    for name, table in PAPER_TABLES.items():
        fits = ", ".join(table.layouts) or "none"
        caveat = f" ({table.caveat})" if table.caveat else ""
        lines.append(f"{name}\t{table.title}\t{', '.join(datasets(name))}\tlayout: {fits}{caveat}")
    return "\n".join(lines) + "\n"
