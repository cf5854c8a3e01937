"""The LFM paper's Table III layout: Original and Attacked Rank-1/5/10/mAP per model."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from robench.results.metric_table import metric_info, rank_keys


def reid_table(doc: dict[str, Any]) -> Table:
    clean = doc["clean"]
    ranks = rank_keys(clean)
    table = Table(title=f"robench · {doc['model']['name']} · suite {doc['suite']['name']} · {doc['data']['spec']} "
                        f"({doc['data']['queries']} queries, {doc['data']['gallery']} gallery)")
    for col in ("setting", "eps", "source", *[f"Rank-{k[4:]}" for k in ranks], f"mAP ({clean['ap_convention']})",
                "mINP"):
        table.add_column(col, justify="left" if col in ("setting", "source") else "right")

    def row(name: str, eps: str, source: str, m: dict[str, Any]) -> None:
        table.add_row(name, eps, source, *(metric_info(k).show(m.get(k)) for k in (*ranks, "mAP", "mINP")))

    row("original", "", "", clean)
    if doc.get("clean_reranked"):
        row("original + re-ranking", "", "", doc["clean_reranked"])
    for a in doc["attacks"]:
        name = f"{a['label']} ({a['params']['objective']})"
        eps = a["params"].get("eps_expr") or f"{a['eps']:.4g}"
        source = a["params"]["source"]
        if source == "surrogate" and doc.get("surrogate"):
            source = f"surrogate {doc['surrogate']['name']}"
        row(name, eps, source, a)
        if a.get("reranked"):
            row(f"{name} + re-ranking", eps, source, a["reranked"])
    table.caption = (f"distance {doc['protocol']['distance']} · denominator {doc['protocol']['denominator']} · "
                     f"{doc['protocol']['perturb']} perturbed · {doc['env']['device_name']} · "
                     f"{doc['env']['seconds']:.1f}s")
    return table
