"""``Result``: what every task returns — the results document, the per-sample table, the settings
that made it and the files saved beside it — and the one way a run directory is written."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from robench.errors import UsageError
from robench.results.adversarial import SavedExamples, rounding_warning
from robench.results.adversarial_grid import save_examples
from robench.results.tidy import pixels_text, tidy_frame
from robench.results.writers import write_run

HTML_ROWS = 40  # a notebook table beyond this is a scroll bar; the tidy frame has them all


@dataclass
class Result:
    """A classification, re-identification or Pixel-index run (``doc["task"]`` says which)."""

    doc: dict[str, Any]
    config: dict[str, Any]
    samples: pd.DataFrame | None = None  # one row per sample (classification); None where a task has none
    # Saved examples (--save-adversarial), written to adversarial/ by ``save``; empty when not asked.
    adversarial: list[SavedExamples] = field(default_factory=list)
    class_names: list[str] | None = None  # the data's class names, for the example grids

    @property
    def task(self) -> str:
        return self.doc["task"]

    @property
    def complete(self) -> bool:
        return self.doc.get("complete", True) is not False

    @property
    def clean_accuracy(self) -> float | None:
        return self.doc["clean"].get("accuracy") if self.task != "reid" else None

    @property
    def robust_accuracy(self) -> float | None:
        return self.doc.get("robust_accuracy")

    def tidy(self) -> pd.DataFrame:
        """The rows of results.csv: one per value, the columns ``robench compare`` reads."""
        return tidy_frame(self.doc)

    def to_json(self) -> str:
        return json.dumps(self.doc, indent=2)

    def rounding_warnings(self) -> list[str]:
        """One line per entry whose saved 8-bit examples lost some of the run's successes (``robench eval``
        prints them); empty without ``save_adversarial``."""
        lines = [rounding_warning(f"{a['label']} {setting_text(a)}".strip(), a["saved_examples"])
                 for a in self.doc.get("attacks", []) if a.get("saved_examples")]
        return [line for line in lines if line]

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the run directory: results.json, results.csv, config.json, samples.csv where there is a
        per-sample table and adversarial/ where examples were kept.

        A complete results.json already there is kept unless ``overwrite=True``, as the CLI
        never overwrites a run; partial results (an interrupted run) are replaced.
        """
        from robench.results.progress import finished

        path = Path(directory)
        if not overwrite and finished(path):
            raise UsageError(f"{path} already holds a complete results.json; choose another directory "
                             "or pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        if self.adversarial:  # before results.json: its presence means every file is there
            save_examples(path, self.adversarial, self.class_names)
        write_run(path, self.doc, self.samples, self.config)
        return path

    # A notebook shows a result by its repr: the numbers a person looks for, not the whole
    # document, the samples frame and the config (kilobytes); those stay one attribute away.
    def __repr__(self) -> str:
        doc = self.doc
        partial = "" if self.complete else ", partial"
        name = (doc.get("model") or {}).get("name")
        if self.task == "classification":
            robust = doc.get("robust_accuracy")
            worst = "n/a" if robust is None else f"{100 * robust:.2f}%"
            return (f"Result(task='classification', model={name!r}, suite={doc['suite'].get('name')!r}, "
                    f"n={doc['clean']['n']}, clean={100 * doc['clean']['accuracy']:.2f}%, worst={worst}, "
                    f"entries={len(doc['attacks'])}{partial})")
        if self.task == "reid":
            clean = doc["clean"]
            return (f"Result(task='reid', model={name!r}, suite={doc['suite'].get('name')!r}, "
                    f"queries={doc['data'].get('queries')}, rank1={100 * clean['rank1']:.1f}%, "
                    f"mAP={100 * clean['mAP']:.1f}%, settings={len(doc['attacks'])}{partial})")
        if self.task == "certify":  # certified accuracy per radius
            certified = ", ".join(f"{r['radius']:g}: {_percent(r['accuracy'])}%" for r in doc["certified_accuracy"])
            return (f"Result(task='certify', model={name!r}, sigma={doc['settings']['sigma']:g}, "
                    f"n={doc['clean']['n']}, smoothed={_percent(doc['smoothed']['accuracy'])}%, "
                    f"certified={{{certified}}}{partial})")
        images = doc.get("images", {})
        return (f"Result(task={self.task!r}, model={name!r}, read={images.get('read')}, "
                f"evaluated={images.get('evaluated')}{partial})")

    def _repr_html_(self) -> str:
        if self.task == "classification":  # accuracy per entry as evaluated: what a paper's table holds
            rows = [("clean", "", "accuracy", self.doc["clean"]["accuracy"])]
            rows += [(a["label"], setting_text(a), "accuracy", a["accuracy"]) for a in self.doc["attacks"]]
        else:
            tidy = self.tidy().dropna(subset=["value"]).head(HTML_ROWS)
            rows = [(r.entry, _row_setting(r), r.metric, r.value) for r in tidy.itertuples()]
        cells = "".join(
            f"<tr><td>{html.escape(str(entry))}</td><td>{html.escape(setting)}</td><td>{html.escape(str(metric))}"
            f"</td><td style='text-align:right'>{_percent(value)}</td></tr>" for entry, setting, metric, value in rows)
        return (f"<p>{html.escape(repr(self))}</p><table><thead><tr><th>entry</th><th>setting</th><th>metric</th>"
                f"<th>value %</th></tr></thead><tbody>{cells}</tbody></table>")


def setting_text(entry: dict[str, Any]) -> str:
    """eps as the suite wrote it, or the pixel count of an entry that sweeps pixels."""
    params = entry.get("params") or {}
    if entry.get("eps") is not None:
        return f"eps {params.get('eps_expr') or format(entry['eps'], 'g')}"
    return pixels_text(params.get("pixels"))


def _row_setting(row: Any) -> str:
    if isinstance(row.eps_text, str) and row.eps_text:
        return f"eps {row.eps_text}"
    if pd.notna(row.eps) and row.eps:
        return f"eps {row.eps:g}"
    return pixels_text(None if pd.isna(row.pixels) else int(row.pixels))


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.2f}"
