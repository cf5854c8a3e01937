"""Re-identification ranking metrics (CMC, mAP, mINP) under the Market-1501 protocol.

Protocol, per query:

* gallery images of the query's person taken by the query's camera are junk
  and are dropped from that query's ranking, as are gallery images with person
  id -1 (junk for every query); id 0 (distractors) are ordinary negatives;
* the gallery is ranked by ascending distance, equal distances in gallery
  order (a stable sort); NaN distances rank last;
* a correct match is a non-junk image of the query's person (so from another
  camera); a query with no correct match is *invalid*.

CMC@k is the share of queries whose first correct match is within the top k
non-junk images. Two AP conventions, named in every result:

* ``noninterp`` (torchreid, fast-reid): the mean, over the correct matches, of
  the precision at each match;
* ``trapezoid`` (the official Market-1501 MATLAB evaluation and layumi's
  Person_reID_baseline_pytorch): the sum over correct matches of
  ``(previous precision + precision) / 2 / n_good``, where the previous
  precision is the precision one non-junk position above the match (1 when the
  match is at the top).

Invalid queries are skipped (``denominator="valid"``, torchreid's
``num_valid_q``) or count as 0 in CMC and mAP (``denominator="all"``, the
MATLAB code's average over every query). mINP (Ye et al., 2021) is the mean,
over valid queries under either denominator, of ``n_good / position of the
last correct match``.

Everything runs in torch on the device of the distance matrix, a chunk of
queries at a time (a chunk sorts a [chunk, G] block); there is no per-query
Python loop.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn import functional as F

from robench.errors import UsageError

METRICS = ("euclidean", "cosine")
AP_CONVENTIONS = ("noninterp", "trapezoid")
DENOMINATORS = ("valid", "all")


def distance_matrix(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean", chunk: int = 2048) -> torch.Tensor:
    """[Q, G] float32 distances between query and gallery features.

    ``euclidean`` is the squared Euclidean distance (the same ranking as the
    Euclidean distance; torchreid ranks by it), ``|q|^2 + |g|^2 - 2 q.g``
    clamped at 0; ``cosine`` is ``1 - cosine similarity``. Computed ``chunk``
    queries at a time on the features' device.
    """
    if metric not in METRICS:
        raise UsageError(f"distance metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if qf.dim() != 2 or gf.dim() != 2:
        raise UsageError(f"features must be 2-D (images x feature size), got query {tuple(qf.shape)} "
                         f"and gallery {tuple(gf.shape)}")
    if qf.shape[1] != gf.shape[1]:
        raise UsageError(f"query features have {qf.shape[1]} dims but gallery features {gf.shape[1]}; "
                         "both must come from the same model and layer")
    if qf.device != gf.device:
        raise UsageError(f"query features are on {qf.device} but gallery features on {gf.device}")
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}")
    qf, gf = qf.float(), gf.float()
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    if metric == "cosine":
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        gt = gf.t()
        for s in range(0, qf.shape[0], chunk):
            block = out[s:s + chunk]
            torch.mm(qf[s:s + chunk], gt, out=block)
            block.neg_().add_(1.0)
        return out
    g2 = (gf * gf).sum(dim=1)
    gt = gf.t()
    for s in range(0, qf.shape[0], chunk):
        q = qf[s:s + chunk]
        block = out[s:s + chunk]
        # |g|^2 - 2 q.g in one matmul, then + |q|^2
        torch.addmm(g2[None, :], q, gt, alpha=-2.0, out=block)
        block.add_((q * q).sum(dim=1, keepdim=True)).clamp_min_(0.0)
    return out


def _as_ids(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise UsageError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UsageError(f"{name} must be integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _chunk_stats(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_cams: torch.Tensor,
                 g_cams: torch.Tensor, ranks: torch.Tensor, ap: str):
    """For a [B, G] block: CMC hit flags [B, R], AP [B] (float64), INP [B] (float64), valid [B]."""
    b = dist.shape[0]
    if dist.is_floating_point():
        dist = torch.where(torch.isnan(dist), torch.full_like(dist, float("inf")), dist)
    order = torch.sort(dist, dim=1, stable=True).indices
    del dist
    gp = g_pids[order]
    same_id = gp == q_pids[:, None]
    junk = gp == -1
    del gp
    junk |= same_id & (g_cams[order] == q_cams[:, None])
    del order
    good = same_id & ~junk
    del same_id
    # 1-based position of each image among the query's non-junk images
    position = torch.cumsum(~junk, dim=1, dtype=torch.int32)
    del junk
    # number of correct matches up to and including each image
    found = torch.cumsum(good, dim=1, dtype=torch.int32)
    n_good = found[:, -1].to(torch.int64) if good.shape[1] else torch.zeros(b, dtype=torch.int64,
                                                                                  device=good.device)
    valid = n_good > 0
    rows, cols = torch.nonzero(good, as_tuple=True)  # the correct matches, row-major
    pos = position[rows, cols].to(torch.float64)
    hit_no = found[rows, cols].to(torch.float64)  # this match is the hit_no-th one of its query
    del position, found, good
    precision = hit_no / pos
    if ap == "noninterp":
        contrib = precision
    else:
        # precision one non-junk position higher: (hit_no - 1) / (pos - 1), or 1 at the top
        previous = torch.where(pos > 1, (hit_no - 1) / (pos - 1).clamp_min(1), torch.ones_like(pos))
        contrib = (previous + precision) / 2
    ap_sum = torch.zeros(b, dtype=torch.float64, device=contrib.device).index_add_(0, rows, contrib)
    ap_values = ap_sum / n_good.clamp_min(1).to(torch.float64)
    # first (hit_no == 1) and last (hit_no == n_good) correct match of each query
    first = torch.zeros(b, dtype=torch.float64, device=pos.device)
    first[rows[hit_no == 1]] = pos[hit_no == 1]
    last_mask = hit_no == n_good[rows].to(torch.float64)
    last = torch.ones(b, dtype=torch.float64, device=pos.device)
    last[rows[last_mask]] = pos[last_mask]
    hits = (first[:, None] <= ranks[None, :].to(torch.float64)) & valid[:, None]
    inp = torch.where(valid, n_good.to(torch.float64) / last, torch.zeros_like(last))
    return hits, ap_values, inp, valid


def _checked_protocol(ap: str, denominator: str, ranks: Sequence[int], chunk: int) -> tuple[int, ...]:
    """The protocol's choices checked; the ranks as plain ints."""
    if ap not in AP_CONVENTIONS:
        raise UsageError(f"AP convention must be one of {', '.join(AP_CONVENTIONS)}, got {ap!r}")
    if denominator not in DENOMINATORS:
        raise UsageError(f"denominator must be one of {', '.join(DENOMINATORS)}, got {denominator!r}")
    ranks = tuple(ranks)
    if not ranks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ranks):
        raise UsageError(f"ranks must be integers >= 1, got {ranks}")
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}")
    return tuple(int(k) for k in ranks)


