"""torchrun (gloo, loopback) gives exactly the single-process numbers: any number of processes, two nodes,
a worker killed and restarted, a whole job killed and resumed with another process count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from robench.evaluation.work_queue import UNITS_PER_PROCESS, plan_units
from robench.results.progress import PROGRESS_FILE
from cli_helpers import invoke
from torchrun_helpers import nodes, saved_units, standalone

FAST = "name: dist\nattacks:\n  - attack: fgsm\n    eps: [0.05, 0.1]\n  - attack: pgd\n    eps: 0.1\n    steps: 5\n"
# Slow enough that a kill lands in the middle: the robust samples take every step.
SLOW = "name: slow\nattacks:\n  - attack: pgd\n    eps: 0.03\n    steps: 60\n"
EVAL = ["eval", "example:digits", "--batch-size", "16", "--quiet", "--json", "--save-every", "0"]
SLOW_EVAL = [*EVAL, "--limit", "320"]
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")


@given(samples=st.integers(1, 100_000), batch=st.integers(1, 512), longest=st.integers(1, 32),
       processes=st.integers(1, 64))
def test_units_cover_the_data_once_in_whole_batches(samples, batch, longest, processes):
    plan = plan_units(samples, batch, longest, processes)
    bounds = [plan.bounds(unit) for unit in range(plan.count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == samples
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(start % batch == 0 and 0 < stop - start <= batch * longest for start, stop in bounds)
    if -(-samples // batch) >= UNITS_PER_PROCESS * processes * longest:
        assert plan.unit_batches == longest, "big data: units as long as a segment"


def _robench(args, out: Path, cwd: Path, launcher=(), **kwargs):
    cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "robench", *args, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs (in this process) of the fast and the slow suite: what every distributed run must
    equal."""
    root = tmp_path_factory.mktemp("single")
    (root / "fast.yaml").write_text(FAST)
    (root / "slow.yaml").write_text(SLOW)
    runs = {}
    for name, args in (("fast", EVAL), ("slow", SLOW_EVAL)):
        done = invoke(*args, "--suite", root / f"{name}.yaml", "--out", root / name)
        assert done.exit_code == 0, done.stderr
        runs[name] = (json.loads(done.stdout), (root / name / "samples.csv").read_text(), root / f"{name}.yaml")
    return runs


def _assert_same(doc: dict, samples: Path, expected) -> None:
    want, want_samples, _ = expected
    assert doc["complete"] is True
    assert doc["clean"] == want["clean"] and doc["robust_accuracy"] == want["robust_accuracy"]
    for x, y in zip(doc["attacks"], want["attacks"]):
        assert (x["accuracy"], x["success_rate"], x["n"], x["gradient_evals"]) == \
            (y["accuracy"], y["success_rate"], y["n"], y["gradient_evals"])
    assert doc["env"]["dataset_fingerprint"] == want["env"]["dataset_fingerprint"]
    assert doc["sanity"] == want["sanity"]
    assert samples.read_text() == want_samples


