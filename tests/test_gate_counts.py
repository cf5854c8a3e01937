"""The gate compares accuracies by their exact counts, counts one change once, and says why runs differ.

The documents are real runs of the trained digits CNN; the variants change the counts of one run
the way one more (or one fewer) correctly classified image would, rates recomputed as robench
writes them (k / n).
"""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from fractions import Fraction

import pytest

import robench
from robench.reporting.gate import gate, parse_rule
from robench.results.reading import read_result
from cli_helpers import invoke, one_error_line

SUITE = {"name": "counts", "attacks": [{"attack": "fgsm", "eps": [0.05, 0.1]},
                                       {"attack": "pgd", "eps": 0.1, "steps": 5}]}


@pytest.fixture(scope="module")
def real(trained_model, test_tensors, tmp_path_factory):
    root = tmp_path_factory.mktemp("counts")
    path = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu").save(root / "run")
    return json.loads((path / "results.json").read_text())


def robust_count(entry):
    return round(entry["accuracy"] * entry["n"])


def recount(doc, correct, robust_change=0):
    """``doc`` with ``correct`` clean-correct images and every attack entry keeping ``robust_change`` more."""
    out = copy.deepcopy(doc)
    n = out["clean"]["n"]
    out["clean"].update(correct=correct, accuracy=correct / n)
    for entry in out["attacks"]:
        robust = robust_count(entry) + robust_change
        entry.update(accuracy=robust / n, attacked=correct, success_rate=(correct - robust) / correct)
    out["robust_accuracy"] = (round(doc["robust_accuracy"] * n) + robust_change) / n
    out["mean_attack_accuracy"] = sum(e["accuracy"] for e in out["attacks"]) / len(out["attacks"])
    return out


def write(tmp_path, name, doc):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def gate_docs(tmp_path, current, baseline, **kw):
    return gate(read_result(write(tmp_path, "cur", current)), read_result(write(tmp_path, "base", baseline)), **kw)


def test_one_more_correct_image_is_not_a_regression(real, tmp_path):
    """527/529 -> 528/530: the success rates rise by a hair, no accuracy falls: the gate passes."""
    correct = real["clean"]["correct"]
    assert all(robust_count(e) < correct - 1 for e in real["attacks"]), "every entry fools some images"
    out = gate_docs(tmp_path, real, recount(real, correct - 1))
    assert out.exit_code == 0, out.rows
    assert set(out.rows.metric) == {"accuracy", "robust_accuracy"}
    assert out.metrics == ["accuracy", "robust_accuracy"]
    assert out.not_gated == ["success_rate", "mean_attack_accuracy"]
    clean = out.rows[out.rows.entry == "clean"].iloc[0]
    assert (clean.baseline_count, clean.current_count, clean.verdict) == (
        f"{correct - 1}/540", f"{correct}/540", "improved")


@pytest.mark.parametrize("max_drop", [0.0, 1e-5, 0.0015, 0.01])
def test_success_rate_on_request_is_compared_exactly(real, tmp_path, max_drop):
    correct = real["clean"]["correct"]
    out = gate_docs(tmp_path, real, recount(real, correct - 1), max_drop=max_drop,
                    metrics=["accuracy", "success_rate"])
    rows = out.rows[out.rows.metric == "success_rate"]
    assert len(rows) == len(real["attacks"])
    for entry, (_, row) in zip(real["attacks"], rows.iterrows()):
        fooled = correct - robust_count(entry)
        assert (row.baseline_count, row.current_count) == (f"{fooled - 1}/{correct - 1}", f"{fooled}/{correct}")
        rise = Fraction(fooled, correct) - Fraction(fooled - 1, correct - 1)  # > 0: one more image fooled
        worse = rise > Fraction(repr(max_drop))
        assert row.verdict == ("regression" if worse else "ok"), (row.to_dict(), float(rise))
    assert out.exit_code == (1 if (rows.verdict == "regression").any() else 0)
    assert (out.rows[out.rows.metric == "accuracy"].verdict != "regression").all()


def test_one_change_is_counted_once_per_accuracy(real, tmp_path):
    """An image right and robust everywhere is now misclassified: clean, each entry and the worst case
    fall by one image; the success rates and the mean are not counted again."""
    correct = real["clean"]["correct"]
    out = gate_docs(tmp_path, recount(real, correct - 1, robust_change=-1), real)
    assert out.exit_code == 1
    failing = out.rows[out.rows.verdict == "regression"]
    assert len(failing) == 1 + len(real["attacks"]) + 1
    assert set(failing.metric) == {"accuracy", "robust_accuracy"}
    both = gate_docs(tmp_path, recount(real, correct - 1, robust_change=-1), real,
                     metrics=["accuracy", "robust_accuracy", "success_rate", "mean_attack_accuracy"])
    assert len(both.rows[both.rows.verdict == "regression"]) > len(failing), "asked for, they are gated too"
    missing = copy.deepcopy(real)
    del missing["attacks"][0]
    missing["mean_attack_accuracy"] = sum(e["accuracy"] for e in missing["attacks"]) / len(missing["attacks"])
    gone = gate_docs(tmp_path, missing, real, max_drop=1.0)
    assert list(gone.rows[gone.rows.verdict == "missing"].metric) == ["accuracy"], "one missing entry, one row"


