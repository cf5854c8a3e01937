"""``--save-adversarial``: 8-bit adversarial examples per entry that stay in their threat model,
predictions a reader can reproduce, float examples that reproduce the run's verdicts, the 8-bit
counts in results.json and a warning when rounding undoes successes, resume safety, and no change
to the results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robench
import robench.models
from robench.api import EvaluationInterrupted
from robench.config import EvalConfig
from robench.errors import UsageError
from robench.evaluation.engine import SEGMENT_BATCHES
from robench.results.adversarial_grid import MAX_ROWS, grid_size
from robench.evaluation.kept_examples import quantize_adversarial
from robench.results.adversarial import read_examples
from robench.results.reading import validate_document
from robench.tasks.run import eval_task
from cli_helpers import RowByRow, evaluate_with_state, invoke, one_error_line, saved_and_loaded, stop_after

BOUNDS_SUITE = {"name": "bounds", "attacks": [
    {"attack": "fgsm", "eps": [8 / 255, 0.1]},
    {"attack": "pgd", "eps": 8 / 255, "steps": 10, "step_size": 2 / 255},
    {"attack": "pgd", "norm": "l2", "eps": 1.0, "steps": 10, "step_size": 0.25, "label": "pgd-l2"},
]}
EPS = {"fgsm@0.03137254901960784": 8 / 255, "fgsm@0.1": 0.1, "pgd@0.03137254901960784": 8 / 255, "pgd-l2@1.0": 1.0}


def predict(model, images_nhwc: np.ndarray) -> np.ndarray:
    """The model's classes for saved uint8 NHWC images, read as a user would read them."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return model(x).argmax(dim=1).numpy()


@pytest.fixture(scope="module")
def saved_all(trained_model, test_tensors):
    result = robench.evaluate(trained_model, test_tensors, BOUNDS_SUITE, device="cpu", save_adversarial="all")
    return result, {ex.entry: ex for ex in result.adversarial}


def test_saved_examples_stay_within_eps_after_8bit_rounding(saved_all, digits_split):
    _, by_entry = saved_all
    _, x_te, _, y_te = digits_split
    assert set(by_entry) == set(EPS)
    for entry, ex in by_entry.items():
        eps = EPS[entry]
        assert ex.eps == pytest.approx(eps) and ex.clean.dtype == ex.adversarial.dtype == np.uint8
        # The digits are stored as 8-bit images: the saved clean image is the data itself.
        assert np.array_equal(ex.clean, x_te[ex.index]) and np.array_equal(ex.label, y_te[ex.index])
        delta = ex.adversarial.astype(np.int64) - ex.clean.astype(np.int64)
        if ex.norm == "linf":
            assert np.abs(delta).max() <= eps * 255 + 1e-9, entry
        else:
            l2 = np.sqrt(((delta / 255.0) ** 2).reshape(len(delta), -1).sum(axis=1))
            assert l2.max() <= eps, entry
        assert np.abs(delta).max() > 0, entry  # something was attacked
        # Samples the entry did not attack (misclassified before) are saved unchanged.
        assert np.array_equal(ex.adversarial[~ex.attacked], ex.clean[~ex.attacked])


def test_predictions_are_those_of_the_saved_images(saved_all, trained_model):
    _, by_entry = saved_all
    for ex in by_entry.values():
        assert np.array_equal(ex.clean_pred, predict(trained_model, ex.clean))
        assert np.array_equal(ex.adv_pred, predict(trained_model, ex.adversarial))
        assert np.array_equal(ex.fooled, ex.adv_pred != ex.label)
        assert not ex.fooled[ex.attacked & (ex.adversarial == ex.clean).reshape(len(ex.clean), -1).all(1)].any()


