"""Certified accuracy by randomized smoothing (``robench certify``): CERTIFY's radius against the exact radius
of a linear model, answers that depend neither on the batch size nor on an interruption, the command line,
and the certified accuracy of the bundled digits CNN as compare and gate read it."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import robench
from robench.errors import UsageError
from robench.evaluation import certification
from robench.evaluation.binomial import lower_confidence_bound, normal_quantile, two_sided_half_test, \
    upper_confidence_bound
from robench.evaluation.certification import CertifyWork, run_certification
from robench.evaluation.smoothing import ABSTAIN, Smoothing, noisy_copies
from robench.examples import example_data_path
from robench.models.config import ModelConfig
from robench.models.wrapper import RobustModel
from robench.results.schema import validate_document
from robench.tasks.classification import as_dataset
from robench.data.sources import DataOptions
from tests.cli_helpers import invoke, one_error_line, without

# The run's facts, not its answers: what two runs of the same certification may differ in.
TIMINGS = {"seconds", "finished_at", "batch_size"}
# The bundled digits CNN at sigma 0.5 (where it abstains now and then), small enough for a test.
DIGITS = ("example:digits", "--sigma", "0.5", "--n0", "50", "--n", "1000", "--limit", "60", "--batch-size", "500")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The digits CNN on a busy 2-core machine: one thread is faster than two fighting for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the statistics ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, trials", [(0, 10), (10, 10), (1, 1), (7, 20), (5000, 10000), (99_731, 100_000),
                                               (100_000, 100_000), (1, 100_000), (523_114, 1_000_000)])
def test_the_bounds_and_the_test_are_scipys(successes: int, trials: int) -> None:
    from scipy.stats import beta, binomtest

    for alpha in (0.001, 0.05):
        expected = beta.ppf(alpha, successes, trials - successes + 1) if successes else 0.0
        assert lower_confidence_bound(successes, trials, alpha) == pytest.approx(expected, abs=1e-11)
        upper = beta.ppf(1 - alpha, successes + 1, trials - successes) if successes < trials else 1.0
        assert upper_confidence_bound(successes, trials, alpha) == pytest.approx(upper, abs=1e-11)
    assert two_sided_half_test(successes, trials) == pytest.approx(binomtest(successes, trials, 0.5).pvalue, abs=1e-11)


def test_the_noise_is_keyed_by_sample_and_copy_and_not_clamped() -> None:
    smoothing = Smoothing(0.5, seed=3)
    x = torch.full((1, 8, 8), 0.5)
    together = noisy_copies(x, 7, 0, 300, smoothing)
    assert torch.equal(together[120:180], noisy_copies(x, 7, 120, 60, smoothing))  # a copy is a copy in any batch
    assert not torch.equal(together[:60], noisy_copies(x, 8, 0, 60, smoothing))  # another sample, other draws
    noise = (together - x).flatten()
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05) and float(noise.mean()) == pytest.approx(0, abs=0.02)
    assert float(together.min()) < 0 and float(together.max()) > 1


# -- CERTIFY against the exact answer ----------------------------------------------------------------------------

class TwoClassLinear(nn.Module):
    """f(x) = argmax(Wx + b) with class 0's row zero: class 1 wins exactly where w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([torch.zeros_like(w), w]))
        self.bias = nn.Parameter(torch.tensor([0.0, b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def test_certify_bounds_a_linear_models_exact_radius_from_below() -> None:
    """The smoothed linear classifier's pA at distance R from the boundary is Phi(R / sigma), so its exact
    radius is R. CERTIFY's radius lies below it (with probability 1 - alpha), and above it by no more than
    the Clopper–Pearson interval of the observed count allows: the exact pA lies below the interval's upper
    end (again with probability 1 - alpha), so R <= sigma Phi^-1(upper)."""
    sigma, n, alpha = 0.25, 100_000, 0.001
    w = torch.tensor([1.0, -2.0, 0.5, 1.5])
    unit = w / w.norm()
    centre = torch.full((4,), 0.5)
    model = TwoClassLinear(w, -float(w @ centre))  # the boundary passes through the centre
    distances = [0.3, 0.15, 0.0005, -0.2]  # signed: the last point lies on class 0's side
    x = torch.stack([centre + d * unit for d in distances]).view(-1, 1, 2, 2)
    labels = torch.ones(len(distances), dtype=torch.long)
    result = robench.evaluate(model, (x, labels), task="certify", sigma=sigma, n=n, alpha=alpha, batch_size=20_000,
                              device="cpu")
    validate_document(result.doc)
    rows = result.samples.to_dict("records")
    for row, distance in zip(rows, distances):
        exact = abs(distance)
        if distance == 0.0005:  # pA = 0.5016: even the expected count's lower bound stays below 1/2
            assert lower_confidence_bound(round(n * normal_cdf(exact / sigma)), n, alpha) < 0.5
            assert row["certified_class"] == ABSTAIN and math.isnan(row["radius"]) and not row["correct"]
            continue
        k = row["selected_count"]
        assert row["p_lower"] == lower_confidence_bound(k, n, alpha)
        width = sigma * (normal_quantile(upper_confidence_bound(k, n, alpha)) -
                         normal_quantile(lower_confidence_bound(k, n, alpha)))
        assert row["certified_class"] == (1 if distance > 0 else 0)
        assert row["radius"] <= exact <= row["radius"] + width, (distance, row["radius"], width)
        assert width < 0.1 * exact  # large n: the interval is narrow, and the certificate close to exact
    assert result.doc["certify"] == {**result.doc["certify"], "correct": 2, "abstained": 1, "wrong": 1}
    assert [r["correct"] for r in result.doc["certified_accuracy"]] == [2, 1, 0, 0, 0]  # radii 0.3 and 0.15


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# -- the same answers however the work is cut ----------------------------------------------------------------------

def digits_model() -> RobustModel:
    return RobustModel(ModelConfig(source="example:digits").load().model)


def test_answers_do_not_depend_on_the_batch_size_nor_on_the_work_queue() -> None:
    dataset = as_dataset("example:digits", DataOptions(limit=12))
    smoothing = Smoothing(0.5, n0=20, n=300, seed=5)
    answers = [run_certification(digits_model(), dataset, smoothing, batch_size=size, device=torch.device("cpu"))
               for size in (64, 1000)]
    # One process resuming a torchrun job computes the job's units in turn: the queue's own path.
    queued = CertifyWork(digits_model(), dataset, smoothing, 97, torch.device("cpu")).run()
    assert queued is not None
    for other in (answers[1], queued):
        assert pd.DataFrame(other.columns).equals(pd.DataFrame(answers[0].columns))  # NaN radii equal too
        assert other.fingerprint == answers[0].fingerprint
    from robench.evaluation.engine import dataset_fingerprint

    assert answers[0].fingerprint == dataset_fingerprint(dataset, 5)  # robench eval's, on the same data


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The bundled CNN certified through the command line: the reference every other run must equal."""
    folder = tmp_path_factory.mktemp("certify")
    run = invoke("certify", *DIGITS, "--out", folder / "run", "--json")
    assert run.exit_code == 0, run.stderr
    return folder / "run", json.loads(run.stdout)


def interrupt_at(monkeypatch, calls: int) -> None:
    """Ctrl-C while sample number ``calls`` is being answered (its copies are counted; it is not kept)."""
    seen = []
    answer = certification.answer_from_counts

    def interrupting(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return answer(*args, **kwargs)

    monkeypatch.setattr(certification, "answer_from_counts", interrupting)


def test_an_interrupted_run_resumes_to_the_uninterrupted_answers(digits_run, tmp_path, monkeypatch) -> None:
    reference, _ = digits_run
    x, y = np.load(example_data_path("digits"))["x"], np.load(example_data_path("digits"))["y"]
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    command = [*DIGITS, "--data", f"npz:{tmp_path / 'digits.npz'}", "--out", tmp_path / "run"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 25)
        stopped = invoke("certify", *command)
    assert stopped.exit_code == 130
    assert "interrupted after 24 of 60 samples" in one_error_line(stopped, "interrupted")
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["complete"] is False and partial["progress"]["evaluated"] == 24
    shutil.copytree(tmp_path / "run", tmp_path / "changed")

    resumed = invoke("certify", *command)
    assert resumed.exit_code == 0, resumed.stderr
    assert not (tmp_path / "run" / "progress.pt").exists()
    assert (tmp_path / "run" / "samples.csv").read_bytes() == (reference / "samples.csv").read_bytes()
    whole, again = (json.loads((run / "results.json").read_text()) for run in (reference, tmp_path / "run"))
    assert without(again, TIMINGS | {"data"}) == without(whole, TIMINGS | {"data"})
    assert again["data"]["fingerprint"] == whole["data"]["fingerprint"]  # npz of the same digits: the same data

    np.savez(tmp_path / "digits.npz", x=x[::-1].copy(), y=y[::-1].copy())  # the same name, other data
    refused = invoke("certify", *DIGITS, "--data", f"npz:{tmp_path / 'digits.npz'}", "--out", tmp_path / "changed")
    assert refused.exit_code == 2 and "the data changed" in one_error_line(refused)


# -- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ((), "--sigma is required"),
    (("--sigma", "-0.5"), "--sigma must be > 0"),
    (("--sigma", "abc"), "--sigma takes a number"),
    (("--sigma", "0.25", "--n", "0"), "--n must be an integer from 1"),
    (("--sigma", "0.25", "--alpha", "0.5"), "--alpha must be in (0, 0.5)"),
    (("--sigma", "0.25", "--radii", "0,-1"), "--radii takes comma-separated numbers >= 0"),
    (("--sigma", "0.25", "--batch-size", "0"), "--batch-size must be an integer from 1"),
])
def test_bad_options_are_one_line_and_exit_2(options, message, tmp_path) -> None:
    run = invoke("certify", "example:digits", *options, "--out", tmp_path / "run")
    assert run.exit_code == 2 and message in one_error_line(run)
    assert not (tmp_path / "run").exists(), "refused before any work"


def test_the_python_api_refuses_a_suite_and_a_missing_sigma() -> None:
    with pytest.raises(UsageError, match="takes no suite"):
        robench.evaluate("example:digits", None, "pgd-linf", task="certify", sigma=0.25)
    with pytest.raises(UsageError, match="--sigma is required"):
        robench.evaluate("example:digits", None, task="certify")


# -- the bundled digits CNN ----------------------------------------------------------------------------------------

def test_certified_accuracy_of_the_digits_cnn(digits_run) -> None:
    folder, doc = digits_run
    validate_document(doc)
    assert doc == json.loads((folder / "results.json").read_text())
    certified = [row["accuracy"] for row in doc["certified_accuracy"]]
    assert [row["radius"] for row in doc["certified_accuracy"]] == [0, 0.25, 0.5, 0.75, 1.0]
    assert certified == sorted(certified, reverse=True), "non-increasing in the radius"
    assert certified[0] <= doc["smoothed"]["accuracy"] <= doc["clean"]["accuracy"] + 0.05
    assert doc["certify"]["abstained"] > 0, "sigma 0.5 is a lot of noise for this model: some abstentions"
    samples = pd.read_csv(folder / "samples.csv")
    answered_correctly = (samples.certified_class != ABSTAIN) & (samples.certified_class == samples.label)
    assert doc["certified_accuracy"][0]["correct"] == answered_correctly.sum() == samples.correct.sum()
    assert certified[0] == answered_correctly.sum() / len(samples)
    assert samples.radius.isna().sum() == doc["certify"]["abstained"]
    assert (samples.smoothed_prediction == samples.label).mean() == doc["smoothed"]["accuracy"]


def test_compare_gate_plot_and_report_read_certifications(digits_run, tmp_path) -> None:
    folder, _ = digits_run
    compared = invoke("compare", folder, "--format", "markdown")
    assert compared.exit_code == 0, compared.stderr
    assert "| certified r = 0.25 |" in compared.stdout and "| smoothed, clean |" in compared.stdout
    gated = invoke("gate", folder, "--baseline", folder, "--json")
    assert gated.exit_code == 0, gated.stderr
    verdicts = json.loads(gated.stdout)
    assert verdicts["metrics"] == ["accuracy", "certified_accuracy"] and verdicts["passed"]
    plotted = invoke("plot", folder, "--metric", "certified_accuracy", "--out", tmp_path / "curve.png")
    assert plotted.exit_code == 0 and (tmp_path / "curve.png").stat().st_size > 0, plotted.stderr
    reported = invoke("report", folder, "--out", tmp_path / "report.html")
    assert reported.exit_code == 0 and "certified r = 0.25" in (tmp_path / "report.html").read_text()
    other = invoke("certify", *DIGITS[:-2], "--radii", "0,0.25", "--sigma", "0.25", "--out", tmp_path / "other", "-q")
    assert other.exit_code == 0, other.stderr
    not_comparable = invoke("gate", tmp_path / "other", "--baseline", folder)
    assert not_comparable.exit_code == 3 and "sigma differs (0.5 vs 0.25)" in not_comparable.stderr


# -- the recipe ----------------------------------------------------------------------------------------------------

def test_the_gaussian_recipe_adds_unclamped_noise_at_its_sigma() -> None:
    from robench.defenses.noise import GaussianNoiseAugment
    from robench.training.recipe import load_recipe

    [spec] = load_recipe("digits-gaussian").recipe.defenses
    assert (spec.kind, spec.sigma, spec.p) == ("gaussian-noise", 0.25, 1.0)
    augment = GaussianNoiseAugment(spec.sigma)
    x = torch.full((256, 1, 8, 8), 0.5)
    ids = torch.arange(256)
    noisy = augment(x, ids, key=11)
    assert float((noisy - x).std()) == pytest.approx(0.25, rel=0.05)
    assert float(noisy.min()) < 0 and float(noisy.max()) > 1
    assert torch.equal(augment(x[100:], ids[100:], key=11), noisy[100:])  # keyed by sample, not by batch


# -- the docs page -------------------------------------------------------------------------------------------------

def test_docs_examples_run_as_written(tmp_path) -> None:
    from tests.cli_helpers import readme_block
    from tests.test_readme import run_bash_block, run_python_block

    assert readme_block("certify-command").startswith("robench certify example:digits --sigma 0.25")
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    [ran] = run_bash_block("certify-command", tmp_path / "cli")
    assert ran.returncode == 0, ran.stderr
    [run_dir] = list((tmp_path / "cli" / "runs").glob("certify/*/*"))
    doc = json.loads((run_dir / "results.json").read_text())
    assert "certified, L2 radius 0.25" in ran.stdout
    assert 'task="certify"' in readme_block("certify-api")
    printed = run_python_block("certify-api", tmp_path / "api").ok().stdout.splitlines()
    assert printed[-1] == str([(row["radius"], row["accuracy"]) for row in doc["certified_accuracy"]])


def test_training_block_runs(tmp_path) -> None:
    from tests.cli_helpers import readme_block
    from tests.test_readme import bash_commands, sh

    train, certify = bash_commands(readme_block("certify-train"))
    assert train == "robench train digits-gaussian" and certify.endswith("--sigma 0.25 --n 10000")
    sh(f"{train} --epochs 2", tmp_path).ok()
    ran = sh(certify.replace("--n 10000", "--n 200 --limit 40"), tmp_path).ok()
    doc = json.loads((ran.written(tmp_path) / "results.json").read_text())
    assert doc["model"]["name"] == "digits-gaussian" and doc["progress"] == {"evaluated": 40, "total": 40,
                                                                              "unit": "samples"}


def test_the_plot_reads_certified_accuracy_against_a_radius() -> None:
    from robench.reporting.plots import _x_label

    assert _x_label("eps", "certified_accuracy") == "L2 radius ([0,1] pixel units)"
    assert _x_label("eps", "accuracy") == "eps ([0,1] pixel units)"
    assert _x_label("pixels", "misclassified") == "changed pixels"
