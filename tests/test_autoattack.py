"""AutoAttack as one composite entry: its log, its bounds against its members and PGD, invariance, masking."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

import robench
from robench.attacks import ATTACKS
from robench.attacks.autoattack import VERSIONS, AutoAttack
from robench.errors import UsageError
from cli_helpers import invoke, evaluate_with_state

EPS = 0.1  # digits: PGD-50 leaves roughly half the points robust here, so every bound below can bite
# Members cut down for the tests that are about the machinery, not the strength (CPU time).
QUICK = {"apgd-ce": {"steps": 20}, "apgd-t": {"steps": 10, "targets": 3}, "fab-t": {"steps": 10, "targets": 3},
         "square": {"queries": 300}}


def _subset(test_tensors, n):
    return test_tensors[0][:n], test_tensors[1][:n]


@pytest.fixture(scope="module")
def standard_run(trained_model, test_tensors):
    """AutoAttack standard (reference settings) beside PGD-50, on 80 digits."""
    suite = {"name": "aa", "attacks": [
        {"attack": "autoattack", "eps": EPS},
        {"attack": "pgd", "eps": EPS, "steps": 50, "step_size": "2.5*eps/50"},
    ]}
    return robench.evaluate(trained_model, _subset(test_tensors, 80), suite, device="cpu", batch_size=128)


def test_standard_version_runs_the_reference_members_in_order():
    assert [name for name, _ in VERSIONS["standard"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    attack = AutoAttack()
    assert attack.parts() == ["apgd-ce", "apgd-t", "fab-t", "square"]
    described = attack.describe(8 / 255)
    assert described["members"]["apgd-ce"]["steps"] == 100
    assert described["members"]["square"]["queries"] == 5001  # the start and 5,000 proposals, as the reference
    assert [m.name for m in AutoAttack(version="rand").members] == ["apgd-ce", "apgd-dlr"]
    assert all(m.params.eot == 20 for m in AutoAttack(version="rand").members)
    cost = ATTACKS.get("autoattack").cost(AutoAttack.Params())
    assert cost.gradient >= 100 + 9 * 100 and cost.forward >= 5000


def test_autoattack_is_at_most_pgd50_and_its_log_adds_up(standard_run):
    doc = standard_run.doc
    auto, pgd = doc["attacks"]
    assert auto["accuracy"] <= pgd["accuracy"]
    assert 0 < pgd["accuracy"] < doc["clean"]["accuracy"]
    parts = auto["parts"]
    assert [p["attack"] for p in parts] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # The points each member broke first, and the robust ones, are the clean-correct points.
    assert sum(p["broken"] for p in parts) + round(auto["accuracy"] * auto["n"]) == doc["clean"]["correct"]
    after = [p["accuracy_after"] for p in parts]
    assert after == sorted(after, reverse=True) and after[-1] == auto["accuracy"]
    assert parts[0]["broken"] > 0
    column = next(c for c in standard_run.samples.columns if c.startswith("found_by[0]"))
    counts = standard_run.samples[column].value_counts()
    for p in parts:
        assert counts.get(p["attack"], 0) == p["broken"]
    robust = standard_run.samples[next(c for c in standard_run.samples.columns if c.startswith("robust[0]"))]
    assert ((standard_run.samples[column] == "") == (robust | ~standard_run.samples["clean_correct"])).all()


def test_autoattack_is_at_most_each_member_run_alone(trained_model, test_tensors):
    """Per sample: a point AutoAttack leaves robust is robust to each member run alone on every point.

    The members are cut down (CPU time); the property is about how the parts are chained,
    and holds for any settings because each member draws from the same per-sample streams
    alone as inside AutoAttack.
    """
    x, y = _subset(test_tensors, 120)
    suite = {"name": "aa", "attacks": [{"attack": "autoattack", "eps": EPS, "members": QUICK}]}
    run = robench.evaluate(trained_model, (x, y), suite, device="cpu", batch_size=128)
    correct = torch.tensor(run.samples["clean_correct"].to_numpy())
    robust = torch.tensor(run.samples[next(c for c in run.samples.columns if c.startswith("robust[0]"))].to_numpy())
    attack = AutoAttack(members=QUICK, stream=0)  # entry 0 of the suite above
    ids = torch.arange(len(x))[correct]
    for member in attack.members:
        alone = member(trained_model.eval(), x[correct], y[correct], EPS, ids, batch_size=128)
        alone_robust = torch.zeros_like(robust)
        alone_robust[correct] = ~alone.success
        assert robust.sum() <= alone_robust.sum(), member.name
        # A member sees other batch neighbours alone than after the members before it; float
        # rounding in a batched convolution may flip a sample on the boundary, never more.
        assert int((robust & ~alone_robust).sum()) <= 1, member.name
    assert 0 < robust.sum() < correct.sum()


def _quick_suite(**extra):
    return {"name": "aa-quick", "attacks": [{"attack": "autoattack", "eps": EPS, "members": QUICK, **extra}]}


def _stable(doc):
    volatile = {"seconds", "speed", "finished_at", "peak_memory_bytes", "attack_chunk", "batch_size"}
    if isinstance(doc, dict):
        return {k: _stable(v) for k, v in doc.items() if k not in volatile}
    if isinstance(doc, list):
        return [_stable(v) for v in doc]
    return doc


def test_results_do_not_depend_on_batch_size_or_refill(trained_model, test_tensors):
    data = _subset(test_tensors, 80)
    runs = [robench.evaluate(trained_model, data, _quick_suite(), device="cpu", batch_size=b, refill=r)
            for b, r in ((80, True), (16, True), (7, False))]
    first = runs[0]
    assert 0 < first.doc["attacks"][0]["accuracy"] < first.doc["clean"]["accuracy"]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(other.samples, first.samples)
        assert json.dumps(_stable(other.doc), sort_keys=True) == json.dumps(_stable(first.doc), sort_keys=True)


def test_a_subset_of_members_and_bad_settings():
    assert AutoAttack(attacks=["square", "apgd-ce"]).parts() == ["apgd-ce", "square"]  # the version's order
    with pytest.raises(UsageError, match="attacks: 'fab' not in version standard"):
        AutoAttack(attacks=["fab"])
    with pytest.raises(UsageError, match="members.square.queries"):
        AutoAttack(members={"square": {"queries": 0}})
    with pytest.raises(UsageError, match="members.apgd-ce.stepz"):
        AutoAttack(members={"apgd-ce": {"stepz": 3}})


class Rounded(nn.Module):
    """Rounds its input to 8-bit levels: the same predictions as the model, and zero input gradients."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 255) / 255)