def test_fooled_counts_match_the_results_up_to_rounding(saved_all):
    result, _ = saved_all
    for a, ex in zip(result.doc["attacks"], result.adversarial):  # both in entry order
        assert ex.entry.startswith(a["label"] + "@")
        assert len(ex.index) == a["n"] == 540 and int(ex.attacked.sum()) == a["attacked"]
        run_fooled = round(a["success_rate"] * a["attacked"])
        assert int(ex.run_fooled.sum()) == run_fooled
        saved_fooled = int((ex.fooled & ex.attacked).sum())
        lost = int((ex.run_fooled & ~ex.fooled).sum())  # fooling that did not survive 8-bit rounding
        gained = int((ex.fooled & ex.attacked & ~ex.run_fooled).sum())
        assert saved_fooled == run_fooled - lost + gained
        print(f"{ex.entry}: run fooled {run_fooled}, saved fooled {saved_fooled} (lost {lost}, gained {gained})")
        # Rounding toward zero weakens an example only by what does not fit a whole step.
        assert lost <= 0.25 * run_fooled


def test_float32_noise_does_not_cost_a_whole_step():
    x = torch.arange(240, dtype=torch.float32).div(255).reshape(1, 1, 16, 15)  # every 8-bit level up to 239
    x_adv = x + torch.tensor(8 / 255, dtype=torch.float32)  # what an L-inf attack at 8/255 computes
    steps = (x_adv.double() - x.double()) * 255
    assert (steps < 8).sum() > 100  # in float32 most of these are a hair under 8 steps
    assert torch.equal(quantize_adversarial(x, x_adv).long() - torch.arange(240).reshape(1, 1, 16, 15),
                       torch.full((1, 1, 16, 15), 8))
    # Anything short of a whole step by more than float noise is rounded toward zero.
    short = quantize_adversarial(x, x - 2.5 / 255).flatten()
    assert torch.equal(short[3:], torch.arange(1, 238, dtype=torch.uint8)) and short[:3].tolist() == [0, 0, 0]


def test_count_limits_the_saved_samples_and_results_do_not_change(tmp_path, test_tensors):
    common = ["example:digits", "--suite", "fgsm", "--limit", "120", "--quiet", "--device", "cpu"]
    on = invoke("eval", *common, "--out", tmp_path / "on", "--save-adversarial", "5")
    off = invoke("eval", *common, "--out", tmp_path / "off")
    assert on.exit_code == 0 and off.exit_code == 0, on.stderr + off.stderr
    assert not (tmp_path / "off" / "adversarial").exists()
    assert (tmp_path / "on" / "samples.csv").read_text() == (tmp_path / "off" / "samples.csv").read_text()
    docs = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("on", "off")]
    assert all("saved_examples" not in a for a in docs[1]["attacks"])  # only runs that save examples get it
    for a in docs[0]["attacks"]:
        assert a.pop("saved_examples")["n"] == 5
    assert stable(docs[0]) == stable(docs[1])
    assert (tmp_path / "on" / "results.csv").read_text() == (tmp_path / "off" / "results.csv").read_text()
    files = sorted((tmp_path / "on" / "adversarial").iterdir())
    assert [f.name for f in files] == [f"fgsm_{k}_255.{ext}" for k in (2, 4, 8) for ext in ("npz", "png")]
    first_five = np.loadtxt(tmp_path / "on" / "samples.csv", delimiter=",", skiprows=1, usecols=0)[:5]
    for npz in files[::2]:
        ex = read_examples(npz)
        assert ex.entry == f"fgsm@{npz.stem.split('_')[1]}/255" and len(ex.index) == 5
        assert np.array_equal(ex.index, first_five)  # the first samples of the evaluated set, in order
        with Image.open(npz.with_suffix(".png")) as png:
            assert png.format == "PNG" and png.size == grid_size(5)
            assert np.asarray(png.convert("L")).std() > 10  # images were drawn, not a blank page


def stable(doc: dict) -> dict:
    volatile = {"seconds", "finished_at", "peak_memory_bytes", "speed", "source"}
    if isinstance(doc, dict):
        return {k: stable(v) for k, v in doc.items() if k not in volatile}
    if isinstance(doc, list):
        return [stable(v) for v in doc]
    return doc


