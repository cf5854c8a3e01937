"""The results document (versioned JSON) and its tidy, one-row-per-metric form.

Schema ``robench.results/1`` (documented in README, "Results"):

* ``clean``: ``{"accuracy", "n", "correct"}``
* ``attacks``: one object per (attack, eps): ``attack``, ``label``, ``norm``,
  ``eps`` (pixel units unless ``eps_space`` says normalized), ``accuracy``,
  ``success_rate`` (fooled / attacked, attacked = clean-correct samples),
  ``n``, ``attacked``, ``params``, ``seconds``, ``gradient_evals``,
  ``peak_memory_bytes``
* ``robust_accuracy``: accuracy under the worst case per sample over all entries
* ``mean_attack_accuracy``: mean of the entries' accuracies (the papers' "Mean")
* ``model``, ``suite``, ``data``, ``env``, ``sanity``, ``complete``
"""

from __future__ import annotations

from typing import Any

SCHEMA = "robench.results/1"
TIDY_COLUMNS = ["model", "suite", "attack", "label", "norm", "eps", "metric", "value", "n"]


def tidy_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric; pandas pivots these into any table."""
    model = doc["model"]["name"]
    suite = doc["suite"]["name"]
    rows = [
        {"model": model, "suite": suite, "attack": "clean", "label": "clean", "norm": None, "eps": 0.0,
         "metric": "accuracy", "value": doc["clean"]["accuracy"], "n": doc["clean"]["n"]}
    ]
    for a in doc["attacks"]:
        for metric in ("accuracy", "success_rate"):
            rows.append({"model": model, "suite": suite, "attack": a["attack"], "label": a["label"],
                         "norm": a["norm"], "eps": a["eps"], "metric": metric, "value": a[metric],
                         "n": a["n"] if metric == "accuracy" else a["attacked"]})
    if doc.get("robust_accuracy") is not None:
        rows.append({"model": model, "suite": suite, "attack": "worst-case", "label": "worst-case", "norm": None,
                     "eps": None, "metric": "robust_accuracy", "value": doc["robust_accuracy"],
                     "n": doc["clean"]["n"]})
    return rows
