"""Continuous batching (the attack pool with refill) changes the packing of the work, never the results.

Every sample carries its own step counter, restart number, random stream and attack state,
so which samples share a forward pass (batch size, refill on or off, segments, a resume,
an out-of-memory back-off) must not change a single output byte.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robench
from robench.api import EvaluationInterrupted
from robench.attacks import MIFGSM, PGD
from robench.evaluation.engine import SEGMENT_BATCHES
from cli_helpers import RowByRow, invoke, stop_after, evaluate_with_state

# Timing and memory facts of a run: the only parts of results.json allowed to differ.
VOLATILE = {"seconds", "finished_at", "speed", "peak_memory_bytes", "attack_chunk"}

SUITE_YAML = """\
name: pool
attacks:
  - attack: pgd
    eps: 0.1
    steps: 5
    restarts: 3
    random_start: true
  - attack: mifgsm
    eps: 0.1
    steps: 5
  - attack: bim
    eps: 0.1
    steps: 5
    final_iterate: true
  - attack: fgsm
    eps: 0.1
  - attack: pgd
    norm: l2
    eps: 0.5
    steps: 5
"""

SWEEP_YAML = """\
name: pool-sweep
attacks:
  - attack: pgd
    eps: [0.03, 0.06, 0.1]
    steps: 5
    restarts: 2
"""


def _stable(doc):
    """results.json without the env block and the timing/memory fields."""
    if isinstance(doc, dict):
        return {k: _stable(v) for k, v in doc.items() if k not in VOLATILE and k != "env"}
    if isinstance(doc, list):
        return [_stable(v) for v in doc]
    return doc


def _cli_runs(tmp_path, suite_text, extra=()):
    """samples.csv bytes and results.json per (batch size, refill) on 80 bundled digits."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(suite_text)
    runs = {}
    for batch_size in (1, 7, 256):
        for refill in ("--refill", "--no-refill"):
            out = tmp_path / f"run-{batch_size}{refill}"
            result = invoke("eval", "example:digits", "--data", "example:digits", "--limit", 80, "--suite", suite,
                            "--batch-size", batch_size, refill, "--compile", "off", "--out", out, "--quiet", *extra)
            assert result.exit_code == 0, result.stderr
            doc = json.loads((out / "results.json").read_text())
            # The flag reached the engine (else the comparison would compare a run with itself).
            assert doc["env"]["speed"]["refill"] is (refill == "--refill")
            assert doc["env"]["batch_size"] == batch_size
            runs[(batch_size, refill)] = ((out / "samples.csv").read_bytes(), doc)
    return runs


def _assert_all_identical(runs):
    (ref_key, (ref_csv, ref_doc)), *others = runs.items()
    ref_stable = json.dumps(_stable(ref_doc), sort_keys=True)
    for key, (csv, doc) in others:
        assert csv == ref_csv, f"samples.csv of {key} differs from {ref_key}"
        assert json.dumps(_stable(doc), sort_keys=True) == ref_stable, f"results.json of {key} differs from {ref_key}"


def test_batch_size_and_refill_change_no_byte_of_the_results(tmp_path):
    runs = _cli_runs(tmp_path, SUITE_YAML)
    _assert_all_identical(runs)
    csv, doc = runs[(7, "--refill")]
    # 80 samples in batches of 7: several batches per segment, and a pool that really refills.
    assert doc["env"]["speed"]["segment_batches"] == SEGMENT_BATCHES
    assert runs[(7, "--no-refill")][1]["env"]["speed"]["segment_batches"] == 1
    clean = doc["clean"]["accuracy"]
    attacks = {(a["attack"], a["norm"]): a for a in doc["attacks"]}
    assert len(attacks) == 5
    # Not trivial: some entry fools some samples but not all of them.
    assert any(0 < a["accuracy"] < clean for a in doc["attacks"])
    pgd = attacks[("pgd", "linf")]
    assert 0 < pgd["accuracy"] < clean
    # PGD really restarted (more than one restart's steps) and really retired fooled samples early.
    assert pgd["params"]["restarts"] == 3 and pgd["params"]["random_start"] is True
    assert pgd["attacked"] * 5 < pgd["gradient_evals"] < pgd["attacked"] * 5 * 3
    assert attacks[("bim", "linf")]["params"]["final_iterate"] is True
    # Final iterate: every attacked sample runs all its steps.
    assert attacks[("bim", "linf")]["gradient_evals"] == attacks[("bim", "linf")]["attacked"] * 5
    assert attacks[("fgsm", "linf")]["gradient_evals"] == attacks[("fgsm", "linf")]["attacked"]
    lines = csv.decode().splitlines()
    assert len(lines) == 81 and lines[0].startswith("index,label,clean_pred,clean_correct,robust[0]:pgd@0.1")


