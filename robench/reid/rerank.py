"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking Person Re-identification with k-reciprocal
Encoding"), the authors' feature-based algorithm, in torch on the features' device.

With the query and gallery features stacked (N = Q + G images):

1. original distance: squared Euclidean distances between all N images, each
   column divided by its maximum and transposed (for this symmetric matrix:
   each row divided by its maximum);
2. R(i): the k1-reciprocal neighbours of i, the images among i's k1+1 nearest
   that have i among their own k1+1 nearest; for every candidate c in R(i), if
   more than 2/3 of c's half-size set R(c, round(k1/2)) lies in R(i), that set
   is added to i's expanded set;
3. V[i, j] = exp(-d(i, j)) over the expanded set, divided by its sum;
4. local query expansion (k2 > 1): V[i] becomes the mean of V over i's k2
   nearest images (i included);
5. Jaccard distance for the query rows, 1 - m / (2 - m) with
   m = sum_k min(V[i, k], V[j, k]);
6. final = (1 - lambda) * Jaccard + lambda * original, query x gallery block.

How it stays within memory at Market-1501 scale (19,281 images): no N x N
matrix is ever held. Distances are computed ``chunk`` rows at a time to take
each row's maximum, its nearest neighbours and (for query rows) its
query-by-gallery block, then dropped. V is sparse (each row has at most
(k1+1)(round(k1/2)+2) entries before query expansion) and is kept as
(row, column, value) lists; the few distances it needs are recomputed from the
features. The Jaccard overlaps are accumulated through an inverted index
(gallery rows by column), as the authors' code does, but batched over many
(query entry, gallery entry) pairs at once. Peak memory is about two
Q x G matrices, the sparse V and a few hundred MB of batch temporaries
(``_BUDGET`` elements each): under 1 GB at Market-1501 scale.

Differences from the reference code that do not change the algorithm: values
are float32 (float64 when the features are float64) where the authors'
feature-based code stores distances and V in float16; the distances V needs
are recomputed as dot products, so they can differ from the ranking pass's in
the last bits (about 1e-7 relative in float32); the self distance is exactly 0 (as ``cdist`` gives); neighbour
lists come from top-k rather than a full argsort (only their membership is
used, so the order inside a list does not matter; exact ties in distance at a
list's boundary are broken arbitrarily, as by the reference's quicksort).
"""

from __future__ import annotations

import torch

from robench.errors import UsageError

# Elements per temporary in the batched steps (gathered features, pair lists): bounds memory.
_BUDGET = 1 << 22


def _reciprocal(top: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[stop-start, k]: is row i among the k nearest of its a-th nearest neighbour (top = [N, k] lists)."""
    rows = torch.arange(start, stop, device=top.device)
    return (top[top[start:stop]] == rows[:, None, None]).any(dim=2)


def _pass_one(feats: torch.Tensor, sq: torch.Tensor, n_query: int, depth: int, chunk: int):
    """Row maxima, the ``depth`` nearest neighbours of every image, and the normalised query x gallery block."""
    n = feats.shape[0]
    device, dtype = feats.device, feats.dtype
    tiny = torch.finfo(dtype).tiny
    neighbours = torch.empty(n, depth, dtype=torch.int64, device=device)
    row_max = torch.empty(n, dtype=dtype, device=device)
    original = torch.empty(n_query, n - n_query, dtype=dtype, device=device)
    ft = feats.t()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        block = torch.addmm(sq[None, :], feats[s:e], ft, alpha=-2.0)
        block.add_(sq[s:e, None]).clamp_min_(0.0)
        local = torch.arange(e - s, device=device)
        block[local, local + s] = 0.0
        m = block.amax(dim=1).clamp_min_(tiny)
        row_max[s:e] = m
        block.div_(m[:, None])
        neighbours[s:e] = torch.topk(block, depth, dim=1, largest=False, sorted=True).indices
        if s < n_query:
            q_end = min(e, n_query)
            original[s:q_end] = block[:q_end - s, n_query:]
        del block
    return neighbours, row_max, original