def test_an_interrupted_then_resumed_run_saves_the_same_examples(trained_model, test_tensors, tmp_path):
    suite = {"name": "resume", "attacks": [{"attack": "pgd", "eps": [0.05, 0.1], "steps": 3}]}
    batch, count = 8, 300  # segments of 256 samples: the kept samples span the interruption
    options = dict(device="cpu", batch_size=batch, save_adversarial=count, sweep_reuse=True)
    plain = robench.evaluate(trained_model, test_tensors, suite, **options)
    snapshots = []
    with pytest.raises(EvaluationInterrupted) as info:
        evaluate_with_state(trained_model, test_tensors, suite, on_batch=stop_after(1), save_state=snapshots.append,
                         save_every=0, **options)
    partial = info.value.result
    assert [len(ex.index) for ex in partial.adversarial] == [batch * SEGMENT_BATCHES] * 2
    resumed = evaluate_with_state(trained_model, test_tensors, suite, resume_state=saved_and_loaded(snapshots[-1]),
                               **options)
    plain.save(tmp_path / "plain")
    resumed.save(tmp_path / "resumed")
    names = sorted(p.name for p in (tmp_path / "plain" / "adversarial").glob("*.npz"))
    assert names == ["pgd_0.05.npz", "pgd_0.1.npz"]
    for name in names:
        a, b = (np.load(tmp_path / run / "adversarial" / name) for run in ("plain", "resumed"))
        assert a.files == b.files and len(a["index"]) == count
        for key in a.files:
            assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), (name, key)
    # Sweep reuse: a sample fooled at 0.05 keeps that example at 0.1.
    small, large = (read_examples(tmp_path / "plain" / "adversarial" / n) for n in names)
    reused = small.run_fooled
    assert reused.any() and np.array_equal(large.adversarial[reused], small.adversarial[reused])


def test_pixel_index_saves_the_first_trial_changes(tmp_path, digits_split):
    _, x_te, _, y_te = digits_split
    folder = tmp_path / "digits"
    for i, (img, label) in enumerate(zip(x_te[:60], y_te[:60])):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(folder / str(label) / f"{i:03d}.png")
    result = invoke("pixel-index", "example:digits", folder, "--pixels", "2,8", "--delta", "60", "--trials", "3",
                    "--quiet", "--json", "--out", tmp_path / "run", "--save-adversarial", "all")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    model = robench.models.load_model("example:digits").model.eval()
    saved = sorted((tmp_path / "run" / "adversarial").glob("*.npz"))
    assert [p.stem for p in saved] == ["delta__60_2px", "delta__60_8px", "range_0-255_2px", "range_0-255_8px"]
    rows = {(e["setting"], r["pixels"]): r for e in doc["experiments"] for r in e["results"]}
    for path in saved:
        ex = read_examples(path)
        n = int(ex.extra["pixels"])
        changed = (ex.adversarial != ex.clean).any(axis=-1).reshape(len(ex.clean), -1).sum(axis=1)
        assert changed.max() <= n and changed[ex.attacked].mean() > n / 2  # at most n pixels, most of them moved
        assert not changed[~ex.attacked].any()
        assert np.array_equal(ex.adv_pred, predict(model, ex.adversarial))
        # The saved images are exactly the first trial's: their mistakes are its count.
        assert int(ex.fooled[ex.attacked].sum()) == rows[(str(ex.extra["setting"]), n)]["misclassified_trials"][0]
        assert int(ex.attacked.sum()) == doc["images"]["evaluated"] and len(ex.index) == 60
        with Image.open(path.with_suffix(".png")) as png:
            assert png.size == grid_size(MAX_ROWS)


@pytest.mark.parametrize("value", ["-1", "abc", "2.5"])
def test_bad_counts_are_one_line_usage_errors(value, tmp_path):
    for command in (["eval", "example:digits", "--suite", "fgsm"], ["pixel-index", "example:digits", tmp_path]):
        result = invoke(*command, "--save-adversarial", value, "--out", tmp_path / "never")
        assert result.exit_code == 2
        assert "--save-adversarial" in one_error_line(result)
    assert not (tmp_path / "never").exists()
    with pytest.raises(UsageError, match="save-adversarial"):
        EvalConfig.of(model="example:digits", save_adversarial=int(value) if value == "-1" else value)


