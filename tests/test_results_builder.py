"""One results builder: shared document blocks, one tidy row format, one metric table.

Three real runs of the command line in this process (classification, Pixel-index and a
small Market-style ReID folder with ``--ranks 1,20``) are checked for what they share:
the env and model blocks, ``results.csv`` rows equal to what the reader builds, and
every CMC rank the run asked for reaching results.json, results.csv, compare and gate.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from robench.cli import app
from robench.examples import example_data_path
from robench.reporting.gate import standard_error
from robench.results.metric_table import higher_is_better, is_proportion, metric_info, rank_keys
from robench.results.reading import read_result, results_frame
from robench.results.tidy import TIDY_COLUMNS, tidy_frame

FEATURE_LAYER = "6"  # the 32-d embedding before the classifier
# What differs between two runs in one process for reasons other than the kind of run.
TIMING = {"seconds", "finished_at"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def embedding_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def market(digits_split, tmp_path_factory):
    """Six persons, two cameras: two query images per (person, camera), the rest in the gallery."""
    _, x_te, _, y_te = digits_split
    root = tmp_path_factory.mktemp("market")
    seen: dict[tuple[int, int], int] = {}
    for i in [i for i, label in enumerate(y_te) if label < 6][:90]:
        pid, cam = int(y_te[i]) + 1, 1 + i % 2
        seen[pid, cam] = seen.get((pid, cam), 0) + 1
        split = root / ("query" if seen[pid, cam] <= 2 else "bounding_box_test")
        split.mkdir(exist_ok=True)
        Image.fromarray(x_te[i][..., 0]).convert("RGB").save(split / f"{pid:04d}_c{cam}s1_{i:06d}_00.png")
    return root


@pytest.fixture(scope="module")
def runs(market, tmp_path_factory):
    """One finished run directory of each kind, all made in this process."""
    base = tmp_path_factory.mktemp("runs")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = embedding_net()  # untrained: the ranks are what they are, the plumbing is under test
    torch.save(net.state_dict(), base / "reid.pt")
    suite = base / "reid-suite.yaml"
    suite.write_text("name: rb\ntask: reid\nattacks:\n  - attack: pgd\n    eps: 0.1\n    steps: 2\n"
                     "    objective: away\n")
    folder = base / "digits"
    with np.load(example_data_path("digits")) as data:
        for i, (img, label) in enumerate(zip(data["x"][:30], data["y"][:30])):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[..., 0]).save(folder / str(label) / f"{i:03d}.png")
    commands = {
        "classification": ("eval", "example:digits", "--suite", "fgsm", "--data", "example:digits",
                           "--limit", 40, "--batch-size", 16),
        "pixel": ("pixel-index", "example:digits", folder, "--pixels", "1,2", "--trials", "1", "--batch-size", 16),
        "reid": ("eval", base / "reid.pt", "--arch", "test_results_builder:embedding_net", "--data",
                 f"market1501:{market}", "--feature-layer", FEATURE_LAYER, "--suite", suite, "--ranks", "1,20",
                 "--rerank"),
    }
    out = {}
    for kind, command in commands.items():
        out[kind] = base / kind
        result = invoke(*command, "--out", out[kind], "--quiet")
        assert result.exit_code == 0, (kind, result.stderr)
    return out


def document(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# ------------------------------------------------------------------ shared blocks
def test_env_blocks_agree_across_kinds(runs):
    docs = {kind: document(path) for kind, path in runs.items()}
    envs = {kind: {k: v for k, v in doc["env"].items() if k not in TIMING} for kind, doc in docs.items()}
    # What describes the software and the machine is the same for every kind of run in one process.
    for key in ("robench", "torch", "torchvision", "python", "numpy", "device", "device_name"):
        assert envs["classification"][key] == envs["pixel"][key] == envs["reid"][key], key
    assert envs["classification"]["seed"] == envs["pixel"]["seed"] == envs["reid"]["seed"] == 0
    # Each env names the data it ran on, the same value as the data block the reader matches runs by.
    for doc in docs.values():
        assert doc["env"]["dataset_fingerprint"] == doc["data"]["fingerprint"]
        assert list(doc)[:3] == ["schema", "task", "complete"] and doc["complete"] is True
    # One canonical field order: the fields two kinds share come in the same order in both.
    for a, b in (("classification", "pixel"), ("classification", "reid"), ("pixel", "reid")):
        shared = set(docs[a]["env"]) & set(docs[b]["env"])
        assert [k for k in docs[a]["env"] if k in shared] == [k for k in docs[b]["env"] if k in shared]
    assert "forward_images" in envs["pixel"] and "speed" in envs["classification"] and "speed" not in envs["reid"]


def test_model_blocks_of_one_checkpoint_agree(runs):
    """The classification and Pixel-index runs load the same bundled model: same identity, same order."""
    cls, pix = document(runs["classification"])["model"], document(runs["pixel"])["model"]
    assert cls.pop("num_classes") == 10
    assert cls == pix
    assert list(cls) == ["name", "source", "arch", "sha256", "normalization"]
    reid = document(runs["reid"])["model"]
    assert list(reid)[:4] == ["name", "source", "arch", "sha256"]
    assert reid["feature_layer"] == FEATURE_LAYER and reid["sha256"] and reid["sha256"] != cls["sha256"]


# ------------------------------------------------------------------ one tidy row format
def normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """Through CSV and back, so both sides carry the same types."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False)))


