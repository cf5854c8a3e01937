"""``--eps`` and ``--norm``: any suite at another budget, recorded in the results and kept apart from plain runs.

The runs use the bundled digits example on a subset (``--limit``) and one-step or
few-step attacks: every property here is about which eps and norm the entries run at
and how that is recorded, which a hundred 8x8 images show as well as all of them.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

import robench
from robench.config import EvalConfig, resolve
from robench.errors import Interrupted, UsageError
from robench.results.locking import release_run_dirs
from robench.tasks import Hooks
from robench.tasks.run import run_evaluation
from robench.suites import Suite, builtin_suites, load_suite, parse_suite
from robench.suites.loader import with_overrides
from cli_helpers import invoke, one_error_line, stop_after

LIMIT = 100
TIMING = ("seconds", "peak_memory_bytes", "gradient_evals", "attack_chunk")
MIXED_SUITE = """\
name: mixed
attacks:
  - attack: dmr
    generator: generator.pt
    eps: [8/255]
  - attack: pixels
    pixels: [2]
"""
FEW_STEPS = """\
name: few-steps
attacks:
  - attack: bim
    eps: [0.05]
    steps: 3
    step_size: eps/steps
  - attack: pgd
    eps: [0.05]
    steps: 3
    step_size: 2.5*eps/steps
    random_start: true
"""
SHRINKING_STEP = """\
name: shrinking-step
attacks:
  - attack: pgd
    eps: [0.01]
    steps: 5
    step_size: 0.05 - eps
"""


def eval_json(*args):
    result = invoke("eval", "example:digits", "--limit", LIMIT, "--quiet", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def outcomes(doc):
    """What an entry measured and at which eps and norm, without timings."""
    return [{k: v for k, v in a.items() if k not in TIMING} for a in doc["attacks"]]


def builtin_with(name, path, **entry_fields):
    """The built-in suite ``name`` written out by hand with ``entry_fields`` in each entry."""
    suite = yaml.safe_load(builtin_suites()[name].read_text())
    for entry in suite["attacks"]:
        entry.update(entry_fields)
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fgsm as written and fgsm at 4/255 alone, shared by the tests that compare with them."""
    root = tmp_path_factory.mktemp("overrides")
    eval_json("--suite", "fgsm", "--out", root / "plain")
    eval_json("--suite", "fgsm", "--eps", "4/255", "--out", root / "at-4")
    return root