def test_refused_where_examples_cannot_be_gathered(monkeypatch, tmp_path):
    reid = invoke("eval", "example:reid-digits", "--suite", "reid-pgd", "--save-adversarial", "3",
                  "--out", tmp_path / "reid")
    assert reid.exit_code == 2 and "re-identification" in one_error_line(reid)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="torchrun"):
        eval_task(EvalConfig.of(model="example:digits", suite="fgsm", save_adversarial=3, out=tmp_path / "ddp"))
    assert not Path(tmp_path / "ddp").exists()


@pytest.mark.parametrize("where", ["last", "before-option"])
def test_the_bare_flag_saves_every_sample(tmp_path, where):
    out = tmp_path / "run"
    tail = ["--save-adversarial"] if where == "last" else ["--save-adversarial", "-q"]
    args = ["eval", "example:digits", "--suite", "fgsm", "--limit", 12, "-o", out, *tail]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    saved = sorted((out / "adversarial").glob("*.npz"))
    assert len(saved) == 3  # fgsm at three eps
    for path in saved:
        with np.load(path) as z:
            assert len(z["index"]) == 12


# -- float examples: what the run scored, reproduced by the model -----------------------------------------------
FLOAT_SUITE = {"name": "float", "attacks": [
    {"attack": "pgd", "eps": [0.05, 0.1], "steps": 10, "step_size": 0.025},
    {"attack": "pgd", "norm": "l2", "eps": 1.0, "steps": 10, "step_size": 0.25, "label": "pgd-l2"},
    {"attack": "fgsm", "eps": 0.1},
]}


@pytest.fixture(scope="module")
def float_run(trained_model, test_tensors, tmp_path_factory):
    """A run on a model whose rows do not depend on their batch, every sample saved, written and read back.

    Batches of 16 with refill: the attacks score examples in pools whose make-up no re-classification repeats.
    """
    model = RowByRow(trained_model).eval()
    result = robench.evaluate(model, test_tensors, FLOAT_SUITE, device="cpu", limit=64, batch_size=16,
                              sweep_reuse=True, save_adversarial="all")
    out = result.save(tmp_path_factory.mktemp("float") / "run")
    examples = [read_examples(out / a["saved_examples"]["file"]) for a in result.doc["attacks"]]
    return model, result, examples


def test_float_examples_reproduce_the_run_verdicts_and_accuracy(float_run):
    model, result, examples = float_run
    assert len(examples) == len(result.doc["attacks"]) == 4
    for a, ex in zip(result.doc["attacks"], examples):
        assert ex.adversarial_float.dtype == ex.clean_float.dtype == np.float32
        assert ex.adversarial_float.shape == ex.clean_float.shape == (64, 8, 8, 1)  # NHWC, as the 8-bit images
        with torch.no_grad():  # all 64 at once: batches the run never formed
            pred = model(torch.from_numpy(ex.adversarial_float).permute(0, 3, 1, 2)).argmax(dim=1).numpy()
        fooled = (pred != ex.label) & ex.attacked
        assert np.array_equal(fooled, ex.run_fooled), ex.entry
        assert int(fooled.sum()) == round(a["success_rate"] * a["attacked"]) > 0
        # Every sample is kept: the robust ones among them give the reported accuracy exactly.
        assert (ex.attacked & ~fooled).sum() / len(ex.index) == a["accuracy"]
        # The clean images are the data as the run read it, and the model's verdicts on them.
        clean = torch.from_numpy(ex.clean_float).permute(0, 3, 1, 2)
        with torch.no_grad():
            assert np.array_equal(model(clean).argmax(dim=1).numpy() == ex.label, ex.attacked)


