"""ReID metrics and k-reciprocal re-ranking.

* hand-computed cases, the expected numbers worked out as fractions in comments;
* two loop-based references written here from the protocols' descriptions:
  a torchreid-style evaluation (non-interpolated AP, valid queries, CMC, mINP)
  and the official Market-1501 MATLAB evaluation (walk down the ranking,
  ``continue`` on junk, trapezoid AP, average over all queries);
* ``distance_matrix`` against direct formulas;
* re-ranking against a plain numpy, loop-based rendering of the authors'
  feature-based algorithm.
"""

from __future__ import annotations

from fractions import Fraction as Fr

import numpy as np
import pytest
import torch

import robench.reid.rerank as rerank_module
from robench.errors import UsageError
from robench.reid.metrics import distance_matrix, rank_metrics
from robench.reid.rerank import k_reciprocal_rerank


def run(dist, qp, gp, qc, gc, **kw):
    ids = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return rank_metrics(torch.as_tensor(np.asarray(dist, dtype=np.float64)), ids(qp), ids(gp), ids(qc), ids(gc),
                        **kw)


def close(value, fraction, tol=1e-12):
    return abs(value - float(fraction)) <= tol


# ============================================================ hand-computed cases
def test_one_query_with_every_kind_of_gallery_image():
    # Query: person 1, camera 1. Gallery already in distance order (0, 1, ..., 7):
    #   g0 person 1 cam 1  junk (same person, same camera)
    #   g1 person 0 cam 2  distractor = negative            -> non-junk position 1
    #   g2 person 1 cam 2  correct                           -> position 2
    #   g3 person -1 cam 3 junk
    #   g4 person 3 cam 1  negative                          -> position 3
    #   g5 person 1 cam 3  correct                           -> position 4
    #   g6 person 1 cam 1  junk
    #   g7 person 2 cam 2  negative                          -> position 5
    dist = [[0, 1, 2, 3, 4, 5, 6, 7]]
    gp, gc = [1, 0, 1, -1, 3, 1, 1, 2], [1, 2, 2, 3, 1, 3, 1, 2]
    r = run(dist, [1], gp, [1], gc, ranks=(1, 2, 4, 10), minp=True)
    # first correct match at position 2
    assert r["cmc"] == {1: 0.0, 2: 1.0, 4: 1.0, 10: 1.0}
    # noninterp: precision 1/2 at the first hit, 2/4 at the second -> (1/2 + 1/2) / 2 = 1/2
    assert close(r["mAP"], Fr(1, 2))
    # mINP: 2 correct matches, the last at position 4 -> 2/4
    assert close(r["mINP"], Fr(1, 2))
    assert r["queries"] == r["valid_queries"] == 1
    assert r["ap_convention"] == "noninterp" and r["denominator"] == "valid"
    # trapezoid, n_good = 2:
    #   hit at 2: previous precision (position 1) 0/1, precision 1/2 -> (0 + 1/2)/2 = 1/4
    #   hit at 4: previous precision (position 3) 1/3, precision 2/4 -> (1/3 + 1/2)/2 = 5/12
    #   AP = (1/4 + 5/12) / 2 = 1/3
    t = run(dist, [1], gp, [1], gc, ap="trapezoid")
    assert close(t["mAP"], Fr(1, 3)) and t["ap_convention"] == "trapezoid"


