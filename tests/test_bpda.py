"""BPDA (a suite entry's ``bpda:``, ``--bpda``) on the bundled digits CNN behind the input-transform defences of
``robench.defenses``: forward values untouched, gradients through the approximation, PGD back at the undefended
model's accuracy, the sanity flags, approximations from a plugin file, one-line errors, and the blocks of
docs/guide/bpda.md run as written through the installed ``robench`` script."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import robench
from cli_helpers import readme_block
from robench.defenses import JPEG, InputDefended, Quantize
from robench.errors import RunError, UsageError
from robench.evaluation.bpda import BpdaHooks
from robench.examples import example_data_path
from robench.suites import parse_suite
from robench.suites.schema import BpdaSpec

LIMIT = 300  # bundled test digits per in-process run
PGD = {"attack": "pgd", "eps": 0.1, "steps": 20, "step_size": "2.5*eps/steps", "random_start": True}
SUITE = {"name": "pgd-digits", "attacks": [PGD]}
GRADIENT_FLAGS = {"zero_gradients", "no_input_gradient"}
# How far BPDA's robust accuracy may lie above the undefended model's: the defences hide gradients and add (almost)
# no robustness. Measured on the first 300 digits: undefended 52.0%, JPEG 52.3% with BPDA (97.7% without); 4-bit
# rounding 43.0% with BPDA (96.7% without), below the undefended model, as rounding turns small perturbations into
# jumps of a whole level.
ABOVE_UNDEFENDED = 0.05
# Without BPDA the defences look this much more robust than the undefended model (they are not).
MASKED_GAIN = 0.3
# The numbers docs/guide/bpda.md quotes for its recipe (all 540 digits), with a point of room for another CPU.
RECIPE_ACCURACY = {"pgd": 0.9722, "pgd-bpda": 0.4185, "pgd-bpda-soft": 0.4167}
JPEG_RECIPE_LIMIT = "200"  # the recipe's JPEG run: the digits suite on 200 images instead of 540 (time)


def defended(kind: str, cnn: torch.nn.Module) -> InputDefended:
    return InputDefended(Quantize(bits=4) if kind == "quantize" else JPEG(quality=75), cnn).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two threads spinning beside the other test process on two cores cost many times the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return robench.load_model("example:digits").model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(example_data_path("digits")) as d:
        x, y = d["x"], d["y"]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y)


@pytest.fixture(scope="module")
def runs(cnn) -> dict[str, dict]:
    """PGD-20 at eps 0.1 on the undefended CNN and on each defended one, without and with BPDA."""
    def run(model, **options):
        return robench.evaluate(model, "example:digits", SUITE, device="cpu", limit=LIMIT, **options).doc

    docs = {"undefended": run(cnn)}
    for kind in ("quantize", "jpeg"):
        docs[kind] = run(defended(kind, cnn))
        docs[f"{kind}+bpda"] = run(defended(kind, cnn), bpda=["transform"])
    return docs


@pytest.mark.parametrize("kind", ["quantize", "jpeg"])
def test_hooks_keep_every_forward_value_and_pass_the_gradient(kind, cnn, digits):
    model = defended(kind, cnn)
    x, y = digits[0][:128].clone().requires_grad_(True), digits[1][:128]
    plain = model(x)
    (masked,) = torch.autograd.grad(F.cross_entropy(plain, y), x, allow_unused=True)
    # JPEG's output has no input gradient at all; rounding's is zero.
    assert masked is None if kind == "jpeg" else not masked.any()
    hooks = BpdaHooks("test", [BpdaSpec(module="transform")], model)
    with hooks.installed():
        hooked = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(hooked, y), x)
        with torch.no_grad():
            assert torch.equal(model(x), plain)
    assert torch.equal(hooked, plain)
    assert (grad != 0).float().mean() > 0.5
    # The gradient is the plain CNN's, taken at the transformed images: the identity stands in for the transform.
    inner = model.transform(x.detach()).requires_grad_(True)
    assert torch.allclose(grad, torch.autograd.grad(F.cross_entropy(cnn(inner), y), inner)[0])
    assert not model.transform._forward_hooks

    with pytest.raises(KeyboardInterrupt), hooks.installed():
        raise KeyboardInterrupt  # Ctrl-C in an attack: the hooks go all the same
    assert not model.transform._forward_hooks


def test_without_bpda_the_defences_look_robust_and_are_flagged(runs):
    undefended = runs["undefended"]["robust_accuracy"]
    assert not GRADIENT_FLAGS & set(runs["undefended"]["sanity"]["flag_names"])
    for kind, flag in (("quantize", "zero_gradients"), ("jpeg", "no_input_gradient")):
        doc = runs[kind]
        assert doc["robust_accuracy"] > undefended + MASKED_GAIN, (kind, doc["robust_accuracy"], undefended)
        names, flags = doc["sanity"]["flag_names"], doc["sanity"]["flags"]
        assert flag in names
        assert "--bpda NAME" in flags[names.index(flag)]  # the message says what to do
        assert "bpda" not in doc["attacks"][0]["params"] and "bpda" not in doc["sanity"]


def test_with_bpda_pgd_is_back_at_the_undefended_accuracy_and_not_flagged(runs):
    undefended = runs["undefended"]["robust_accuracy"]
    for kind in ("quantize", "jpeg"):
        doc = runs[f"{kind}+bpda"]
        assert doc["clean"] == runs[kind]["clean"]  # forward values are the model's own
        assert doc["robust_accuracy"] <= undefended + ABOVE_UNDEFENDED, (kind, doc["robust_accuracy"], undefended)
        assert doc["robust_accuracy"] < runs[kind]["robust_accuracy"] - MASKED_GAIN
        assert not GRADIENT_FLAGS & set(doc["sanity"]["flag_names"]), doc["sanity"]["flags"]
        [entry] = doc["attacks"]
        assert entry["params"]["bpda"] == ["transform"] and entry["input_gradient"] is True
        [probe] = doc["sanity"]["bpda"]
        assert probe["modules"] == ["transform"] and probe["input_gradient"] is True
        assert probe["zero_gradient_fraction"] == doc["sanity"]["zero_gradient_fraction"] < 0.5
        assert doc["suite"]["overrides"]["bpda"] == ["transform"]
    # JPEG changes the 8-bit digits a little; with BPDA it is no harder to fool than the CNN alone.
    assert abs(runs["jpeg+bpda"]["robust_accuracy"] - undefended) <= ABOVE_UNDEFENDED


def test_bpda_is_refused_where_it_cannot_work(cnn):
    def refused(model, suite=SUITE, **options) -> str:
        with pytest.raises(UsageError) as caught:
            robench.evaluate(model, "example:digits", suite, device="cpu", limit=8, **options)
        return str(caught.value)

    assert refused(cnn, bpda=["transform"]) == ("suite pgd-digits attacks[0] (pgd): bpda: the model has no module "
                                                "'transform'; its modules include 0, 1, 2, 3, 4, 5, 6, 7 (and 1 more)")
    quantized = defended("quantize", cnn)
    assert "did you mean 'transform'?" in refused(quantized, bpda="transfrom")
    assert "maps shape (2, 1, 8, 8) to (2, 16, 8, 8), so the identity cannot stand in" in refused(
        quantized, bpda=["model.0"])
    assert refused(quantized, bpda=["transform"], compile="on").startswith("--compile on: a compiled model")
    square = {"name": "square", "attacks": [{"attack": "square", "eps": 0.1, "bpda": ["transform"]}]}
    assert "bpda: square takes no gradients" in refused(quantized, square)
    square["attacks"][0].pop("bpda")
    assert "--bpda: suite square has no gradient attack" in refused(quantized, square, bpda="transform")
    assert "module 'transform' is named twice" in refused(quantized, bpda="transform,transform")


def test_an_approximation_that_fails_or_misfits_is_one_line(cnn, monkeypatch):
    """A user's approximation is called before any attack (the first batch's checks): its errors come first."""
    plugin = types.ModuleType("bpda_test_approximations")
    plugin.broken = lambda x: 1 / 0
    plugin.flat = lambda x: x.flatten(1)
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)

    def failure(function: str) -> Exception:
        entry = {**PGD, "bpda": [{"module": "transform", "approx": f"{plugin.__name__}:{function}"}]}
        with pytest.raises((RunError, UsageError)) as caught:
            robench.evaluate(defended("quantize", cnn), "example:digits", {"name": "approx", "attacks": [entry]},
                             device="cpu", limit=8)
        return caught.value

    broken = failure("broken")
    assert isinstance(broken, RunError) and str(broken) == (
        "suite approx attacks[0] (pgd): bpda: the approximation of 'transform' failed: ZeroDivisionError: division "
        "by zero")
    assert str(failure("flat")).endswith("the approximation of 'transform' returned (2, 64); the module returns "
                                         "shape (2, 1, 8, 8)")
    assert "has no function 'missing'" in str(failure("missing"))


def test_an_approximation_is_a_plugin_the_user_allows():
    suite = readme_block("pgd-bpda.yaml")
    line = suite.splitlines().index("        approx: soft_quantize.py:soft_quantize") + 1
    assert "soft_quantize" not in sys.modules
    with pytest.raises(UsageError) as caught:
        parse_suite(suite, "pgd-bpda.yaml")
    assert str(caught.value) == (f"pgd-bpda.yaml:{line} attacks[2].bpda[0].approx: importing soft_quantize runs its "
                                 "code; pass --plugin soft_quantize (or --trust-suite) to allow it")


# -- docs/guide/bpda.md, as a user runs it ------------------------------------------------------------------------

def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBENCH_DEBUG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def sh(command: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=folder, env=user_env(),
                          capture_output=True, text=True, timeout=600)


def written(run: subprocess.CompletedProcess, folder: Path) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    [where] = re.findall(r"^results written to (.+)$", run.stderr, re.MULTILINE)
    return json.loads((folder / where / "results.json").read_text())


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A fresh folder holding the page's three files, after its `python defended.py`."""
    folder = tmp_path_factory.mktemp("bpda-recipe")
    for name in ("defended.py", "pgd-bpda.yaml", "soft_quantize.py"):
        (folder / name).write_text(readme_block(name))
    return folder