def test_sweep_reuse_is_also_packing_independent(tmp_path):
    runs = _cli_runs(tmp_path, SWEEP_YAML, extra=("--sweep-reuse",))
    _assert_all_identical(runs)
    doc = runs[(7, "--refill")][1]
    assert doc["env"]["speed"]["sweep_reuse"] is True
    acc = [a["accuracy"] for a in doc["attacks"]]
    assert len(acc) == 3
    # Reuse makes the sweep monotone, and the largest eps fools some samples but not all.
    assert acc[0] >= acc[1] >= acc[2]
    assert 0 < acc[2] < doc["clean"]["accuracy"]
    # Samples fooled at a smaller eps are not attacked again at a larger one: at most the survivors'
    # full budget (5 steps x 2 restarts) is spent there.
    n = doc["clean"]["n"]
    for before, entry in zip(doc["attacks"], doc["attacks"][1:]):
        assert entry["gradient_evals"] <= round(before["accuracy"] * n) * 5 * 2


class GradientCalls(nn.Module):
    """The model, recording the batch size of every forward pass made with gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.sizes.append(int(x.shape[0]))
        return self.model(x)


def test_refill_keeps_the_gradient_batches_full(trained_model, test_tensors):
    batch = 32
    suite = {"name": "pgd10", "attacks": [{"attack": "pgd", "eps": 0.2, "steps": 10}]}
    calls, results = {}, {}
    for refill in (True, False):
        wrapper = GradientCalls(trained_model)
        results[refill] = robench.evaluate(wrapper, test_tensors, suite, device="cpu", batch_size=batch,
                                           refill=refill, compile="off")
        calls[refill] = wrapper.sizes
    assert results[True].samples.equals(results[False].samples)
    on, off = results[True].doc, results[False].doc
    assert _stable(on) == _stable(off)
    pgd = on["attacks"][0]
    # eps 0.2 breaks most samples within a few of the 10 steps.
    assert pgd["accuracy"] < 0.1 and pgd["gradient_evals"] < 0.5 * pgd["attacked"] * 10

    def full(sizes):
        return sum(s == batch for s in sizes) / len(sizes)

    assert full(calls[True]) > 0.6
    assert full(calls[True]) > 3 * full(calls[False])
    assert len(calls[True]) < 0.75 * len(calls[False])
    # The same work, packed differently: the same images pass through the model with gradients.
    assert sum(calls[True]) == sum(calls[False])
    assert pgd["gradient_evals"] == off["attacks"][0]["gradient_evals"]
    assert max(calls[True]) == batch


ATTACKS = {  # name: (attack, eps)
    "pgd": lambda: (PGD(steps=5, restarts=2, step_size="eps/2"), 0.1),
    "pgd-final": lambda: (PGD(steps=5, restarts=2, step_size="eps/2", final_iterate=True), 0.1),
    "pgd-l2": lambda: (PGD(steps=5, restarts=2, step_size="eps/2", norm="l2"), 0.5),
    "mifgsm": lambda: (MIFGSM(steps=6, decay=0.9), 0.1),
    # eps in normalised units: per-channel radii (eps * std) in pixels
    "pgd-normalized": lambda: (PGD(steps=5, restarts=2, eps_scale=torch.tensor([0.5]).view(1, 1, 1)), 0.2),
}


def _three_packings(attack, model, x, y, eps, sample_ids):
    plain = attack(model, x, y, eps, sample_ids, batch_size=len(x), refill=False)
    refilled = attack(model, x, y, eps, sample_ids, batch_size=7, refill=True)
    single = attack(model, x, y, eps, sample_ids, batch_size=1, refill=True)
    return plain, refilled, single


def test_per_sample_step_counters_give_the_plain_result(trained_model, test_tensors):
    """The brief's call: PGD-5 with 2 restarts, exact across pools of 7 (refilled), all, and 1."""
    x, y = test_tensors[0][:96], test_tensors[1][:96]
    sample_ids = torch.arange(1000, 1000 + len(x))
    attack = robench.attacks.PGD(steps=5, restarts=2, step_size="eps/2")
    plain, refilled, single = _three_packings(attack, trained_model, x, y, 0.1, sample_ids)
    assert 0 < int(plain.success.sum()) < len(x)
    # Early stops and restarts both happened: between one restart's budget and the full one.
    assert len(x) * 5 < plain.gradient_evals < len(x) * 5 * 2
    for other in (refilled, single):
        assert torch.equal(other.x_adv, plain.x_adv)
        assert torch.equal(other.success, plain.success)
        assert other.gradient_evals == plain.gradient_evals
        assert other.forward_evals == plain.forward_evals
    # The reported success is that of the returned examples, which lie in the eps-ball.
    with torch.no_grad():
        assert torch.equal(trained_model(plain.x_adv).argmax(1) != y, plain.success)
    assert float((plain.x_adv - x).abs().max()) <= 0.1 + 1e-6


