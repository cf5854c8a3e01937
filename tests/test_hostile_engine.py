"""Hostile models and data against the engine: resume checks, sanity that holds up, the first-batch probe."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import robench
from robench.api import EvaluationInterrupted
from robench.errors import RunError, UsageError
from robench.models.wrapper import RobustModel
from robench.evaluation.engine import SEGMENT_BATCHES
from robench.evaluation.state import RunState
from robench.evaluation.sanity import explain_failure, first_batch_checks
from cli_helpers import invoke, one_error_line, stop_after, evaluate_with_state

FGSM = {"name": "f", "attacks": [{"attack": "fgsm", "eps": 0.1}]}
SUITE_YAML = "name: quick\nattacks:\n  - attack: fgsm\n    eps: 0.1\n"


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.eval()  # handed over as deployed: only the train-mode test wants the flag


class Centred(Wrap):
    """Subtracts the batch's mean logits: every prediction depends on the other samples in the batch."""

    def forward(self, x):
        out = self.inner(x)
        return out - out.mean(dim=0, keepdim=True)


class SometimesNaN(Wrap):
    """NaN logits for images whose top-left pixel is bright."""

    def forward(self, x):
        out = self.inner(x)
        bad = x[:, 0, 0, 0] > 0.5
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


class OneHot(Wrap):
    def forward(self, x):
        out = self.inner(x)
        return F.one_hot(out.argmax(1), out.shape[1]).float()


class Detached(Wrap):
    def forward(self, x):
        return self.inner(x).detach()


class NoGrad(Wrap):
    def forward(self, x):
        with torch.no_grad():
            return self.inner(x)


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class OneLogit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(dim=1, keepdim=True)


# -- resume ----------------------------------------------------------------------------------------------------

def test_flags_survive_a_resume_whose_batches_were_all_done(trained_model, test_tensors):
    data = test_tensors[0][:300], test_tensors[1][:300]
    saved = []
    first = evaluate_with_state(Centred(trained_model), data, FGSM, device="cpu", batch_size=128,
                             save_state=saved.append, save_every=0)
    assert "batch_dependence" in first.doc["sanity"]["flag_names"]
    final = saved[-1]
    assert final["format"] == "robench.progress/3" and final["batches"] == 3  # 300 samples, 3 batches of 128
    # Killed after the final snapshot, before results.json: the resume has nothing left to compute.
    resumed = evaluate_with_state(Centred(trained_model), data, FGSM, device="cpu", batch_size=128,
                               resume_state=final)
    assert resumed.doc["complete"] is True
    assert resumed.doc["sanity"]["flags"] == first.doc["sanity"]["flags"]
    assert resumed.doc["sanity"]["flag_names"] == first.doc["sanity"]["flag_names"]
    assert resumed.doc["sanity"]["batch_dependent_predictions"] is True
    assert resumed.doc["clean"] == first.doc["clean"]
    assert resumed.doc["data"]["fingerprint"] == first.doc["data"]["fingerprint"]


def test_a_snapshot_of_the_old_format_is_refused(trained_model, test_tensors):
    data = test_tensors[0][:192], test_tensors[1][:192]  # 12 batches of 16: segments of 8 and 4
    saved = []
    with pytest.raises(EvaluationInterrupted):
        evaluate_with_state(trained_model, data, FGSM, device="cpu", batch_size=16,
                         on_batch=stop_after(1), save_state=saved.append)
    for older in ("robench.progress/1", "robench.progress/2"):
        old = {**saved[-1], "format": older}
        with pytest.raises(UsageError, match="older robench .*start a new run"):
            evaluate_with_state(trained_model, data, FGSM, device="cpu", batch_size=16, resume_state=old)
        with pytest.raises(UsageError, match="older robench"):
            RunState.for_entries(0).restore(old, 16)


def test_resume_on_data_with_fewer_batches_is_refused(trained_model, test_tensors):
    x, y = test_tensors
    saved = []
    batch = 4
    first = batch * SEGMENT_BATCHES  # the samples of the first segment, the one committed
    with pytest.raises(EvaluationInterrupted):  # two segments of SEGMENT_BATCHES batches
        evaluate_with_state(trained_model, (x[:2 * first], y[:2 * first]), FGSM, device="cpu", batch_size=batch,
                         on_batch=stop_after(1), save_state=saved.append)
    fewer = first - 3 * batch  # fewer batches than the interrupted run finished
    with pytest.raises(UsageError, match=f"data changed .*first {SEGMENT_BATCHES} batches"):
        evaluate_with_state(trained_model, (x[:fewer], y[:fewer]), FGSM, device="cpu", batch_size=batch,
                         resume_state=saved[-1])


