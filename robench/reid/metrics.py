"""CMC, mAP and mINP with the Market-1501 protocol, vectorized in torch and chunked over queries.

For each query, gallery images of the same person seen by the same camera
are junk and removed from its ranking, as are images with id -1; id 0
(distractors) are ordinary negatives. Ranking is by ascending distance with
ties broken by gallery order (a stable sort).

AP conventions (every result names its own):

* ``noninterp`` (torchreid, fast-reid): the mean, over the query's correct
  matches, of the precision at each match's position;
* ``trapezoid`` (the official Market-1501 MATLAB code and the layumi
  baseline): the mean over matches of (precision at the previous position +
  precision at the match)/2, the previous precision being 1 at the top.

Queries without a valid match are skipped (``denominator="valid"``, as
torchreid) or count as 0 (``denominator="all"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from robench.errors import UsageError

AP_CONVENTIONS = ("noninterp", "trapezoid")
DENOMINATORS = ("valid", "all")


def distance_matrix(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean", chunk: int = 2048) -> torch.Tensor:
    """[Q, G] distances: squared Euclidean (ranks as Euclidean does) or 1 - cosine similarity."""
    if qf.dim() != 2 or gf.dim() != 2:
        raise UsageError(f"features must be 2-D (images x dims), got {tuple(qf.shape)} and {tuple(gf.shape)}")
    if qf.shape[1] != gf.shape[1]:
        raise UsageError(f"query features have {qf.shape[1]} dims but gallery features {gf.shape[1]}")
    if metric not in ("euclidean", "cosine"):
        raise UsageError(f"distance must be euclidean or cosine, got {metric!r}")
    qf, gf = qf.float(), gf.float()
    if metric == "cosine":
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    g2 = (gf * gf).sum(dim=1)
    parts = []
    for start in range(0, len(qf), chunk):
        q = qf[start:start + chunk]
        if metric == "cosine":
            parts.append(1.0 - q @ gf.t())
        else:
            parts.append(((q * q).sum(dim=1, keepdim=True) + g2[None, :] - 2.0 * q @ gf.t()).clamp_min_(0.0))
    return torch.cat(parts)


def _per_query(dist: torch.Tensor, q_pids, g_pids, q_cams, g_cams, ranks: tuple[int, ...], ap: str):
    """For a chunk of queries: hit-within-k flags, AP, INP and whether a valid match exists."""
    order = torch.sort(dist, dim=1, stable=True).indices
    gp, gc = g_pids[order], g_cams[order]
    same_id = gp == q_pids[:, None]
    junk = (same_id & (gc == q_cams[:, None])) | (gp == -1)
    good = same_id & ~junk
    keep = ~junk
    # 1-based position of every item among the query's non-junk items.
    position = torch.cumsum(keep, dim=1)
    n_good = good.sum(dim=1)
    valid = n_good > 0
    big = torch.iinfo(position.dtype).max
    first = torch.where(good, position, torch.full_like(position, big)).amin(dim=1)
    last = torch.where(good, position, torch.zeros_like(position)).amax(dim=1)
    hits = torch.stack([first <= k for k in ranks], dim=1) & valid[:, None]
    found = torch.cumsum(good, dim=1).double()
    pos = position.double()
    precision = found / pos
    if ap == "noninterp":
        contrib = precision
    else:
        previous = torch.where(pos > 1, (found - 1) / (pos - 1).clamp_min(1), torch.ones_like(pos))
        contrib = (previous + precision) / 2
    denom = n_good.clamp_min(1).double()
    ap_values = torch.where(good, contrib, torch.zeros_like(contrib)).sum(dim=1) / denom
    inp = torch.where(valid, n_good.double() / last.clamp_min(1).double(), torch.zeros_like(denom))
    return hits, ap_values * valid, inp, valid


def rank_metrics(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    ranks: tuple[int, ...] = (1, 5, 10),
    ap: str = "noninterp",
    denominator: str = "valid",
    minp: bool = False,
    chunk: int = 256,
) -> dict[str, Any]:
    """CMC at ``ranks``, mAP (and mINP) of a [Q, G] distance matrix under the Market-1501 protocol."""
    if ap not in AP_CONVENTIONS:
        raise UsageError(f"AP convention must be one of {', '.join(AP_CONVENTIONS)}, got {ap!r}")
    if denominator not in DENOMINATORS:
        raise UsageError(f"denominator must be one of {', '.join(DENOMINATORS)}, got {denominator!r}")
    if dist.shape != (len(q_pids), len(g_pids)):
        raise UsageError(f"distance matrix {tuple(dist.shape)} does not match {len(q_pids)} queries and "
                         f"{len(g_pids)} gallery images")
    if not ranks or min(ranks) < 1:
        raise UsageError(f"ranks must be positive, got {ranks}")
    if not torch.isfinite(dist).all():
        # NaN would sort anywhere: rank non-finite distances last, deterministically.
        dist = torch.nan_to_num(dist.float(), nan=float("inf"))
    device = dist.device
    q_pids, g_pids = q_pids.to(device), g_pids.to(device)
    q_camids, g_camids = q_camids.to(device), g_camids.to(device)
    hits, aps, inps, valids = [], [], [], []
    for start in range(0, len(dist), chunk):
        end = start + chunk
        h, a, i, v = _per_query(dist[start:end], q_pids[start:end], g_pids, q_camids[start:end], g_camids,
                                tuple(ranks), ap)
        hits.append(h)
        aps.append(a)
        inps.append(i)
        valids.append(v)
    hit, ap_all, inp, valid = torch.cat(hits), torch.cat(aps), torch.cat(inps), torch.cat(valids)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UsageError("no query has a valid match in the gallery (same person, different camera)")
    n = n_valid if denominator == "valid" else len(valid)
    return {
        "cmc": {k: float(hit[:, j].sum()) / n for j, k in enumerate(ranks)},
        "mAP": float(ap_all.sum()) / n,
        "mINP": float(inp.sum()) / n if minp else None,
        "queries": len(valid),
        "valid_queries": n_valid,
        "ap_convention": ap,
        "denominator": denominator,
    }