MASKED_EPS = 0.2


def _masked_suite():
    return {"name": "masked", "attacks": [
        {"attack": "pgd", "eps": MASKED_EPS, "steps": 20},
        {"attack": "apgd-ce", "eps": MASKED_EPS, "steps": 20},
        {"attack": "square", "eps": MASKED_EPS, "queries": 500},
        {"attack": "autoattack", "eps": MASKED_EPS, "attacks": ["apgd-ce", "apgd-t", "square"],
         "members": {"apgd-ce": {"steps": 20}, "apgd-t": {"steps": 10, "targets": 3}, "square": {"queries": 500}}},
    ]}


def test_masked_gradients_are_seen_through_by_square_and_flagged(trained_model, test_tensors):
    masked = Rounded(trained_model).eval()
    x, y = _subset(test_tensors, 150)
    with torch.no_grad():
        assert torch.equal(masked(x).argmax(1), trained_model(x).argmax(1))
    doc = robench.evaluate(masked, (x, y), _masked_suite(), device="cpu", batch_size=64).doc
    clean = doc["clean"]["accuracy"]
    pgd, apgd, square, auto = (a["accuracy"] for a in doc["attacks"])
    # No gradient reaches the input: the gradient attacks move only by their random start.
    assert pgd >= clean - 0.05 and apgd >= clean - 0.05
    assert square <= clean - 0.3
    log = {p["attack"]: p["broken"] for p in doc["attacks"][3]["parts"]}
    assert log["square"] > log["apgd-ce"] + log["apgd-t"]
    names = doc["sanity"]["flag_names"]
    assert "gradient_masking" in names and "zero_gradients" in names
    messages = [m for n, m in zip(names, doc["sanity"]["flags"]) if n == "gradient_masking"]
    assert any("square (black-box) broke" in m for m in messages)  # from AutoAttack's own log
    assert any("beats the iterative white-box attacks" in m for m in messages)  # square's own entry