@pytest.mark.parametrize("name", list(ATTACKS))
def test_pool_logic_is_exact_on_a_batch_independent_model(name, trained_model, test_tensors):
    """With the model run image by image, floats cannot depend on the packing: every attack is exact,
    L2 included (on the batched model L2 steps follow the raw gradient, whose last bits change with
    the batch size in the CPU kernels; see the next test)."""
    x, y = test_tensors[0][:40], test_tensors[1][:40]
    sample_ids = torch.arange(200, 240)
    attack, eps = ATTACKS[name]()
    plain, refilled, single = _three_packings(attack, RowByRow(trained_model), x, y, eps, sample_ids)
    assert 0 < int(plain.success.sum()) < len(x)
    for other in (refilled, single):
        assert torch.equal(other.x_adv, plain.x_adv)
        assert torch.equal(other.success, plain.success)
        assert (other.gradient_evals, other.forward_evals) == (plain.gradient_evals, plain.forward_evals)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_pool_packings_agree_on_the_batched_model(name, trained_model, test_tensors):
    """On the real batched model: linf attacks exact; L2 equal up to float rounding of the gradient."""
    x, y = test_tensors[0][:48], test_tensors[1][:48]
    sample_ids = torch.arange(1000, 1048)
    attack, eps = ATTACKS[name]()
    plain, refilled, single = _three_packings(attack, trained_model, x, y, eps, sample_ids)
    for other in (refilled, single):
        assert torch.equal(other.success, plain.success)
        assert (other.gradient_evals, other.forward_evals) == (plain.gradient_evals, plain.forward_evals)
        if attack.norm == "linf":
            assert torch.equal(other.x_adv, plain.x_adv)
        else:
            torch.testing.assert_close(other.x_adv, plain.x_adv, rtol=0, atol=1e-5)


def test_random_starts_depend_on_the_sample_id_not_the_slot(trained_model, test_tensors):
    x, y = test_tensors[0][:40], test_tensors[1][:40]
    attack = PGD(steps=1, restarts=1, step_size="eps/2")
    ids = torch.arange(40)
    a = attack(trained_model, x, y, 0.1, ids, batch_size=3, refill=True)
    # The same samples queued in reverse order: each one's example is unchanged.
    rev = torch.arange(39, -1, -1)
    b = attack(trained_model, x[rev], y[rev], 0.1, ids[rev], batch_size=3, refill=True)
    assert torch.equal(b.x_adv[rev], a.x_adv) and torch.equal(b.success[rev], a.success)
    # Other ids: other random starts.
    c = attack(trained_model, x, y, 0.1, ids + 500, batch_size=3, refill=True)
    assert not torch.equal(c.x_adv, a.x_adv)


