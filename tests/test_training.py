"""`robench train`: recipes, the training loop, checkpoints eval loads, resume, and the papers' defences
trained end to end on the bundled digits (train -> eval -> compare)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robench.models.loading import load_model
from robench.training.recipe import builtin_recipes, load_recipe
from robench.training.trainer import STATE, TrainOptions, train
from tests.cli_helpers import invoke, one_error_line

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two threads on a busy 2-core machine are many times slower than one for these small networks.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BASE = """name: tiny
data: example:digits
model:
  arch: robench:digits_cnn
  num_classes: 10
epochs: 3
batch_size: 64
optimizer: {name: adam, lr: 0.002}
"""


# --- recipes -------------------------------------------------------------------------------------------------


def test_every_builtin_recipe_validates():
    recipes = builtin_recipes()
    assert {"digits-baseline", "digits-fdd", "digits-lfm", "digits-pgd-at", "digits-hfa"} <= set(recipes)
    for name, path in recipes.items():
        assert load_recipe(str(path)).recipe.name == name


@pytest.mark.parametrize("extra, line, message", [
    ("defenses:\n  - kind: lfm\n    p: 1.5\n", 11, "p"),
    ("defenses:\n  - kind: blur\n", 10, "kind"),
    ("alignment:\n  layers: ['1']\n", 9, "adversarial"),
    ("adversarial:\n  attack: pgd\n  eps: 2\n", 11, "eps"),
    ("adversarial:\n  attack: fgsm\n  eps: 0.1\n  steps: 3\n", 12, "FGSM is one step"),
    ("schedule: {name: step}\n", 9, "milestones"),
    ("epochz: 3\n", 9, "unknown field"),
])
def test_recipe_errors_name_file_line_and_field(tmp_path, extra, line, message):
    path = _write(tmp_path, BASE + extra)
    result = invoke("train", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    error = one_error_line(result)
    assert f"{path}:{line}" in error and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_recipe_may_not_name_code_to_import(tmp_path):
    path = _write(tmp_path, BASE.replace("robench:digits_cnn", "os.path:join"))
    result = invoke("train", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "unknown architecture" in one_error_line(result)


# --- the loop, its checkpoint, resume ------------------------------------------------------------------------


def test_checkpoint_loads_in_eval_with_its_architecture_and_preprocessing(tmp_path):
    path = _write(tmp_path, BASE.replace("  num_classes: 10\n", "  num_classes: 10\n  mean: [0.3]\n  std: [0.4]\n"))
    result = train(load_recipe(str(path)), tmp_path / "out", TrainOptions(epochs=1))
    loaded = load_model(str(result.model_path))
    assert loaded.arch == "robench:digits_cnn" and loaded.name == "tiny"
    assert loaded.preprocessing.mean == (0.3,) and loaded.preprocessing.std == (0.4,)
    log = json.loads((tmp_path / "out" / "training.json").read_text())
    assert log["complete"] and len(log["epochs"]) == 1 and log["recipe"]["epochs"] == 1
    assert not (tmp_path / "out" / STATE).exists()
    # The normalisation travels into eval: results.json records it as the model's preprocessing.
    run = tmp_path / "run"
    ok = invoke("eval", result.model_path, "--suite", "clean", "--data", "example:digits", "--out", run)
    assert ok.exit_code == 0, ok.stderr
    doc = json.loads((run / "results.json").read_text())
    assert doc["model"]["preprocessing"]["mean"] == [0.3]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    loaded = load_recipe(str(_write(tmp_path, BASE + "defenses:\n  - kind: lfm\n    after: '1'\n    channels: 8\n")))
    whole = train(loaded, tmp_path / "whole")

    def stop_in_epoch_3(epoch, epochs, done, batches):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(loaded, tmp_path / "cut", progress=stop_in_epoch_3)
    assert (tmp_path / "cut" / STATE).exists() and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train(loaded, tmp_path / "cut")
    assert resumed.resumed_from == 2
    a = load_model(str(whole.model_path)).model.state_dict()
    b = load_model(str(resumed.model_path)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e.loss for e in whole.epochs] == [e.loss for e in resumed.epochs]


def test_out_folder_refusals(tmp_path):
    path = _write(tmp_path, BASE.replace("epochs: 3", "epochs: 1"))
    assert invoke("train", path, "--out", tmp_path / "out").exit_code == 0
    again = invoke("train", path, "--out", tmp_path / "out")
    assert again.exit_code == 2 and "already holds a trained model" in one_error_line(again)
    # An interrupted run of another recipe is not resumed with this one.
    other = _write(tmp_path, BASE.replace("epochs: 3", "epochs: 2"), "other.yaml")
    (tmp_path / "half").mkdir()
    torch.save({"recipe_sha256": "something else"}, tmp_path / "half" / STATE)
    mixed = invoke("train", other, "--out", tmp_path / "half")
    assert mixed.exit_code == 2 and "different recipe" in one_error_line(mixed)


def test_a_file_naming_an_importable_module_is_refused(tmp_path):
    from robench.models.trained import write_trained
    from robench.examples import digits_cnn

    path = tmp_path / "model.safetensors"
    write_trained(path, digits_cnn().state_dict(), arch="robench.examples:digits_cnn", num_classes=10, mean=None,
                  std=None, input_size=None, recipe="x")
    result = invoke("eval", path, "--suite", "clean", "--data", "example:digits", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "--arch robench.examples:digits_cnn" in one_error_line(result)
    # Named explicitly, the same file loads.
    assert load_model(str(path), arch="robench.examples:digits_cnn", num_classes=10).arch


# --- the papers' defences on digits, train -> eval -> compare ------------------------------------------------


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    runs = {}
    for name in ("digits-baseline", "digits-fdd", "digits-lfm", "digits-pgd-at"):
        out = root / name
        result = invoke("train", RECIPES / f"{name}.yaml", "--out", out)
        assert result.exit_code == 0, result.stderr
        run = root / "runs" / name
        # Half the test digits: the FGSM and PGD columns the tests compare, at half the CPU time.
        ev = invoke("eval", out / "model.safetensors", "--suite", "digits", "--data", "example:digits",
                    "--limit", 270, "--out", run)
        assert ev.exit_code == 0, ev.stderr
        runs[name] = run
    return runs


def _accuracy(run: Path, entry: str, eps: float | None) -> float:
    doc = json.loads((run / "results.json").read_text())
    rows = [a for a in doc["attacks"] if a["attack"] == entry and (eps is None or abs(a["eps"] - eps) < 1e-9)]
    assert len(rows) == 1
    return rows[0]["accuracy"]


def test_defended_models_train_well_and_adversarial_training_raises_pgd_accuracy(trained_digits):
    clean = {name: json.loads((run / "results.json").read_text())["clean"]["accuracy"]
             for name, run in trained_digits.items()}
    assert all(acc > 0.85 for acc in clean.values()), clean
    base = _accuracy(trained_digits["digits-baseline"], "pgd", 0.1)
    robust = _accuracy(trained_digits["digits-pgd-at"], "pgd", 0.1)
    # PGD training at eps 0.1 must buy real robustness at that eps, not a rounding difference.
    assert robust >= base + 0.2, (base, robust)


def test_compare_puts_the_trained_models_side_by_side(trained_digits):
    runs = [trained_digits[n] for n in ("digits-baseline", "digits-fdd", "digits-lfm", "digits-pgd-at")]
    result = invoke("compare", *runs, "--layout", "alignment", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["digits-baseline", "digits-fdd", "digits-lfm",
                                                        "digits-pgd-at"]
    assert "Mean" in lines[0]


def test_list_and_missing_recipe():
    listed = invoke("train", "--list")
    assert listed.exit_code == 0 and "digits-pgd-at" in listed.stdout and "cifar10-hfa-k40" in listed.stdout
    missing = invoke("train")
    assert missing.exit_code == 2 and "--list" in one_error_line(missing)
    unknown = invoke("train", "digits-pgd")
    assert unknown.exit_code == 2 and "digits-pgd-at" in one_error_line(unknown)


def test_npz_data_has_no_test_split_unless_one_is_named(tmp_path):
    import numpy as np

    with np.load(Path(__file__).resolve().parent.parent / "robench/examples/digits_train.npz") as d:
        np.savez(tmp_path / "train.npz", x=d["x"][:200], y=d["y"][:200])
    recipe = load_recipe(str(_write(tmp_path, BASE.replace("example:digits", f"npz:{tmp_path / 'train.npz'}"))))
    alone = train(recipe, tmp_path / "alone", TrainOptions(epochs=1))
    assert alone.epochs[0].test_accuracy is None  # not the training images' accuracy under another name
    named = train(recipe, tmp_path / "named", TrainOptions(epochs=1, test_data="example:digits"))
    assert 0 <= named.epochs[0].test_accuracy <= 1
