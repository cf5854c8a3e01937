"""Ctrl-C inside an attack keeps the samples it finished: partial results, progress at sample granularity,
and a resume that attacks only the rest and ends with the uninterrupted run's results.

In-process runs interrupt deterministically (a KeyboardInterrupt from the k-th pass an attack reports)
on the row-by-row model, where results cannot depend on how samples share a batch, so the resumed run
must equal the uninterrupted one exactly. The last test sends a real SIGINT to ``robench eval``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from robench.api import EvaluationInterrupted
from robench.attacks.base import Attack
from robench.cli.progress_work import Work
from robench.config import EvalConfig
from robench.errors import UsageError
from robench.tasks.run import run_evaluation
from robench.tasks import Hooks
from robench.tasks.classification import evaluate_config
from cli_helpers import RowByRow, evaluate_with_state, saved_and_loaded, without

EPS = 0.1
QUICK = {"apgd-ce": {"steps": 10}, "apgd-t": {"steps": 5, "targets": 2}, "fab-t": {"steps": 5, "targets": 2},
         "square": {"queries": 60}}
VOLATILE = {"seconds", "speed", "finished_at", "peak_memory_bytes", "attack_chunk", "gradient_evals",
            "forward_evals"}

SUITES = {
    # Early stop: fooled samples leave the pool at different steps; 60 batches of 1 make two segments.
    "pgd": ({"name": "pgd", "attacks": [{"attack": "pgd", "eps": EPS, "steps": 10}]}, 1, {}),
    # A composite: samples finish when a member fools them or the last member is done with them.
    "autoattack": ({"name": "aa", "attacks": [{"attack": "autoattack", "eps": EPS, "members": QUICK}]}, 16, {}),
    # Several entries, sweep reuse and kept examples: the interrupted entry is not the first.
    "sweep": ({"name": "sweep", "attacks": [{"attack": "fgsm", "eps": EPS},
                                            {"attack": "pgd", "eps": [EPS / 2, EPS], "steps": 8}]}, 8,
              {"sweep_reuse": True, "save_adversarial": "all"}),
}


class PassCounter:
    """``Attack.count_passes`` replaced: counts the calls and raises KeyboardInterrupt at call ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at
        self.passes = 0  # per sample, gradient and forward together

    def install(self, monkeypatch) -> None:
        def count_passes(attack: Attack, gradient: int, forward: int = 0) -> None:
            self.calls += 1
            self.passes += gradient + forward
            if self.calls == self.stop_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(Attack, "count_passes", count_passes)