def test_recipe_runs_as_written(recipe):
    # The folder holds the page's files as written.
    assert (recipe / "defended.py").read_text() == readme_block("defended.py")
    assert (recipe / "pgd-bpda.yaml").read_text() == readme_block("pgd-bpda.yaml")
    assert (recipe / "soft_quantize.py").read_text() == readme_block("soft_quantize.py")
    make, quantized, jpeg = re.sub(r"\\\n\s*", "", readme_block("bpda-recipe")).splitlines()
    assert make == "python defended.py" and sh(make, recipe).returncode == 0
    assert (recipe / "digits-defended.pt").is_file()

    doc = written(sh(quantized, recipe), recipe)
    accuracy = {entry["label"]: entry["accuracy"] for entry in doc["attacks"]}
    assert accuracy == pytest.approx(RECIPE_ACCURACY, abs=0.01)
    assert doc["clean"]["accuracy"] == pytest.approx(0.9815, abs=0.005)
    params = [entry["params"].get("bpda") for entry in doc["attacks"]]
    assert params == [None, ["transform"], [{"module": "transform", "approx": "soft_quantize.py:soft_quantize"}]]
    assert [entry["input_gradient"] for entry in doc["attacks"]] == [True, True, True]
    # One entry attacks through the rounding: its gradients are still masked, and the run says so.
    assert "zero_gradients" in doc["sanity"]["flag_names"]
    assert [probe["modules"] for probe in doc["sanity"]["bpda"]] == params[1:]
    assert all(probe["zero_gradient_fraction"] < 0.5 for probe in doc["sanity"]["bpda"])

    assert jpeg.endswith("--bpda transform")
    doc = written(sh(f"{jpeg} --limit {JPEG_RECIPE_LIMIT}", recipe), recipe)
    assert doc["suite"]["overrides"]["bpda"] == ["transform"] and len(doc["attacks"]) == 9
    assert all(entry["params"]["bpda"] == ["transform"] for entry in doc["attacks"])
    assert not GRADIENT_FLAGS & set(doc["sanity"]["flag_names"]) and doc["sanity"]["input_gradient"] is True
    assert doc["robust_accuracy"] < 0.05  # PGD at eps 0.2 breaks nearly every digit, as on the undefended CNN


def test_unknown_module_is_one_line_naming_the_entry(recipe):
    if not (recipe / "digits-defended.pt").is_file():
        sh("python defended.py", recipe)
    typo = (recipe / "pgd-bpda.yaml").read_text().replace("bpda: [transform]", "bpda: [transfrom]")
    (recipe / "typo.yaml").write_text(typo)
    run = sh("robench eval digits-defended.pt --arch defended:quantized --data example:digits --suite typo.yaml "
             "--plugin soft_quantize", recipe)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [readme_block("bpda-error").strip()]


def test_api_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_block("bpda-api"), "bpda-api", "exec"), {})
    accuracies, names = printed.getvalue().splitlines()
    clean, robust = map(float, accuracies.split())
    assert clean > 0.9 and robust < 0.1
    assert names == "['transform']"