@pytest.mark.parametrize("kind", ["classification", "pixel", "reid"])
def test_results_csv_rows_are_the_reader_rows(runs, kind):
    written = pd.read_csv(runs[kind] / "results.csv")
    assert list(written.columns) == TIDY_COLUMNS
    read = results_frame([read_result(runs[kind])]).drop(columns="source")
    assert len(written) == len(read) > 0
    pd.testing.assert_frame_equal(written, normalised(read))
    assert set(written.kind) == {kind}
    doc = document(runs[kind])
    if kind == "classification":
        assert set(written.metric) == {"accuracy", "success_rate", "robust_accuracy", "mean_attack_accuracy"}
        clean = written[written.entry == "clean"].iloc[0]
        assert clean.value == doc["clean"]["accuracy"] and clean.n == doc["clean"]["n"]
    elif kind == "pixel":
        assert set(written.metric) == {"misclassified", "recognition_rate", "pi"}
        assert sorted(written.pixels.unique()) == [1, 2]
    else:
        assert set(written.ap_convention) == {doc["clean"]["ap_convention"]}


def test_evaluation_result_tidy_is_the_results_csv(tmp_path):
    import robench

    result = robench.evaluate("example:digits", "example:digits", "fgsm", limit=32, device="cpu")
    result.save(tmp_path / "run")
    tidy = result.tidy()
    assert list(tidy.columns) == TIDY_COLUMNS
    pd.testing.assert_frame_equal(normalised(tidy), pd.read_csv(tmp_path / "run" / "results.csv"))
    row = tidy[(tidy.entry == result.doc["attacks"][0]["label"]) & (tidy.metric == "success_rate")].iloc[0]
    assert row.value == result.doc["attacks"][0]["success_rate"] and row.n == result.doc["attacks"][0]["attacked"]