def read_doc(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_an_eps_sweep_gives_the_numbers_of_the_suite_written_with_it(tmp_path):
    overridden = eval_json("--suite", "fgsm", "--eps", "4/255,0.1", "--out", tmp_path / "over")
    by_hand = eval_json("--suite", builtin_with("fgsm", tmp_path / "hand.yaml", eps=["4/255", 0.1]),
                        "--out", tmp_path / "hand")
    assert [a["eps"] for a in overridden["attacks"]] == [4 / 255, 0.1]
    assert [a["params"]["eps_expr"] for a in overridden["attacks"]] == ["4/255", "0.1"]  # the text as written
    assert overridden["suite"]["overrides"] == {"eps": ["4/255", "0.1"], "norm": None,
                                                "entries": [{"index": 0, "label": "fgsm"}]}
    assert "overrides" not in by_hand["suite"]
    # The suite as run is the hand-written one: the same hash, the same numbers sample by sample.
    assert overridden["suite"]["sha256"] == by_hand["suite"]["sha256"]
    assert outcomes(overridden) == outcomes(by_hand)
    assert (tmp_path / "over" / "samples.csv").read_text() == (tmp_path / "hand" / "samples.csv").read_text()
    accuracies = [a["accuracy"] for a in overridden["attacks"]]
    assert accuracies[1] < accuracies[0] <= overridden["clean"]["accuracy"]  # the larger eps bites


def test_a_single_eps_is_not_comparable_with_the_suite_as_written(runs):
    plain, overridden = read_doc(runs / "plain"), read_doc(runs / "at-4")
    assert [(a["eps"], a["params"]["eps_expr"]) for a in overridden["attacks"]] == [(4 / 255, "4/255")]
    assert overridden["suite"]["overrides"]["eps"] == ["4/255"]
    assert overridden["suite"]["sha256"] != plain["suite"]["sha256"]
    assert overridden["env"]["suite_sha256"] == overridden["suite"]["sha256"]
    # The same eps value is in both runs, with the same accuracy: only the suites differ.
    same_eps = [a for a in plain["attacks"] if a["eps"] == 4 / 255]
    assert outcomes(overridden) == outcomes({"attacks": same_eps})
    gated = invoke("gate", runs / "at-4", "--baseline", runs / "plain")
    assert gated.exit_code == 3, gated.stdout + gated.stderr
    assert "not comparable" in gated.stdout + gated.stderr and "suite settings" in gated.stdout + gated.stderr
    compared = invoke("compare", runs / "plain", runs / "at-4")
    assert "not comparable: different suite settings" in compared.stderr


def test_norm_l2_turns_every_entry_into_an_l2_one_and_keeps_the_eps_text(tmp_path, runs):
    doc = eval_json("--suite", "fgsm", "--norm", "l2", "--out", tmp_path / "l2")
    assert [a["norm"] for a in doc["attacks"]] == ["l2"] * 3
    assert [a["params"]["norm"] for a in doc["attacks"]] == ["l2"] * 3
    assert [a["params"]["eps_expr"] for a in doc["attacks"]] == ["2/255", "4/255", "8/255"]
    assert doc["suite"]["overrides"] == {"eps": None, "norm": "l2", "entries": [{"index": 0, "label": "fgsm"}]}
    assert all(a["accuracy"] <= doc["clean"]["accuracy"] for a in doc["attacks"])
    # An L2 ball of radius r holds fewer points than the L-inf ball of radius r: never a stronger attack.
    linf = read_doc(runs / "plain")
    assert all(a2["accuracy"] >= ai["accuracy"] for a2, ai in zip(doc["attacks"], linf["attacks"]))


def test_eps_zero_with_a_step_size_of_eps_over_steps_runs_and_moves_nothing(tmp_path):
    path = tmp_path / "few.yaml"
    path.write_text(FEW_STEPS)
    doc = eval_json("--suite", path, "--eps", "0", "--out", tmp_path / "zero")  # step sizes of 0 at eps 0
    assert [a["eps"] for a in doc["attacks"]] == [0.0, 0.0]
    assert {a["accuracy"] for a in doc["attacks"]} == {doc["clean"]["accuracy"]}
    assert doc["suite"]["overrides"]["entries"] == [{"index": 0, "label": "bim"}, {"index": 1, "label": "pgd"}]


@pytest.mark.parametrize("args, message", [
    (("--eps", "abc"), "--eps: 'abc' is not plain arithmetic"),
    (("--eps", "-1"), "--eps values must be >= 0, got -1"),
    (("--eps", "1/255,,2/255"), "--eps: '' is not an arithmetic expression"),
    (("--norm", "l3"), "--norm must be one of linf, l2, got 'l3'"),
    (("--eps", "2"), "--eps 2: suite pgd-linf attacks[0] (pgd): eps 2 is absurd for linf"),
])
def test_bad_values_are_one_line_and_exit_2(args, message):
    result = invoke("eval", "example:digits", "--suite", "pgd-linf", *args)
    assert result.exit_code == 2
    assert message in one_error_line(result)


def test_eval_help_documents_both_options():
    result = invoke("eval", "--help")
    assert result.exit_code == 0
    assert "--eps" in result.stdout and "--norm" in result.stdout and "2/255,4/255,8/255" in result.stdout


def test_a_step_size_that_turns_negative_at_the_new_eps_is_refused(tmp_path):
    path = tmp_path / "shrinking.yaml"
    path.write_text(SHRINKING_STEP)
    result = invoke("eval", "example:digits", "--suite", path, "--eps", "0.1", "--out", tmp_path / "run")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "--eps 0.1: suite shrinking-step attacks[0] (pgd): step_size:" in line and "at eps 0.1" in line
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_an_attack_without_the_new_norm_is_a_usage_error_naming_the_entry(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(MIXED_SUITE)
    result = invoke("eval", "example:digits", "--suite", path, "--norm", "l2")
    assert result.exit_code == 2
    assert "--norm l2: suite mixed attacks[0] (dmr): norm: dmr supports linf, not 'l2'" in one_error_line(result)


def test_entries_without_an_eps_keep_theirs_and_are_not_listed():
    loaded = parse_suite(MIXED_SUITE)
    overridden = with_overrides(loaded, eps=("0.1",))
    dmr, pixels = overridden.suite.attacks
    assert (dmr.eps, dmr.eps_text) == ([0.1], ["0.1"])
    assert pixels.model_dump() == loaded.suite.attacks[1].model_dump() and pixels.eps == []
    assert overridden.overrides["entries"] == [{"index": 0, "label": "dmr"}]
    # Re-identification suites follow the same rule: dmr without an eps runs at its trained budget.
    reid = with_overrides(load_suite("reid-dmr"), eps=("4/255",), norm="l2")
    assert reid.overrides["entries"] == [] and reid.suite.attacks[0].eps == []
    reid_pgd = with_overrides(load_suite("reid-pgd"), eps=("4/255",), norm="l2")
    assert [(a.eps, a.norm, a.objective) for a in reid_pgd.suite.attacks] == [([4 / 255], "l2", "away"),
                                                                              ([4 / 255], "l2", "away"),
                                                                              ([4 / 255], "l2", "odfa")]


def test_the_api_overrides_through_the_config_and_leaves_the_callers_suite_alone():
    entries = [{"attack": "fgsm", "eps": ["2/255"]}, {"attack": "pgd", "eps": 0.05, "steps": 3,
                                                      "step_size": "eps/steps"}]
    as_dict = {"name": "api", "attacks": entries}
    before = copy.deepcopy(as_dict)
    run = robench.evaluate("example:digits", "example:digits", as_dict, eps=[0.1, "1/20"], norm="l2",
                           limit=LIMIT, device="cpu")
    assert as_dict == before
    by_hand = robench.evaluate("example:digits", "example:digits",
                               {"name": "api", "attacks": [{**e, "eps": [0.1, "1/20"], "norm": "l2"} for e in entries]},
                               limit=LIMIT, device="cpu")
    assert outcomes(run.doc) == outcomes(by_hand.doc)
    assert [a["norm"] for a in run.doc["attacks"]] == ["l2"] * 4
    assert run.doc["suite"]["sha256"] == by_hand.doc["suite"]["sha256"]
    record = {"eps": ["0.1", "1/20"], "norm": "l2", "entries": [{"index": 0, "label": "fgsm"},
                                                                 {"index": 1, "label": "pgd"}]}
    assert run.doc["suite"]["overrides"] == run.config["suite_overrides"] == record
    # A Suite or a LoadedSuite handed over becomes the same suite as run, and stays as it was.
    as_object = Suite.model_validate(copy.deepcopy(as_dict))
    object_before = (as_object.model_dump(), [a.eps_text for a in as_object.attacks])
    loaded = parse_suite(yaml.safe_dump(as_dict))
    loaded_before = (loaded.sha256, loaded.overrides, [a.eps_text for a in loaded.suite.attacks])
    for suite in (as_object, loaded):
        resolved = resolve(EvalConfig.of(model="example:digits", suite=suite, eps=[0.1, "1/20"], norm="l2"))
        assert resolved.suite.sha256 == by_hand.doc["suite"]["sha256"] and resolved.suite.overrides == record
    assert (as_object.model_dump(), [a.eps_text for a in as_object.attacks]) == object_before
    assert (loaded.sha256, loaded.overrides, [a.eps_text for a in loaded.suite.attacks]) == loaded_before
    assert EvalConfig.of(model="m", eps=0.03).suite.eps == ("0.03",)
    with pytest.raises(UsageError, match="--norm must be one of linf, l2"):
        robench.evaluate("example:digits", "example:digits", "fgsm", norm="l1")


def test_resume_refuses_other_overrides_and_continues_with_the_same(tmp_path, runs):
    out = tmp_path / "run"
    options = dict(model="example:digits", suite="fgsm", limit=LIMIT, batch_size=32, save_every=0, refill=False)
    with pytest.raises(Interrupted):
        run_evaluation(EvalConfig.of(**options, eps="4/255", out=out), Hooks(on_batch=stop_after(2)))
    release_run_dirs()
    assert (out / "progress.pt").is_file()
    common = ("eval", "example:digits", "--suite", "fgsm", "--limit", LIMIT, "--batch-size", 32, "--no-refill",
              "--quiet", "--json", "--resume", out)
    for other in ((), ("--eps", "0.2"), ("--eps", "4/255", "--norm", "l2")):
        refused = invoke(*common, *other)
        assert refused.exit_code == 2, other
        assert "cannot resume" in one_error_line(refused)
    resumed = invoke(*common, "--eps", "4/255")
    assert resumed.exit_code == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["complete"] and doc["suite"]["overrides"]["eps"] == ["4/255"]
    assert outcomes(doc) == outcomes(read_doc(runs / "at-4"))  # as if never interrupted


def test_no_overrides_leave_the_suite_and_its_hash_as_written():
    loaded = load_suite("fgsm")
    assert with_overrides(loaded) is loaded
    assert resolve(EvalConfig.of(model="example:digits", suite="fgsm")).suite.sha256 == loaded.sha256
    assert EvalConfig.of(model="m").suite.eps is None and EvalConfig.of(model="m").suite.norm is None
