"""Hostile command lines and environments: bounds on every option, run directories that are not
clobbered, files written with the umask's mode, a full disk, repeated signals."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from robench.results import atomic, writers
from cli_helpers import invoke, lock_held_by_another_process, one_error_line

QUICK = "name: quick\nattacks:\n  - attack: fgsm\n    eps: [0.1]\n  - attack: pgd\n    eps: 0.1\n    steps: 3\n"
HEAVY = "name: heavy\nattacks:\n  - attack: pgd\n    eps: [0.05, 0.1]\n    steps: 20\n    final_iterate: true\n"


def eval_args(tmp_path, *extra, suite_text: str = QUICK):
    suite = tmp_path / "suite.yaml"
    suite.write_text(suite_text)
    return ["eval", "example:digits", "--suite", suite, "--limit", "60", "--quiet", *extra]


def robench_cmd(*args):
    # 40 batches of 4, committed in segments of 8: progress to interrupt and partial results to keep
    return [sys.executable, "-m", "robench", "eval", "example:digits", "--batch-size", "4", "--limit", "160",
            "--save-every", "0", "--quiet", *args]


# -- option bounds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "²", "--batch-size must be an integer"),
    ("--batch-size", "0", "--batch-size must be an integer"),
    ("--batch-size", "-3", "--batch-size must be an integer"),
    ("--save-every", "nan", "--save-every must be between"),
    ("--save-every", "inf", "--save-every must be between"),
    ("--save-every", "-1", "--save-every must be between"),
    ("--workers", "-1", "--workers must be between"),
])
def test_out_of_range_options_are_usage_errors(tmp_path, option, value, message):
    result = invoke(*eval_args(tmp_path, option, value, "--out", tmp_path / "run"))
    assert result.exit_code == 2
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists(), "nothing is created before the options are checked"


def test_pixel_index_trials_are_bounded(tmp_path):
    result = invoke("pixel-index", "example:digits", tmp_path, "--trials", "100000000")
    assert result.exit_code == 2 and "--trials must be between 1 and 10000" in one_error_line(result)


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--margin", "inf"), ("--ce-weight", "-1"),
                                           ("--msssim-weight", "nan"), ("--steps", "0")])
def test_dmr_training_options_are_bounded(tmp_path, option, value):
    result = invoke("dmr", "train", "example:digits", "--data", f"market1501:{tmp_path}", "--out",
                    tmp_path / "g.pt", option, value)
    assert result.exit_code == 2 and option in one_error_line(result)


def test_a_generator_being_trained_is_locked(tmp_path):
    lock = tmp_path / "g.pt.lock"
    lock.mkdir()
    with lock_held_by_another_process(lock) as pid:
        result = invoke("dmr", "train", "example:digits", "--data", f"market1501:{tmp_path}", "--out",
                        tmp_path / "g.pt")
        assert result.exit_code == 2
        assert f"another robench run (pid {pid}) is writing to {lock}" in one_error_line(result)
    assert not (tmp_path / "g.pt").exists()
    # The holder has gone: the next run takes the lock, and its failure (the folder holds no data)
    # leaves neither the lock nor a generator behind.
    result = invoke("dmr", "train", "example:digits", "--data", f"market1501:{tmp_path}", "--out", tmp_path / "g.pt")
    assert result.exit_code == 2 and "no query/ folder" in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, message", [
    ("eps: (9.0**64)**64", "too large to be a number"),
    ("eps: 1e308*10", "not a finite number"),
    ("eps: (-8)**0.5", "not a real number"),
    ("eps: 0.1\n    steps: 10\n    step_size: (eps-0.5)/steps",
     "step_size: '(eps-0.5)/steps' is -0.04 at eps 0.1, steps 10; it must be > 0"),
    ("eps: 0.1\n    steps: 1\n    step_size: eps/(steps-1)", "division by zero in 'eps/(steps-1)' at eps 0.1, steps 1"),
    ("eps: 0.1\n    steps: 10\n    step_size: __import__('os').getcwd()", "is not plain arithmetic"),
    ("eps: 0.1\n    decay: .nan", "decay"),
    ("eps: 0.1\n    decay: .inf", "decay"),
])
def test_suite_numbers_are_checked_at_their_real_values(tmp_path, field, message):
    suite = f"name: bad\nattacks:\n  - attack: mifgsm\n    {field}\n"
    result = invoke(*eval_args(tmp_path, "--out", tmp_path / "run", suite_text=suite))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert message in line and "suite.yaml:" in line


def test_a_step_size_that_only_divides_by_zero_at_stand_in_values_runs(tmp_path):
    suite = "name: ok\nattacks:\n  - attack: pgd\n    eps: 0.1\n    steps: 10\n    step_size: eps/(steps-1)\n"
    result = invoke(*eval_args(tmp_path, "--out", tmp_path / "run", "--json", suite_text=suite))
    assert result.exit_code == 0, result.stderr
    params = json.loads(result.stdout)["attacks"][0]["params"]
    assert params["step_size"] == pytest.approx(0.1 / 9)


# -- run directories -------------------------------------------------------------------------------

def test_a_locked_run_directory_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_by_another_process(out) as pid:
        result = invoke(*eval_args(tmp_path, "--out", out))
        assert result.exit_code == 2
        line = one_error_line(result)
        assert f"another robench run (pid {pid}) is writing to" in line
        assert sorted(p.name for p in out.iterdir()) == [".robench.lock"]
    # The kernel drops a dead holder's lock: the directory is usable again at once.
    result = invoke(*eval_args(tmp_path, "--out", out))
    assert result.exit_code == 0, result.stderr
    assert not (out / ".robench.lock").exists(), "the lock file is removed when the run ends"


def test_two_runs_started_together_never_both_write(tmp_path):
    suite = tmp_path / "heavy.yaml"
    suite.write_text(HEAVY)
    out = tmp_path / "run"
    procs = [subprocess.Popen(robench_cmd("--suite", suite, "--out", out), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, err in outcomes if code == 2)
    assert "another robench run" in refused or "never overwritten" in refused
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_default_run_directories_of_simultaneous_runs_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = writers.default_run_dir("suite", "model")
    second = writers.default_run_dir("suite", "model")
    assert first != second and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("out", ["/proc/self", "/proc/self/robench-run"])
def test_an_unwritable_output_directory_fails_before_the_first_batch(tmp_path, out):
    start = time.perf_counter()
    result = invoke(*eval_args(tmp_path, "--out", out, suite_text=HEAVY))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "output directory" in line and out in line
    assert time.perf_counter() - start < 20  # refused up front, not after attacking


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    result = invoke(*eval_args(tmp_path, "--out", target))
    assert result.exit_code == 2 and "is a file" in one_error_line(result)
    assert target.read_text() == "not a directory"


# -- files on disk ---------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_result_files_get_the_mode_the_umask_asks_for(tmp_path, umask):
    previous = os.umask(umask)
    try:
        result = invoke(*eval_args(tmp_path, "--out", tmp_path / "run"))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    for name in ("results.json", "results.csv", "samples.csv", "config.json"):
        mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def disk_full_for(monkeypatch, name: str) -> None:
    """The device fills up while ``name`` is written: the flush to disk reports ENOSPC, as on a real disk."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)