# Six queries on a five-image gallery:
#   g0 person 1 cam 2 | g1 person 2 cam 1 | g2 person 1 cam 1 | g3 person 0 cam 3 | g4 person -1 cam 2
GP, GC = [1, 2, 1, 0, -1], [2, 1, 1, 3, 2]
QP, QC = [1, 2, 1, 3, 2, 1], [1, 2, 2, 1, 1, 3]
DIST = [
    # q0 person 1 cam 1: junk g2 (same camera), g4 (-1); correct g0.
    #    sorted (stable): g2 0, g4 0, g1 1, g3 1, g0 2 -> g1 pos 1, g3 pos 2, g0 pos 3 (hit)
    [2, 1, 0, 1, 0],
    # q1 person 2 cam 2: correct g1; junk g4. All distances tie -> gallery order:
    #    g0 pos 1, g1 pos 2 (hit), g2 pos 3, g3 pos 4
    [1, 1, 1, 1, 1],
    # q2 person 1 cam 2: correct g2; junk g0 (same camera), g4.
    #    g0 0 (junk), g2 1 -> pos 1 (hit), g3 pos 2, g1 pos 3
    [0, 3, 1, 2, 5],
    # q3 person 3: nobody in the gallery -> no valid match
    [0, 0, 0, 0, 0],
    # q4 person 2 cam 1: its only gallery image g1 is from cam 1 -> junk -> no valid match
    [4, 0, 3, 2, 1],
    # q5 person 1 cam 3: correct g0 and g2; junk g4.
    #    g1 0 pos 1, g3 0.5 pos 2, g2 1 pos 3 (hit), g4 2 junk, g0 3 pos 4 (hit)
    [3, 0, 1, 0.5, 2],
]
# First correct match: q0 3, q1 2, q2 1, q5 3; valid queries: 4 of 6.
# noninterp AP: q0 1/3, q1 1/2, q2 1, q5 (1/3 + 2/4)/2 = 5/12
# trapezoid AP: q0 (0/2 + 1/3)/2 = 1/6; q1 (0/1 + 1/2)/2 = 1/4; q2 (1 + 1)/2 = 1;
#               q5 [(0/2 + 1/3)/2 + (1/3 + 2/4)/2] / 2 = (1/6 + 5/12)/2 = 7/24
# INP: q0 1/3, q1 1/2, q2 1, q5 2/4
NONINTERP = [Fr(1, 3), Fr(1, 2), Fr(1), Fr(5, 12)]
TRAPEZOID = [Fr(1, 6), Fr(1, 4), Fr(1), Fr(7, 24)]
INP = [Fr(1, 3), Fr(1, 2), Fr(1), Fr(1, 2)]
FIRST = [3, 2, 1, 3]


@pytest.mark.parametrize("chunk", [1, 2, 256])
@pytest.mark.parametrize("ap, per_query", [("noninterp", NONINTERP), ("trapezoid", TRAPEZOID)])
@pytest.mark.parametrize("denominator, n", [("valid", 4), ("all", 6)])
def test_six_queries_both_conventions_both_denominators(ap, per_query, denominator, n, chunk):
    r = run(DIST, QP, GP, QC, GC, ranks=(1, 2, 3, 5), ap=ap, denominator=denominator, minp=True, chunk=chunk)
    # noninterp: sum 4/12 + 6/12 + 12/12 + 5/12 = 9/4 -> valid 9/16, all 3/8
    # trapezoid: sum 4/24 + 6/24 + 24/24 + 7/24 = 41/24 -> valid 41/96, all 41/144
    assert close(r["mAP"], sum(per_query) / n)
    assert close(r["mAP"], {("noninterp", 4): Fr(9, 16), ("noninterp", 6): Fr(3, 8),
                            ("trapezoid", 4): Fr(41, 96), ("trapezoid", 6): Fr(41, 144)}[ap, n])
    # CMC: @1 one query (q2), @2 two (q1, q2), @3 and @5 all four -> valid 1/4, 2/4, 1, 1; all 1/6, 2/6, 4/6, 4/6
    for k in (1, 2, 3, 5):
        assert close(r["cmc"][k], Fr(sum(f <= k for f in FIRST), n))
    # mINP is over the valid queries under both denominators: (1/3 + 1/2 + 1 + 1/2) / 4 = 7/12
    assert close(r["mINP"], Fr(7, 12))
    assert r["queries"] == 6 and r["valid_queries"] == 4 and r["denominator"] == denominator


