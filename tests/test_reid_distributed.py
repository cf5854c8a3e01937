"""Re-identification under torchrun (gloo, loopback) measures exactly what one process measures: 2 and 3
processes, two nodes of two, and a job killed mid-setting, resumed by torchrun with another process count
and by a plain single process.

On the bundled example (example:reid-digits): features and attacked groups are work units
(``robench.reid.queued``). Every torchrun worker spends seconds importing torch, so the jobs are started
together and the single-process reference runs in this process meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from robench.results.progress import PROGRESS_FILE
from cli_helpers import invoke
from torchrun_helpers import nodes, standalone
from test_reid_interrupt import measured

# An away entry and a mis-ranking one (groups of whole identities), a few PGD steps each: slow enough that
# a job can be killed in the middle of a setting, with units saved.
SUITE = """name: reid-dist
task: reid
attacks:
  - attack: pgd
    eps: 8/255
    steps: 2
    objective: away
  - attack: pgd
    eps: 8/255
    steps: 2
    objective: misrank
    ids_per_batch: 6
"""
EVAL = ["eval", "example:reid-digits", "--device", "cpu", "--batch-size", "32", "--quiet", "--json",
        "--save-every", "0"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "reid-dist.yaml"
    path.write_text(SUITE)
    return path


def _command(launcher: list[str], suite: Path, out: Path) -> list[str]:
    return [*launcher, "-m", "robench", *EVAL, "--suite", str(suite), "--out", str(out)]


def _start(launcher: list[str], suite: Path, out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(_command(launcher, suite, out), cwd=out.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def jobs(suite, tmp_path_factory):
    """The independent torchrun jobs, started at once: 2 processes, 3 processes, two nodes of two; each
    job's run folder, alone in a folder of its own."""
    two_nodes = nodes(2, 2, "robench-reid-test")
    launchers = {2: [standalone(2)], 3: [standalone(3)], "nodes": [two_nodes, two_nodes]}
    started = {}
    for name, commands in launchers.items():
        out = tmp_path_factory.mktemp(f"torchrun-{name}") / "run"
        started[name] = ([_start(launcher, suite, out) for launcher in commands], out)
    yield started
    for launched, _ in started.values():
        for job in launched:
            if job.poll() is None:
                job.kill()
                job.communicate()


@pytest.fixture(scope="module")
def reference(jobs, suite, tmp_path_factory) -> dict:
    """A single process (this one, while the torchrun jobs start): what every job must equal."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = invoke(*EVAL, "--suite", suite, "--out", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [a["params"]["objective"] for a in doc["attacks"]] == ["away", "misrank"]
    assert "work_units" not in doc["env"].get("speed", {}), "a single process uses no work queue"
    return doc


def _finished(launched: list[subprocess.Popen]) -> dict:
    outputs = [job.communicate(timeout=300) for job in launched]
    assert [job.returncode for job in launched] == [0] * len(launched), [err for _, err in outputs]
    docs = [json.loads(out) for out, _ in outputs if out.strip()]
    assert len(docs) == 1, "rank 0 alone prints and writes"
    return docs[0]


def _assert_same(doc: dict, reference: dict) -> None:
    assert doc["complete"] is True
    # Exactly, to the last bit of every float: the same features, whoever computed them.
    assert json.dumps(measured(doc)) == json.dumps(measured(reference))


@pytest.mark.parametrize("name, processes", [(2, 2), (3, 3), ("nodes", 4)])
def test_torchrun_equals_one_process(jobs, reference, name, processes):
    launched, out = jobs[name]
    doc = _finished(launched)
    assert doc["env"]["processes"] == processes
    units = doc["env"]["speed"]["work_units"]
    assert units["processes"] == processes and units["resumed"] == 0 and units["units"] > 4
    _assert_same(doc, reference)
    assert json.loads((out / "results.json").read_text())["attacks"] == doc["attacks"]
    assert not (out / PROGRESS_FILE).exists(), "a finished job keeps no progress file"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "only rank 0 writes"


def _saved_units(run: Path) -> int:
    """Units of the setting under way in the progress file (0 before the first is saved)."""
    try:
        state = torch.load(run / PROGRESS_FILE, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return 0  # not written yet
    return len(state.get("queued", {}).get("job", {}).get("units", {}))


def test_a_killed_job_resumes_with_another_number_of_processes_or_one(suite, reference, tmp_path):
    run = tmp_path / "run"
    job = _start(standalone(2), suite, run, start_new_session=True)
    deadline = time.monotonic() + 300
    while (saved := _saved_units(run)) == 0:
        assert job.poll() is None, "the job ended before it could be killed: " + job.communicate()[1]
        assert time.monotonic() < deadline, "no units saved"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # launcher and workers at once: nothing gets to save on the way out
    job.communicate(timeout=60)
    assert not (run / "results.json").exists()
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)

    # Three processes resume the job's units; meanwhile a plain process resumes the copy here.
    three = _start(standalone(3), suite, run)
    single = invoke(*EVAL, "--suite", suite, "--out", alone)
    assert single.exit_code == 0, single.stderr
    _assert_same(json.loads(single.stdout), reference)
    doc = _finished([three])
    assert doc["env"]["speed"]["work_units"]["resumed"] >= saved
    _assert_same(doc, reference)
    for out in (run, alone):
        assert not (out / PROGRESS_FILE).exists()
