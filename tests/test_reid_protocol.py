"""CMC/mAP/mINP against hand-computed cases and loop-based references; re-ranking against the original algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robench.errors import UsageError
from robench.reid.metrics import distance_matrix, rank_metrics
from robench.reid.rerank import k_reciprocal_rerank


def metrics(dist, qp, gp, qc, gc, **kw):
    t = lambda a: torch.as_tensor(np.asarray(a))  # noqa: E731
    return rank_metrics(torch.as_tensor(np.asarray(dist, dtype=np.float64)), t(qp), t(gp), t(qc), t(gc), **kw)


# ---------------------------------------------------------------- hand-computed
def test_hand_computed_query_with_junk_distractor_and_same_camera():
    # One query: person 1, camera 1. Gallery in order of distance:
    #   g0 person 1 cam 1 -> junk (same person, same camera)
    #   g1 person 0       -> distractor: an ordinary negative
    #   g2 person 1 cam 2 -> hit at position 2 (among non-junk)
    #   g3 person -1      -> junk
    #   g4 person 2       -> negative
    #   g5 person 1 cam 3 -> hit at position 4
    dist = [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    gp, gc = [1, 0, 1, -1, 2, 1], [1, 2, 2, 1, 1, 3]
    r = metrics(dist, [1], gp, [1], gc, ranks=(1, 2, 5), minp=True)
    assert r["cmc"] == {1: 0.0, 2: 1.0, 5: 1.0}
    # noninterp: precisions at the hits 1/2 and 2/4 -> (1/2 + 1/2) / 2
    assert r["mAP"] == pytest.approx(0.5)
    # mINP: 2 correct matches, the last at position 4
    assert r["mINP"] == pytest.approx(2 / 4)
    # trapezoid: hit 1 at position 2: (prev 0/1 + 1/2)/2 = 1/4; hit 2 at position 4: (prev 1/3 + 2/4)/2 = 5/12
    t = metrics(dist, [1], gp, [1], gc, ap="trapezoid")
    assert t["mAP"] == pytest.approx((1 / 4 + 5 / 12) / 2)


def test_hit_at_the_top_uses_precision_one_before_it():
    # Hits at positions 1 and 3: noninterp (1 + 2/3)/2; trapezoid ((1+1)/2 + (1/2 + 2/3)/2)/2.
    dist = [[0.1, 0.2, 0.3]]
    args = ([1], [1, 5, 1], [1], [2, 2, 2])
    assert metrics(dist, *args)["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics(dist, *args, ap="trapezoid")["mAP"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)


def test_queries_without_valid_match_and_the_two_denominators():
    # Query 0 (person 1, cam 1) matches g0 at the top. Query 1 (person 2, cam 1) only has
    # person-2 images from camera 1: all junk, no valid match.
    dist = [[0.0, 1.0, 2.0], [0.5, 0.1, 0.2]]
    qp, qc = [1, 2], [1, 1]
    gp, gc = [1, 2, 3], [2, 1, 2]
    valid = metrics(dist, qp, gp, qc, gc)
    assert valid["valid_queries"] == 1 and valid["queries"] == 2
    assert valid["cmc"][1] == 1.0 and valid["mAP"] == 1.0
    every = metrics(dist, qp, gp, qc, gc, denominator="all")
    assert every["cmc"][1] == 0.5 and every["mAP"] == 0.5
    with pytest.raises(UsageError, match="no query has a valid match"):
        metrics([[0.5, 0.1, 0.2]], [2], gp, [1], gc)


def test_ties_are_broken_by_gallery_order():
    # Equal distances: the earlier gallery image ranks first.
    assert metrics([[1.0, 1.0]], [1], [2, 1], [1], [2, 2])["cmc"][1] == 0.0
    assert metrics([[1.0, 1.0]], [1], [1, 2], [1], [2, 2])["cmc"][1] == 1.0


# ---------------------------------------------------------------- loop references
def reference_torchreid(dist, qp, gp, qc, gc, max_rank):
    """torchreid-style: per query, drop same id+cam, skip queries without matches, non-interpolated AP."""
    cmc_sum, aps, inps, n_valid = np.zeros(max_rank), [], [], 0
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        remove = ((gp[order] == qp[i]) & (gc[order] == qc[i])) | (gp[order] == -1)
        matches = (gp[order] == qp[i])[~remove].astype(int)
        if not matches.any():
            continue
        n_valid += 1
        cmc = matches.cumsum()
        cmc[cmc > 1] = 1
        cmc_sum += cmc[:max_rank] if len(cmc) >= max_rank else np.pad(cmc, (0, max_rank - len(cmc)), mode="edge")
        hits = np.nonzero(matches)[0]
        aps.append(np.mean([(k + 1) / (pos + 1) for k, pos in enumerate(hits)]))
        inps.append(len(hits) / (hits[-1] + 1))
    return cmc_sum / n_valid, float(np.mean(aps)), float(np.mean(inps))


def reference_matlab(dist, qp, gp, qc, gc, max_rank):
    """The official Market-1501 evaluation: a walk down the ranking skipping junk, trapezoid AP, all queries."""
    cmc_sum, ap_sum = np.zeros(max_rank), 0.0
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        good = set(np.nonzero((gp == qp[i]) & (gc != qc[i]) & (gp != -1))[0])
        junk = set(np.nonzero(((gp == qp[i]) & (gc == qc[i])) | (gp == -1))[0])
        cmc = np.zeros(len(order))
        ap, old_recall, old_precision, found, j, first = 0.0, 0.0, 1.0, 0, 0, None
        if good:
            for idx in order:
                if idx in junk:
                    continue
                if idx in good:
                    found += 1
                    if first is None:
                        first = j
                recall = found / len(good)
                precision = found / (j + 1)
                ap += (recall - old_recall) * (old_precision + precision) / 2
                old_recall, old_precision = recall, precision
                j += 1
                if found == len(good):
                    break
            cmc[first:] = 1
        ap_sum += ap
        cmc_sum += cmc[:max_rank]
    return cmc_sum / len(qp), ap_sum / len(qp)


def random_case(rng, integer_distances):
    nq, ng = int(rng.integers(3, 25)), int(rng.integers(10, 60))
    ids = int(rng.integers(2, 8))
    qp = rng.integers(1, ids + 1, nq)
    gp = rng.integers(-1, ids + 1, ng)  # includes junk (-1) and distractors (0)
    qc, gc = rng.integers(1, 4, nq), rng.integers(1, 4, ng)
    dist = rng.integers(0, 6, (nq, ng)).astype(float) if integer_distances else rng.random((nq, ng))
    return dist, qp, gp, qc, gc


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_reference_protocols(seed):
    rng = np.random.default_rng(seed)
    dist, qp, gp, qc, gc = random_case(rng, integer_distances=seed % 2 == 1)
    ranks = (1, 2, 5, 10)
    try:
        ref_cmc, ref_map, ref_minp = reference_torchreid(dist, qp, gp, qc, gc, 10)
    except ZeroDivisionError:
        with pytest.raises(UsageError):
            metrics(dist, qp, gp, qc, gc)
        return
    ours = metrics(dist, qp, gp, qc, gc, ranks=ranks, minp=True)
    assert ours["mAP"] == pytest.approx(ref_map, abs=1e-6)
    assert ours["mINP"] == pytest.approx(ref_minp, abs=1e-6)
    for k in ranks:
        assert ours["cmc"][k] == pytest.approx(ref_cmc[k - 1], abs=1e-6)
    mat_cmc, mat_map = reference_matlab(dist, qp, gp, qc, gc, 10)
    theirs = metrics(dist, qp, gp, qc, gc, ranks=ranks, ap="trapezoid", denominator="all", chunk=4)
    assert theirs["mAP"] == pytest.approx(mat_map, abs=1e-6)
    for k in ranks:
        assert theirs["cmc"][k] == pytest.approx(mat_cmc[k - 1], abs=1e-6)
    cmc = [ours["cmc"][k] for k in ranks]
    assert cmc == sorted(cmc) and 0 <= ours["mAP"] <= 1


def test_distance_matrix():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(7, 5, generator=gen), torch.randn(11, 5, generator=gen)
    assert torch.allclose(distance_matrix(q, g), torch.cdist(q, g) ** 2, atol=1e-5)
    assert torch.allclose(distance_matrix(q, g, chunk=3), distance_matrix(q, g))
    cos = 1 - (q / q.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).t()
    assert torch.allclose(distance_matrix(q, g, "cosine"), cos, atol=1e-6)
    with pytest.raises(UsageError, match="5 dims but gallery features 4"):
        distance_matrix(q, g[:, :4])
    with pytest.raises(UsageError):
        distance_matrix(q, g, "manhattan")


def test_nan_distances_rank_last():
    dist = [[float("nan"), 1.0]]
    r = metrics(dist, [1], [2, 1], [1], [2, 2])
    assert r["cmc"][1] == 1.0


# ---------------------------------------------------------------- re-ranking
def reference_rerank(qf, gf, k1, k2, lam):
    """The original feature-based algorithm, written out with loops, in float64."""
    feats = np.concatenate([qf, gf]).astype(np.float64)
    nq, n = len(qf), len(feats)
    sq = (feats ** 2).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * feats @ feats.T
    d = np.maximum(d, 0)
    d = np.transpose(d / np.max(d, axis=0))
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        fwd = rank[i, :k + 1]
        return np.array([c for c in fwd if i in rank[c, :k + 1]])

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion.extend(rc)
        expansion = np.unique(expansion)
        w = np.exp(-d[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            m = np.minimum(v[i], v[j]).sum()
            jac[i, j] = 1 - m / (2 - m)
    final = jac * (1 - lam) + d[:nq] * lam
    return final[:, nq:]


@pytest.mark.parametrize("nq, ng, dim, k1, k2", [(7, 20, 8, 6, 3), (12, 40, 16, 8, 4), (15, 60, 32, 20, 6),
                                                 (5, 30, 4, 6, 1)])
def test_rerank_matches_the_original_algorithm(nq, ng, dim, k1, k2):
    rng = np.random.default_rng(nq * 100 + ng)
    centers = rng.normal(size=(6, dim))
    qf = centers[rng.integers(0, 6, nq)] + 0.5 * rng.normal(size=(nq, dim))
    gf = centers[rng.integers(0, 6, ng)] + 0.5 * rng.normal(size=(ng, dim))
    ours = k_reciprocal_rerank(torch.tensor(qf), torch.tensor(gf), k1=k1, k2=k2, lambda_value=0.3, chunk=7)
    ref = reference_rerank(qf, gf, k1, k2, 0.3)
    assert ours.shape == (nq, ng)
    assert np.abs(ours.double().numpy() - ref).max() < 1e-5


def test_rerank_chunking_and_validation():
    gen = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(9, 6, generator=gen), torch.randn(30, 6, generator=gen)
    a = k_reciprocal_rerank(qf, gf, k1=6, k2=3, chunk=5)
    b = k_reciprocal_rerank(qf, gf, k1=6, k2=3, chunk=1000)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(UsageError):
        k_reciprocal_rerank(qf, gf[:, :5])
    with pytest.raises(UsageError):
        k_reciprocal_rerank(qf[:2], gf[:3], k1=20)