def test_ties_break_by_gallery_index():
    # Equal distances: the lower gallery index ranks first.
    assert run([[1.0, 1.0]], [1], [5, 1], [1], [2, 2])["cmc"][1] == 0.0
    assert run([[1.0, 1.0]], [1], [1, 5], [1], [2, 2])["cmc"][1] == 1.0
    # Two hits tied with a negative between them in index order: g0 hit, g1 negative, g2 hit, all at distance 3.
    # noninterp (1/1 + 2/3)/2 = 5/6; trapezoid ((1+1)/2 + (1/2 + 2/3)/2)/2 = (1 + 7/12)/2 = 19/24
    args = ([[3.0, 3.0, 3.0]], [7], [7, 8, 7], [1], [2, 2, 3])
    assert close(run(*args)["mAP"], Fr(5, 6))
    assert close(run(*args, ap="trapezoid")["mAP"], Fr(19, 24))


def test_no_valid_query():
    # The only image of person 2 is from the query's camera.
    args = ([[0.5, 0.1]], [2], [2, 3], [1], [1, 2])
    with pytest.raises(UsageError, match="no query has a valid match in the gallery"):
        run(*args)
    r = run(*args, denominator="all", minp=True)
    assert r["cmc"] == {1: 0.0, 5: 0.0, 10: 0.0} and r["mAP"] == 0.0 and r["valid_queries"] == 0


def test_nan_distances_rank_last():
    r = run([[float("nan"), 2.0, float("inf")]], [1], [1, 4, 1], [1], [2, 2, 2], ranks=(1, 2, 3))
    # order: g1 (2), g2 (inf), g0 (nan) -> hits at 2 and 3
    assert r["cmc"] == {1: 0.0, 2: 1.0, 3: 1.0}
    assert close(r["mAP"], (Fr(1, 2) + Fr(2, 3)) / 2)


def test_bad_arguments():
    dist = torch.zeros(2, 3)
    p, c = torch.tensor([1, 2]), torch.tensor([1, 1])
    gp, gc = torch.tensor([1, 2, 3]), torch.tensor([2, 2, 2])
    with pytest.raises(UsageError, match="AP convention"):
        rank_metrics(dist, p, gp, c, gc, ap="interp")
    with pytest.raises(UsageError, match="denominator"):
        rank_metrics(dist, p, gp, c, gc, denominator="some")
    with pytest.raises(UsageError, match="does not match"):
        rank_metrics(dist.t(), p, gp, c, gc)
    with pytest.raises(UsageError, match="ranks"):
        rank_metrics(dist, p, gp, c, gc, ranks=(0, 1))


# ============================================================ loop references
def torchreid_style(dist, qp, gp, qc, gc, max_rank):
    """Per query: stable argsort, drop same id + same camera and id -1, skip queries without a match."""
    cmc_sum, ap_sum, inp_sum, n_valid = np.zeros(max_rank), 0.0, 0.0, 0
    for q in range(len(qp)):
        order = np.argsort(dist[q], kind="stable")
        ids, cams = gp[order], gc[order]
        remove = ((ids == qp[q]) & (cams == qc[q])) | (ids == -1)
        matches = (ids[~remove] == qp[q]).astype(np.int64)
        if matches.sum() == 0:
            continue
        n_valid += 1
        cum = matches.cumsum()
        last = np.nonzero(matches)[0].max()
        inp_sum += cum[last] / (last + 1.0)
        cmc = np.minimum(cum, 1)
        if len(cmc) < max_rank:
            cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])])
        cmc_sum += cmc[:max_rank]
        precision_at = cum / np.arange(1, len(cum) + 1)
        ap_sum += (precision_at * matches).sum() / matches.sum()
    if n_valid == 0:
        return None
    return cmc_sum / n_valid, ap_sum / n_valid, inp_sum / n_valid


