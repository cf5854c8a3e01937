"""Read result documents of every kind back into one long table.

Classification (``robench.results/1``, task classification), re-identification
(same schema, task reid) and Pixel-index (``robench.pixel-index/1``) documents
become rows keyed by (model, attack entry, its settings, eps or pixel count,
metric), which ``compare`` pivots and ``gate`` matches run against run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from robench.errors import UsageError

KNOWN_SCHEMAS = ("robench.results/1", "robench.pixel-index/1")
ROW_COLUMNS = ["model", "kind", "entry", "attack", "settings", "eps", "eps_text", "pixels", "metric", "value", "n",
               "ap_convention", "source"]
# Metrics where a larger value means a more robust model; the rest (attack success, Pi,
# misclassification) are better when smaller.
HIGHER_IS_BETTER = {"accuracy", "robust_accuracy", "mean_attack_accuracy", "rank1", "rank5", "rank10", "rank20",
                    "mAP", "mINP", "recognition_rate"}
SETTINGS_EXCLUDED = {"seconds", "gradient_evals", "peak_memory_bytes", "eps_expr"}


@dataclass
class ResultFile:
    path: Path
    doc: dict[str, Any]
    label: str

    @property
    def kind(self) -> str:
        if self.doc.get("schema") == "robench.pixel-index/1":
            return "pixel"
        return "reid" if self.doc.get("task") == "reid" else "classification"

    @property
    def fingerprint(self) -> str | None:
        return self.doc.get("env", {}).get("dataset_fingerprint") or self.doc.get("data", {}).get("fingerprint")

    @property
    def settings_hash(self) -> str | None:
        """What must agree for two runs to be comparable, beyond the data: the suite or the pixel settings."""
        if self.kind == "pixel":
            s = self.doc.get("settings", {})
            return json.dumps({k: s.get(k) for k in ("pixels", "trials", "seed", "shared_positions", "channels")},
                              sort_keys=True)
        return self.doc.get("suite", {}).get("sha256")


def read_result(path: str | Path, label: str | None = None) -> ResultFile:
    """A ``results.json`` file or a run directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UsageError(f"result file not found: {path}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{p} is not a readable results.json: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") not in KNOWN_SCHEMAS:
        raise UsageError(f"{p} is not a robench result (schema {doc.get('schema') if isinstance(doc, dict) else '?'}"
                         f"; expected one of {', '.join(KNOWN_SCHEMAS)})")
    if doc.get("complete") is False:
        raise UsageError(f"{p} is a partial result (the run did not finish)")
    return ResultFile(p, doc, label or doc.get("model", {}).get("name") or p.parent.name)


def settings_key(params: dict[str, Any] | None) -> str:
    params = {k: v for k, v in (params or {}).items() if k not in SETTINGS_EXCLUDED}
    return json.dumps(params, sort_keys=True, default=str)


def result_rows(result: ResultFile) -> list[dict[str, Any]]:
    doc, model = result.doc, result.label
    rows: list[dict[str, Any]] = []

    def add(entry: str, attack: str, settings: str, eps: Any, pixels: Any, metric: str, value: Any, n: Any,
            ap: str | None = None, eps_text: str | None = None) -> None:
        if value is None:
            return
        rows.append({"model": model, "kind": result.kind, "entry": entry, "attack": attack, "settings": settings,
                     "eps": eps, "eps_text": eps_text, "pixels": pixels, "metric": metric, "value": float(value),
                     "n": n, "ap_convention": ap, "source": str(result.path)})

    if result.kind == "classification":
        n = doc["clean"]["n"]
        add("clean", "clean", "", 0.0, None, "accuracy", doc["clean"]["accuracy"], n)
        for a in doc["attacks"]:
            s = settings_key(a.get("params"))
            pixels = a.get("params", {}).get("pixels")
            text = a.get("params", {}).get("eps_expr")
            add(a["label"], a["attack"], s, a["eps"], pixels, "accuracy", a["accuracy"], a["n"], eps_text=text)
            add(a["label"], a["attack"], s, a["eps"], pixels, "success_rate", a["success_rate"], a.get("attacked"),
                eps_text=text)
        add("worst-case", "worst-case", "", None, None, "robust_accuracy", doc.get("robust_accuracy"), n)
        add("mean", "mean", "", None, None, "mean_attack_accuracy", doc.get("mean_attack_accuracy"), None)
    elif result.kind == "reid":
        metric_keys = [k for k in doc["clean"] if k.startswith("rank")] + ["mAP", "mINP"]

        def add_reid(entry: str, attack: str, settings: str, eps: Any, m: dict | None, text: str | None = None) -> None:
            if not m:
                return
            for key in metric_keys:
                add(entry, attack, settings, eps, None, key, m.get(key), m.get("queries"), m.get("ap_convention"),
                    text)

        add_reid("clean", "clean", "", 0.0, doc["clean"])
        add_reid("clean+rerank", "clean", "rerank", 0.0, doc.get("clean_reranked"))
        for a in doc["attacks"]:
            s = settings_key(a.get("params"))
            text = a.get("params", {}).get("eps_expr")
            add_reid(a["label"], a["attack"], s, a["eps"], a, text)
            add_reid(a["label"] + "+rerank", a["attack"], s + "|rerank", a["eps"], a.get("reranked"), text)
    else:
        for exp in doc["experiments"]:
            entry = f"{exp['experiment']}:{exp['setting']}"
            s = json.dumps({k: exp.get(k) for k in ("delta", "area", "eps")}, sort_keys=True)
            for r in exp["results"]:
                for metric in ("misclassified", "recognition_rate", "pi"):
                    add(entry, exp["experiment"], s, None, r["pixels"], metric, r.get(metric), r["total"])
    return rows


def results_frame(results: list[ResultFile]) -> pd.DataFrame:
    rows = [row for r in results for row in result_rows(r)]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def comparability_problems(results: list[ResultFile]) -> list[str]:
    """Why these runs should not share a table: different data, settings or AP conventions."""
    problems = []
    kinds = {r.kind for r in results}
    if len(kinds) > 1:
        problems.append(f"results of different kinds: {', '.join(sorted(kinds))}")
    for attr, what in (("fingerprint", "dataset fingerprint"), ("settings_hash", "suite settings")):
        values = {getattr(r, attr) for r in results}
        if len(values) > 1:
            groups = {}
            for r in results:
                groups.setdefault(getattr(r, attr), []).append(r.label)
            problems.append(f"different {what}: " + "; ".join(", ".join(v) for v in groups.values()))
    aps = {r.doc.get("clean", {}).get("ap_convention") for r in results if r.kind == "reid"}
    if len(aps) > 1:
        problems.append(f"different AP conventions: {', '.join(sorted(map(str, aps)))}")
    return problems
