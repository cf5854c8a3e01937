"""What compare, plot and suites show a person: ReID tables that fit a terminal, Pixel-index curves in
percent of each setting's images with their spread over trials, and suite names never cut."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from rich.console import Console
from torch import nn

import robench.cli.compare_cmd
import robench.cli.suites_cmd
from robench.reporting.plots import plot_results
from robench.results.reading import read_result
from robench.suites import builtin_suites
from cli_helpers import invoke

REID_SUITE = """name: wide
task: reid
attacks:
  - attack: fgsm
    label: fgsm-away
    eps: [4/255, 8/255, 16/255]
    objective: away
  - attack: pgd
    label: pgd-odfa
    eps: [8/255, 16/255]
    steps: 2
    objective: odfa
"""


def tiny_embedding() -> nn.Module:
    """An untrained feature extractor: enough for ReID documents written by the real code path."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 8))


@pytest.fixture(scope="module")
def reid_runs(digits_split, tmp_path_factory):
    """Two ReID runs with re-ranking (two embeddings), five attack entries: 48 values per run."""
    root = tmp_path_factory.mktemp("reid")
    _, x_te, _, y_te = digits_split
    for folder in ("query", "bounding_box_test"):
        (root / "market" / folder).mkdir(parents=True)
    for person in range(1, 7):
        for k, img in enumerate(x_te[y_te == person][:5]):
            folder, cam = ("query", 1) if k < 2 else ("bounding_box_test", 2)
            Image.fromarray(img[..., 0]).convert("RGB").save(
                root / "market" / folder / f"{person:04d}_c{cam}s1_{person * 10 + k:06d}_00.png")
    (root / "wide.yaml").write_text(REID_SUITE)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(tiny_embedding().state_dict(), root / f"net{seed}.pt")
        out = root / f"run{seed}"
        result = invoke("eval", root / f"net{seed}.pt", "--arch", "test_report_layouts:tiny_embedding", "--data",
                        f"market1501:{root / 'market'}", "--suite", root / "wide.yaml", "--rerank", "--quiet",
                        "--out", out)
        assert result.exit_code == 0, result.stderr
        runs.append(out)
    return runs


def test_reid_compare_fits_a_100_column_terminal(reid_runs, monkeypatch):
    monkeypatch.setattr(robench.cli.compare_cmd, "stdout_console", lambda: Console(width=100))
    result = invoke("compare", *reid_runs)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    header = next(line for line in lines if "Rank-1" in line)
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == ["", "Rank-1", "Rank-5", "Rank-10", "mAP"]
    docs = [json.loads((run / "results.json").read_text()) for run in reid_runs]
    text = re.sub(r"\s*│\s*", " | ", result.stdout)
    for doc in docs:
        name = doc["model"]["name"]
        row = f"Original · {name} | " + " | ".join(f"{100 * doc['clean'][k]:.1f}" for k in ("rank1", "rank5",
                                                                                             "rank10", "mAP"))
        assert row in text, (row, text[:2000])
        reranked = doc["attacks"][-1]["reranked"]
        assert f"pgd-odfa ε = 16/255 + re-ranking · {name} | {100 * reranked['rank1']:.1f}" in text


def test_reid_files_keep_the_papers_wide_layout(reid_runs):
    result = invoke("compare", *reid_runs, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    header = result.stdout.splitlines()[0].split(",")
    assert header[:5] == ["model", "Original Rank-1", "Original Rank-5", "Original Rank-10", "Original mAP"]
    assert len(header) == 1 + 4 * 12  # Original, 5 attack entries, each also re-ranked
    rows = invoke("compare", *reid_runs, "--layout", "reid-rows", "--format", "csv").stdout.splitlines()
    assert rows[0] == ",Rank-1,Rank-5,Rank-10,mAP" and len(rows) == 1 + 2 * 12


@pytest.fixture(scope="module")
def pixel_and_digits(digits_split, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    _, x_te, _, y_te = digits_split
    for i, (img, label) in enumerate(zip(x_te[:40], y_te[:40])):
        (root / "img" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / "img" / str(label) / f"{i:02d}.png")
    pixel = invoke("pixel-index", "example:digits", root / "img", "--pixels", "1,4,16", "--trials", "3",
                   "--on-attack", "fgsm", "--eps", "0.2", "--quiet", "--out", root / "pixel")
    assert pixel.exit_code == 0, pixel.stderr
    (root / "s.yaml").write_text("name: s\nattacks:\n  - attack: fgsm\n    eps: [0.05, 0.1]\n")
    digits = invoke("eval", "example:digits", "--suite", root / "s.yaml", "--limit", "40", "--quiet",
                    "--out", root / "digits")
    assert digits.exit_code == 0, digits.stderr
    return root


def test_pixel_curves_are_percent_of_each_settings_images_with_trial_spread(pixel_and_digits, tmp_path):
    result = read_result(pixel_and_digits / "pixel")
    plot = plot_results([result], "pixels", None, tmp_path / "px.png")
    assert (tmp_path / "px.png").stat().st_size > 5000 and plot.metric == "misclassified"
    points = plot.points.set_index(["entry", "pixels"])
    totals = set()
    for exp in result.doc["experiments"]:
        for row in exp["results"]:
            drawn = points.loc[(f"{exp['experiment']}:{exp['setting']}", row["pixels"])]
            assert drawn.y == pytest.approx(100 * row["misclassified"] / row["total"])
            assert drawn.err == pytest.approx(100 * row["misclassified_std"] / row["total"])
            assert 0 <= drawn.y <= 100
            totals.add(row["total"])
    assert len(totals) == 2, "the attack experiment's own n (its adversarial images) differs from the others'"
    assert (plot.points.err > 0).any(), "three trials of random positions do not all agree"


def test_plot_mixing_kinds_says_what_it_left_out(pixel_and_digits, tmp_path):
    both = (pixel_and_digits / "pixel", pixel_and_digits / "digits")
    by_pixels = invoke("plot", *both, "--out", tmp_path / "p.png")
    assert by_pixels.exit_code == 0, by_pixels.stderr
    warnings = [line for line in by_pixels.stderr.splitlines() if line.startswith("robench: warning:")]
    assert warnings == ["robench: warning: left out 1 run(s) with no misclassified values against pixels: "
                        "example-digits (digits), a classification run"]
    by_eps = invoke("plot", *both, "--x", "eps", "--out", tmp_path / "e.png")
    assert by_eps.exit_code == 0, by_eps.stderr
    assert "left out 1 run(s) with no accuracy values against eps: example-digits (pixel), a pixel run" \
        in by_eps.stderr


def test_suite_names_are_never_cut(monkeypatch):
    monkeypatch.setattr(robench.cli.suites_cmd, "stdout_console", lambda: Console(width=80))
    result = invoke("suites")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    names = {line.split("│")[1].strip() for line in lines if line.startswith("│")}
    assert set(builtin_suites()) <= names, set(builtin_suites()) - names
