"""The tidy form of a results document: one row per value, the same for every kind of run.

``results.csv`` holds these rows, ``Result.tidy()`` returns them and the reader
behind ``compare`` and ``gate`` builds its table from them, so what a run writes and what
is read back never disagree. Rows follow the document's own keys (every ``rankN`` a ReID
run reports, every metric of a pixel row) rather than a fixed list.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pandas as pd

from robench.results.schema import PIXEL_SCHEMA
from robench.results import minimum_norm
from robench.results.metric_table import reid_metric_keys

TIDY_COLUMNS = ["model", "kind", "suite", "entry", "attack", "norm", "settings", "eps", "eps_text", "pixels", "metric",
                "value", "n", "ap_convention"]
# Per-entry fields that record how the run went, not what was asked: two runs of the same
# settings differ in them, so they stay out of the settings key that matches runs.
SETTINGS_EXCLUDED = {"seconds", "gradient_evals", "peak_memory_bytes", "eps_expr"}
PIXEL_METRICS = ("misclassified", "recognition_rate", "pi")

Add = Callable[..., None]


def document_kind(doc: dict[str, Any]) -> str:
    """``classification``, ``reid``, ``pixel``, ``attack-check`` or ``certify``."""
    if doc.get("schema") == PIXEL_SCHEMA:
        return "pixel"
    if doc.get("task") in ("attack-check", "certify"):
        return doc["task"]
    return "reid" if doc.get("task") == "reid" else "classification"


def settings_key(params: dict[str, Any] | None) -> str:
    params = {k: v for k, v in (params or {}).items() if k not in SETTINGS_EXCLUDED}
    return json.dumps(params, sort_keys=True, default=str)


def tidy_rows(doc: dict[str, Any], model: str | None = None, keep_null: bool = False) -> list[dict[str, Any]]:
    """One row per value of ``doc``; ``model`` labels the rows (default: the document's model name).

    Null values (a success rate with nothing attacked, mINP not computed) are left out unless
    ``keep_null``: the gate must see them to tell a missing value from a changed one.
    """
    kind = document_kind(doc)
    label = model if model is not None else doc.get("model", {}).get("name")
    suite = doc.get("suite", {}).get("name")
    rows: list[dict[str, Any]] = []

    def add(entry: str, attack: str, settings: str, metric: str, value: Any, n: Any, *, eps: Any = None,
            eps_text: str | None = None, pixels: Any = None, norm: str | None = None, ap: str | None = None) -> None:
        if value is None and not keep_null:
            return
        rows.append({"model": label, "kind": kind, "suite": suite, "entry": entry, "attack": attack, "norm": norm,
                     "settings": settings, "eps": eps, "eps_text": eps_text, "pixels": pixels, "metric": metric,
                     "value": None if value is None else float(value), "n": n, "ap_convention": ap})

    {"classification": _classification_rows, "reid": _reid_rows, "pixel": _pixel_rows,
     "attack-check": _check_rows, "certify": _certify_rows}[kind](doc, add)
    return rows


def pixels_text(pixels: Any) -> str:
    """"8 px" for a pixel count (a frame may hold it as a float or pandas' NA), "" for none."""
    if pixels is None or pd.isna(pixels):
        return ""
    return f"{int(pixels)} px"


def tidy_frame(doc: dict[str, Any], model: str | None = None, keep_null: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame(tidy_rows(doc, model, keep_null), columns=TIDY_COLUMNS)
    # Counts stay whole numbers in results.csv even where some rows have none (the mean has no n).
    return frame.astype({"n": "Int64", "pixels": "Int64"})


def _entry_identity(a: dict[str, Any]) -> dict[str, Any]:
    params = a.get("params") or {}
    return {"eps": a["eps"], "eps_text": params.get("eps_expr"), "norm": a.get("norm")}


def _classification_rows(doc: dict[str, Any], add: Add) -> None:
    n = doc["clean"]["n"]
    add("clean", "clean", "", "accuracy", doc["clean"]["accuracy"], n, eps=0.0)
    for a in doc["attacks"]:
        s, pixels = settings_key(a.get("params")), (a.get("params") or {}).get("pixels")
        add(a["label"], a["attack"], s, "accuracy", a["accuracy"], a["n"], pixels=pixels, **_entry_identity(a))
        add(a["label"], a["attack"], s, "success_rate", a["success_rate"], a.get("attacked"), pixels=pixels,
            **_entry_identity(a))
    minimum_norm.tidy_rows(doc, add, settings_key)
    add("worst-case", "worst-case", "", "robust_accuracy", doc.get("robust_accuracy"), n)
    add("mean", "mean", "", "mean_attack_accuracy", doc.get("mean_attack_accuracy"), None)


def _reid_rows(doc: dict[str, Any], add: Add) -> None:
    # The clean block names the ranks the run was asked for (--ranks); every block reports the same ones.
    keys = reid_metric_keys(doc["clean"])

    def add_block(entry: str, attack: str, settings: str, m: dict | None, **identity: Any) -> None:
        if not m:
            return
        for key in keys:
            add(entry, attack, settings, key, m.get(key), m.get("queries"), ap=m.get("ap_convention"), **identity)

    add_block("clean", "clean", "", doc["clean"], eps=0.0)
    add_block("clean+rerank", "clean", "rerank", doc.get("clean_reranked"), eps=0.0)
    for a in doc["attacks"]:
        s = settings_key(a.get("params"))
        add_block(a["label"], a["attack"], s, a, **_entry_identity(a))
        add_block(a["label"] + "+rerank", a["attack"], s + "|rerank", a.get("reranked"), **_entry_identity(a))


def _pixel_rows(doc: dict[str, Any], add: Add) -> None:
    for exp in doc["experiments"]:
        entry = f"{exp['experiment']}:{exp['setting']}"
        s = json.dumps({k: exp.get(k) for k in ("delta", "area", "eps")}, sort_keys=True)
        for r in exp["results"]:
            for metric in PIXEL_METRICS:
                add(entry, exp["experiment"], s, metric, r.get(metric), r["total"], pixels=r["pixels"])


def _check_rows(doc: dict[str, Any], add: Add) -> None:
    """The pass rate of each checked entry (skipped ones have none)."""
    for c in doc["checks"]:
        s = settings_key(c.get("params"))
        add(c["label"], c["attack"], s, "pass_rate", c["pass_rate"], c["problems"], eps=c["eps"],
            eps_text=c["eps_text"], norm=c["norm"])


def _certify_rows(doc: dict[str, Any], add: Add) -> None:
    """The base model's clean accuracy, the smoothed classifier's (PREDICT), and the certified accuracy at
    each radius (held in the eps column: an L2 radius in pixel units)."""
    # The smoothing (sigma, n0, n, alpha) is the document's settings block: runs that differ in it are not
    # comparable (robench.results.reading), so the rows need no settings key of their own.
    n = doc["clean"]["n"]
    add("clean", "clean", "", "accuracy", doc["clean"]["accuracy"], n, eps=0.0)
    add("smoothed", "smoothed", "", "accuracy", doc["smoothed"]["accuracy"], n, norm="l2")
    for row in doc["certified_accuracy"]:
        add("certified", "certify", "", "certified_accuracy", row["accuracy"], n, eps=row["radius"],
            eps_text=f"{row['radius']:g}", norm="l2")
