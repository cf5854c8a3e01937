"""Nothing computed is lost: interrupt-and-resume equality, out-of-memory back-off, partial results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import robench
from robench.api import EvaluationInterrupted
from robench.attacks import PGD
from robench.evaluation.engine import SEGMENT_BATCHES
from cli_helpers import evaluate_with_state, invoke, stop_after

SUITE = {"name": "rel", "attacks": [{"attack": "pgd", "eps": [0.05, 0.1], "steps": 5},
                                    {"attack": "fgsm", "eps": 0.1}]}


def test_interrupt_then_resume_equals_an_uninterrupted_run(trained_model, test_tensors):
    # 540 samples in batches of 8: 68 batches, committed in segments of SEGMENT_BATCHES (32, 32, 4).
    batch = 8
    assert 540 > 2 * batch * SEGMENT_BATCHES
    plain = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", batch_size=batch)
    saved = []
    with pytest.raises(EvaluationInterrupted) as info:
        evaluate_with_state(trained_model, test_tensors, SUITE, device="cpu", batch_size=batch,
                         on_batch=stop_after(1), save_state=saved.append)
    partial = info.value.result
    first = batch * SEGMENT_BATCHES
    assert partial.doc["complete"] is False and partial.doc["progress"] == {"evaluated": first, "total": 540}
    assert len(partial.samples) == first
    assert saved and saved[-1]["batches"] == SEGMENT_BATCHES
    resumed = evaluate_with_state(trained_model, test_tensors, SUITE, device="cpu", batch_size=batch,
                               resume_state=saved[-1])
    assert resumed.doc["complete"] is True
    assert resumed.samples.equals(plain.samples)
    for a, b in zip(resumed.doc["attacks"], plain.doc["attacks"]):
        assert a["accuracy"] == b["accuracy"] and a["success_rate"] == b["success_rate"]
    assert resumed.doc["env"]["dataset_fingerprint"] == plain.doc["env"]["dataset_fingerprint"]
    with pytest.raises(robench.errors.UsageError, match="batch-size"):
        evaluate_with_state(trained_model, test_tensors, SUITE, device="cpu", batch_size=64, resume_state=saved[-1])


def test_out_of_memory_halves_the_chunk_and_keeps_the_results(trained_model, test_tensors, monkeypatch):
    plain = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", batch_size=256)
    real_call = PGD.__call__
    sizes = []

    def small_memory(self, model, x, y, eps=None, sample_ids=None, *, batch_size=None, refill=True):
        sizes.append(batch_size)
        if batch_size > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, model, x, y, eps, sample_ids, batch_size=batch_size, refill=refill)

    monkeypatch.setattr(PGD, "__call__", small_memory)
    squeezed = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", batch_size=256)
    assert max(sizes) > 40 and any(s <= 40 for s in sizes)
    assert squeezed.samples.equals(plain.samples)
    pgd = [a for a in squeezed.doc["attacks"] if a["attack"] == "pgd"]
    assert all(a["attack_chunk"] is not None and a["attack_chunk"] <= 40 for a in pgd)
    fgsm = [a for a in squeezed.doc["attacks"] if a["attack"] == "fgsm"]
    assert fgsm[0]["attack_chunk"] is None


def test_out_of_memory_for_a_single_image_is_a_clear_error(trained_model, test_tensors, monkeypatch):
    def never_fits(self, model, x, y, eps=None, sample_ids=None, **_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(PGD, "__call__", never_fits)
    with pytest.raises(robench.errors.RunError, match="out of memory even for one image"):
        robench.evaluate(trained_model, (test_tensors[0][:8], test_tensors[1][:8]), SUITE, device="cpu")


HEAVY = "name: heavy\nattacks:\n  - attack: pgd\n    eps: [0.05, 0.1]\n    steps: 20\n    final_iterate: true\n"


# 40 batches of 4: five segments, so there is progress to interrupt and to resume
EVAL = ["eval", "example:digits", "--batch-size", "4", "--limit", "160", "--save-every", "0", "--quiet"]


def robench_cmd(*args):
    return [sys.executable, "-m", "robench", *EVAL, *args]


def test_sigterm_leaves_a_partial_result_and_rerunning_continues(tmp_path):
    suite = tmp_path / "heavy.yaml"
    suite.write_text(HEAVY)
    out = tmp_path / "run"
    env = {**os.environ, "ROBENCH_DEBUG": ""}
    proc = subprocess.Popen(robench_cmd("--suite", suite, "--out", out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "progress.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "robench: interrupted:" in err and "--resume" in err
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and 0 < partial["progress"]["evaluated"] < 160
    resumed = subprocess.run(robench_cmd("--suite", suite, "--resume", out, "--json"), capture_output=True,
                             text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["complete"] is True and doc["progress"]["evaluated"] == 160
    assert not (out / "progress.pt").exists()
    # An uninterrupted run and the same command again, in this process.
    fresh = invoke(*EVAL, "--suite", suite, "--out", tmp_path / "fresh", "--json")
    assert [a["accuracy"] for a in json.loads(fresh.stdout)["attacks"]] == [a["accuracy"] for a in doc["attacks"]]
    assert (out / "samples.csv").read_text() == (tmp_path / "fresh" / "samples.csv").read_text()
    again = invoke(*EVAL, "--suite", suite, "--out", out)
    assert again.exit_code == 2 and "never overwritten" in again.stderr


def test_resume_refuses_other_settings_and_empty_directories(tmp_path):
    suite = tmp_path / "heavy.yaml"
    suite.write_text(HEAVY)
    nothing = invoke(*EVAL, "--suite", suite, "--resume", tmp_path)
    assert nothing.exit_code == 2 and "no interrupted run" in nothing.stderr
    out = tmp_path / "run"
    out.mkdir()
    from robench.results.progress import save_progress

    save_progress(out, {"format": "robench.progress/1", "batches": 1}, "some-other-settings")
    other = invoke(*EVAL, "--suite", suite, "--resume", out)
    assert other.exit_code == 2 and "differ from the interrupted run" in other.stderr
