"""Hostile inputs to `robench train`: recipe names that are paths, two runs on one folder, a state.pt that
never ends or was forged, resumes on other data, and recipe values that only the data can refute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robench.results import writers
from robench.training.recipe import load_recipe
from robench.training.trainer import STATE, TrainOptions, train
from cli_helpers import invoke, lock_held_by_another_process, one_error_line

DIGITS = Path(__file__).resolve().parent.parent / "robench" / "examples" / "digits_train.npz"

TINY = """name: tiny
data: {data}
model:
  arch: robench:digits_cnn
  num_classes: 10
epochs: 2
batch_size: 32
optimizer: {{name: {optimizer}, lr: 0.01}}
schedule: {schedule}
"""


@pytest.fixture(autouse=True)
def one_thread_in_tmp(tmp_path, monkeypatch):
    # Nothing lands in the repository; one thread is many times faster for these tiny networks on 2 busy cores.
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _npz(path: Path, n: int = 64, channels: int = 1, shift: int = 0) -> Path:
    with np.load(DIGITS) as d:
        x, y = d["x"][shift:shift + n], d["y"][shift:shift + n]
    np.savez(path, x=np.repeat(x, channels, axis=3), y=y)
    return path


def _recipe(tmp_path: Path, extra: str = "", *, data: str | None = None, optimizer: str = "adam",
            schedule: str = "{name: cosine}", name: str = "r.yaml") -> Path:
    data = data or f"npz:{_npz(tmp_path / 'train.npz')}"
    path = tmp_path / name
    path.write_text(TINY.format(data=data, optimizer=optimizer, schedule=schedule) + extra, encoding="utf-8")
    return path


def _interrupted(recipe: Path, out: Path) -> None:
    """A run of the recipe killed in its second epoch: state.pt holds epoch 1."""
    def stop_in_epoch_2(epoch, epochs, done, batches):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(str(recipe)), out, TrainOptions(test_data="none"), progress=stop_in_epoch_2)
    assert (out / STATE).is_file()


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


# --- 1. the recipe's name is the default folder: it never leaves runs/train ---------------------------------


@pytest.mark.parametrize("name", ["/ABSOLUTE/robench-escaped", "../../../../robench-escaped", "..", ".",
                                  "a/b", "x" * 101])
def test_a_recipe_name_that_is_a_path_is_refused_at_its_line(tmp_path, monkeypatch, name):
    work = tmp_path / "a" / "b" / "c" / "d"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = name.replace("/ABSOLUTE", str(tmp_path))
    recipe = _recipe(tmp_path).read_text().replace("name: tiny", f"name: '{name}'")
    path = work / "r.yaml"
    path.write_text(recipe)
    result = invoke("train", path, "--limit", 16, "--epochs", 1)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{path}:1 name:" in line and "output folder" in line, line
    assert not list(tmp_path.rglob("robench-escaped")), "nothing is written where the name points"
    assert not (work / "runs").exists()


def test_the_default_folder_name_is_one_plain_folder():
    # Names made only of dots would be this folder or its parent: they become underscores.
    assert [writers._safe(n) for n in ("..", ".", "...", "", "a..b", "../x")] == ["__", "_", "___", "model",
                                                                                  "a..b", ".._x"]
    for name in ("..", "../../../../elsewhere", "/abs/where"):
        folder = writers.default_train_dir(name)
        assert folder.parent == Path("runs") / "train" and folder.name not in (".", "..")


# --- 2. and 4. one run per folder, and no empty folder after a failure --------------------------------------


def test_a_locked_out_folder_is_refused_before_any_work(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    out.mkdir()
    with lock_held_by_another_process(out) as pid:
        result = invoke("train", recipe, "--out", out, "--epochs", 1)
        assert result.exit_code == 2
        assert f"another robench run (pid {pid}) is writing to {out}" in one_error_line(result)
        assert _files(out) == {".robench.lock"}, "no checkpoint, state or log was written beside the other run"
    result = invoke("train", recipe, "--out", out, "--epochs", 1)
    assert result.exit_code == 0, result.stderr
    assert _files(out) == {"model.safetensors", "training.json"}, "the lock file goes when the run ends"


def test_a_finished_train_folder_is_never_overwritten(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    assert invoke("train", recipe, "--out", out, "--epochs", 1).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    again = invoke("train", recipe, "--out", out, "--epochs", 1)
    assert again.exit_code == 2
    assert "already holds a trained model (model.safetensors); choose another --out" in one_error_line(again)
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args", [["--data", "npz:missing.npz"], ["--test-data", "npz:missing.npz"]])
def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(tmp_path, args):
    result = invoke("train", _recipe(tmp_path), "--out", tmp_path / "runs" / "out", *args)
    assert result.exit_code == 2 and "missing.npz" in one_error_line(result)
    assert not (tmp_path / "runs" / "out").exists()
    # The default folder too.
    result = invoke("train", _recipe(tmp_path), *args)
    assert result.exit_code == 2
    assert not (tmp_path / "runs" / "train" / "tiny").exists()


# --- 3. a state.pt that never ends, or is too large, is refused without hanging --------------------------------


@pytest.mark.parametrize("kind, message", [("fifo", "is a pipe (FIFO)"), ("zero", "is a device"),
                                           ("dir", "is a directory"), ("huge", "is larger than")])
def test_a_state_file_that_never_ends_is_refused_quickly(tmp_path, kind, message):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    out.mkdir()
    state = out / STATE
    if kind == "fifo":
        os.mkfifo(state)
    elif kind == "zero":
        state.symlink_to("/dev/zero")
    elif kind == "dir":
        state.mkdir()
    else:
        with open(state, "wb") as f:  # sparse: takes no disk, but claims 8 GiB
            f.truncate(8 << 30)
    run = subprocess.run([sys.executable, "-m", "robench", "train", str(recipe), "--out", str(out), "--epochs", "1"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robench: error: ") and message in lines[0], run.stderr
    assert "remove it to start again" in lines[0]
    assert not (out / "model.safetensors").exists(), "no training ran"


# --- 5. a resume continues the same run: same data, same overrides -----------------------------------------


def test_a_resume_on_other_data_or_overrides_is_refused_by_name(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    _interrupted(recipe, out)
    other = _npz(tmp_path / "other.npz", shift=64)
    cases = [(["--data", f"npz:{other}"], f"with --data npz:{tmp_path / 'train.npz'}, not npz:{other};"),
             (["--limit", 32], "with --limit none, not 32"),
             (["--epochs", 3], "with --epochs 2, not 3"),
             (["--test-data", "example:digits"], "with --test-data none, not example:digits")]
    for args, message in cases:
        result = invoke("train", recipe, "--out", out, *args)
        assert result.exit_code == 2, args
        line = one_error_line(result)
        assert message in line and f"choose another --out or remove {out / STATE}" in line, line
    # The same file name with other images in it: the fingerprint tells.
    _npz(tmp_path / "train.npz", shift=128)
    changed = invoke("train", recipe, "--out", out, "--test-data", "none")
    assert changed.exit_code == 2 and "other training data (dataset fingerprint" in one_error_line(changed)
    assert not (out / "model.safetensors").exists()


def test_training_json_records_the_overrides_and_the_data(tmp_path):
    recipe, out = _recipe(tmp_path, data="example:digits"), tmp_path / "out"
    result = invoke("train", recipe, "--out", out, "--limit", 48, "--epochs", 1, "--test-data", "none")
    assert result.exit_code == 0, result.stderr
    log = json.loads((out / "training.json").read_text())
    assert log["options"] == {"data": None, "test_data": "none", "limit": 48, "epochs": 1}
    data = log["data"]
    assert data["train"] == "example:digits" and data["test"] == "none" and data["samples"] == 48
    assert len(data["fingerprint"]) == 64


# --- 6. a forged or broken state.pt is refused, whatever it says ---------------------------------------------


def _forge(state: dict, change: str):
    if change == "epoch 1e9":
        state["epoch"] = 10**9
    elif change == "epoch -5":
        state["epoch"] = -5
    elif change == "schedule":  # the old format's scheduler state, bent
        state["schedule"] = {"base_lrs": [1e9], "T_max": 10**12, "last_epoch": 1}
    elif change == "old format":  # what robench wrote before states were checked
        del state["format"], state["settings"]
    elif change == "lr":
        state["optimizer"]["param_groups"][0]["lr"] = 1e9
    elif change == "extra history key":
        state["history"][0]["surprise"] = 1.0
    elif change == "history string":
        state["history"] = "epoch 1"
    elif change == "tensor shape":
        key = next(iter(state["model"]))
        state["model"][key] = torch.zeros(3)
    elif change == "nan weights":
        key = next(iter(state["model"]))
        state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    elif change == "no optimizer":
        del state["optimizer"]
    elif change == "param groups":
        state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))
    elif change == "param ids":
        state["optimizer"]["param_groups"][0]["params"] = [0] * len(state["optimizer"]["param_groups"][0]["params"])
    elif change == "moment shape":
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(7)
    elif change == "list":
        return [state]
    return state


@pytest.mark.parametrize("change, what", [
    ("epoch 1e9", "epoch 1000000000 is not one of 1..2"),
    ("epoch -5", "epoch -5 is not one of 1..2"),
    ("schedule", "unexpected entry 'schedule'"),
    ("old format", "its format is None, not robench-train-state-2"),
    ("lr", "optimizer parameter group 0: lr is 1000000000.0"),
    ("extra history key", "history record 1 has an unexpected entry 'surprise'"),
    ("history string", "history is a str, not a list"),
    ("tensor shape", "expected a float32 tensor of shape"),
    ("nan weights", "holds NaN or infinite values"),
    ("no optimizer", "has no 'optimizer' entry"),
    ("param groups", "optimizer has 2 parameter groups, this recipe's has 1"),
    ("param ids", "optimizer parameter group 0: params is"),
    ("moment shape", "optimizer state exp_avg of parameter 0 is a float32 tensor of shape [7]"),
    ("list", "its top level is a list, not a mapping"),
])
def test_a_forged_state_is_refused_before_training(tmp_path, change, what):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    _interrupted(recipe, out)
    state = torch.load(out / STATE, weights_only=True)
    torch.save(_forge(state, change), out / STATE)
    forged = (out / STATE).read_bytes()
    result = invoke("train", recipe, "--out", out, "--test-data", "none")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{out / STATE} is not a training state this recipe wrote (" in line, line
    assert what in line and line.endswith("remove it to start again"), line
    assert (out / STATE).read_bytes() == forged and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("content, what", [(b"", "the file is empty"),
                                           (b"not a torch file", "torch cannot read it")])
def test_an_empty_or_unreadable_state_gives_a_reason(tmp_path, content, what):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / STATE).write_bytes(content)
    result = invoke("train", recipe, "--out", out)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"is not a training state this recipe wrote ({what}" in line and "remove it to start again" in line


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "{name: step, milestones: [1]}"),
                                                 ("adamw", "{name: constant}"), ("adam", "{name: cosine}")])
def test_an_honest_state_still_resumes_to_the_uninterrupted_weights(tmp_path, optimizer, schedule):
    recipe = _recipe(tmp_path, optimizer=optimizer, schedule=schedule)
    whole = train(load_recipe(str(recipe)), tmp_path / "whole", TrainOptions(test_data="none"))
    _interrupted(recipe, tmp_path / "cut")
    result = invoke("train", recipe, "--out", tmp_path / "cut", "--test-data", "none")
    assert result.exit_code == 0, result.stderr
    assert "resuming tiny" in result.stderr
    from safetensors.torch import load_file

    a, b = load_file(whole.model_path), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "cut" / "training.json").read_text())
    assert [e["lr"] for e in log["epochs"]] == [e.lr for e in whole.epochs]


# --- 7. recipe values refuted by the schema or by the data: file:line, before the first epoch ----------------


CUTOUT = "defenses:\n  - kind: cutout\n    size: {size}\n"
LFM = "defenses:\n  - kind: lfm\n    after: '1'\n    {field}\n"


@pytest.mark.parametrize("extra, line, message", [
    (LFM.format(field="area: [5, -1]"), 13, "area must be a (lo, hi) pair with 0.0 < lo <= hi <= 1.0"),
    (LFM.format(field="aspect: [2, 1]"), 13, "aspect must be a (lo, hi) pair"),
    (LFM.format(field="channels: 0"), 13, "channels"),
    (LFM.format(field="p: -0.5"), 13, "p"),
    (CUTOUT.format(size=1000000000), 12, "size"),
    (CUTOUT.format(size=9), 12, "a 9x9 square is larger than the 8x8 images; at most 8"),
    ("defenses:\n  - kind: few-pixel\n    pixels: 65\n", 12, "65 distinct pixels do not fit in 8x8 images; at most 64"),
    ("adversarial:\n  attack: pgd\n  eps: 0.1\n  random_start: -0.5\n", 13, "random_start"),
    ("defenses:\n  - kind: dropout\n    after: 'nine'\n", 12, "model has no submodule 'nine'"),
])
def test_recipe_values_are_refused_at_their_line_before_training(tmp_path, extra, line, message):
    path = _recipe(tmp_path, extra)
    result = invoke("train", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    error = one_error_line(result)
    assert f"{path}:{line} " in error and message in error, error
    assert not (tmp_path / "out").exists()


def test_more_labels_than_the_model_has_classes_is_refused_naming_both(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("num_classes: 10", "num_classes: 3"))
    result = invoke("train", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    error = one_error_line(result)
    assert f"{path}:5 model.num_classes:" in error and "labels up to 9" in error and "3 classes" in error, error
    assert not (tmp_path / "out").exists()


def test_three_channel_data_into_a_one_channel_network_is_refused(tmp_path):
    path = _recipe(tmp_path, data=f"npz:{_npz(tmp_path / 'rgb.npz', channels=3)}")
    result = invoke("train", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    error = one_error_line(result)
    assert f"{path}:4 model.arch:" in error and "the training data has 3 channels; the recipe's model takes 1" in error
    assert not (tmp_path / "out").exists()


def test_normalisation_values_must_match_the_channels(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("num_classes: 10", "num_classes: 10\n  mean: [0.5, 0.5]\n"
                                                                 "  std: [0.2, 0.2]"))
    result = invoke("train", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    error = one_error_line(result)
    assert f"{path}:6 model.mean:" in error and "2 normalisation values for the training data's 1 channel" in error


def test_a_test_set_of_another_image_size_is_refused_before_training(tmp_path):
    big = tmp_path / "big.npz"
    np.savez(big, x=np.zeros((8, 16, 16, 1), np.uint8), y=np.zeros(8, np.int64))
    result = invoke("train", _recipe(tmp_path), "--out", tmp_path / "out", "--test-data", f"npz:{big}")
    assert result.exit_code == 2
    assert "the model cannot take the test images (1x16x16)" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_a_recipe_path_that_is_a_folder_says_so(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    result = invoke("train", tmp_path / "folder.yaml")
    assert result.exit_code == 2
    assert "is a directory" in one_error_line(result)


# --- 8. an interrupted command keeps its finished epochs and resumes -----------------------------------------


def test_an_interrupted_command_keeps_its_epochs_and_the_next_one_resumes(tmp_path, monkeypatch):
    from robench.training import trainer

    recipe, out = _recipe(tmp_path), tmp_path / "out"
    real = trainer._run_epoch

    def stop_in_epoch_2(step, recipe, train_set, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(step, recipe, train_set, epoch, *args)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_run_epoch", stop_in_epoch_2)
        stopped = invoke("train", recipe, "--out", out)
    assert stopped.exit_code == 130
    assert f"the finished epochs are saved in {out}; run the same command to resume" in stopped.stderr
    assert _files(out) == {STATE, "training.json"}
    resumed = invoke("train", recipe, "--out", out)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming tiny in {out} after epoch 1 of 2" in resumed.stderr
    assert _files(out) == {"model.safetensors", "training.json"}
