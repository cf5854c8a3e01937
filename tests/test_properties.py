"""Property-based checks (hypothesis): perturbation bounds for any eps and input, metric invariants."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robench.attacks import BIM, FGSM, MIFGSM, PGD
from robench.reid.metrics import rank_metrics

ATTACKS = {"fgsm": FGSM, "bim": BIM, "pgd": PGD, "mifgsm": MIFGSM}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(ATTACKS)), eps=st.floats(0.0, 1.0), steps=st.integers(1, 4),
       norm=st.sampled_from(["linf", "l2"]), seed=st.integers(0, 2**31 - 1), final=st.booleans())
def test_any_attack_stays_in_the_ball_and_the_image_range(trained_model, name, eps, steps, norm, seed, final):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (12,), generator=gen)
    kwargs = {} if name == "fgsm" else {"steps": steps}
    attack = ATTACKS[name](norm=norm, final_iterate=final, seed=seed, **kwargs)
    out = attack(trained_model, x, y, eps).x_adv
    delta = (out - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= eps + 1e-5)
    assert out.min() >= 0 and out.max() <= 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ap=st.sampled_from(["noninterp", "trapezoid"]),
       denominator=st.sampled_from(["valid", "all"]))
def test_metric_invariants(seed, ap, denominator):
    rng = np.random.default_rng(seed)
    nq, ng = int(rng.integers(1, 15)), int(rng.integers(2, 40))
    qp = torch.as_tensor(rng.integers(1, 5, nq))
    gp = torch.as_tensor(np.concatenate([qp.numpy(), rng.integers(-1, 5, ng)]))  # every query has a match
    qc = torch.as_tensor(rng.integers(1, 3, nq))
    gc = torch.as_tensor(np.concatenate([3 - qc.numpy(), rng.integers(1, 3, ng)]))  # ... from another camera
    dist = torch.as_tensor(rng.random((nq, len(gp))))
    ranks = (1, 2, 3, 5, 10, 20)
    r = rank_metrics(dist, qp, gp, qc, gc, ranks=ranks, ap=ap, denominator=denominator, minp=True)
    cmc = [r["cmc"][k] for k in ranks]
    assert all(0 <= v <= 1 for v in cmc) and cmc == sorted(cmc), "CMC is non-decreasing in rank"
    assert 0 <= r["mAP"] <= 1 and 0 <= r["mINP"] <= 1
    # Relabelling the gallery order consistently (a permutation of columns with distances) changes nothing
    perm = torch.as_tensor(rng.permutation(len(gp)))
    again = rank_metrics(dist[:, perm], qp, gp[perm], qc, gc[perm], ranks=ranks, ap=ap, denominator=denominator)
    assert again["mAP"] == r["mAP"] or abs(again["mAP"] - r["mAP"]) < 1e-12
