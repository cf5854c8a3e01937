"""compare, plot and the one-step eval + gate on result files written by real runs during the test run."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import robench
from robench.examples import digits_cnn, train_classifier
from cli_helpers import invoke

SUITE = {"name": "cmp", "attacks": [{"attack": "fgsm", "eps": [0.05, 0.1]},
                                    {"attack": "pgd", "eps": [0.05, 0.1], "steps": 5, "final_iterate": True}]}


@pytest.fixture(scope="module")
def runs(trained_model, digits_split, test_tensors, tmp_path_factory):
    """The trained fixture model and a weaker one (one epoch), evaluated with the same suite."""
    x_tr, _, y_tr, _ = digits_split
    with torch.random.fork_rng():
        torch.manual_seed(5)
        weak = digits_cnn()
    train_classifier(weak, torch.from_numpy(x_tr).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y_tr),
                     epochs=1, seed=5)
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, model in (("strong", trained_model), ("weak", weak)):
        result = robench.evaluate(model, test_tensors, SUITE, device="cpu")
        result.doc["model"]["name"] = name
        paths[name] = result.save(root / name)
        torch.save(model.state_dict(), root / f"{name}.pt")
    return root, paths


def test_fdd_layout_markdown(runs):
    _, paths = runs
    result = invoke("compare", paths["strong"], paths["weak"], "--format", "markdown")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2] == "|  | strong | weak |"
    body = {line.split("|")[1].strip(): line for line in lines[4:] if line.startswith("|")}
    assert set(body) == {"clean", "fgsm ε = 0.05", "fgsm ε = 0.1", "pgd ε = 0.05", "pgd ε = 0.1", "worst case"}
    strong = json.loads((paths["strong"] / "results.json").read_text())
    assert f"**{100 * strong['clean']['accuracy']:.2f}**" in body["clean"], "the better model is marked"
    # the last row, as in eval's table: per sample, robust under every entry (at most the lowest entry)
    assert list(body)[-1] == "worst case"
    assert f"{100 * strong['robust_accuracy']:.2f}" in body["worst case"]
    assert strong["robust_accuracy"] <= min(a["accuracy"] for a in strong["attacks"])


def test_alignment_layout_mean_and_csv(runs):
    _, paths = runs
    result = invoke("compare", paths["strong"], paths["weak"], "--layout", "alignment", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["model"] for r in table] == ["strong", "weak"]
    columns = ["fgsm ε = 0.05", "fgsm ε = 0.1", "pgd ε = 0.05", "pgd ε = 0.1"]
    assert list(table[0]) == ["model", "Clean", *columns, "Mean"]
    for row in table:
        mean = np.mean([float(row[c]) for c in columns])
        assert float(row["Mean"]) == pytest.approx(mean, abs=0.01), "Mean averages the attack columns only"
    doc = json.loads((paths["weak"] / "results.json").read_text())
    assert float(table[1]["Clean"]) == pytest.approx(100 * doc["clean"]["accuracy"], abs=0.005)


def test_latex_html_and_out_file(runs, tmp_path):
    _, paths = runs
    out = tmp_path / "t.tex"
    assert invoke("compare", paths["strong"], paths["weak"], "--format", "latex", "--out", out).exit_code == 0
    tex = out.read_text()
    assert tex.startswith("\\begin{tabular}") and "\\textbf{" in tex and "$\\epsilon$" in tex
    html = invoke("compare", paths["strong"], paths["weak"], "--format", "html").stdout
    assert html.startswith("<table>") and "<b>" in html and html.count("<tr>") == 7  # header, 5 settings, worst


def test_free_pivot_labels_and_rich_table(runs):
    _, paths = runs
    result = invoke("compare", paths["strong"], paths["weak"], "--rows", "model", "--cols", "entry,eps",
                    "--metric", "success_rate", "--label", "A", "--label", "B", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r[""] for r in rows] == ["A", "B"] and "pgd · 0.1" in rows[0]
    table = invoke("compare", paths["strong"], paths["weak"])
    assert table.exit_code == 0 and "strong" in table.stdout and "pgd ε = 0.1" in table.stdout


def test_not_comparable_runs_are_flagged(runs, trained_model, digits_split, tmp_path):
    _, paths = runs
    _, x_te, _, y_te = digits_split
    other = robench.evaluate(trained_model, (x_te[:100], y_te[:100]), SUITE, device="cpu").save(tmp_path / "o")
    result = invoke("compare", paths["strong"], other, "--format", "markdown")
    assert result.exit_code == 0
    assert "not comparable: different dataset fingerprint" in result.stderr
    assert "> not comparable: different dataset fingerprint" in result.stdout


def test_compare_errors(runs, tmp_path):
    _, paths = runs
    assert invoke("compare", tmp_path / "none").exit_code == 2
    assert "unknown layout" in invoke("compare", paths["strong"], "--layout", "fdda").stderr
    bad = invoke("compare", paths["strong"], "--format", "docx")
    assert bad.exit_code == 2 and "--format" in bad.stderr
    assert invoke("compare", paths["strong"], "--label", "a", "--label", "b").exit_code == 2
    assert "no 'pi' values" in invoke("compare", paths["strong"], "--metric", "pi").stderr


def test_plot_accuracy_vs_eps(runs, tmp_path):
    _, paths = runs
    out = tmp_path / "curves.png"
    result = invoke("plot", paths["strong"], paths["weak"], "--out", out)
    assert result.exit_code == 0, result.stderr
    with Image.open(out) as img:
        assert img.size[0] >= 600 and img.size[1] >= 400
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10, "the figure has content, not a blank canvas"
    svg = tmp_path / "curves.svg"
    assert invoke("plot", paths["strong"], "--out", svg).exit_code == 0
    assert "<svg" in svg.read_text()[:500] and svg.stat().st_size > 5000
    assert invoke("plot", paths["strong"], "--out", tmp_path / "c.gif").exit_code == 2
    assert invoke("plot", paths["strong"], "--x", "pixels", "--out", tmp_path / "p.png").exit_code == 2


def test_eval_and_gate_in_one_step(runs, tmp_path):
    root, paths = runs
    npz = tmp_path / "test.npz"
    strong_doc = json.loads((paths["strong"] / "results.json").read_text())
    suite = tmp_path / "cmp.yaml"
    suite.write_text(json.dumps(SUITE))  # JSON is YAML
    args = ("eval", "--arch", "robench.examples:digits_cnn", "--suite", suite, "--quiet")
    data = np.load(robench.examples.example_data_path("digits"))
    np.savez(npz, x=data["x"], y=data["y"])
    strong = invoke(*args[:1], root / "strong.pt", *args[1:], "--data", f"npz:{npz}", "--out", tmp_path / "s")
    assert strong.exit_code == 0, strong.stderr
    weak = invoke(*args[:1], root / "weak.pt", *args[1:], "--data", f"npz:{npz}", "--out", tmp_path / "w",
                  "--baseline", tmp_path / "s", "--max-drop", "0.01", "--junit", tmp_path / "gate.xml")
    assert weak.exit_code == 1, weak.stderr
    assert "FAILED" in weak.stderr and (tmp_path / "w" / "results.json").is_file(), "the run is kept"
    assert (tmp_path / "gate.xml").read_text().count("<failure") >= 1
    same = invoke(*args[:1], root / "strong.pt", *args[1:], "--data", f"npz:{npz}", "--out", tmp_path / "s2",
                  "--baseline", tmp_path / "s")
    assert same.exit_code == 0 and "passed" in same.stderr
    assert strong_doc["suite"]["name"] == "cmp"
    no_base = invoke(*args[:1], root / "strong.pt", *args[1:], "--data", f"npz:{npz}", "--max-drop", "0.1")
    assert no_base.exit_code == 2 and "need --baseline" in no_base.stderr


PIXEL_SUITE = "name: px\nattacks:\n  - attack: pixels\n    pixels: [1, 2, 4, 8]\n    trials: 3\n"


def test_a_pixel_count_sweep_keeps_one_row_per_count(tmp_path):
    """compare (both layouts) and the report show each pixel count's accuracy as eval computed it."""
    suite = tmp_path / "px.yaml"
    suite.write_text(PIXEL_SUITE)
    assert invoke("eval", "example:digits", "--suite", suite, "--limit", 100, "--out", tmp_path / "run",
                  "--quiet").exit_code == 0
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    expected = {f"pixels {a['params']['pixels']} px": 100 * a["accuracy"] for a in doc["attacks"]}
    assert len(expected) == 4
    rows = dict(csv.reader(io.StringIO(invoke("compare", tmp_path / "run", "--format", "csv").stdout)))
    assert {k: float(v) for k, v in rows.items() if k in expected} == pytest.approx(expected)
    wide = list(csv.DictReader(io.StringIO(invoke("compare", tmp_path / "run", "--layout", "alignment",
                                                  "--format", "csv").stdout)))[0]
    assert {k: float(wide[k]) for k in expected} == pytest.approx(expected)
    assert float(wide["Mean"]) == pytest.approx(100 * doc["mean_attack_accuracy"])
    assert invoke("report", tmp_path / "run", "--out", tmp_path / "r.html").exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert all(label in page for label in expected)


def test_the_gate_names_pixel_counts_as_whole_numbers(tmp_path):
    suite = tmp_path / "px.yaml"
    suite.write_text(PIXEL_SUITE)
    assert invoke("eval", "example:digits", "--suite", suite, "--limit", 40, "--out", tmp_path / "run",
                  "--quiet").exit_code == 0
    gate = invoke("gate", tmp_path / "run", "--baseline", tmp_path / "run", "--junit", tmp_path / "j.xml")
    assert gate.exit_code == 0, gate.stderr
    assert "8 px" in gate.stdout and ".0 px" not in gate.stdout
    junit = (tmp_path / "j.xml").read_text()
    assert 'name="accuracy pixels@8px"' in junit and ".0px" not in junit