def matlab_style(dist, qp, gp, qc, gc, max_rank):
    """The official Market-1501 evaluation loop: junk skipped with continue, trapezoid AP, all queries."""
    cmc_sum, ap_sum = np.zeros(max_rank), 0.0
    for q in range(len(qp)):
        good = [i for i in range(len(gp)) if gp[i] == qp[q] and gc[i] != qc[q] and gp[i] != -1]
        junk = [i for i in range(len(gp)) if gp[i] == -1 or (gp[i] == qp[q] and gc[i] == qc[q])]
        index = np.argsort(dist[q], kind="stable")
        cmc = np.zeros(len(index))
        ap, old_recall, old_precision, hits, j, n_junk, good_now = 0.0, 0.0, 1.0, 0, 0, 0, 0
        for n, idx in enumerate(index):
            flag = False
            if idx in good:
                cmc[n - n_junk:] = 1
                flag = True
                good_now += 1
            if idx in junk:
                n_junk += 1
                continue
            if flag:
                hits += 1
            recall = hits / len(good) if good else 0.0
            precision = hits / (j + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            j += 1
            if good and good_now == len(good):
                break
        padded = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1] if len(cmc) else 0)])
        cmc_sum += padded[:max_rank]
        ap_sum += ap
    return cmc_sum / len(qp), ap_sum / len(qp)


def random_protocol_case(seed):
    rng = np.random.default_rng(1000 + seed)
    nq, ng = int(rng.integers(1, 30)), int(rng.integers(3, 70))
    n_ids = int(rng.integers(1, 9))
    qp = rng.integers(1, n_ids + 1, nq)
    gp = rng.integers(-1, n_ids + 1, ng)  # -1 junk, 0 distractors, repeats
    n_cams = int(rng.integers(1, 5))
    qc, gc = rng.integers(1, n_cams + 1, nq), rng.integers(1, n_cams + 1, ng)
    kind = seed % 3
    if kind == 0:
        dist = rng.random((nq, ng))
    elif kind == 1:
        dist = rng.integers(0, 4, (nq, ng)).astype(np.float64)  # many ties
    else:
        dist = np.round(rng.random((nq, ng)), 1).astype(np.float32)  # ties, float32
    return dist, qp, gp, qc, gc


@pytest.mark.parametrize("seed", range(50))
def test_matches_the_reference_protocols(seed):
    dist, qp, gp, qc, gc = random_protocol_case(seed)
    ranks = (1, 2, 3, 5, 10, 50)
    max_rank = max(ranks)
    d = torch.as_tensor(dist)
    ids = [torch.as_tensor(a) for a in (qp, gp, qc, gc)]
    chunk = int(np.random.default_rng(seed).integers(1, 8))
    ref = torchreid_style(dist, qp, gp, qc, gc, max_rank)
    if ref is None:
        with pytest.raises(UsageError):
            rank_metrics(d, *ids, ranks=ranks)
    else:
        cmc, m_ap, m_inp = ref
        ours = rank_metrics(d, *ids, ranks=ranks, minp=True, chunk=chunk)
        assert ours["mAP"] == pytest.approx(m_ap, abs=1e-6)
        assert ours["mINP"] == pytest.approx(m_inp, abs=1e-6)
        for k in ranks:
            assert ours["cmc"][k] == pytest.approx(cmc[k - 1], abs=1e-6)
        values = [ours["cmc"][k] for k in ranks]
        assert values == sorted(values) and all(0 <= v <= 1 for v in values)
        assert 0 <= ours["mAP"] <= 1 and 0 < ours["mINP"] <= 1
        trap = rank_metrics(d, *ids, ranks=ranks, ap="trapezoid", chunk=chunk)
        assert 0 <= trap["mAP"] <= ours["mAP"] + 1e-12  # the trapezoid never exceeds the step
    cmc, m_ap = matlab_style(dist, qp, gp, qc, gc, max_rank)
    official = rank_metrics(d, *ids, ranks=ranks, ap="trapezoid", denominator="all", chunk=chunk)
    assert official["mAP"] == pytest.approx(m_ap, abs=1e-6)
    for k in ranks:
        assert official["cmc"][k] == pytest.approx(cmc[k - 1], abs=1e-6)
    assert official["queries"] == len(qp)


