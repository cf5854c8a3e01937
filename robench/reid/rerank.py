"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), in torch, on the GPU when the features are there.

Follows the authors' feature-based algorithm step by step:

1. original distance: squared Euclidean distances between all query and
   gallery features, each row divided by its maximum;
2. the k1-reciprocal set R(i) of every image, expanded by the half-size
   reciprocal set R(c, k1/2) of each candidate c in R(i) that shares more
   than 2/3 of its members with R(i);
3. V[i, j] = exp(-d(i, j)) on the expanded set, normalised to sum 1;
4. local query expansion: V[i] <- mean of V over i's k2 nearest neighbours;
5. Jaccard distance 1 - sum(min(V_i, V_j)) / sum(max(V_i, V_j)) for query rows;
6. final = (1 - lambda) * Jaccard + lambda * original, query x gallery block.

Differences from the reference code that do not change the algorithm: V is
kept in float32 (the reference stores it in float16, which moves distances
by ~1e-3), neighbour lists come from top-k rather than a full argsort, and
every step is batched over rows (chunks of ``chunk`` rows) instead of a
Python loop per image. Memory is dominated by three dense N x N float32
matrices (N = queries + gallery): 4.5 GB at Market-1501 scale.
"""

from __future__ import annotations

import torch

from robench.errors import UsageError


def _reciprocal(neighbours: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """mask[i, a]: is i among the first k+1 neighbours of its a-th neighbour (a < k+1)."""
    top = neighbours[:, :k + 1]
    rows = torch.arange(len(neighbours), device=neighbours.device)
    parts = []
    for s in range(0, len(top), chunk):
        back = top[top[s:s + chunk]]  # [B, k+1, k+1]: neighbours of each neighbour
        parts.append((back == rows[s:s + chunk, None, None]).any(dim=2))
    return torch.cat(parts)


def k_reciprocal_rerank(qf: torch.Tensor, gf: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        chunk: int = 1024) -> torch.Tensor:
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise UsageError(f"re-ranking needs features of equal size, got {tuple(qf.shape)} and {tuple(gf.shape)}")
    n_query = len(qf)
    feats = torch.cat([qf, gf]).float()
    n = len(feats)
    if k1 < 1 or k2 < 1 or k1 + 1 > n or k2 > n:
        raise UsageError(f"re-ranking with k1={k1}, k2={k2} needs more than {max(k1, k2)} images; got {n}")
    device = feats.device
    sq = (feats * feats).sum(dim=1)
    dist = torch.empty(n, n, device=device)
    for s in range(0, n, chunk):
        block = (sq[s:s + chunk, None] + sq[None, :] - 2.0 * feats[s:s + chunk] @ feats.t()).clamp_min_(0.0)
        dist[s:s + chunk] = block / block.amax(dim=1, keepdim=True).clamp_min(1e-12)

    half = int(round(k1 / 2))  # the reference's np.around: halves to even
    depth = max(k1 + 1, k2)
    neighbours = torch.empty(n, depth, dtype=torch.long, device=device)
    for s in range(0, n, chunk):
        neighbours[s:s + chunk] = torch.topk(dist[s:s + chunk], depth, dim=1, largest=False, sorted=True).indices
    forward = neighbours[:, :k1 + 1]
    is_recip = _reciprocal(neighbours, k1, chunk)  # [N, k1+1]
    half_nb = neighbours[:, :half + 1]
    half_recip = _reciprocal(neighbours, half, chunk)  # [N, half+1]

    weights = torch.zeros(n, n, device=device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        fwd, rec = forward[s:e], is_recip[s:e]  # [B, k1+1]
        members = torch.zeros(e - s, n, dtype=torch.bool, device=device)
        members.scatter_(1, fwd, rec)
        # Candidates c in R(i) and their half-size reciprocal sets R(c).
        cand_sets = half_nb[fwd]  # [B, k1+1, half+1]
        cand_valid = half_recip[fwd] & rec[:, :, None]
        in_r = torch.gather(members, 1, cand_sets.flatten(1)).view_as(cand_sets) & cand_valid
        size = cand_valid.sum(dim=2)
        expand = (in_r.sum(dim=2) > (2.0 / 3.0) * size) & rec  # [B, k1+1]
        add = (cand_valid & expand[:, :, None]).flatten(1)
        # An image can sit in several candidates' sets: count, so duplicates never overwrite a True.
        extra = torch.zeros(e - s, n, dtype=torch.int32, device=device)
        extra.scatter_add_(1, cand_sets.flatten(1), add.int())
        members |= extra > 0
        w = torch.where(members, torch.exp(-dist[s:e]), torch.zeros(1, device=device))
        weights[s:e] = w / w.sum(dim=1, keepdim=True)

    if k2 != 1:
        expanded = torch.empty_like(weights)
        for s in range(0, n, chunk):
            expanded[s:s + chunk] = weights[neighbours[s:s + chunk, :k2]].mean(dim=1)
        weights = expanded
        del expanded

    original = dist[:n_query]
    del dist
    jaccard = torch.empty(n_query, n, device=device)
    q_chunk = max(1, chunk // 64)
    for s in range(0, n_query, q_chunk):
        rows = weights[s:min(s + q_chunk, n_query)]  # [B, N]
        nnz = int((rows != 0).sum(dim=1).max())
        vals, cols = torch.topk(rows, max(nnz, 1), dim=1)  # the nonzero entries (and zeros as padding)
        other = weights[:, cols.flatten()].view(n, *cols.shape)  # [N, B, m]
        overlap = torch.minimum(vals[None], other).sum(dim=2).t()  # [B, N]: sum_k min(V_i[k], V_j[k])
        jaccard[s:s + q_chunk] = 1.0 - overlap / (2.0 - overlap)
    final = jaccard * (1.0 - lambda_value) + original * lambda_value
    return final[:, n_query:]
