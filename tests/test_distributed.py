"""torchrun with 2 CPU processes (gloo) gives exactly the single-process numbers."""

from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from robench.evaluation.distributed import shard_bounds

SUITE = "name: dist\nattacks:\n  - attack: fgsm\n    eps: [0.05, 0.1]\n  - attack: pgd\n    eps: 0.1\n    steps: 5\n"


@given(n=st.integers(1, 10_000), size=st.integers(1, 16))
def test_shards_are_exact(n, size):
    if n < size:
        return
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "contiguous, no gap, no overlap"
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_two_gloo_processes_equal_one(tmp_path):
    suite = tmp_path / "dist.yaml"
    suite.write_text(SUITE)
    args = ["-m", "robench", "eval", "example:digits", "--suite", str(suite), "--batch-size", "64", "--quiet",
            "--json"]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            *args, "--out", str(tmp_path / "multi")], capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "single")], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    a, b = json.loads(multi.stdout), json.loads(single.stdout)
    assert a["env"]["processes"] == 2 and b["env"]["processes"] == 1
    assert a["clean"] == b["clean"] and a["robust_accuracy"] == b["robust_accuracy"]
    for x, y in zip(a["attacks"], b["attacks"]):
        assert (x["accuracy"], x["success_rate"], x["n"], x["gradient_evals"]) == \
            (y["accuracy"], y["success_rate"], y["n"], y["gradient_evals"])
    assert a["env"]["dataset_fingerprint"] == b["env"]["dataset_fingerprint"]
    assert (tmp_path / "multi" / "samples.csv").read_text() == (tmp_path / "single" / "samples.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.yaml", "multi", "single"], "only rank 0 writes"
