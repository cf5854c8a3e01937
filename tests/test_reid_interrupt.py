"""Re-identification runs stop on Ctrl-C or SIGTERM with the finished settings saved, and resume.

On the bundled example (example:reid-digits). The suites are the bundled reid-pgd
and reid-misrank-transfer with fewer PGD steps (and reid-pgd at one eps), so that
a run takes seconds on a CPU; every entry keeps its attack, objective, random
start and source. A resumed run must equal an uninterrupted one exactly (timings
aside): a setting's result depends only on the seed, its place in the suite and
the sample indices.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import robench.reid.engine as reid_engine
from robench.results.progress import PROGRESS_FILE
from cli_helpers import invoke, one_error_line

SUITES = Path(__file__).resolve().parents[1] / "suites"
SURROGATE = ("--surrogate", "example:reid-digits-surrogate")


def quick_suite(tmp: Path, name: str, steps: int) -> Path:
    """The bundled suite ``name`` with at most ``steps`` PGD steps per entry."""
    suite = yaml.safe_load((SUITES / f"{name}.yaml").read_text())
    for entry in suite["attacks"]:
        if "steps" in entry:
            entry["steps"] = min(entry["steps"], steps)
    path = tmp / f"{name}-quick.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def pgd_suite(tmp_path_factory) -> Path:
    return quick_suite(tmp_path_factory.mktemp("suites"), "reid-pgd", steps=2)


@pytest.fixture(scope="module")
def misrank_suite(tmp_path_factory) -> Path:
    return quick_suite(tmp_path_factory.mktemp("suites"), "reid-misrank-transfer", steps=1)


def pgd_args(suite: Path) -> list:
    # One eps: fgsm-away, pgd-away and pgd-odfa at 8/255, three settings.
    return ["eval", "example:reid-digits", "--suite", suite, "--eps", "8/255", "--device", "cpu", "--quiet"]


def misrank_args(suite: Path) -> list:
    # misrank-pgd at 8/255 and 16/255 on the surrogate, two settings.
    return ["eval", "example:reid-digits", "--suite", suite, *SURROGATE, "--device", "cpu", "--quiet"]


def uninterrupted(args: list, out: Path) -> dict:
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and not (out / PROGRESS_FILE).exists()
    return doc


@pytest.fixture(scope="module")
def pgd_reference(pgd_suite, tmp_path_factory) -> dict:
    doc = uninterrupted(pgd_args(pgd_suite), tmp_path_factory.mktemp("reference") / "pgd")
    assert [a["label"] for a in doc["attacks"]] == ["fgsm-away", "pgd-away", "pgd-odfa"]
    assert doc["progress"] == {"evaluated": 3, "total": 3, "unit": "settings"}
    return doc


def measured(doc: dict) -> dict:
    """What a run measured: every block but the environment, and each setting without its timing."""
    kept = {k: v for k, v in doc.items() if k != "env"}
    kept["attacks"] = [{k: v for k, v in a.items() if k != "seconds"} for a in doc["attacks"]]
    return kept


def interrupt_settings(monkeypatch, after: int) -> list:
    """Ctrl-C as setting ``after + 1`` starts, i.e. once ``after`` settings have finished."""
    real, started = reid_engine._run_entry, []

    def run_entry(entry, *args, **kwargs):
        started.append(entry.index)
        if len(started) == after + 1:
            raise KeyboardInterrupt
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(reid_engine, "_run_entry", run_entry)
    return started


@pytest.mark.parametrize("which, after", [("reid-pgd", 2), ("reid-misrank-transfer", 1)])
def test_interrupted_run_keeps_the_finished_settings_and_resumes_to_the_same_result(
        which, after, pgd_suite, misrank_suite, pgd_reference, tmp_path, monkeypatch):
    if which == "reid-pgd":
        args, reference = pgd_args(pgd_suite), pgd_reference
    else:
        args = misrank_args(misrank_suite)
        reference = uninterrupted(args, tmp_path / "reference")
    total = len(reference["attacks"])
    out = tmp_path / "run"

    with monkeypatch.context() as patch:
        interrupt_settings(patch, after)
        stopped = invoke(*args, "--out", out)
    assert stopped.exit_code == 130, stopped.stderr
    line = one_error_line(stopped, "interrupted")
    assert line == (f"robench: interrupted: interrupted after {after} of {total} settings; partial results in "
                    f"{out}/results.json (complete: false); run the same command with --resume {out}")
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and partial["task"] == "reid"
    assert partial["progress"] == {"evaluated": after, "total": total, "unit": "settings"}
    # Exactly the finished settings, measured as in the uninterrupted run; the clean metrics too.
    assert measured(partial)["attacks"] == measured(reference)["attacks"][:after]
    assert partial["clean"] == reference["clean"]
    assert (out / PROGRESS_FILE).is_file() and (out / "config.json").is_file() and (out / "results.csv").is_file()

    # Readers: gate and compare refuse a partial document; the report shows it, marked partial.
    gate = invoke("gate", out, "--baseline", out)
    assert gate.exit_code == 2 and "partial result" in one_error_line(gate)
    report = invoke("report", out, "-o", tmp_path / "report.html")
    assert report.exit_code == 0, report.stderr
    assert f"partial: {after} of {total} settings" in (tmp_path / "report.html").read_text()

    # Interrupted again before a new setting finished: the partial results stay as they were.
    with monkeypatch.context() as patch:
        interrupt_settings(patch, 0)
        again = invoke(*args, "--resume", out)
    assert again.exit_code == 130
    assert f"interrupted after {after} of {total} settings" in one_error_line(again, "interrupted")
    assert measured(json.loads((out / "results.json").read_text())) == measured(partial)

    # Other settings do not resume this run.
    other = invoke(*args, "--resume", out, "--seed", "1")
    assert other.exit_code == 2 and "differ from the interrupted run" in one_error_line(other)

    # The same command (--out or --resume) computes only the missing settings.
    started = interrupt_settings(monkeypatch, total)  # never reached: counts the settings run
    resumed = invoke(*args, "--out", out)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"robench: resuming {out} after {after} finished setting(s)" in resumed.stderr
    assert started == list(range(after, total))
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and doc["progress"] == reference["progress"]
    assert measured(doc) == measured(reference)
    assert not (out / PROGRESS_FILE).exists()
    refused = invoke(*args, "--out", out)
    assert refused.exit_code == 2 and "never overwritten" in one_error_line(refused)


def test_sigterm_stops_a_run_with_exit_130_and_the_same_command_finishes_it(pgd_suite, pgd_reference, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "robench", *map(str, pgd_args(pgd_suite)), "--out", str(out)]
    env = {**os.environ, "ROBENCH_DEBUG": ""}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    # The progress file appears once the first setting has finished.
    deadline = time.time() + 300
    while not (out / PROGRESS_FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robench: interrupted: interrupted after "), err
    assert f"--resume {out}" in lines[0]
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False
    done = partial["progress"]["evaluated"]
    assert 1 <= done < 3 and partial["progress"]["total"] == 3
    assert measured(partial)["attacks"] == measured(pgd_reference)["attacks"][:done]

    resumed = subprocess.run([*command[:-2], "--resume", str(out)], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} after {done} finished setting(s)" in resumed.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and measured(doc) == measured(pgd_reference)
    assert not (out / PROGRESS_FILE).exists()


@pytest.mark.parametrize("where", ["features", "first setting"])
def test_interrupted_before_the_first_setting_saves_nothing(where, pgd_suite, tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reid_engine, "_extract_all" if where == "features" else "_run_entry", stop)
    out = tmp_path / "run"
    result = invoke(*pgd_args(pgd_suite), "--out", out)
    assert result.exit_code == 130
    assert one_error_line(result, "interrupted") == ("robench: interrupted: interrupted before the first setting "
                                                     "finished; nothing to save (0 of 3 settings)")
    assert not out.exists()  # no empty folder, not even the lock file


def test_sigkill_mid_run_then_the_same_command_resumes_to_the_same_results(pgd_suite, pgd_reference, tmp_path):
    """No handler runs on SIGKILL: what survives is the progress file saved after each finished setting."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "robench", *map(str, pgd_args(pgd_suite)), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / PROGRESS_FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    assert not (out / "results.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and measured(doc) == measured(pgd_reference)
    assert not (out / PROGRESS_FILE).exists()