RESUME_SUITE = {"name": "resume", "attacks": [
    {"attack": "pgd", "eps": 0.1, "steps": 5, "restarts": 2},
    {"attack": "mifgsm", "eps": 0.1, "steps": 5},
    {"attack": "bim", "eps": 0.1, "steps": 5, "final_iterate": True},
]}


@pytest.mark.parametrize("resume_refill", [True, False])
def test_resume_with_refill_equals_an_uninterrupted_run(trained_model, test_tensors, resume_refill):
    data = (test_tensors[0][:200], test_tensors[1][:200])
    batch = 4  # 50 batches: a segment of SEGMENT_BATCHES batches, then the rest
    assert 200 > batch * SEGMENT_BATCHES
    plain = robench.evaluate(trained_model, data, RESUME_SUITE, device="cpu", batch_size=batch, refill=False,
                             compile="off")
    saved = []
    with pytest.raises(EvaluationInterrupted) as info:
        evaluate_with_state(trained_model, data, RESUME_SUITE, device="cpu", batch_size=batch, refill=True,
                         compile="off", on_batch=stop_after(1), save_state=saved.append)
    partial = info.value.result
    # Interrupted after the first segment: exactly its batches are kept.
    assert partial.doc["complete"] is False
    assert partial.doc["progress"] == {"evaluated": batch * SEGMENT_BATCHES, "total": 200}
    assert saved and saved[-1]["batches"] == SEGMENT_BATCHES
    assert partial.samples.equals(plain.samples.iloc[:batch * SEGMENT_BATCHES])
    resumed = evaluate_with_state(trained_model, data, RESUME_SUITE, device="cpu", batch_size=batch,
                               refill=resume_refill, compile="off", resume_state=saved[-1])
    assert resumed.doc["complete"] is True
    assert resumed.samples.equals(plain.samples)
    assert _stable(resumed.doc) == _stable(plain.doc)
    assert any(0 < a["accuracy"] < plain.doc["clean"]["accuracy"] for a in plain.doc["attacks"])


def test_out_of_memory_back_off_with_refill_keeps_the_results(trained_model, test_tensors, monkeypatch):
    n = 16 * (SEGMENT_BATCHES + 1)  # in batches of 16: two segments (SEGMENT_BATCHES batches + 1)
    assert n <= len(test_tensors[1])
    data = (test_tensors[0][:n], test_tensors[1][:n])
    suite = {"name": "oom", "attacks": [{"attack": "pgd", "eps": [0.05, 0.1], "steps": 5, "restarts": 2},
                                        {"attack": "fgsm", "eps": 0.1}]}
    plain = robench.evaluate(trained_model, data, suite, device="cpu", batch_size=16, refill=False, compile="off")
    real_call = PGD.__call__
    sizes, refills = [], []

    def small_memory(self, model, x, y, eps=None, sample_ids=None, *, batch_size=None, refill=True):
        sizes.append(batch_size)
        refills.append(refill)
        if batch_size > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, model, x, y, eps, sample_ids, batch_size=batch_size, refill=refill)

    monkeypatch.setattr(PGD, "__call__", small_memory)
    squeezed = robench.evaluate(trained_model, data, suite, device="cpu", batch_size=16, refill=True,
                                compile="off")
    # Per pgd entry: 16 -> 8 -> 4 on the first segment, and the second segment starts at 4.
    assert sizes == [16, 8, 4, 16, 8, 4, 4, 4] and all(refills)
    assert squeezed.samples.equals(plain.samples)
    assert _stable(squeezed.doc) == _stable(plain.doc)
    pgd = [a for a in squeezed.doc["attacks"] if a["attack"] == "pgd"]
    assert [a["attack_chunk"] for a in pgd] == [4, 4]
    fgsm = [a for a in squeezed.doc["attacks"] if a["attack"] == "fgsm"]
    assert fgsm[0]["attack_chunk"] is None
    assert squeezed.doc["env"]["speed"]["refill"] is True