# ============================================================ distance_matrix
def test_distance_matrix():
    gen = torch.Generator().manual_seed(3)
    q, g = torch.randn(13, 24, generator=gen), torch.randn(29, 24, generator=gen)
    euclid = distance_matrix(q, g)
    assert euclid.dtype == torch.float32 and euclid.shape == (13, 29)
    assert torch.allclose(euclid, torch.cdist(q.double(), g.double()).float() ** 2, rtol=1e-5, atol=1e-4)
    assert (euclid >= 0).all()
    assert torch.allclose(distance_matrix(q, q).diagonal(), torch.zeros(13), atol=1e-4)
    cosine = distance_matrix(q, g, "cosine")
    direct = 1 - (q @ g.t()) / (q.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    assert torch.allclose(cosine, direct, atol=1e-6)
    for metric in ("euclidean", "cosine"):
        whole = distance_matrix(q, g, metric)
        for chunk in (1, 4, 13, 100):
            assert torch.allclose(distance_matrix(q, g, metric, chunk=chunk), whole, atol=1e-5)
    assert distance_matrix(q.double(), g.double()).dtype == torch.float32
    assert distance_matrix(q[:0], g).shape == (0, 29)
    with pytest.raises(UsageError, match="query features have 24 dims but gallery features 23"):
        distance_matrix(q, g[:, :23])
    with pytest.raises(UsageError, match="distance metric"):
        distance_matrix(q, g, "manhattan")
    with pytest.raises(UsageError, match="2-D"):
        distance_matrix(q[0], g)


# ============================================================ re-ranking
def numpy_rerank(probe, gallery, k1, k2, lam):
    """The feature-based k-reciprocal re-ranking, written out plainly (float64, loops)."""
    feat = np.concatenate([probe, gallery]).astype(np.float64)
    n, n_probe = len(feat), len(probe)
    diff = feat[:, None, :] - feat[None, :, :]
    dist = (diff ** 2).sum(axis=2)  # cdist(feat, feat) ** 2
    dist = np.transpose(dist / np.max(dist, axis=0))
    initial_rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    half = int(np.around(k1 / 2))
    V = np.zeros((n, n))
    for i in range(n):
        k_recip = reciprocal(i, k1)
        expansion = k_recip
        for candidate in k_recip:
            cand_recip = reciprocal(candidate, half)
            if len(np.intersect1d(cand_recip, k_recip)) > 2 / 3 * len(cand_recip):
                expansion = np.append(expansion, cand_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i] = V[initial_rank[i, :k2]].mean(axis=0)
        V = V_qe
    jaccard = np.zeros((n_probe, n))
    for i in range(n_probe):
        nonzero = np.where(V[i] != 0)[0]
        shared = np.zeros(n)
        for k in nonzero:
            holders = np.where(V[:, k] != 0)[0]  # inverted index of column k
            shared[holders] += np.minimum(V[i, k], V[holders, k])
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lam) + dist[:n_probe] * lam
    return final[:, n_probe:]


def clustered(rng, n, dim, centres, spread):
    return centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, dim))