@pytest.mark.parametrize("processes", [2, 3])
def test_the_work_queue_equals_one_process(reference, tmp_path, processes):
    suite = reference["fast"][2]
    run = _robench([*EVAL, "--suite", str(suite)], tmp_path / "run", tmp_path, standalone(processes))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["env"]["processes"] == processes
    units = doc["env"]["speed"]["work_units"]
    # 540 samples: 34 batches of 16, cut into UNITS_PER_PROCESS units a process where the data allows.
    assert units["units"] == plan_units(540, 16, 32, processes).count > processes
    assert units["resumed"] == 0 and units["processes"] == processes
    _assert_same(doc, tmp_path / "run" / "samples.csv", reference["fast"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "only rank 0 writes"
    assert not (tmp_path / "run" / PROGRESS_FILE).exists(), "a finished job keeps no progress file"


def test_two_nodes_of_two_processes_equal_one_process(reference, tmp_path):
    """Two torchrun launchers on one machine, meeting through a c10d rendezvous on loopback."""
    suite = reference["fast"][2]
    launcher = nodes(2, 2, "robench-test")
    cmd = [*launcher, "-m", "robench", *EVAL, "--suite", str(suite), "--out", str(tmp_path / "run")]
    launched = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in launched]
    assert [node.returncode for node in launched] == [0, 0], [err for _, err in outputs]
    docs = [json.loads(out) for out, _ in outputs if out.strip()]
    assert len(docs) == 1, "one node holds rank 0, which alone prints and writes"
    assert docs[0]["env"]["processes"] == 4
    _assert_same(docs[0], tmp_path / "run" / "samples.csv", reference["fast"])


def _wait_for_units(run: Path, job: subprocess.Popen, count: int) -> int:
    deadline = time.monotonic() + 300
    while (saved := saved_units(run)) < count:
        assert job.poll() is None, job.communicate()[1]
        assert time.monotonic() < deadline, "no progress saved"
        time.sleep(0.05)
    return saved


def _workers(parent: int) -> dict[int, int]:
    """torchrun's worker processes: rank -> pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue  # gone meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@needs_proc
def test_a_killed_worker_is_restarted_and_the_job_resumes_its_saved_units(reference, tmp_path):
    suite, run = reference["slow"][2], tmp_path / "run"
    cmd = [*standalone(2, "--max-restarts", "1"), "-m", "robench", *SLOW_EVAL, "--suite", str(suite),
           "--out", str(run)]
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _wait_for_units(run, job, 3)
    os.kill(_workers(job.pid)[1], signal.SIGKILL)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err
    doc = json.loads(out)
    units = doc["env"]["speed"]["work_units"]
    # The restarted group attacked only the units not saved when the worker died.
    assert units["units"] == plan_units(320, 16, 32, 2).count and seen <= units["resumed"] < units["units"], units
    _assert_same(doc, run / "samples.csv", reference["slow"])


@needs_proc
def test_a_killed_job_resumes_with_another_number_of_processes(reference, tmp_path):
    suite, run = reference["slow"][2], tmp_path / "run"
    cmd = [*standalone(2), "-m", "robench", *SLOW_EVAL, "--suite", str(suite), "--out", str(run)]
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    seen = _wait_for_units(run, job, 3)
    os.killpg(job.pid, signal.SIGKILL)  # launcher and workers at once: nothing gets to save on the way out
    job.communicate(timeout=60)
    saved = saved_units(run)
    assert saved >= seen
    again = _robench([*SLOW_EVAL, "--suite", str(suite)], run, tmp_path, standalone(3))
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["env"]["speed"]["work_units"]["resumed"] == saved
    _assert_same(doc, run / "samples.csv", reference["slow"])


def test_one_process_resumes_a_queued_job(reference, tmp_path):
    """A job stopped by SIGTERM under torchrun, finished by a plain single process (no torchrun)."""
    suite, run = reference["slow"][2], tmp_path / "run"
    cmd = [*standalone(2), "-m", "robench", *SLOW_EVAL, "--suite", str(suite), "--out", str(run)]
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_units(run, job, 2)
    job.send_signal(signal.SIGTERM)  # torchrun passes it to its workers: rank 0 saves and writes partial results
    job.communicate(timeout=120)
    partial = json.loads((run / "results.json").read_text())
    assert partial["complete"] is False and 0 < partial["progress"]["evaluated"] < 320
    saved = saved_units(run)
    again = invoke(*SLOW_EVAL, "--suite", suite, "--out", run)
    assert again.exit_code == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["env"]["processes"] == 1 and doc["env"]["speed"]["work_units"]["resumed"] == saved
    _assert_same(doc, run / "samples.csv", reference["slow"])


def test_a_single_process_run_is_not_resumed_under_torchrun(reference, tmp_path, monkeypatch):
    import robench.evaluation.engine as engine

    suite, run = reference["slow"][2], tmp_path / "run"
    real_run_segment, calls = engine._run_segment, []

    def interrupted_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second segment: the first is saved
        return real_run_segment(*args, **kwargs)

    monkeypatch.setattr(engine, "SEGMENT_BATCHES", 4)  # 20 batches: five segments
    monkeypatch.setattr(engine, "_run_segment", interrupted_on_second)
    stopped = invoke(*SLOW_EVAL, "--suite", suite, "--out", run)
    assert stopped.exit_code == 130 and (run / PROGRESS_FILE).exists(), stopped.stderr
    again = _robench([*SLOW_EVAL, "--suite", str(suite)], run, tmp_path, standalone(2))
    assert again.returncode != 0  # torchrun's own code: a worker failed (each said why, with robench's code 2)
    assert ("robench: error: cannot resume under torchrun: the run was started by a single process; resume it "
            "with a single process") in again.stderr


def test_a_node_that_read_other_data_stops_the_job(reference, tmp_path):
    """Each node reads its own copy of the data; the second copy differs from sample 160 on (one bit a pixel),
    where both nodes are attacking units (the slow suite: rank 0 cannot finish them all before the other starts)."""
    from robench.examples import example_data_path

    arrays = dict(np.load(example_data_path("digits")))
    launched = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "data.npz", **arrays)
        arrays["x"] = arrays["x"].copy()
        arrays["x"][160:] ^= 1
    launcher = nodes(2, 1, "robench-data")
    cmd = [*launcher, "-m", "robench", *SLOW_EVAL, "--data", "npz:data.npz", "--suite", str(reference["slow"][2]),
           "--out", str(tmp_path / "run")]
    for name in ("a", "b"):
        # One thread a process, as torchrun sets for several processes a node: two nodes share these cores.
        launched.append(subprocess.Popen(cmd, cwd=tmp_path / name, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    errors = "".join(node.communicate(timeout=300)[1] for node in launched)
    # Every process stops (rank 0 tells the others): no node is left waiting for the rest.
    assert all(node.returncode != 0 for node in launched)
    assert "read other data than the first process for samples" in errors, errors
    assert "the first process (rank 0) stopped" in errors, errors
    run = tmp_path / "run"
    assert not (run / "results.json").exists(), "no result from mixed data"
    # The first unit of other data stopped the job: the units checked before it are kept for a rerun.
    assert 0 < saved_units(run) < plan_units(320, 16, 32, 2).count
