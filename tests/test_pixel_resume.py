"""``robench pixel-index`` keeps its finished image batches: a killed or interrupted run resumes with
``--resume`` to the results of an uninterrupted one, and refuses to resume on other images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import robench.pixels.experiment as experiment
from robench.examples import example_data_path
from cli_helpers import invoke, one_error_line, without

IMAGES = 200  # 25 batches of 8: a run long enough to be stopped in the middle
BATCH = 8
SETTINGS = ["--pixels", "1,2,4", "--trials", "2", "--batch-size", str(BATCH), "--save-every", "0"]
# Timings and the software stack differ between two runs; results do not.
VOLATILE = {"seconds", "finished_at", "robench", "torch", "torchvision", "python", "numpy", "device_name"}


def command(folder, *extra):
    return ["pixel-index", "example:digits", str(folder), *SETTINGS, "--quiet", *map(str, extra)]


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The bundled digits as PNG files in class folders."""
    root = tmp_path_factory.mktemp("pixel-resume") / "digits"
    with np.load(example_data_path("digits")) as data:
        x, y = data["x"][:IMAGES], data["y"][:IMAGES]
    for i, (img, label) in enumerate(zip(x, y)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / str(label) / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pixel-resume") / "whole"
    result = invoke(*command(folder, "--out", out))
    assert result.exit_code == 0, result.stderr
    doc = results(out)
    assert doc["progress"] == {"evaluated": IMAGES, "total": IMAGES, "unit": "images"}
    return without(doc, VOLATILE)


def signal_after_batches(monkeypatch, batches: int, signum: int) -> None:
    """Send ``signum`` to this process when the experiments start the batch after ``batches`` batches."""
    calls_per_batch = 3  # one per pixel count of SETTINGS (a single setting)
    real, calls = experiment.pixel_trials, []

    def pixel_trials(*args, **kwargs):
        calls.append(1)
        if len(calls) == batches * calls_per_batch + 1:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises KeyboardInterrupt before this ends
            raise AssertionError("the signal did not stop the run")
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "pixel_trials", pixel_trials)


def test_a_killed_run_resumes_to_the_uninterrupted_results(folder, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "robench", *command(folder, "--out", run_dir)],
                                 stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not (run_dir / "progress.pt").exists():
                assert child.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no progress file"
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"
    resumed = invoke(*command(folder, "--resume", run_dir))
    assert resumed.exit_code == 0, resumed.stderr
    assert f"robench: resuming {run_dir} after " in resumed.stderr
    assert without(results(run_dir), VOLATILE) == uninterrupted
    assert not (run_dir / "progress.pt").exists()


def test_an_interrupted_run_writes_partial_results_and_resumes(folder, uninterrupted, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    signal_after_batches(monkeypatch, 3, signal.SIGINT)
    stopped = invoke(*command(folder, "--out", run_dir))
    assert stopped.exit_code == 130, stopped.stderr
    assert f"interrupted after {3 * BATCH} of {IMAGES} images" in one_error_line(stopped, "interrupted")
    partial = results(run_dir)
    assert partial["complete"] is False
    assert partial["progress"] == {"evaluated": 3 * BATCH, "total": IMAGES, "unit": "images"}
    assert partial["clean"]["n"] == 3 * BATCH and partial["images"]["read"] == IMAGES
    assert all(row["total"] == partial["images"]["evaluated"] for row in partial["experiments"][0]["results"])
    monkeypatch.undo()
    resumed = invoke(*command(folder, "--resume", run_dir))
    assert resumed.exit_code == 0, resumed.stderr
    assert f"robench: resuming {run_dir} after {3 * BATCH} finished image(s)" in resumed.stderr
    assert without(results(run_dir), VOLATILE) == uninterrupted


def test_a_resume_on_other_images_or_batches_is_refused(folder, tmp_path, monkeypatch):
    images = tmp_path / "digits"
    shutil.copytree(folder, images)
    run_dir = tmp_path / "run"
    signal_after_batches(monkeypatch, 2, signal.SIGTERM)
    assert invoke(*command(images, "--out", run_dir)).exit_code == 130
    monkeypatch.undo()
    progress = run_dir / "progress.pt"
    before = (progress.read_bytes(), progress.stat().st_mtime_ns)
    other_batches = invoke(*command(images, "--resume", run_dir, "--batch-size", 16))
    assert other_batches.exit_code == 2
    assert "the run used --batch-size 8, not 16" in one_error_line(other_batches)
    for path in images.rglob("*.png"):  # the same files, other pixels
        with Image.open(path) as img:
            Image.fromarray(255 - np.asarray(img)).save(path)
    other_images = invoke(*command(images, "--resume", run_dir))
    assert other_images.exit_code == 2
    line = one_error_line(other_images)
    assert "the images changed since the interrupted run" in line and "another --out" in line
    assert (progress.read_bytes(), progress.stat().st_mtime_ns) == before
    assert results(run_dir)["complete"] is False
