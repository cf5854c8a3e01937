"""``robench pixel-index`` under torchrun (gloo, loopback): the work queue gives exactly a single process's
results with any number of processes, and a job killed outright resumes from the units it saved."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from robench.evaluation.work_queue import Plan, plan_units
from robench.pixels.queued import LONGEST_UNIT
from robench.results.progress import PROGRESS_FILE
from torchrun_helpers import nodes, saved_units, standalone
import test_pixel_resume as pixel_resume
from cli_helpers import invoke, one_error_line, without
from test_pixel_resume import VOLATILE, results, signal_after_batches

folder = pixel_resume.folder  # the fixture: the bundled digits as PNG files in class folders

# 200 images in batches of 8, cut into a few units a process. Enough trials that a job is still computing
# when its first unit is saved (about a second of work for one process).
SETTINGS = ["--pixels", "1,2,4", "--trials", "10", "--batch-size", "8", "--save-every", "0", "--quiet"]


def plan(processes: int) -> Plan:
    return plan_units(200, 8, LONGEST_UNIT, processes)

# How the run went, not what it found.
RUN_FACTS = VOLATILE | {"processes", "speed"}
# torchrun gives each worker one thread; so do the runs in this process (below), which are then the
# same computation, and fast on a small machine.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(images: Path, out: Path) -> list[str]:
    return ["pixel-index", "example:digits", str(images), *SETTINGS, "--out", str(out)]


def torchrun(processes: int, images: Path, out: Path) -> list[str]:
    return [*standalone(processes), "-m", "robench", *command(images, out)]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """One plain process (in this one): what every job must equal."""
    out = tmp_path_factory.mktemp("pixel-single") / "run"
    with one_thread():
        done = invoke(*command(folder, out))
    assert done.exit_code == 0, done.stderr
    doc = results(out)
    assert "processes" not in doc["env"] and "speed" not in doc["env"], "a single-process run's env is unchanged"
    return without(doc, RUN_FACTS)


def two_nodes(images: Path, out: Path) -> list[str]:
    """One of two torchrun launchers of 2 processes (run it twice)."""
    return [*nodes(2, 2, "pixels"), "-m", "robench", *command(images, out)]


JOBS = {"2": (2, 1), "3": (3, 1), "2 nodes x 2": (4, 2)}  # name: (processes, launchers)


@pytest.fixture(scope="module")
def jobs(folder, tmp_path_factory):
    """The jobs, started together: most of a small job's time is its processes starting up, which side by
    side overlap (each job's own rendezvous is on a free port)."""
    started = {}
    for name, (processes, launchers) in JOBS.items():
        cwd = tmp_path_factory.mktemp("pixel-torchrun")
        cmd = two_nodes(folder, cwd / "run") if launchers == 2 else torchrun(processes, folder, cwd / "run")
        started[name] = cwd, [subprocess.Popen(cmd, cwd=cwd, text=True, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, env=ONE_THREAD, start_new_session=True)
                              for _ in range(launchers)]
    yield started
    for _, launched in started.values():
        for job in launched:
            if job.poll() is None:  # a test that failed first: the launcher and its workers go
                os.killpg(job.pid, signal.SIGKILL)
                job.communicate()


@pytest.mark.parametrize("name", list(JOBS))
def test_the_work_queue_equals_one_process(jobs, reference, name):
    cwd, launched = jobs[name]
    for job in launched:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    processes = JOBS[name][0]
    doc = results(cwd / "run")
    assert without(doc, RUN_FACTS) == reference
    assert doc["env"]["processes"] == processes
    cut = plan(processes)
    assert doc["env"]["speed"]["work_units"] == {"units": cut.count, "unit_batches": cut.unit_batches,
                                                 "resumed": 0, "processes": processes}
    assert sorted(p.name for p in cwd.iterdir()) == ["run"], "only rank 0 writes"
    assert not (cwd / "run" / PROGRESS_FILE).exists(), "a finished job keeps no progress file"


def test_a_killed_job_resumes_in_one_process(folder, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    job = subprocess.Popen(torchrun(2, folder, run), cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=ONE_THREAD, start_new_session=True)
    deadline = time.monotonic() + 120
    while saved_units(run) < 1:
        assert job.poll() is None, job.communicate()[1]
        assert time.monotonic() < deadline, "no unit saved"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # launcher and workers at once: nothing gets to save on the way out
    job.communicate(timeout=60)
    assert not (run / "results.json").exists(), "the job finished before it was killed"
    saved = saved_units(run)
    assert 1 <= saved < plan(2).count
    other_batches = invoke(*command(folder, run), "--batch-size", 16)
    assert other_batches.exit_code == 2
    assert "the run used --batch-size 8, not 16" in one_error_line(other_batches)
    with one_thread():
        # A plain process finishes the job on the work queue; stopped after two more units, it writes the
        # partial results of every unit collected, resumed ones included.
        signal_after_batches(monkeypatch, 2 * plan(2).unit_batches, signal.SIGTERM)
        stopped = invoke(*command(folder, run))
        assert stopped.exit_code == 130, stopped.stderr
        assert f"resuming {run} after {saved} of {plan(2).count} finished work units" in stopped.stderr
        units = [int(u) for u in torch.load(run / PROGRESS_FILE, weights_only=True)["units"]]
        assert len(units) == saved + 2
        images = sum(stop - start for start, stop in map(plan(2).bounds, units))
        assert f"interrupted after {images} of 200 images" in one_error_line(stopped, "interrupted")
        assert results(run)["complete"] is False
        monkeypatch.undo()
        done = invoke(*command(folder, run))
    assert done.exit_code == 0, done.stderr
    doc = results(run)
    assert without(doc, RUN_FACTS) == reference
    assert doc["env"]["processes"] == 1 and doc["env"]["speed"]["work_units"]["resumed"] == saved + 2
    assert not (run / PROGRESS_FILE).exists()