def test_the_masking_flag_reaches_stderr_from_the_command_line(trained_model, tmp_path):
    path = tmp_path / "rounded.pt"
    torch.jit.save(torch.jit.script(Rounded(trained_model).eval()), str(path))
    suite = tmp_path / "masked.yaml"
    suite.write_text("name: masked\nattacks:\n  - attack: autoattack\n    eps: 0.2\n    attacks: [apgd-ce, square]\n"
                     "    members: {apgd-ce: {steps: 10}, square: {queries: 300}}\n")
    result = invoke("eval", path, "--trust-checkpoint", "--suite", suite, "--data", "example:digits",
                    "--limit", "100", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "gradient masking" in result.stderr and "square (black-box) broke" in result.stderr
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "gradient_masking" in doc["sanity"]["flag_names"]
    assert "after square" in result.stdout


def test_an_interrupted_run_resumes_to_the_same_log(trained_model, test_tensors):
    """The per-sample ``found_by`` travels in the progress file: a resumed run has the same log."""
    from robench.api import EvaluationInterrupted
    from robench.evaluation.engine import SEGMENT_BATCHES
    from cli_helpers import stop_after

    batch = 2
    n = batch * SEGMENT_BATCHES + 16  # two segments: the first is committed, then the run stops
    data = _subset(test_tensors, n)
    # Small pools make many model calls: lighter members, three of them so the log has several parts.
    suite = {"name": "aa-resume", "attacks": [{
        "attack": "autoattack", "eps": EPS, "attacks": ["apgd-ce", "apgd-t", "square"],
        "members": {"apgd-ce": {"steps": 10}, "apgd-t": {"steps": 5, "targets": 2}, "square": {"queries": 100}}}]}
    plain = robench.evaluate(trained_model, data, suite, device="cpu", batch_size=batch)
    saved = []
    with pytest.raises(EvaluationInterrupted):
        evaluate_with_state(trained_model, data, suite, device="cpu", batch_size=batch,
                         on_batch=stop_after(1), save_state=saved.append)
    assert saved[-1]["batches"] == SEGMENT_BATCHES
    resumed = evaluate_with_state(trained_model, data, suite, device="cpu", batch_size=batch,
                               resume_state=saved[-1])
    pd.testing.assert_frame_equal(resumed.samples, plain.samples)
    assert resumed.doc["attacks"][0]["parts"] == plain.doc["attacks"][0]["parts"]
    assert sum(p["broken"] for p in plain.doc["attacks"][0]["parts"]) > 0


def test_bf16_runs_with_fp32_losses(trained_model, test_tensors):
    """Under bf16 autocast the members' losses and margins are computed in fp32: the run completes and
    lands close to the fp32 one (bf16 logits move a few borderline points)."""
    data = _subset(test_tensors, 60)
    fp32 = robench.evaluate(trained_model, data, _quick_suite(), device="cpu", batch_size=64).doc
    bf16 = robench.evaluate(trained_model, data, _quick_suite(), device="cpu", batch_size=64, precision="bf16").doc
    assert bf16["env"]["precision"] == "bf16"
    a, b = fp32["attacks"][0]["accuracy"], bf16["attacks"][0]["accuracy"]
    assert b <= bf16["clean"]["accuracy"] and abs(a - b) <= 0.1


def test_the_attack_list_says_autoattack_includes_a_query_attack():
    """Its trait stays "gradient" (it is judged as a white-box attack); the listing names its members' kinds."""
    rows = json.loads(invoke("attacks", "--json").stdout)
    family = next(r["family"] for r in rows if r["name"] == "autoattack")
    assert family == "composite: gradient + query"
    assert next(r["family"] for r in rows if r["name"] == "pgd") == "gradient"


def test_a_line_after_each_member_with_the_samples_still_robust(tmp_path):
    """As the reference prints: after each member, how many attacked samples are still robust."""
    suite = tmp_path / "aa-quick.yaml"  # the members cut down: the lines are the point here, not the strength
    suite.write_text(json.dumps(_quick_suite()))
    result = invoke("eval", "example:digits", "--suite", suite, "--limit", 30, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("robench: autoattack eps 0.1: after")]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    entry = doc["attacks"][0]
    members = [line.split("after ")[1].split(":")[0] for line in lines]
    assert members == entry["params"]["attacks"][:len(members)] and members
    robust = [int(line.split(": ")[3].split(" of ")[0]) for line in lines]
    assert robust == sorted(robust, reverse=True), "a member only removes samples"
    assert all(f" of {entry['attacked']} attacked samples still robust" in line for line in lines)
    assert robust[-1] == round(entry["accuracy"] * entry["n"])
    # At eps 0.3 APGD-CE fools every sample of 8, so the run ends after the first member's line.
    loud, quiet = (invoke("eval", "example:digits", "--suite", "autoattack", "--eps", "0.3", "--limit", 8, *extra,
                          "--out", tmp_path / name) for name, extra in (("loud", ()), ("quiet", ("--quiet",))))
    assert "after apgd-ce" in loud.stderr and "after apgd-ce" not in quiet.stderr
