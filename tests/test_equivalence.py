"""Refactors prove themselves by equivalence: every built-in classification suite, the ReID suites
and the Pixel-index on the bundled examples give the same results.json (timings and machine details
aside) and samples.csv (results.csv for ReID) as the files pinned in tests/golden/.

After an intended change of results, regenerate the pinned files with
``ROBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_equivalence.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robench.examples import example_data_path
from robench.suites.loader import builtin_suites
from cli_helpers import invoke

GOLDEN = Path(__file__).with_name("golden")
UPDATE = os.environ.get("ROBENCH_UPDATE_GOLDEN", "") not in ("", "0")
LIMIT = 120  # a fixed subset of the 540 digits: every suite in a few seconds
# AutoAttack costs a hundred times a one-step suite: a smaller subset (its rows are those the 120-digit run
# gave for the same samples, checked when the pin was cut down).
LIMITS = {"autoattack": 40}
# Suites state eps in z-score units of their dataset's preset; the digits have one channel.
EXTRA = {"fdd-cifar100": ["--mean", "0.5", "--std", "0.25"]}
# Timings, paths and the software stack differ between runs and machines; results do not.
VOLATILE = {"seconds", "finished_at", "peak_memory_bytes", "speed", "source", "torch", "torchvision", "python",
            "numpy", "device_name", "robench", "folder"}


def classification_suites() -> list[str]:
    names = []
    for name, path in builtin_suites().items():
        if "task: reid" not in path.read_text():
            names.append(name)
    return names


# Passes through the model: exact on one machine, but CPU families (AVX2 against AVX-512 kernels)
# round differently, which can move the step at which one sample is first fooled (1690 against
# 1689 for one entry of the digits suite) while every per-sample outcome stays the same.
EFFORT = {"gradient_evals", "forward_evals"}
EFFORT_TOLERANCE = 0.005  # relative


def stable(value, drop=frozenset()):
    """The document without what legitimately changes from run to run."""
    if isinstance(value, dict):
        return {k: stable(v, drop) for k, v in value.items() if k not in VOLATILE | drop}
    if isinstance(value, list):
        return [stable(v, drop) for v in value]
    return value


def efforts(value, path=""):
    """Every pass count in the document, by its place in it."""
    if isinstance(value, dict):
        found = {f"{path}.{k}": v for k, v in value.items() if k in EFFORT and isinstance(v, int)}
        for k, v in value.items():
            found.update(efforts(v, f"{path}.{k}"))
        return found
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in efforts(item, f"{path}[{i}]").items()}
    return {}


def check_or_update(name: str, doc: dict, samples: str | None, table: str = "samples") -> None:
    json_path, csv_path = GOLDEN / f"{name}.json", GOLDEN / f"{name}.{table}.csv"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        json_path.write_text(json.dumps(stable(doc), indent=1, sort_keys=True) + "\n")
        if samples is not None:
            csv_path.write_text(samples)
        return
    assert json_path.is_file(), f"no pinned results for {name}: run with ROBENCH_UPDATE_GOLDEN=1"
    pinned = json.loads(json_path.read_text())
    assert stable(doc, EFFORT) == stable(pinned, EFFORT)
    now, then = efforts(doc), efforts(pinned)
    assert now.keys() == then.keys()
    for place, count in now.items():
        assert abs(count - then[place]) <= EFFORT_TOLERANCE * max(then[place], 1), (place, count, then[place])
    if samples is not None:
        assert samples == csv_path.read_text()


# Re-identification on the bundled example: every built-in ReID suite but reid-dmr, whose generator is
# trained by the user (its attack is pinned through the DMR tests).
REID = {"reid-clean": [], "reid-pgd": [],
        "reid-misrank-transfer": ["--surrogate", "example:reid-digits-surrogate"]}


def test_every_classification_suite_is_pinned():
    assert sorted(p.name for p in GOLDEN.glob("*.json")) == sorted(
        [f"{name}.json" for name in [*classification_suites(), *REID]] + ["pixel-index.json"])


@pytest.mark.parametrize("suite", list(REID))
def test_reid_results_are_unchanged(suite, tmp_path):
    out = tmp_path / "run"
    result = invoke("eval", "example:reid-digits", "--suite", suite, "--out", out, "--quiet", *REID[suite])
    assert result.exit_code == 0, result.stderr
    check_or_update(suite, json.loads((out / "results.json").read_text()), (out / "results.csv").read_text(),
                    table="results")


@pytest.mark.parametrize("suite", classification_suites())
def test_builtin_suite_results_are_unchanged(suite, tmp_path):
    out = tmp_path / "run"
    result = invoke("eval", "example:digits", "--suite", suite, "--data", "example:digits", "--limit",
                    LIMITS.get(suite, LIMIT), "--out", out, "--quiet", *EXTRA.get(suite, []))
    assert result.exit_code == 0, result.stderr
    check_or_update(suite, json.loads((out / "results.json").read_text()), (out / "samples.csv").read_text())


def test_pixel_index_results_are_unchanged(tmp_path):
    with np.load(example_data_path("digits")) as data:
        x, y = data["x"][:LIMIT], data["y"][:LIMIT]
    folder = tmp_path / "digits"
    for i, (img, label) in enumerate(zip(x, y)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(folder / str(label) / f"{i:03d}.png")
    out = tmp_path / "run"
    result = invoke("pixel-index", "example:digits", folder, "--pixels", "1,2,4", "--delta", "40", "--area", "4",
                    "--trials", "2", "--on-attack", "fgsm", "--eps", "0.1", "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    check_or_update("pixel-index", json.loads((out / "results.json").read_text()), None)
