"""Tables in the paper's layout: rows are settings, columns pixel counts (Tables 6-9)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from robench.results.metric_table import metric_info


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def pixel_tables(doc: dict[str, Any]) -> list[Table]:
    """One table per experiment; cells "misclassified · recognition rate", then a Pi row."""
    h, w = doc["data"]["input_size"]
    pixels = doc["settings"]["pixels"]
    titles = {"range": "Experiment 1 · new values in [0,255], whole image",
              "delta": "Experiment 2 · values within ±delta of the original",
              "area": "Experiment 3 · positions inside a centred area",
              "attack": "Experiment 4 · pixel changes on FGSM adversarial examples"}
    tables = []
    for kind, title in titles.items():
        exps = [e for e in doc["experiments"] if e["experiment"] == kind]
        if not exps:
            continue
        n = exps[0]["results"][0]["total"]
        table = Table(title=f"{doc['model']['name']} · {title} (n={n}, trials={doc['settings']['trials']})")
        table.add_column("setting")
        table.add_column("")
        for p in pixels:
            table.add_column(f"{p}\n{100 * p / (h * w):.4f}%", justify="right")
        for e in exps:
            res = e["results"]
            table.add_row(e["setting"], "misclassified", *(_count(r["misclassified"]) for r in res))
            rate = metric_info("recognition_rate")
            table.add_row("", "recognition rate", *(
                "-" if r["recognition_rate"] is None else f"{rate.show(r['recognition_rate'])}%" for r in res))
            if kind != "attack":
                table.add_row("", "Pi", *(metric_info("pi").show(r["pi"]) for r in res), end_section=True)
        tables.append(table)
    return tables