def test_a_full_disk_names_the_disk_and_keeps_the_progress(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = eval_args(tmp_path, "--out", out, "--batch-size", "16", "--save-every", "0")
    with monkeypatch.context() as patch:
        disk_full_for(patch, "results.json")
        failed = invoke(*args)
    assert failed.exit_code == 3
    line = one_error_line(failed)
    assert f"no space left on the device holding {out}" in line and "results.json" in line
    assert (out / "progress.pt").is_file() and not (out / "results.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".results.json.")], "no temporary file is left"
    resumed = invoke(*args, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    fresh = invoke(*eval_args(tmp_path, "--out", tmp_path / "fresh", "--batch-size", "16", "--json"))
    assert (out / "samples.csv").read_text() == (tmp_path / "fresh" / "samples.csv").read_text()
    timing = ("seconds", "peak_memory_bytes")
    strip = lambda doc: [{k: v for k, v in a.items() if k not in timing} for a in doc["attacks"]]  # noqa: E731
    assert strip(json.loads(resumed.stdout)) == strip(json.loads(fresh.stdout))


def test_a_full_disk_during_progress_saves_is_a_warning_not_the_end(tmp_path, monkeypatch):
    disk_full_for(monkeypatch, "progress.pt")
    result = invoke(*eval_args(tmp_path, "--out", tmp_path / "run", "--batch-size", "16", "--save-every", "0"))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "no space left" in line]
    assert len(warnings) == 1 and warnings[0].startswith("robench: warning:") and "progress.pt" in warnings[0]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["complete"] is True


# -- signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gap", [0.0, 0.05])
def test_two_quick_sigterms_still_leave_the_partial_results(tmp_path, gap):
    suite = tmp_path / "heavy.yaml"
    suite.write_text(HEAVY)
    out = tmp_path / "run"
    proc = subprocess.Popen(robench_cmd("--suite", suite, "--out", out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "progress.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # The second signal may land after the partial results are written, when the default
    # handler is back: then the process dies of it, but the files are complete.
    assert proc.returncode in (130, -signal.SIGTERM), err
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and 0 < partial["progress"]["evaluated"] < 160
    assert (out / "progress.pt").is_file()
