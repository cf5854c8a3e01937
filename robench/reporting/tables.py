"""Human-readable tables of a results document (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table

from robench.results.metric_table import metric_info


def _show(metric: str, value: float | None) -> str:
    return metric_info(metric).show(value)


def _eps(a: dict[str, Any]) -> str:
    if a["eps"] is None:
        pixels = a["params"].get("pixels")
        return f"{pixels} px" if pixels else "-"
    text = a["params"].get("eps_expr")
    value = f"{a['eps']:.4g}"
    return value if not text or text == value else f"{text} ({value})"


def results_table(doc: dict[str, Any]) -> Table:
    model, suite, data = doc["model"]["name"], doc["suite"]["name"], doc["data"]["spec"]
    table = Table(title=f"robench · {model} · suite {suite} · {data} (n={doc['clean']['n']})")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("attack", "left"), ("norm", "left"), ("eps", "right"), ("accuracy %", "right"), ("success %", "right"),
        ("time s", "right"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    table.add_row("clean", "", "", _show("accuracy", doc["clean"]["accuracy"]), "", "")
    for a in doc["attacks"]:
        name = a["label"] if a["label"] == a["attack"] else f"{a['label']} ({a['attack']})"
        table.add_row(name, a["norm"], _eps(a), _show("accuracy", a["accuracy"]),
                      _show("success_rate", a["success_rate"]), f"{a['seconds']:.2f}")
        for part in a.get("parts") or []:  # a composite's log: robust accuracy after each of its attacks
            table.add_row(f"  after {part['attack']}", "", "", _show("accuracy", part["accuracy_after"]),
                          f"{part['broken']} broken", "")
    for block in doc.get("min_norm") or []:  # the median is a norm: it goes in the eps column
        median = block["median_norm"]
        table.add_row(f"{block['label']} median min. norm", block["norm"], "unbounded" if median is None else
                      f"{median:.4g}", "", f"{block['found']}/{block['attacked']} found", "")
    if doc["robust_accuracy"] is not None:
        worst = _show("robust_accuracy", doc["robust_accuracy"])
        table.add_row("[bold]worst case[/bold]", "", "", f"[bold]{worst}[/bold]", "", "")
        table.add_row("mean over attacks", "", "", _show("mean_attack_accuracy", doc["mean_attack_accuracy"]), "", "")
    env = doc["env"]
    table.caption = (f"{env['device_name']} · {env['precision']} · seed {env['seed']} · "
                     f"batch {env['batch_size']} · {env['seconds']:.1f}s · robench {env['robench']}")
    for flag in doc.get("sanity", {}).get("flags", []):
        # Flags quote suite syntax (`bpda: [module name]`) and user labels: text, never markup.
        table.caption += f"\n[yellow]warning: {escape(flag)}[/yellow]"
    return table