@pytest.mark.parametrize("name", list(SUITES))
def test_an_interrupted_attack_keeps_what_it_finished_and_resumes_to_the_same_results(
        name, trained_model, test_tensors, monkeypatch):
    suite, batch_size, options = SUITES[name]
    x, y = test_tensors[0][:60], test_tensors[1][:60]
    model = RowByRow(trained_model)

    def evaluate(counter: PassCounter, **kwargs):
        counter.install(monkeypatch)
        return evaluate_with_state(model, (x, y), suite, device="cpu", batch_size=batch_size, compile="off",
                                   **options, **kwargs)

    whole = PassCounter()
    reference = evaluate(whole)
    saved: list[dict] = []
    stop = PassCounter(stop_at=whole.calls * 2 // 3)
    with pytest.raises(EvaluationInterrupted) as interrupted:
        evaluate(stop, save_state=saved.append, save_every=0)
    partial = interrupted.value.result
    assert partial.doc["complete"] is False
    finished = partial.doc["progress"]["evaluated"]
    assert 0 < finished < len(y)
    # The samples the interrupted run reports finished are exactly the uninterrupted run's.
    ref_rows = reference.samples.set_index("index").loc[partial.samples["index"]].reset_index()
    pd.testing.assert_frame_equal(partial.samples, ref_rows)

    resumed_passes = PassCounter()
    resumed = evaluate(resumed_passes, resume_state=saved_and_loaded(saved[-1]))
    # Finished (entry, sample) pairs are not attacked again: fewer passes than the whole run made.
    assert whole.calls - stop.calls <= resumed_passes.calls and resumed_passes.passes < whole.passes
    pd.testing.assert_frame_equal(resumed.samples, reference.samples)
    assert without(resumed.doc, VOLATILE) == without(reference.doc, VOLATILE)
    assert len(resumed.adversarial) == len(reference.adversarial)
    for mine, theirs in zip(resumed.adversarial, reference.adversarial):
        assert (mine.adversarial_float == theirs.adversarial_float).all()
        assert (mine.adv_pred == theirs.adv_pred).all()


def test_a_resumed_segment_on_other_data_is_refused(trained_model, test_tensors, monkeypatch):
    suite, batch_size, _ = SUITES["autoattack"]
    x, y = test_tensors[0][:40], test_tensors[1][:40]
    saved: list[dict] = []
    PassCounter(stop_at=30).install(monkeypatch)
    with pytest.raises(EvaluationInterrupted):
        evaluate_with_state(trained_model, (x, y), suite, device="cpu", batch_size=batch_size, compile="off",
                            save_state=saved.append, save_every=0)
    assert saved[-1]["batches"] == 0 and saved[-1]["partial"]["entries"]
    PassCounter().install(monkeypatch)
    changed = x.clone()
    changed[0] = 1 - changed[0]
    with pytest.raises(UsageError, match="data of the interrupted segment changed"):
        evaluate_with_state(trained_model, (changed, y), suite, device="cpu", batch_size=batch_size,
                            compile="off", resume_state=saved[-1])


def test_the_bar_moves_with_every_pass_and_ends_at_the_total():
    work = Work([30.0, 3.0], samples=10)
    work.add(-1, 10)  # the clean pass
    work.tick(3 * 4)  # four samples' gradient passes in the first entry
    assert work.done_weight == 10 + 12 and work.done_units == 0
    work.add(0, 10)  # the entry ends: the rest of its weight (fooled samples stopped early)
    assert work.done_weight == 10 + 300 and work.done_units == 10
    work.tick(1000)  # more passes than weighed: never past the total
    work.add(1, 10)
    assert work.done_weight == work.total_weight and work.done_units == work.total_units


def test_progress_hears_passes_within_an_entry(tmp_path):
    heard = []

    class Sink:
        def start(self, samples, done):
            heard.append(("start", samples))

        def entry_done(self, entry, samples):
            heard.append(("done", entry))

        def tick(self, entry, weight):
            heard.append(("tick", entry))

    config = EvalConfig.of(model="example:digits", suite="pgd-linf", limit=40, out=tmp_path / "run")
    evaluate_config(config, hooks=Hooks(progress=Sink()))
    ticks = [i for i, event in enumerate(heard) if event[0] == "tick"]
    assert len(ticks) >= 10  # one per step at least
    first_done = heard.index(("done", heard[ticks[0]][1]))
    assert ticks[0] < first_done  # the bar moved before the entry finished


# -- a real SIGINT -----------------------------------------------------------------------------------------------

SLOW_SQUARE = {**QUICK, "square": {"queries": 1500}}


def _batch_invariant() -> bool:
    """Whether this CPU's kernels give the example model the same logits and input gradients for any batch
    composition: only then can a resumed run, whose pools hold other samples, equal an uninterrupted one bit
    for bit (elsewhere the verdicts agree up to float rounding, see test_square)."""
    import numpy as np

    from robench.examples import example_data_path
    from robench.models.loading import load_example_model

    model = load_example_model("digits").model.eval()
    with np.load(example_data_path("digits")) as data:
        x = torch.from_numpy(data["x"][:50]).permute(0, 3, 1, 2).float() / 255
    x.requires_grad_(True)
    whole = model(x)
    (grad,) = torch.autograd.grad(whole.sum(), x)
    part = x.detach()[7:30].requires_grad_(True)
    some = model(part)
    (grad_part,) = torch.autograd.grad(some.sum(), part)
    return torch.equal(whole[7:30], some) and torch.equal(grad[7:30], grad_part)


def test_sigint_in_a_100_sample_autoattack_run_keeps_the_finished_samples(tmp_path):
    suite = tmp_path / "aa.yaml"
    suite.write_text(yaml.safe_dump({"name": "aa", "attacks": [
        {"attack": "autoattack", "eps": EPS, "members": SLOW_SQUARE}]}))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "robench", "eval", "example:digits", "--suite", str(suite), "--limit", "100",
               "--out", str(out)]
    env = {**os.environ, "ROBENCH_DEBUG": ""}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    lines = []
    deadline = time.time() + 300
    for line in proc.stderr:  # AutoAttack's line after its first member: those it fooled are finished
        lines.append(line)
        if "after apgd-ce" in line or time.time() > deadline:
            break
    assert proc.poll() is None, "".join(lines)
    proc.send_signal(signal.SIGINT)
    err = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 130, err
    stopped = [line for line in err.splitlines() if "interrupted" in line]
    assert len(stopped) == 1 and f"--resume {out}" in stopped[0], err
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False
    finished = partial["progress"]["evaluated"]
    assert 0 < finished < 100 and f"interrupted after {finished} of 100 samples" in stopped[0]
    kept = pd.read_csv(out / "samples.csv")

    resumed = subprocess.run([*command[:-2], "--resume", str(out)], capture_output=True, text=True, env=env,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and doc["progress"]["evaluated"] == 100

    _, reference = run_evaluation(EvalConfig.of(model="example:digits", suite=suite, limit=100,
                                             out=tmp_path / "reference"))
    samples = pd.read_csv(out / "samples.csv")
    ref = pd.read_csv(tmp_path / "reference" / "samples.csv")
    # The finished samples were not attacked again: their rows are the interrupted run's.
    pd.testing.assert_frame_equal(samples.set_index("index").loc[kept["index"]].reset_index(), kept)
    robust = [c for c in ref.columns if c.startswith("robust[")]
    if _batch_invariant():
        pd.testing.assert_frame_equal(samples, ref)
        assert without(doc, VOLATILE) == without(reference.doc, VOLATILE)
    else:  # the resumed pools hold other samples: float rounding may flip a boundary sample or two
        assert int((samples[robust] != ref[robust]).to_numpy().sum()) <= 2


def test_finished_attacks_are_kept_before_any_sample_has_passed_every_attack(tmp_path, monkeypatch):
    """Ctrl-C in the first of two entries: no sample is finished, yet what PGD finished is kept and resumed."""
    from cli_helpers import invoke, one_error_line

    suite = tmp_path / "two.yaml"
    suite.write_text(yaml.safe_dump({"name": "two", "attacks": [{"attack": "pgd", "eps": EPS, "steps": 10},
                                                                {"attack": "fgsm", "eps": EPS}]}))
    args = ("eval", "example:digits", "--suite", suite, "--limit", "64", "--quiet")
    whole = PassCounter()
    whole.install(monkeypatch)
    reference = invoke(*args, "--out", tmp_path / "reference", "--json")
    assert reference.exit_code == 0, reference.stderr
    out = tmp_path / "run"
    PassCounter(stop_at=4).install(monkeypatch)  # PGD's fourth step
    stopped = invoke(*args, "--out", out)
    assert stopped.exit_code == 130
    line = one_error_line(stopped, "interrupted")
    assert "before the first samples finished every attack" in line and f"--resume {out}" in line
    assert not (out / "results.json").exists()
    saved = torch.load(out / "progress.pt", weights_only=True)
    pgd_done = int(saved["partial"]["entries"][0]["done"].sum())
    assert saved["batches"] == 0 and pgd_done > 0  # fooled in PGD's first steps, or never attacked

    counter = PassCounter()
    counter.install(monkeypatch)
    resumed = invoke(*args, "--resume", out, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"after 0 finished batch(es), keeping {pgd_done} finished (sample, attack) pair(s)" in resumed.stderr
    # PGD goes on with the samples it had not finished; FGSM runs on all.
    assert counter.passes < whole.passes
    mine, theirs = json.loads(resumed.stdout), json.loads(reference.stdout)
    if _batch_invariant():
        assert without(mine, VOLATILE) == without(theirs, VOLATILE)
    else:  # the resumed pools hold other samples: float rounding may flip a boundary sample or two
        for a, b in zip(mine["attacks"], theirs["attacks"]):
            assert abs(a["accuracy"] - b["accuracy"]) * a["n"] <= 2