def test_changes_exactly_at_the_threshold_pass(tmp_path, real):
    base = recount(real, 540)
    for k, lost in ((540 - 27, "ok"), (540 - 28, "regression")):  # 27/540 = 5 points exactly
        cur = recount(base, k, robust_change=k - 540)  # the images lost were robust ones
        for rule in ([], [parse_rule("accuracy@clean:5pt")]):
            out = gate_docs(tmp_path, cur, base, max_drop=0.0 if rule else 0.05, rules=rule)
            row = out.rows[out.rows.entry == "clean"].iloc[0]
            assert row.verdict == lost, (k, rule, row.to_dict())
            assert row.allowed_change == pytest.approx(-0.05) and row.threshold == pytest.approx(0.05)


def test_a_rule_naming_a_metric_gates_it_and_globs_select(real, tmp_path):
    correct = real["clean"]["correct"]
    current, baseline = real, recount(real, correct - 1)
    ruled = gate_docs(tmp_path, current, baseline, rules=[parse_rule("success_rate@pgd:0")])
    assert "success_rate" in ruled.metrics
    assert ruled.rows[(ruled.rows.metric == "success_rate") & (ruled.rows.entry == "pgd")].verdict.iloc[0] \
        == "regression"
    glob = gate_docs(tmp_path, current, baseline, metrics=["*accuracy"])
    assert glob.metrics == ["accuracy", "robust_accuracy", "mean_attack_accuracy"]


def test_gate_command_table_lines_json_and_junit(real, tmp_path):
    correct = real["clean"]["correct"]
    base = write(tmp_path, "base", real)
    cur = write(tmp_path, "cur", recount(real, correct - 1, robust_change=-1))
    result = invoke("gate", cur, "--baseline", base, "--junit", tmp_path / "g.xml")
    assert result.exit_code == 1
    assert "allowed change" in result.stdout and "allowed drop" not in result.stdout
    assert f"({correct}/540)" in result.stdout and "≥ 0" in result.stdout
    assert f"accuracy of clean: {correct / 540:.4f} -> {(correct - 1) / 540:.4f} ({correct}/540 -> " \
           f"{correct - 1}/540, change -0.0019; higher is better, allowed change >= 0, max-drop 0)" in result.stderr
    assert "not gated: success_rate, mean_attack_accuracy (add with --metric)" in result.stderr
    root = ET.parse(tmp_path / "g.xml").getroot()
    failures = root.findall(".//failure")
    assert root.get("failures") == str(len(failures)) == str(2 + len(real["attacks"]))
    assert all("allowed change >= 0 (max-drop 0), higher is better" in f.text for f in failures)
    as_json = json.loads(invoke("gate", cur, "--baseline", base, "--json", "--metric", "success_rate").stdout)
    assert as_json["metrics"] == ["success_rate"] and {r["metric"] for r in as_json["rows"]} == {"success_rate"}
    lower = [r for r in as_json["rows"] if r["allowed_change"] is not None]
    assert all(r["direction"] == "lower is better" and r["allowed_change"] >= 0 for r in lower)
    bad = invoke("gate", cur, "--baseline", base, "--metric", "rank1")
    assert bad.exit_code == 2
    assert "--metric 'rank1': no such values in these results" in one_error_line(bad)


def test_not_comparable_names_what_differs(trained_model, test_tensors, tmp_path):
    x, y = test_tensors
    plain = {"name": "d", "attacks": [{"attack": "fgsm", "eps": [0.05, 0.1]},
                                      {"attack": "pgd", "eps": 0.1, "steps": 3}]}
    fewer_steps = copy.deepcopy(plain)
    fewer_steps["attacks"][1]["steps"] = 2
    runs = {"base": robench.evaluate(trained_model, (x[:120], y[:120]), plain, device="cpu"),
            "eps": robench.evaluate(trained_model, (x[:120], y[:120]), plain, device="cpu", eps="4/255"),
            "data": robench.evaluate(trained_model, (x[:80], y[:80]), fewer_steps, device="cpu")}
    paths = {name: r.save(tmp_path / name) for name, r in runs.items()}
    base_sha = runs["base"].doc["suite"]["sha256"][:12]

    eps = invoke("gate", paths["eps"], "--baseline", paths["base"])
    assert eps.exit_code == 3
    line = eps.stderr.splitlines()[0]
    assert line.startswith(f"robench gate: not comparable: suite settings differ (suite sha {base_sha} vs ")
    assert "; eps of fgsm differs (0.05, 0.1 vs 4/255); eps of pgd differs (0.1 vs 4/255)" in line
    assert "refresh the baseline" in line

    data = invoke("gate", paths["data"], "--baseline", paths["base"], "--json")
    assert data.exit_code == 3
    problems = json.loads(data.stdout)["problems"]
    assert "steps of pgd differs (3 vs 2)" in problems
    assert "data differs (arrays: 120 vs 80 samples)" in problems