@pytest.mark.parametrize(
    "nq, ng, dim, k1, k2, lam",
    [
        (7, 20, 8, 6, 3, 0.3),
        (12, 36, 16, 6, 3, 0.3),
        (20, 50, 32, 8, 4, 0.5),
        (10, 40, 12, 5, 2, 0.3),  # odd k1: half-size sets of round(2.5) = 2
        (9, 45, 8, 7, 1, 0.0),  # round(3.5) = 4; no query expansion; Jaccard only
        (1, 25, 8, 6, 3, 1.0),  # one query; original distance only
        (30, 80, 16, 20, 6, 0.3),  # the defaults on 110 images
    ],
)
def test_rerank_matches_the_numpy_algorithm(nq, ng, dim, k1, k2, lam):
    rng = np.random.default_rng(nq * 1000 + ng * 10 + k1)
    centres = rng.normal(size=(max(3, (nq + ng) // 8), dim))
    probe, gallery = clustered(rng, nq, dim, centres, 0.6), clustered(rng, ng, dim, centres, 0.6)
    expected = numpy_rerank(probe, gallery, k1, k2, lam)
    ours = k_reciprocal_rerank(torch.tensor(probe), torch.tensor(gallery), k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == (nq, ng) and ours.dtype == torch.float64
    assert np.abs(ours.numpy() - expected).max() < 1e-5
    small_chunks = k_reciprocal_rerank(torch.tensor(probe), torch.tensor(gallery), k1=k1, k2=k2,
                                       lambda_value=lam, chunk=3)
    assert np.abs(small_chunks.numpy() - expected).max() < 1e-5


def test_rerank_unstructured_features_and_float32():
    rng = np.random.default_rng(11)
    probe, gallery = rng.normal(size=(15, 24)), rng.normal(size=(60, 24))
    expected = numpy_rerank(probe, gallery, 20, 6, 0.3)
    ours = k_reciprocal_rerank(torch.tensor(probe), torch.tensor(gallery))
    assert np.abs(ours.numpy() - expected).max() < 1e-5
    single = k_reciprocal_rerank(torch.tensor(probe, dtype=torch.float32), torch.tensor(gallery, dtype=torch.float32))
    assert single.dtype == torch.float32
    assert np.abs(single.double().numpy() - expected).max() < 1e-5


def test_rerank_in_tiny_batches(monkeypatch):
    # A one-element budget forces every batched step (features, pairs of the inverted index) to split.
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 10))
    probe, gallery = clustered(rng, 18, 10, centres, 0.5), clustered(rng, 40, 10, centres, 0.5)
    expected = numpy_rerank(probe, gallery, 6, 3, 0.3)
    monkeypatch.setattr(rerank_module, "_BUDGET", 1)
    ours = k_reciprocal_rerank(torch.tensor(probe), torch.tensor(gallery), k1=6, k2=3, chunk=2)
    assert np.abs(ours.numpy() - expected).max() < 1e-5


def test_rerank_refuses_bad_input():
    qf, gf = torch.randn(3, 6), torch.randn(10, 6)
    with pytest.raises(UsageError, match="equal size"):
        k_reciprocal_rerank(qf, gf[:, :5])
    with pytest.raises(UsageError, match="needs at least 21 images"):
        k_reciprocal_rerank(qf, gf)
    with pytest.raises(UsageError, match="k1 and k2"):
        k_reciprocal_rerank(qf, gf, k1=0)
    assert k_reciprocal_rerank(qf[:0], torch.randn(30, 6)).shape == (0, 30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(40, 32, generator=gen), torch.randn(300, 32, generator=gen)
    qp, gp = torch.randint(0, 20, (40,), generator=gen), torch.randint(-1, 20, (300,), generator=gen)
    qc, gc = torch.randint(0, 4, (40,), generator=gen), torch.randint(0, 4, (300,), generator=gen)
    cpu_d, gpu_d = distance_matrix(qf, gf), distance_matrix(qf.cuda(), gf.cuda())
    assert gpu_d.is_cuda and torch.allclose(gpu_d.cpu(), cpu_d, atol=1e-4)
    for ap in ("noninterp", "trapezoid"):
        a = rank_metrics(cpu_d.double(), qp, gp, qc, gc, ap=ap, minp=True)
        b = rank_metrics(cpu_d.double().cuda(), qp.cuda(), gp.cuda(), qc.cuda(), gc.cuda(), ap=ap, minp=True)
        assert a["cmc"] == pytest.approx(b["cmc"]) and a["valid_queries"] == b["valid_queries"]
        assert a["mAP"] == pytest.approx(b["mAP"]) and a["mINP"] == pytest.approx(b["mINP"])
    r_cpu = k_reciprocal_rerank(qf.double(), gf.double(), k1=10, k2=4)
    r_gpu = k_reciprocal_rerank(qf.double().cuda(), gf.double().cuda(), k1=10, k2=4)
    assert r_gpu.is_cuda and torch.allclose(r_gpu.cpu(), r_cpu, atol=1e-8)
