"""The gate's truth table on hand-made result files, and the CLI's exit codes."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest

from robench.errors import UsageError
from robench.reporting.gate import gate, junit_xml, parse_rule
from robench.results.reading import read_result
from cli_helpers import invoke


def classification_doc(clean=0.9, pgd=(0.5, 0.3), fgsm=0.6, n=1000, fingerprint="f1", suite="s1", model="m"):
    attacks = [{"attack": "fgsm", "label": "fgsm", "norm": "linf", "eps": 0.03, "accuracy": fgsm, "n": n,
                "success_rate": 1 - fgsm / clean, "attacked": int(clean * n), "params": {"norm": "linf"}}]
    for eps, acc in zip((0.02, 0.03), pgd):
        attacks.append({"attack": "pgd", "label": "pgd", "norm": "linf", "eps": eps, "accuracy": acc, "n": n,
                        "success_rate": 1 - acc / clean, "attacked": int(clean * n),
                        "params": {"norm": "linf", "steps": 10}})
    return {"schema": "robench.results/1", "task": "classification", "complete": True,
            "model": {"name": model}, "suite": {"name": "t", "sha256": suite},
            "data": {"fingerprint": fingerprint}, "clean": {"accuracy": clean, "n": n, "correct": int(clean * n)},
            "attacks": attacks, "robust_accuracy": min(pgd + (fgsm,)),
            "mean_attack_accuracy": (fgsm + sum(pgd)) / 3,
            "env": {"dataset_fingerprint": fingerprint}}


def write(tmp_path, name, doc):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def run(tmp_path, current, baseline, **kw):
    return gate(read_result(write(tmp_path, "cur", current)), read_result(write(tmp_path, "base", baseline)), **kw)


def verdict(outcome, metric, entry, eps=None):
    rows = outcome.rows[(outcome.rows.metric == metric) & (outcome.rows.entry == entry)]
    if eps is not None:
        rows = rows[rows.eps == eps]
    assert len(rows) == 1
    return rows.verdict.iloc[0]


def test_identical_runs_pass(tmp_path):
    out = run(tmp_path, classification_doc(), classification_doc())
    assert out.exit_code == 0 and set(out.rows.verdict) == {"ok"}


def test_drop_beyond_max_drop_is_a_regression(tmp_path):
    out = run(tmp_path, classification_doc(pgd=(0.47, 0.3)), classification_doc(), max_drop=0.02)
    assert out.exit_code == 1
    assert verdict(out, "accuracy", "pgd", 0.02) == "regression"
    assert verdict(out, "accuracy", "pgd", 0.03) == "ok"


def test_drop_within_max_drop_passes(tmp_path):
    out = run(tmp_path, classification_doc(pgd=(0.49, 0.3)), classification_doc(), max_drop=0.02)
    assert out.exit_code == 0 and verdict(out, "accuracy", "pgd", 0.02) == "ok"


def test_improvement_passes(tmp_path):
    out = run(tmp_path, classification_doc(pgd=(0.6, 0.4)), classification_doc())
    assert out.exit_code == 0 and verdict(out, "accuracy", "pgd", 0.02) == "improved"


def test_missing_entry_fails(tmp_path):
    current = classification_doc()
    current["attacks"] = current["attacks"][:2]  # the pgd eps 0.03 entry is gone
    current["mean_attack_accuracy"] = sum(a["accuracy"] for a in current["attacks"]) / 2
    out = run(tmp_path, current, classification_doc())
    assert out.exit_code == 1 and verdict(out, "accuracy", "pgd", 0.03) == "missing"


def test_changed_attack_settings_count_as_missing(tmp_path):
    current = classification_doc()
    current["attacks"][1]["params"]["steps"] = 20  # a different attack, not the baseline's
    out = run(tmp_path, current, classification_doc())
    assert verdict(out, "accuracy", "pgd", 0.02) == "missing"


@pytest.mark.parametrize("field, value", [("fingerprint", "other"), ("suite", "other")])
def test_not_comparable(tmp_path, field, value):
    out = run(tmp_path, classification_doc(**{field: value}), classification_doc())
    assert out.exit_code == 3 and not out.comparable
    assert ("dataset fingerprint" if field == "fingerprint" else "suite settings") in out.problems[0]


def test_direction_per_metric(tmp_path):
    # Lower clean accuracy, same accuracy under attack: accuracy fell (worse) while the attack's
    # success rate over the clean-correct images fell too, 1 - 0.5/0.8 < 1 - 0.5/0.9 (better).
    both = ["accuracy", "success_rate"]  # the success rate is gated only when asked for
    out = run(tmp_path, classification_doc(clean=0.8), classification_doc(clean=0.9), max_drop=0.01, metrics=both)
    assert verdict(out, "accuracy", "clean") == "regression"
    assert verdict(out, "success_rate", "pgd", 0.02) == "improved"
    base, cur = classification_doc(), classification_doc(fgsm=0.55)  # FGSM fools 50 more of the 900 images
    out = run(tmp_path, cur, base, max_drop=0.01, metrics=both)
    assert verdict(out, "success_rate", "fgsm") == "regression", "a higher attack success rate is worse"


def pixel_doc(pi):
    return {"schema": "robench.pixel-index/1", "task": "pixel-index", "complete": True, "model": {"name": "m"},
            "data": {"fingerprint": "p"}, "settings": {"pixels": [4], "trials": 1, "seed": 0},
            "env": {"dataset_fingerprint": "p"},
            "experiments": [{"experiment": "range", "setting": "0-255", "delta": None, "area": None,
                             "results": [{"pixels": 4, "misclassified": 10 * pi, "total": 100,
                                          "recognition_rate": 1 - pi / 10, "pi": pi}]}]}


def test_pixel_index_lower_is_better(tmp_path):
    # Pi is gated on request; by default the recognition rate (the pixel runs' accuracy) is.
    worse = run(tmp_path, pixel_doc(3.0), pixel_doc(2.0), max_drop=0.5, metrics=["pi"])
    assert worse.exit_code == 1 and verdict(worse, "pi", "range:0-255") == "regression"
    better = run(tmp_path, pixel_doc(1.0), pixel_doc(2.0), metrics=["pi"])
    assert better.exit_code == 0 and verdict(better, "pi", "range:0-255") == "improved"
    default = run(tmp_path, pixel_doc(3.0), pixel_doc(2.0))
    assert default.metrics == ["recognition_rate"] and list(default.rows.metric) == ["recognition_rate"]
    assert default.exit_code == 1 and verdict(default, "recognition_rate", "range:0-255") == "regression"


def test_rules_absolute_relative_and_first_match_wins(tmp_path):
    base, cur = classification_doc(pgd=(0.5, 0.3)), classification_doc(pgd=(0.485, 0.29))
    # 1.5 and 1 points of drop
    strict = run(tmp_path, cur, base, rules=[parse_rule("accuracy@pgd*:1pt")], max_drop=0.5)
    assert verdict(strict, "accuracy", "pgd", 0.02) == "regression"
    assert verdict(strict, "accuracy", "pgd", 0.03) == "ok"  # exactly 1 point: allowed
    relative = run(tmp_path, cur, base, rules=[parse_rule("accuracy@pgd:4%")], max_drop=0.5)
    # 4% of 0.5 = 0.02 >= 0.015 ok; 4% of 0.3 = 0.012 >= 0.01 ok
    assert relative.exit_code == 0
    tighter = run(tmp_path, cur, base, rules=[parse_rule("accuracy@pgd:3%")], max_drop=0.5)
    # 3% of 0.3 = 0.009 < 0.01 drop
    assert verdict(tighter, "accuracy", "pgd", 0.03) == "regression"
    first = run(tmp_path, cur, base, rules=[parse_rule("accuracy@*:5pt"), parse_rule("accuracy@pgd:1pt")],
                max_drop=0.5)
    assert first.exit_code == 0, "the first matching rule decides"
    other_metric = run(tmp_path, cur, base, rules=[parse_rule("mAP@*:0.001")], max_drop=0.5)
    assert other_metric.exit_code == 0, "a rule for another metric does not apply"


@pytest.mark.parametrize("text", ["accuracy", "accuracy@pgd", "accuracy@pgd:x", "@pgd:1pt", "accuracy@pgd:1pts"])
def test_bad_rules(text):
    with pytest.raises(UsageError):
        parse_rule(text)


def test_require_significant(tmp_path):
    small_n = run(tmp_path, classification_doc(pgd=(0.47, 0.3), n=200), classification_doc(n=200),
                  require_significant=True)
    # sqrt(2 * 0.5*0.5/200) = 0.05; a 3-point drop is within 1.96 standard errors
    assert verdict(small_n, "accuracy", "pgd", 0.02) == "within noise" and small_n.exit_code == 0
    row = small_n.rows[(small_n.rows.metric == "accuracy") & (small_n.rows.eps == 0.02)].iloc[0]
    assert row.stderr == pytest.approx((0.5 * 0.5 / 200 + 0.47 * 0.53 / 200) ** 0.5)
    large_n = run(tmp_path, classification_doc(pgd=(0.47, 0.3), n=100_000), classification_doc(n=100_000),
                  require_significant=True)
    assert verdict(large_n, "accuracy", "pgd", 0.02) == "regression" and large_n.exit_code == 1


def test_reid_ap_conventions_must_agree(tmp_path):
    def reid(ap, rank1):
        m = {"rank1": rank1, "rank5": 0.9, "rank10": 0.95, "mAP": 0.7, "mINP": 0.3, "queries": 100,
             "valid_queries": 100, "ap_convention": ap, "denominator": "valid"}
        return {"schema": "robench.results/1", "task": "reid", "complete": True, "model": {"name": "r"},
                "suite": {"name": "reid-clean", "sha256": "s"}, "data": {"fingerprint": "d"},
                "env": {"dataset_fingerprint": "d"}, "clean": m, "clean_reranked": None, "attacks": []}
    assert run(tmp_path, reid("trapezoid", 0.8), reid("noninterp", 0.8)).exit_code == 3
    out = run(tmp_path, reid("noninterp", 0.7), reid("noninterp", 0.8), max_drop=0.05)
    assert out.exit_code == 1 and verdict(out, "rank1", "clean") == "regression"


def test_junit_report(tmp_path):
    out = run(tmp_path, classification_doc(pgd=(0.4, 0.3)), classification_doc(), max_drop=0.01)
    root = ET.fromstring(junit_xml(out))
    failures = root.findall(".//failure")
    assert root.get("tests") == str(len(out.rows)) and root.get("failures") == str(len(failures))
    assert any("baseline 0.5, current 0.4," in f.text for f in failures)


def test_gate_command_exit_codes_and_json(tmp_path):
    base = write(tmp_path, "base", classification_doc())
    worse = write(tmp_path, "worse", classification_doc(pgd=(0.4, 0.3)))
    other = write(tmp_path, "other", classification_doc(fingerprint="zzz"))
    assert invoke("gate", base, "--baseline", base).exit_code == 0
    failed = invoke("gate", worse, "--baseline", base, "--max-drop", "0.01", "--junit", tmp_path / "j.xml")
    assert failed.exit_code == 1
    assert "FAILED: 1 regression(s)" in failed.stderr  # the accuracy; its success rate is not counted again
    assert "accuracy of pgd at eps 0.02: 0.5000 -> 0.4000" in failed.stderr
    assert (tmp_path / "j.xml").is_file()
    as_json = invoke("gate", worse, "--baseline", base, "--json")
    doc = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and doc["regressions"] >= 1 and doc["passed"] is False
    not_comparable = invoke("gate", other, "--baseline", base)
    assert not_comparable.exit_code == 3
    assert "improved" not in not_comparable.stdout and "ok" not in not_comparable.stdout, "no verdict table"
    assert "not comparable" in not_comparable.stderr
    bad = invoke("gate", tmp_path / "nope.json", "--baseline", base)
    assert bad.exit_code == 2 and "result file not found" in bad.stderr
    (tmp_path / "junk.json").write_text("{not json")
    assert invoke("gate", tmp_path / "junk.json", "--baseline", base).exit_code == 2
    partial = copy.deepcopy(classification_doc())
    partial["complete"] = False
    assert invoke("gate", write(tmp_path, "partial", partial), "--baseline", base).exit_code == 2