def test_float_examples_lie_in_the_eps_ball_of_the_clean_ones(float_run, digits_split):
    _, _, examples = float_run
    _, x_te, _, _ = digits_split
    for ex in examples:
        assert np.array_equal(ex.clean_float, x_te[ex.index].astype(np.float32) / np.float32(255.0))
        adv, clean = ex.adversarial_float.astype(np.float64), ex.clean_float.astype(np.float64)
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        delta = (adv - clean).reshape(len(adv), -1)
        size = np.abs(delta).max(axis=1) if ex.norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= ex.eps + 1e-6 and size.max() > 0.5 * ex.eps, ex.entry  # float32 rounding only
        assert np.array_equal(adv[~ex.attacked], clean[~ex.attacked])


def test_sweep_reuse_keeps_the_float_example_of_the_smaller_eps(float_run):
    _, _, examples = float_run
    small, large = examples[0], examples[1]
    assert (small.entry, large.entry) == ("pgd@0.05", "pgd@0.1")
    assert small.run_fooled.any()
    assert np.array_equal(large.adversarial_float[small.run_fooled], small.adversarial_float[small.run_fooled])


# -- what the 8-bit files do, in results.json and on stderr ------------------------------------------------------
# PGD at 0.1 (not a whole number of 1/255 steps) loses successes to rounding; FGSM at whole steps moves every
# pixel by exactly eps, which 8-bit images hold: its successes all survive.
ROUNDING_SUITE = """name: rounding
attacks:
  - {attack: pgd, eps: 0.1, steps: 10, step_size: 0.025}
  - {attack: fgsm, eps: [16/255, 24/255]}
"""


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounding")
    (root / "rounding.yaml").write_text(ROUNDING_SUITE)
    done = invoke("eval", "example:digits", "--suite", root / "rounding.yaml", "--limit", 120, "--quiet",
                  "--device", "cpu", "--out", root / "run", "--save-adversarial", "all")
    assert done.exit_code == 0, done.stderr
    return root / "run", done


def test_results_json_counts_agree_with_the_saved_files(cli_run):
    run, _ = cli_run
    doc = json.loads((run / "results.json").read_text())
    validate_document(doc, "results.json")  # the extra field keeps the document valid
    model = robench.models.load_model("example:digits").model.eval()
    for a in doc["attacks"]:
        saved = a["saved_examples"]
        ex = read_examples(run / saved["file"])
        assert saved["n"] == len(ex.index) == a["n"] == 120 and saved["attacked"] == int(ex.attacked.sum())
        assert saved["fooled_run"] == int(ex.run_fooled.sum()) == round(a["success_rate"] * a["attacked"])
        assert saved["fooled_8bit"] == int(((ex.adv_pred != ex.label) & ex.attacked).sum())
        assert saved["undone_8bit"] == int((ex.run_fooled & ~ex.fooled).sum())
        # adv_pred is the model's prediction of the saved 8-bit image, as a reader computes it.
        assert np.array_equal(ex.adv_pred, predict(model, ex.adversarial))


def test_a_warning_says_when_8bit_rounding_undoes_successes(cli_run):
    run, done = cli_run
    doc = json.loads((run / "results.json").read_text())
    by_label = {(a["label"], a["params"]["eps_expr"]): a["saved_examples"] for a in doc["attacks"]}
    pgd = by_label[("pgd", "0.1")]
    assert pgd["undone_8bit"] > 0  # rounding undid some of PGD's successes ...
    assert all(by_label[("fgsm", e)]["undone_8bit"] == 0 and by_label[("fgsm", e)]["fooled_run"] > 0
               for e in ("16/255", "24/255"))  # ... and none of FGSM's
    warnings = [line for line in done.stderr.splitlines() if "8-bit rounding" in line]
    assert warnings == [f"robench: warning: pgd eps 0.1: {pgd['fooled_run'] - pgd['undone_8bit']} of "
                        f"{pgd['fooled_run']} successes survive 8-bit rounding in adversarial/pgd_0.1.png; the "
                        ".npz keeps the float examples (adversarial_float) that reproduce the reported accuracy"]
    assert (run / "adversarial" / "pgd_0.1.png").is_file()
