"""The gate, compare and plot on hostile result documents: each edit of a real run is refused or gated.

A real baseline comes from ``robench eval example:digits`` (one FGSM and one short PGD entry); the
hostile variants are that document with one field changed, as a damaged file or a tampered CI artefact
would have it.
"""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest
import torch
from PIL import Image
from torch import nn

import robench.evaluation.findings
from robench.errors import UsageError
from robench.results.reading import read_result
from cli_helpers import invoke, one_error_line

LIMIT = "64"
SUITE = """name: hostile
attacks:
  - attack: fgsm
    eps: 0.1
  - attack: pgd
    eps: 0.1
    steps: 3
    step_size: 0.05
"""
# A PGD too weak to beat FGSM (one tiny step): robench flags this as gradient masking.
MASKED_SUITE = """name: masked
attacks:
  - attack: fgsm
    eps: 0.1
  - attack: pgd
    eps: 0.1
    steps: 1
    step_size: 0.001
    random_start: false
    final_iterate: true
"""


def tiny_embedding() -> nn.Module:
    """An untrained feature extractor: enough for a ReID document written by the real code path."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 8))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "suite.yaml").write_text(SUITE)
    (root / "masked.yaml").write_text(MASKED_SUITE)
    base = invoke("eval", "example:digits", "--suite", root / "suite.yaml", "--limit", LIMIT, "--quiet",
                  "--out", root / "base")
    assert base.exit_code == 0, base.stderr
    masked = invoke("eval", "example:digits", "--suite", root / "masked.yaml", "--limit", LIMIT, "--quiet",
                    "--out", root / "masked")
    assert masked.exit_code == 0, masked.stderr
    return root


@pytest.fixture()
def doc(runs):
    return json.loads((runs / "base" / "results.json").read_text())


def write(path, document) -> str:
    path.write_text(json.dumps(document))  # Python's json writes NaN and Infinity literals
    return str(path)


def gate(current, baseline, *extra):
    return invoke("gate", current, "--baseline", baseline, *extra)


# ------------------------------------------------------------------ documents robench writes read back
def test_classification_document_reads(runs):
    result = read_result(runs / "base")
    assert result.kind == "classification" and len(result.doc["attacks"]) == 2
    assert result.doc["sanity"]["flags"] == []
    masked = read_result(runs / "masked")
    assert "gradient_masking" in masked.doc["sanity"]["flag_names"], masked.doc["sanity"]


def test_pixel_index_document_reads(digits_split, tmp_path):
    _, x_te, _, y_te = digits_split
    for i, (img, label) in enumerate(zip(x_te[:30], y_te[:30])):
        (tmp_path / "img" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(tmp_path / "img" / str(label) / f"{i:02d}.png")
    run = invoke("pixel-index", "example:digits", tmp_path / "img", "--pixels", "1,2", "--trials", "2",
                 "--on-attack", "fgsm", "--eps", "0.1", "--quiet", "--out", tmp_path / "run")
    assert run.exit_code == 0, run.stderr
    result = read_result(tmp_path / "run")
    assert result.kind == "pixel" and [e["experiment"] for e in result.doc["experiments"]] == ["range", "attack"]
    # the same document gates against itself
    assert gate(tmp_path / "run", tmp_path / "run").exit_code == 0
    broken = result.doc
    broken["experiments"][0]["results"][1]["misclassified"] = broken["experiments"][0]["results"][1]["total"] + 1
    bad = gate(write(tmp_path / "bad.json", broken), tmp_path / "run")
    assert bad.exit_code == 2 and "experiments[0].results[1].misclassified: must be at most total" in \
        one_error_line(bad)


def test_reid_document_reads(digits_split, tmp_path):
    _, x_te, _, y_te = digits_split
    for folder in ("query", "bounding_box_test"):
        (tmp_path / "market" / folder).mkdir(parents=True)
    for person in range(1, 4):
        images = x_te[y_te == person][:5]
        for k, img in enumerate(images):
            folder, cam = ("query", 1) if k < 2 else ("bounding_box_test", 2)
            Image.fromarray(img[..., 0]).convert("RGB").save(
                tmp_path / "market" / folder / f"{person:04d}_c{cam}s1_{person * 10 + k:06d}_00.png")
    torch.save(tiny_embedding().state_dict(), tmp_path / "net.pt")
    run = invoke("eval", tmp_path / "net.pt", "--arch", "test_hostile_gate:tiny_embedding", "--data",
                 f"market1501:{tmp_path / 'market'}", "--suite", "reid-clean", "--quiet", "--out", tmp_path / "run")
    assert run.exit_code == 0, run.stderr
    result = read_result(tmp_path / "run")
    assert result.kind == "reid" and 0 <= result.doc["clean"]["mAP"] <= 1
    assert gate(tmp_path / "run", tmp_path / "run").exit_code == 0
    result.doc["clean"]["mAP"] = float("nan")
    bad = gate(write(tmp_path / "bad.json", result.doc), tmp_path / "run")
    assert bad.exit_code == 2 and "clean.mAP: must be a finite number in [0, 1], got NaN" in one_error_line(bad)


def test_untouched_pair_passes(runs):
    result = gate(runs / "base", runs / "base")
    assert result.exit_code == 0, result.stderr
    assert "passed" in result.stderr


# ------------------------------------------------------------------ values that are not numbers
@pytest.mark.parametrize("edit, field, shown", [
    (lambda d: d["attacks"][0].update(accuracy=float("nan")), "attacks[0].accuracy", "NaN"),
    (lambda d: d.update(robust_accuracy=float("-inf")), "robust_accuracy", "-Infinity"),
    (lambda d: d["attacks"][1].update(success_rate=float("inf")), "attacks[1].success_rate", "Infinity"),
    (lambda d: d["attacks"][1].update(accuracy=None), "attacks[1].accuracy", "null"),
    (lambda d: d["clean"].update(n=-5), "clean.n", "-5"),
    (lambda d: d["clean"].update(correct=10 ** 6), "clean.correct", "at most n"),
    (lambda d: d["attacks"][0].update(eps="0.1"), "attacks[0].eps", '"0.1"'),
    (lambda d: d["attacks"][0].update(n=True), "attacks[0].n", "true"),
])
def test_broken_baseline_values_are_usage_errors(runs, doc, tmp_path, edit, field, shown):
    edit(doc)
    base = write(tmp_path / "base.json", doc)
    result = gate(runs / "base", base)
    line = one_error_line(result)
    assert result.exit_code == 2
    assert f"base.json: {field}: " in line and shown in line, line


def test_infinity_literal_in_the_current_run(runs, doc, tmp_path):
    doc["clean"]["accuracy"] = "__here__"
    hostile = tmp_path / "cur.json"
    hostile.write_text(json.dumps(doc, indent=2).replace('"__here__"', "Infinity"))
    assert json.loads(hostile.read_text())["clean"]["accuracy"] == float("inf")
    result = gate(hostile, runs / "base")
    assert result.exit_code == 2
    assert "cur.json: clean.accuracy: must be a finite number in [0, 1], got Infinity" in one_error_line(result)


def test_current_accuracy_out_of_range(runs, doc, tmp_path):
    doc["attacks"][1]["accuracy"] = 5.0
    result = gate(write(tmp_path / "cur.json", doc), runs / "base")
    assert result.exit_code == 2
    assert "attacks[1].accuracy: must be a finite number in [0, 1], got 5.0" in one_error_line(result)


@pytest.mark.parametrize("value", ["missing", 0, "false", None, 1])
def test_complete_must_be_literally_true(runs, doc, tmp_path, value):
    if value == "missing":
        del doc["complete"]
    else:
        doc["complete"] = value
    result = gate(write(tmp_path / "cur.json", doc), runs / "base")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "complete must be true" in line and "the run did not finish" in line
    if value == "false":
        assert '(got "false")' in line


def test_duplicate_keys_and_control_characters_are_refused(runs, tmp_path):
    text = (runs / "base" / "results.json").read_text()
    twice = tmp_path / "twice.json"
    twice.write_text(text.replace('"complete": true', '"complete": false, "complete": true', 1))
    assert "duplicate key 'complete'" in one_error_line(gate(twice, runs / "base"))
    doc = json.loads(text)
    doc["attacks"][0]["label"] = "fgsm\x1b]0;owned\x07"
    result = gate(write(tmp_path / "ctl.json", doc), runs / "base")
    assert result.exit_code == 2 and "attacks[0].label: must not contain control characters" in \
        one_error_line(result)


# ------------------------------------------------------------------ missing fields: gate, compare, plot
@pytest.mark.parametrize("command", ["gate", "compare", "plot"])
def test_missing_clean_block(runs, doc, tmp_path, command):
    del doc["clean"]
    broken = write(tmp_path / "cur.json", doc)
    args = {"gate": ("gate", broken, "--baseline", runs / "base"),
            "compare": ("compare", runs / "base", broken),
            "plot": ("plot", runs / "base", broken, "--out", tmp_path / "fig.png")}[command]
    result = invoke(*args)
    assert result.exit_code == 2
    assert "cur.json: clean: field required" in one_error_line(result)
    assert "Traceback" not in result.stderr and not (tmp_path / "fig.png").exists()


def test_labels_are_text_not_markup(runs, doc, tmp_path):
    for entry in doc["attacks"]:
        entry["label"] = f"{entry['label']} [/] [bold]$x^"
    path = write(tmp_path / "odd.json", doc)
    assert gate(path, path).exit_code == 0
    table = invoke("compare", path, runs / "base")
    assert table.exit_code == 0, table.stderr
    assert "fgsm [/] [bold]$x^" in table.stdout
    assert invoke("plot", path, "--out", tmp_path / "fig.png").exit_code == 0


# ------------------------------------------------------------------ comparisons need the same entries
def test_baseline_without_attacks_is_not_comparable(runs, doc, tmp_path):
    doc["attacks"] = []
    result = gate(runs / "base", write(tmp_path / "base.json", doc))
    assert result.exit_code == 3, result.stderr
    assert "the baseline has no attack entries while the current run has 2" in result.stderr
    assert "refresh the baseline" in result.stderr


def test_entry_only_in_the_current_run_is_not_comparable(runs, doc, tmp_path):
    extra = copy.deepcopy(doc["attacks"][1])
    extra["params"]["steps"] = 7
    doc["attacks"].append(extra)
    result = gate(write(tmp_path / "cur.json", doc), runs / "base", "--json")
    assert result.exit_code == 3
    verdict = json.loads(result.stdout)
    assert not verdict["comparable"] and "the baseline lacks" in verdict["problems"][0]
    assert "accuracy of pgd eps 0.1" in verdict["problems"][0]


def test_entry_missing_from_the_current_run_is_a_regression(runs, doc, tmp_path):
    del doc["attacks"][0]
    # The summaries as robench writes them for the one entry left.
    doc.update(robust_accuracy=doc["attacks"][0]["accuracy"], mean_attack_accuracy=doc["attacks"][0]["accuracy"])
    result = gate(write(tmp_path / "cur.json", doc), runs / "base", "--max-drop", "1")
    assert result.exit_code == 1
    assert "accuracy of fgsm is in the baseline but missing from the current run" in result.stderr


def test_null_against_a_value_is_not_comparable(runs, doc, tmp_path):
    doc["attacks"][0]["success_rate"] = None  # allowed by the schema (nothing attacked) ...
    result = gate(write(tmp_path / "cur.json", doc), runs / "base", "--json", "--metric", "accuracy,success_rate")
    assert result.exit_code == 3  # ... but not comparable with the baseline's number, when success rates are gated
    verdict = json.loads(result.stdout)
    assert "null in one run and a number in the other (success_rate of fgsm eps 0.1)" in verdict["problems"][0]
    row = [r for r in verdict["rows"] if r["metric"] == "success_rate" and r["entry"] == "fgsm"][0]
    assert row["verdict"] == "not comparable" and row["current"] is None


# ------------------------------------------------------------------ sanity flags
def flagged(doc, names=True):
    message = "fgsm (single-step) at eps 0.1 beats the iterative white-box attacks: a sign of gradient masking"
    doc["sanity"]["flags"] = [message]
    if names:
        doc["sanity"]["flag_names"] = ["gradient_masking"]
    return doc


def test_sanity_flag_fails_the_gate(runs, doc, tmp_path):
    current = write(tmp_path / "cur.json", flagged(doc))
    result = gate(current, runs / "base", "--junit", tmp_path / "gate.xml")
    assert result.exit_code == 1
    assert "robench gate: FAILED: sanity flag gradient_masking in the current run: fgsm (single-step)" in \
        result.stderr
    assert "pass --allow-flag gradient_masking if this is expected" in result.stderr
    failures = ET.parse(tmp_path / "gate.xml").getroot().findall(".//failure")
    assert [f.get("message") for f in failures] == ["sanity flag"]
    as_json = json.loads(gate(current, runs / "base", "--json").stdout)
    rows = [r for r in as_json["rows"] if r["metric"] == "sanity_flag"]
    assert [(r["flag"], r["verdict"]) for r in rows] == [("gradient_masking", "sanity flag")]
    assert as_json["passed"] is False and as_json["sanity_flags_failed"] == 1


@pytest.mark.parametrize("allow", ["gradient_masking", "all"])
def test_allowed_flag_passes(runs, doc, tmp_path, allow):
    current = write(tmp_path / "cur.json", flagged(doc))
    result = gate(current, runs / "base", "--allow-flag", allow)
    assert result.exit_code == 0, result.stderr
    assert "allowed by --allow-flag" in result.stderr


def test_unknown_allow_flag_suggests_the_name(runs, doc, tmp_path):
    current = write(tmp_path / "cur.json", flagged(doc))
    line = one_error_line(gate(current, runs / "base", "--allow-flag", "gradient_mask"))
    assert "--allow-flag 'gradient_mask': unknown sanity flag; did you mean 'gradient_masking'" in line


def test_flag_names_of_older_documents_are_derived(runs, doc, tmp_path):
    # An older writer: sanity.flags without flag_names. Make FGSM really beat PGD so the check agrees.
    fgsm, pgd, n = doc["attacks"][0], doc["attacks"][1], doc["clean"]["n"]
    robust = round(pgd["accuracy"] * n) - 4  # four images fewer than PGD, every derived number to match
    fgsm.update(accuracy=robust / n, success_rate=(fgsm["attacked"] - robust) / fgsm["attacked"])
    doc.update(robust_accuracy=min(doc["robust_accuracy"], fgsm["accuracy"]),
               mean_attack_accuracy=(fgsm["accuracy"] + pgd["accuracy"]) / 2)
    doc["sanity"]["flags"] = robench.evaluation.findings.flags_from(doc["sanity"], doc["attacks"])
    doc["sanity"].pop("flag_names", None)
    assert len(doc["sanity"]["flags"]) == 1
    current = write(tmp_path / "cur.json", doc)
    result = gate(current, runs / "base", "--max-drop", "1")
    assert result.exit_code == 1 and "sanity flag gradient_masking in the current run" in result.stderr
    assert gate(current, runs / "base", "--max-drop", "1", "--allow-flag", "gradient_masking").exit_code == 0
    doc["sanity"]["flags"] = ["a finding this version does not know"]
    odd = gate(write(tmp_path / "odd.json", doc), runs / "base", "--max-drop", "1")
    assert odd.exit_code == 1 and "sanity flag unnamed" in odd.stderr


def test_flag_names_must_match_the_flags(runs, doc, tmp_path):
    flagged(doc)["sanity"]["flag_names"] = []
    line = one_error_line(gate(write(tmp_path / "cur.json", doc), runs / "base"))
    assert "sanity.flag_names: must name each of the 1 flag(s)" in line


def test_baseline_flags_do_not_fail(runs, doc, tmp_path):
    result = gate(runs / "base", write(tmp_path / "base.json", flagged(doc)))
    assert result.exit_code == 0, result.stderr
    assert "note: the baseline has sanity flag gradient_masking" in result.stderr


def test_eval_with_baseline_and_allow_flag(runs, tmp_path):
    args = ("eval", "example:digits", "--suite", runs / "masked.yaml", "--limit", LIMIT, "--quiet",
            "--baseline", runs / "masked")
    typo = invoke(*args, "--out", tmp_path / "typo", "--allow-flag", "gradient_mask")
    assert typo.exit_code == 2 and "did you mean 'gradient_masking'" in one_error_line(typo)
    assert not (tmp_path / "typo" / "results.json").exists(), "refused before the run"
    failed = invoke(*args, "--out", tmp_path / "a")
    assert failed.exit_code == 1, failed.stderr
    assert "sanity flag gradient_masking in the current run" in failed.stderr
    assert (tmp_path / "a" / "results.json").is_file(), "the run is kept"
    allowed = invoke(*args, "--out", tmp_path / "b", "--allow-flag", "gradient_masking")
    assert allowed.exit_code == 0, allowed.stderr
    no_base = invoke("eval", "example:digits", "--suite", runs / "suite.yaml", "--allow-flag", "all")
    assert no_base.exit_code == 2 and "need --baseline" in one_error_line(no_base)


def test_validation_is_available_to_python_callers(doc, tmp_path):
    doc["mean_attack_accuracy"] = -0.5
    with pytest.raises(UsageError, match=r"mean_attack_accuracy: must be a finite number in \[0, 1\] or null"):
        read_result(write(tmp_path / "r.json", doc))