def _checked_ids(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor,
                 g_camids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Identities and cameras on the distance matrix's device, one per query row and gallery column."""
    device = dist.device
    q_pids, g_pids = _as_ids(q_pids, "q_pids", device), _as_ids(g_pids, "g_pids", device)
    q_cams, g_cams = _as_ids(q_camids, "q_camids", device), _as_ids(g_camids, "g_camids", device)
    if len(q_pids) != len(q_cams) or len(g_pids) != len(g_cams):
        raise UsageError(f"{len(q_pids)} query ids but {len(q_cams)} query cameras, or {len(g_pids)} gallery ids "
                         f"but {len(g_cams)} gallery cameras")
    if tuple(dist.shape) != (len(q_pids), len(g_pids)):
        raise UsageError(f"distance matrix {tuple(dist.shape)} does not match {len(q_pids)} queries and "
                         f"{len(g_pids)} gallery images")
    return q_pids, g_pids, q_cams, g_cams


def rank_metrics(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    ranks: Sequence[int] = (1, 5, 10),
    ap: str = "noninterp",
    denominator: str = "valid",
    minp: bool = False,
    chunk: int = 256,
) -> dict[str, Any]:
    """CMC at ``ranks``, mAP and (with ``minp``) mINP of a [Q, G] distance matrix, Market-1501 protocol.

    Returns ``{"cmc": {k: float}, "mAP": float, "mINP": float | None, "queries": int,
    "valid_queries": int, "ap_convention": ap, "denominator": denominator}``.
    """
    ranks = _checked_protocol(ap, denominator, ranks, chunk)
    dist = torch.as_tensor(dist)
    if dist.dim() != 2:
        raise UsageError(f"the distance matrix must be 2-D (queries x gallery), got shape {tuple(dist.shape)}")
    device = dist.device
    q_pids, g_pids, q_cams, g_cams = _checked_ids(dist, q_pids, g_pids, q_camids, g_camids)
    rank_t = torch.tensor(ranks, device=device)
    hits = torch.zeros(len(ranks), dtype=torch.float64, device=device)
    ap_total = torch.zeros((), dtype=torch.float64, device=device)
    inp_total = torch.zeros((), dtype=torch.float64, device=device)
    n_valid_t = torch.zeros((), dtype=torch.int64, device=device)
    for s in range(0, dist.shape[0], chunk):
        h, a, i, v = _chunk_stats(dist[s:s + chunk], q_pids[s:s + chunk], g_pids, q_cams[s:s + chunk], g_cams,
                                  rank_t, ap)
        hits += h.sum(dim=0)
        ap_total += a.sum()
        inp_total += i.sum()
        n_valid_t += v.sum()
    n_queries, n_valid = dist.shape[0], int(n_valid_t)
    if denominator == "valid":
        if n_valid == 0:
            raise UsageError("no query has a valid match in the gallery (an image of the same person from "
                             "another camera): CMC and mAP are undefined")
        n = n_valid
    else:
        n = n_queries
    hits_l = hits.tolist()
    return {
        "cmc": {k: hits_l[j] / n if n else 0.0 for j, k in enumerate(ranks)},
        "mAP": float(ap_total) / n if n else 0.0,
        "mINP": (float(inp_total) / n_valid if n_valid else 0.0) if minp else None,
        "queries": n_queries,
        "valid_queries": n_valid,
        "ap_convention": ap,
        "denominator": denominator,
    }