# ------------------------------------------------------------------ --ranks 1,20 end to end
def test_rank20_reaches_json_csv_compare_and_gate(runs, tmp_path):
    doc = document(runs["reid"])
    blocks = [doc["clean"], doc["clean_reranked"], *doc["attacks"], *(a["reranked"] for a in doc["attacks"])]
    for block in blocks:
        assert rank_keys(block) == ["rank1", "rank20"]
        assert block["rank1"] <= block["rank20"] <= 1.0
    rows = pd.read_csv(runs["reid"] / "results.csv")
    rank20 = rows[rows.metric == "rank20"]
    assert len(rank20) == len(blocks), "one rank20 row per metrics block"
    assert rank20[rank20.entry == "clean"].value.iloc[0] == doc["clean"]["rank20"]
    assert "rank5" not in set(rows.metric), "only the ranks the run asked for"

    table = invoke("compare", runs["reid"], runs["reid"], "--label", "a", "--label", "b", "--format", "csv")
    assert table.exit_code == 0, table.stderr
    header = table.stdout.splitlines()[0].split(",")
    assert "Original Rank-20" in header and "Original Rank-5" not in header
    assert header.index("Original Rank-1") < header.index("Original Rank-20") < header.index("Original mAP")

    # The same run with its clean rank-20 lowered: the gate sees the drop of exactly that value.
    current = tmp_path / "current"
    shutil.copytree(runs["reid"], current)
    worse = document(current)
    assert doc["clean"]["rank1"] < doc["clean"]["rank20"], "the fixture leaves room for a drop"
    worse["clean"]["rank20"] = (doc["clean"]["rank1"] + doc["clean"]["rank20"]) / 2  # CMC never falls with k
    (current / "results.json").write_text(json.dumps(worse))
    gate = invoke("gate", current, "--baseline", runs["reid"], "--json")
    assert gate.exit_code == 1, gate.stderr
    verdicts = json.loads(gate.stdout)["rows"]
    failing = [(r["entry"], r["metric"]) for r in verdicts if r["verdict"] == "regression"]
    assert failing == [("clean", "rank20")]
    assert any(r["metric"] == "rank20" and r["entry"] != "clean" and r["verdict"] == "ok" for r in verdicts)


def test_gate_on_identical_reid_runs_passes(runs):
    gate = invoke("gate", runs["reid"], "--baseline", runs["reid"], "--json")
    assert gate.exit_code == 0, gate.stderr
    assert {r["metric"] for r in json.loads(gate.stdout)["rows"]} >= {"rank1", "rank20", "mAP"}


# ------------------------------------------------------------------ the metric table
@pytest.mark.parametrize("metric", ["accuracy", "robust_accuracy", "mean_attack_accuracy", "rank1", "rank20",
                                    "rank100", "mAP", "mINP", "recognition_rate"])
def test_robustness_metrics_are_higher_is_better(metric):
    assert higher_is_better(metric)


@pytest.mark.parametrize("metric", ["success_rate", "pi", "misclassified"])
def test_attack_side_metrics_are_lower_is_better(metric):
    assert not higher_is_better(metric)


def test_only_fractions_of_n_get_a_binomial_error():
    assert is_proportion("rank20") and is_proportion("rank7") and is_proportion("success_rate")
    assert not is_proportion("mAP") and not is_proportion("pi") and not is_proportion("misclassified")
    assert standard_error("rank20", 0.5, 100) == pytest.approx(0.05)
    assert standard_error("mAP", 0.5, 100) is None
    assert standard_error("rank2x", 0.5, 100) is None, "not a CMC key"


def test_display_follows_the_table():
    assert metric_info("rank20").show(0.8125) == "81.2" and metric_info("accuracy").show(0.8125) == "81.25"
    assert metric_info("pi").show(3.14159) == "3.14" and metric_info("misclassified").show(2.5) == "2.5"
    assert metric_info("mINP").show(None) == "-"
    assert rank_keys(["mAP", "rank20", "rank5", "rank1", "ranking"]) == ["rank1", "rank5", "rank20"]


def test_tidy_rows_follow_any_rank_the_document_has():
    metrics = {"rank3": 0.5, "rank1": 0.25, "mAP": 0.2, "mINP": None, "queries": 8, "ap_convention": "noninterp"}
    doc = {"schema": "robench.results/1", "task": "reid", "model": {"name": "m"}, "suite": {"name": "s"},
           "clean": metrics, "clean_reranked": None, "attacks": []}
    frame = tidy_frame(doc)
    assert list(frame.metric) == ["rank1", "rank3", "mAP"], "mINP is null: left out"
    assert list(tidy_frame(doc, keep_null=True).metric) == ["rank1", "rank3", "mAP", "mINP"]
    assert set(frame.n) == {8} and set(frame.entry) == {"clean"}