def _sparse_weights(feats, sq, row_max, neighbours, k1: int, chunk: int):
    """V before query expansion as padded [N, M] (column, value) lists; value 0 marks padding."""
    n, dim = feats.shape
    device = feats.device
    half = int(round(k1 / 2))  # numpy's around: halves go to the even neighbour, like Python's round
    top = neighbours[:, :k1 + 1]
    half_top = neighbours[:, :half + 1]
    width = (k1 + 1) * (half + 2)
    cols_out = torch.zeros(n, width, dtype=torch.int64, device=device)
    vals_out = torch.zeros(n, width, dtype=feats.dtype, device=device)
    rows_per_step = max(1, min(chunk, _BUDGET // ((k1 + 1) * (half + 1) * max(k1 + 1, half + 1))))
    pairs_per_step = max(1, _BUDGET // dim)
    for s in range(0, n, rows_per_step):
        e = min(s + rows_per_step, n)
        fwd = top[s:e]  # [B, k1+1]
        recip = _reciprocal(top, s, e)
        r_set = torch.where(recip, fwd, -1)  # R(i), -1 padding
        # R(c, half) of every candidate c = fwd[:, a] (used only where c is in R(i))
        c_sets = torch.where(_half_recip_of(half_top, fwd), half_top[fwd], -1)  # [B, k1+1, half+1]
        in_r = ((c_sets[..., None] == r_set[:, None, None, :]) & (c_sets[..., None] >= 0)).any(dim=3)
        size = (c_sets >= 0).sum(dim=2)
        take = recip & (3 * in_r.sum(dim=2) > 2 * size)  # |R(c) & R(i)| > 2/3 |R(c)|
        extra = torch.where(take[:, :, None], c_sets, -1).flatten(1)
        members = torch.cat([r_set, extra], dim=1).sort(dim=1).values
        del r_set, c_sets, in_r, extra
        dup = torch.zeros_like(members, dtype=torch.bool)
        dup[:, 1:] = members[:, 1:] == members[:, :-1]
        keep = (members >= 0) & ~dup
        local, slot = torch.nonzero(keep, as_tuple=True)  # one (row, slot) per member
        i = local + s
        j = members[local, slot]
        # distances to the members, recomputed from the features and normalised as in pass one
        d = torch.empty(len(i), dtype=feats.dtype, device=device)
        for p in range(0, len(i), pairs_per_step):
            ii, jj = i[p:p + pairs_per_step], j[p:p + pairs_per_step]
            dots = (feats[ii] * feats[jj]).sum(dim=1)
            d[p:p + pairs_per_step] = (sq[ii] + sq[jj] - 2.0 * dots).clamp_min_(0.0)
        d = torch.where(i == j, torch.zeros_like(d), d) / row_max[i]
        w = torch.exp(-d)
        total = torch.zeros(e - s, dtype=w.dtype, device=device).index_add_(0, local, w)
        vals_out[i, slot] = w / total[local]
        cols_out[i, slot] = j
    return cols_out, vals_out


def _half_recip_of(half_top: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """[..., half+1]: for each candidate c in ``cands``, is c among the half+1 nearest of its neighbours."""
    nb = half_top[cands]  # [..., half+1]: c's nearest
    back = half_top[nb]  # [..., half+1, half+1]: their nearest
    return (back == cands[..., None, None]).any(dim=-1)


def _coo(cols: torch.Tensor, vals: torch.Tensor, row0: int):
    """Flatten padded lists to (row, column, value) triplets, dropping padding (value 0)."""
    mask = vals > 0
    rows = torch.arange(row0, row0 + cols.shape[0], device=cols.device)[:, None].expand_as(cols)
    return rows[mask], cols[mask], vals[mask]


def _query_expansion(cols, vals, neighbours, k2: int, chunk: int):
    """V[i] <- mean of V over i's k2 nearest, as (row, column, value) triplets sorted by row then column."""
    n, width = cols.shape
    rows_per_step = max(1, min(chunk, _BUDGET // max(1, k2 * width)))
    out_r, out_c, out_v = [], [], []
    for s in range(0, n, rows_per_step):
        e = min(s + rows_per_step, n)
        nb = neighbours[s:e, :k2]
        c = cols[nb].flatten(1)  # [B, k2*width]
        v = vals[nb].flatten(1)
        c, order = torch.sort(c, dim=1, stable=True)
        v = v.gather(1, order)
        first = torch.ones_like(c, dtype=torch.bool)
        first[:, 1:] = c[:, 1:] != c[:, :-1]
        slot = torch.cumsum(first, dim=1) - 1
        summed = torch.zeros_like(v).scatter_add_(1, slot, v) / k2
        ids = torch.zeros_like(c).scatter_(1, slot, c)  # every entry of a slot has the same column
        r, cc, vv = _coo(ids, summed, s)
        out_r.append(r)
        out_c.append(cc)
        out_v.append(vv)
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v)


def _jaccard_overlap(rows, cols, vals, n_query: int, n: int) -> torch.Tensor:
    """[Q, G]: sum_k min(V[i, k], V[j, k]) for query rows i and gallery rows j, through an inverted index."""
    device = vals.device
    n_gallery = n - n_query
    overlap = torch.zeros(n_query * n_gallery, dtype=vals.dtype, device=device)
    g_mask = rows >= n_query
    g_rows, g_cols, g_vals = rows[g_mask] - n_query, cols[g_mask], vals[g_mask]
    order = torch.sort(g_cols, stable=True).indices
    g_rows, g_vals = g_rows[order], g_vals[order]
    col_count = torch.bincount(g_cols, minlength=n)
    col_start = torch.cumsum(col_count, dim=0) - col_count
    del g_cols, order
    q_mask = rows < n_query
    q_rows, q_cols, q_vals = rows[q_mask], cols[q_mask], vals[q_mask]
    pairs = col_count[q_cols]  # gallery entries sharing each query entry's column
    ends = torch.cumsum(pairs, dim=0)
    total = int(ends[-1]) if len(ends) else 0
    budget = max(_BUDGET, n_gallery)
    a, done = 0, 0
    while done < total:
        # query entries [a, b) whose pairs fit in the budget (at least one entry)
        b = int(torch.searchsorted(ends, torch.tensor(done + budget, device=device), right=True))
        b = max(b, a + 1)
        cnt = pairs[a:b]
        n_pairs = int(ends[b - 1]) - done
        entry = torch.repeat_interleave(torch.arange(a, b, device=device), cnt, output_size=n_pairs)
        offset = torch.arange(n_pairs, device=device) - torch.repeat_interleave(
            ends[a:b] - cnt - done, cnt, output_size=n_pairs)
        pos = col_start[q_cols[entry]] + offset
        contrib = torch.minimum(q_vals[entry], g_vals[pos])
        overlap.index_add_(0, q_rows[entry] * n_gallery + g_rows[pos], contrib)
        done += n_pairs
        a = b
    return overlap.view(n_query, n_gallery)


def k_reciprocal_rerank(qf: torch.Tensor, gf: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        chunk: int = 1024) -> torch.Tensor:
    """[Q, G] re-ranked distances (lower is closer) for query features ``qf`` and gallery features ``gf``.

    Runs on the features' device, in float64 when either input is float64 and float32 otherwise.
    """
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise UsageError(f"re-ranking needs 2-D features of equal size, got query {tuple(qf.shape)} and "
                         f"gallery {tuple(gf.shape)}")
    if qf.device != gf.device:
        raise UsageError(f"query features are on {qf.device} but gallery features on {gf.device}")
    if int(k1) != k1 or int(k2) != k2 or k1 < 1 or k2 < 1:
        raise UsageError(f"k1 and k2 must be integers >= 1, got k1={k1}, k2={k2}")
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}")
    k1, k2 = int(k1), int(k2)
    n_query = qf.shape[0]
    n = n_query + gf.shape[0]
    if k1 + 1 > n or k2 > n:
        raise UsageError(f"re-ranking with k1={k1}, k2={k2} needs at least {max(k1 + 1, k2)} images "
                         f"(queries + gallery), got {n}")
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    if n_query == 0 or gf.shape[0] == 0:
        return torch.zeros(n_query, gf.shape[0], dtype=dtype, device=qf.device)
    feats = torch.cat([qf, gf]).to(dtype)
    sq = (feats * feats).sum(dim=1)
    depth = max(k1 + 1, k2)
    neighbours, row_max, original = _pass_one(feats, sq, n_query, depth, chunk)
    cols, vals = _sparse_weights(feats, sq, row_max, neighbours, k1, chunk)
    if k2 != 1:
        rows, cols, vals = _query_expansion(cols, vals, neighbours, k2, chunk)
    else:
        rows, cols, vals = _coo(cols, vals, 0)
    del neighbours, feats
    overlap = _jaccard_overlap(rows, cols, vals, n_query, n)
    del rows, cols, vals
    # final = (1 - lambda) * (1 - m / (2 - m)) + lambda * original, in place, a chunk of rows at a time
    for s in range(0, n_query, chunk):
        m = overlap[s:s + chunk]
        jac = m.div_(m.neg().add_(2.0)).neg_().add_(1.0)
        original[s:s + chunk].mul_(lambda_value).add_(jac, alpha=1.0 - lambda_value)
    return original