def test_resume_after_the_npz_was_rewritten_is_refused(tmp_path, digits_split, monkeypatch):
    _, x_te, _, y_te = digits_split
    batch = 4
    first = batch * SEGMENT_BATCHES
    x_te, y_te = x_te[:2 * first], y_te[:2 * first]  # two segments of SEGMENT_BATCHES batches
    data = tmp_path / "digits.npz"
    np.savez(data, x=x_te, y=y_te)
    suite = tmp_path / "quick.yaml"
    suite.write_text(SUITE_YAML)
    out = tmp_path / "run"
    args = ("eval", "example:digits", "--data", f"npz:{data}", "--suite", suite, "--batch-size", batch,
            "--save-every", 0, "--quiet", "--out", out)

    import robench.evaluation.engine as engine

    real_run_segment = engine._run_segment
    calls = []

    def interrupted_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_segment(*a, **k)

    monkeypatch.setattr(engine, "_run_segment", interrupted_on_second)
    stopped = invoke(*args)
    assert stopped.exit_code == 130, stopped.stderr
    monkeypatch.setattr(engine, "_run_segment", real_run_segment)
    progress = (out / "progress.pt").read_bytes()

    # Same path, other content: labels of the first images shuffled.
    y_new = y_te.copy()
    y_new[:20] = y_new[:20][::-1]
    np.savez(data, x=x_te, y=y_new)
    refused = invoke(*args)
    assert refused.exit_code == 2, refused.stderr
    line = one_error_line(refused)
    assert f"the data changed since the interrupted run (its first {SEGMENT_BATCHES} batches differ)" in line
    assert "another --out" in line
    assert (out / "progress.pt").read_bytes() == progress, "the progress file must be left untouched"

    np.savez(data, x=x_te, y=y_te)  # the original content resumes normally
    resumed = invoke(*args, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["complete"] is True and doc["progress"]["evaluated"] == len(y_te)


# -- sanity checks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 16, 64, 127, 128, 540])
def test_batch_dependence_is_found_at_any_batch_size(trained_model, test_tensors, n):
    x, y = test_tensors[0][:n], test_tensors[1][:n]
    for model, expected in ((trained_model, False), (Centred(trained_model), True)):
        forward = RobustModel(model).eval()
        with torch.no_grad():
            logits = forward(x)
        report = first_batch_checks(forward, x, y, logits)
        assert report["batch_dependent_predictions"] is expected, (type(model).__name__, n)
        assert report["nondeterministic_outputs"] is False


def test_batch_dependence_flag_in_a_run_at_batch_16(trained_model, test_tensors):
    x, y = test_tensors
    doc = robench.evaluate(Centred(trained_model), (x[:48], y[:48]), FGSM, device="cpu", batch_size=16).doc
    assert doc["sanity"]["flag_names"][0] == "batch_dependence"
    assert len(doc["sanity"]["flag_names"]) == len(doc["sanity"]["flags"])


def test_nan_logits_are_only_the_nonfinite_flag(trained_model, test_tensors):
    x, y = test_tensors
    x = x.clone()
    x[:7, 0, 0, 0] = 1.0
    sanity = robench.evaluate(SometimesNaN(trained_model), (x, y), FGSM, device="cpu").doc["sanity"]
    assert sanity["nonfinite_logits"] == 7
    assert sanity["flag_names"] == ["nonfinite_logits"]
    assert not sanity["nondeterministic_outputs"] and not sanity["batch_dependent_predictions"]
    assert sanity["zero_gradient_fraction"] < 0.5


def test_a_torchscript_model_saved_in_train_mode_is_flagged(trained_model, test_tensors, tmp_path):
    scripted = torch.jit.script(copy.deepcopy(trained_model).train())
    path = tmp_path / "train_mode.pt"
    torch.jit.save(scripted, str(path))
    loaded = robench.models.load_model(str(path), trust_checkpoint=True)
    assert not loaded.model.training  # the loader hands over an eval-mode module
    sanity = robench.evaluate(loaded, test_tensors, FGSM, device="cpu").doc["sanity"]
    assert sanity["model_was_training"] is True and "train_mode" in sanity["flag_names"]
    eval_path = tmp_path / "eval_mode.pt"
    torch.jit.save(torch.jit.script(copy.deepcopy(trained_model).eval()), str(eval_path))
    plain = robench.evaluate(robench.models.load_model(str(eval_path), trust_checkpoint=True), test_tensors, FGSM,
                             device="cpu")
    assert plain.doc["sanity"]["flag_names"] == []


# -- models without an input gradient --------------------------------------------------------------------------

NO_GRADIENT_SUITE = {"name": "ng", "attacks": [
    {"attack": "fgsm", "eps": 0.1},
    {"attack": "pgd", "eps": 0.1, "steps": 3},
    {"attack": "ta.FGSM", "eps": 0.1},
    {"attack": "pixels", "pixels": [16], "trials": 2},
]}


@pytest.fixture(scope="module")
def plain_run(trained_model, test_tensors):
    x, y = test_tensors
    return robench.evaluate(trained_model, (x[:200], y[:200]), NO_GRADIENT_SUITE, device="cpu").doc


@pytest.mark.parametrize("wrapper", [OneHot, Detached, NoGrad])
def test_models_without_input_gradient_run_to_the_end(trained_model, test_tensors, plain_run, wrapper):
    x, y = test_tensors
    doc = robench.evaluate(wrapper(trained_model), (x[:200], y[:200]), NO_GRADIENT_SUITE, device="cpu").doc
    clean = doc["clean"]["accuracy"]
    assert doc["complete"] is True and clean == plain_run["clean"]["accuracy"]
    sanity = doc["sanity"]
    assert sanity["input_gradient"] is False and sanity["zero_gradient_fraction"] == 1.0
    assert "no_input_gradient" in sanity["flag_names"] and "zero_gradients" not in sanity["flag_names"]
    rows = {a["label"]: a for a in doc["attacks"]}
    assert rows["fgsm"]["input_gradient"] is False and rows["pgd"]["input_gradient"] is False
    assert rows["fgsm"]["accuracy"] == clean, "a zero gradient takes no step"
    assert rows["ta.FGSM"]["accuracy"] == clean and rows["ta.FGSM"]["input_gradient"] is None
    pixels = next(a for a in doc["attacks"] if a["attack"] == "pixels")
    assert pixels["input_gradient"] is None and pixels["accuracy"] < clean, "black-box attacks still fool it"
    # The plain model has gradients: the same entries say so and its FGSM does take a step.
    plain_rows = {a["label"]: a for a in plain_run["attacks"]}
    assert plain_rows["fgsm"]["input_gradient"] is True and plain_run["sanity"]["input_gradient"] is True
    assert plain_rows["fgsm"]["accuracy"] < clean


def test_eval_of_a_model_without_gradient_succeeds_with_the_flag(trained_model, digits_split, tmp_path):
    _, x_te, _, y_te = digits_split
    np.savez(tmp_path / "d.npz", x=x_te[:64], y=y_te[:64])
    (tmp_path / "s.yaml").write_text(SUITE_YAML)
    torch.save(Detached(trained_model), tmp_path / "detached.pt")
    result = invoke("eval", tmp_path / "detached.pt", "--trust-checkpoint", "--data", f"npz:{tmp_path / 'd.npz'}",
                    "--suite", tmp_path / "s.yaml", "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "robench: warning: the model's output does not depend on its input" in result.stderr


# -- the first-batch probe -------------------------------------------------------------------------------------

@pytest.fixture
def cli_files(tmp_path, digits_split):
    _, x_te, _, y_te = digits_split
    (tmp_path / "s.yaml").write_text(SUITE_YAML)
    np.savez(tmp_path / "gray.npz", x=x_te[:64], y=y_te[:64])
    return tmp_path


def eval_cli(files, model, data, *extra):
    return invoke("eval", model, "--data", f"npz:{data}", "--suite", files / "s.yaml", "--out", files / "run",
                  "--quiet", *extra)


def test_three_channel_data_for_a_one_channel_model(cli_files, digits_split):
    _, x_te, _, y_te = digits_split
    np.savez(cli_files / "rgb.npz", x=np.repeat(x_te[:64], 3, axis=3), y=y_te[:64])
    result = eval_cli(cli_files, "example:digits", cli_files / "rgb.npz")
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result)
    assert "takes 1 input channel(s) but the data has 3 (batch shape 64x3x8x8)" in line
    assert "grayscale" in line


def test_other_channel_counts_point_at_the_layout(trained_model, test_tensors):
    x, y = test_tensors
    two = x[:64].repeat(1, 2, 1, 1)
    with pytest.raises(UsageError, match=r"takes 1 input channel\(s\) but the data has 2 \(batch shape "
                                         r"64x2x8x8\): check the data's layout \(uint8 arrays are read as NHWC"):
        robench.evaluate(trained_model, (two, y[:64]), FGSM, device="cpu")


def test_the_first_layer_of_a_torchscript_model_is_found(trained_model, test_tensors):
    scripted = torch.jit.script(copy.deepcopy(trained_model))
    x3 = test_tensors[0][:4].repeat(1, 3, 1, 1)
    with pytest.raises(Exception) as raised:
        scripted(x3)
    error = explain_failure(scripted, x3, raised.value)
    assert isinstance(error, UsageError) and "takes 1 input channel(s) but the data has 3" in str(error)


@pytest.mark.parametrize("scripted", [False, True])
def test_a_model_that_raises_is_one_line(cli_files, scripted):
    path = cli_files / "boom.pt"
    if scripted:
        torch.jit.save(torch.jit.script(Boom()), str(path))
    else:
        torch.save(Boom(), path)
    result = eval_cli(cli_files, path, cli_files / "gray.npz", "--trust-checkpoint")
    assert result.exit_code == 3, result.stderr
    line = one_error_line(result)
    assert "the model failed on the first batch (shape 64x1x8x8)" in line and line.endswith("RuntimeError: boom")
    assert "Traceback" not in result.stderr and "TorchScript" not in result.stderr


def test_a_model_that_raises_through_the_api_is_a_run_error(test_tensors):
    with pytest.raises(RunError, match="first batch .*RuntimeError: boom"):
        robench.evaluate(Boom(), test_tensors, FGSM, device="cpu")


def test_a_single_logit_output_is_refused(cli_files):
    torch.save(OneLogit(), cli_files / "one.pt")
    result = eval_cli(cli_files, cli_files / "one.pt", cli_files / "gray.npz", "--trust-checkpoint")
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result)
    assert "the model returned shape (64, 1); robench needs one logit per class, shape (batch, classes)" in line