def stop_at_group(monkeypatch, stop: int | None) -> list:
    """Ctrl-C as group ``stop`` (counted over the whole run, from 1) is about to be attacked."""
    real, groups = reid_engine._group_inputs, []

    def group_inputs(images, group, *args, **kwargs):
        groups.append(list(group))
        if len(groups) == stop:
            raise KeyboardInterrupt
        return real(images, group, *args, **kwargs)

    monkeypatch.setattr(reid_engine, "_group_inputs", group_inputs)
    return groups


def test_a_setting_stopped_between_groups_resumes_from_its_finished_groups(pgd_suite, tmp_path, monkeypatch):
    # Groups of 8 queries; a snapshot after every group. The reference runs with the same groups:
    # a CPU's float results may depend on the batch they are computed in.
    args = [*pgd_args(pgd_suite), "--batch-size", "8", "--save-every", "0"]
    with monkeypatch.context() as patch:
        every = stop_at_group(patch, None)
        reference = uninterrupted(args, tmp_path / "reference")
    per_setting = len(every) // 3
    assert per_setting >= 3 and len(every) == 3 * per_setting

    # Stopped in the second setting, after two of its groups.
    stop = per_setting + 3
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_at_group(patch, stop)
        stopped = invoke(*args, "--out", out)
    assert stopped.exit_code == 130
    assert "interrupted after 1 of 3 settings" in one_error_line(stopped, "interrupted")
    state = torch.load(out / PROGRESS_FILE, weights_only=True)
    assert state["partial"]["index"] == 1 and len(state["partial"]["rows"]) == 2 * 8

    # A progress file is input: a setting under way that does not fit the run is refused.
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    state["partial"]["features"] = state["partial"]["features"][:, :3]
    torch.save(state, forged / PROGRESS_FILE)
    refused = invoke(*args, "--out", forged)
    assert refused.exit_code == 2
    assert one_error_line(refused) == ("robench: error: cannot resume: the progress file's setting under way "
                                       "does not fit this run")

    # The same command attacks only the groups that were not finished.
    resumed_groups = stop_at_group(monkeypatch, None)
    resumed = invoke(*args, "--out", out)
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed_groups == every[stop - 1:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and measured(doc) == measured(reference)
