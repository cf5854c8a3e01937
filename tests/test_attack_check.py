"""The attack check (binarization test): problems with a known solution, passed by strong attacks on the
bundled model and failed by PGD where gradients are masked or stopped (x.detach(), 4-bit quantisation, JPEG)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import robench
from robench.errors import UsageError
from robench.defenses.input_transforms import Detach, InputDefended
from robench.evaluation.binarization import Construction, binarized, build_problems, readout_layer
from robench.examples import example_data_path
from robench.models.config import ModelConfig
from robench.models.wrapper import RobustModel
from robench.results.schema import validate_document
from tests.cli_helpers import invoke, one_error_line

EPS = 0.1
FAST = {"samples": 16, "inner_points": 300}  # fewer inner points than the paper's 999: a quicker, easier problem


def bundled_cnn() -> nn.Module:
    return ModelConfig(source="example:digits").load().model


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    arrays = np.load(example_data_path("digits"))
    return torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(arrays["y"]).long()


def suite(*entries: dict) -> dict:
    return {"name": "check", "attacks": [{"eps": [EPS], **e} for e in entries]}


def checks_by_label(result: robench.Result) -> dict[str, dict]:
    validate_document(result.doc)
    return {c["label"]: c for c in result.doc["checks"]}


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_every_problem_has_a_solution_within_eps(norm: str, eps: float) -> None:
    x, _ = digits()
    model = RobustModel(bundled_cnn()).eval()
    _, layer = readout_layer(model.model)
    problems = build_problems(model, layer, x[:12], torch.arange(12), Construction(norm, eps, inner=300), 512)
    assert bool(problems.built.all())
    delta = (problems.boundary - problems.anchors).flatten(1)
    distance = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert torch.allclose(distance, torch.full_like(distance, eps), atol=1e-5)
    assert float(problems.boundary.min()) >= 0 and float(problems.boundary.max()) <= 1
    with binarized(model, layer, problems), torch.no_grad():
        assert model(problems.anchors).argmax(dim=1).tolist() == [0] * 12  # the clean point: class 0
        assert model(problems.boundary).argmax(dim=1).tolist() == [1] * 12  # its known solution: class 1


def test_the_readout_finds_each_inputs_problem_in_any_batch_order() -> None:
    x, _ = digits()
    model = RobustModel(bundled_cnn()).eval()
    _, layer = readout_layer(model.model)
    problems = build_problems(model, layer, x[:6], torch.arange(6), Construction("linf", EPS, inner=200), 512)
    order = torch.tensor([5, 2, 2, 0, 4])
    with binarized(model, layer, problems), torch.no_grad():
        alone = torch.cat([model(problems.boundary[i:i + 1]) for i in order.tolist()])
        together = model(problems.boundary[order])
    assert torch.allclose(alone, together, atol=1e-5)
    with torch.no_grad():
        assert model(x[:2]).shape == (2, 10)  # the hooks are gone afterwards


def test_strong_attacks_pass_on_the_bundled_model() -> None:
    result = robench.evaluate("example:digits", "example:digits", suite(
        {"attack": "bim", "steps": 10, "step_size": "eps/10"},
        {"attack": "pgd", "steps": 20},
        {"attack": "apgd-ce", "steps": 20},
        {"attack": "square", "queries": 1000},
        {"attack": "autoattack", "members": {"apgd-ce": {"steps": 20}, "fab-t": {"steps": 20},
                                             "square": {"queries": 300}}},
    ), task="attack-check", **FAST)
    checks = checks_by_label(result)
    for label, check in checks.items():
        assert check["problems"] == 16 and check["not_built"] == 0, label
        assert check["pass_rate"] >= 0.95 and check["verdict"] == "passed", (label, check["pass_rate"])
    # On two classes AutoAttack runs the members that apply: no DLR losses, FAB-T's one target.
    assert checks["autoattack"]["params"]["attacks"] == ["apgd-ce", "fab-t", "square"]
    assert result.doc["verdict"] == "passed" and result.doc["settings"]["readout"] == "8"
    assert set(result.samples["solved"]) == {True}


def test_pgd_fails_where_gradients_are_masked_and_square_does_not() -> None:
    result = robench.evaluate(InputDefended(Detach(), bundled_cnn()), "example:digits", suite(
        {"attack": "pgd", "steps": 20}, {"attack": "square", "queries": 1000}), task="attack-check", **FAST)
    checks = checks_by_label(result)
    assert checks["pgd"]["verdict"] == "failed" and checks["pgd"]["pass_rate"] < 0.5
    assert checks["square"]["verdict"] == "passed"
    assert result.doc["verdict"] == "failed"
    assert any("autograd" in flag for flag in checks["pgd"]["sanity_flags"])


@pytest.mark.parametrize("transform", ["quantize", "jpeg"])
def test_pgd_fails_on_input_transform_defences_until_bpda(transform: str) -> None:
    from robench.defenses.input_transforms import JPEG, Quantize

    defence = Quantize(4) if transform == "quantize" else JPEG(75)
    model = InputDefended(defence, bundled_cnn())
    result = robench.evaluate(model, "example:digits", suite(
        {"attack": "pgd", "steps": 20, "label": "pgd"},
        {"attack": "pgd", "steps": 20, "label": "pgd+bpda", "bpda": ["transform"]}), task="attack-check", **FAST)
    checks = checks_by_label(result)
    assert checks["pgd"]["verdict"] == "failed" and checks["pgd"]["pass_rate"] < 0.5, checks["pgd"]["pass_rate"]
    assert checks["pgd+bpda"]["pass_rate"] > checks["pgd"]["pass_rate"] + 0.3, checks["pgd+bpda"]["pass_rate"]


def test_the_command_line_writes_the_run_and_exits_1_when_an_attack_fails(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite.yaml").write_text(
        "name: mixed\nattacks:\n  - attack: pgd\n    label: short-pgd\n    eps: [0.2]\n    steps: 1\n"
        "    step_size: eps/10\n    random_start: false\n"
        "  - attack: pgd\n    eps: [0.2]\n    steps: 20\n  - attack: pixels\n    pixels: [4]\n")
    run = invoke("check-attack", "example:digits", "--suite", "suite.yaml", "--samples", "24", "--inner-points", "300",
                 "--out", "run", "--json")
    doc = json.loads(run.stdout)
    validate_document(doc)
    checks = {c["label"]: c for c in doc["checks"]}
    assert checks["pgd"]["verdict"] == "passed" and checks["pixels"]["verdict"] == "skipped"
    # One step of a tenth of eps cannot reach a solution at distance eps (random points may still hit one).
    short = checks["short-pgd"]
    assert short["verdict"] == "failed" and short["solved"] <= short["trivial"] and run.exit_code == 1, run.stderr
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["checks"] == doc["checks"]
    samples = (tmp_path / "run" / "samples.csv").read_text().splitlines()
    assert samples[0] == "check,index,solved" and len(samples) == 1 + 2 * 24
    compared = invoke("compare", "run")
    assert compared.exit_code == 2 and "holds an attack check" in one_error_line(compared)
    again = invoke("check-attack", "example:digits", "--suite", "suite.yaml", "--out", "run")
    assert again.exit_code == 2 and "never overwritten" in one_error_line(again)


def test_bad_readouts_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="no nn.Linear|has none"):
        readout_layer(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()))
    run = invoke("check-attack", "example:digits", "--suite", "digits", "--readout", "nope", "--samples", "2")
    assert run.exit_code == 2 and "--readout 'nope' is not a module" in one_error_line(run)


def test_an_interrupted_check_resumes_without_redoing_finished_checks(tmp_path) -> None:
    from robench.errors import Interrupted
    from robench.tasks import Hooks
    from robench.tasks.attack_check import AttackCheckConfig, AttackCheckTask
    from robench.tasks.run import open_run_directory

    entries = suite({"attack": "pgd", "steps": 10}, {"attack": "bim", "steps": 5, "step_size": "eps/5"})
    config = AttackCheckConfig.of(model="example:digits", suite=entries, out=tmp_path / "run", **FAST)
    lines: list[str] = []

    def stop_at_the_second_check(line: str) -> None:
        lines.append(line)
        if line.startswith("checking bim"):
            raise KeyboardInterrupt

    task = AttackCheckTask(config)
    with pytest.raises(Interrupted, match="interrupted after 1 of 2 checks"):
        task.run(open_run_directory(task, tmp_path / "run"), Hooks(on_step=stop_at_the_second_check))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["complete"] is False

    lines.clear()
    task = AttackCheckTask(config)
    directory = open_run_directory(task, tmp_path / "run")
    resumed = task.run(directory, Hooks(on_step=lines.append))
    directory.finish(resumed)
    assert [line for line in lines if line.startswith("checking")] == ["checking bim eps 0.1 on 16 problems"]
    whole = robench.evaluate("example:digits", None, entries, task="attack-check", **FAST)

    def timeless(doc: dict) -> list[dict]:
        return [{k: v for k, v in c.items() if k != "seconds"} for c in doc["checks"]]

    assert timeless(resumed.doc) == timeless(whole.doc)
    assert resumed.samples.equals(whole.samples)


def test_docs_examples_run_as_written(tmp_path) -> None:
    from tests.cli_helpers import readme_block
    from tests.test_readme import run_bash_block, run_python_block

    command = readme_block("check-attack-command")
    assert command.startswith("robench check-attack example:digits --suite digits")
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    [ran] = run_bash_block("check-attack-command", tmp_path / "cli")
    run_dirs = list((tmp_path / "cli" / "runs").glob("digits-check/*/*"))
    assert len(run_dirs) == 1, ran.stderr
    doc = json.loads((run_dirs[0] / "results.json").read_text())
    validate_document(doc)
    # Exit 1 exactly when an attack failed; the iterative attacks pass on the bundled model.
    assert ran.returncode == (1 if doc["verdict"] == "failed" else 0), ran.stderr
    for check in doc["checks"]:
        assert check["problems"] == 20
        if check["attack"] in ("bim", "pgd"):
            assert check["verdict"] == "passed", check
        assert f"{check['label']} " in ran.stdout
    assert 'task="attack-check"' in readme_block("check-attack-api")
    printed = run_python_block("check-attack-api", tmp_path / "api").ok().stdout.splitlines()
    assert printed[-1] == doc["verdict"]
    assert printed[:-1] == [f"{c['label']} {c['eps_text']} {c['pass_rate']} {c['verdict']}" for c in doc["checks"]]


@pytest.mark.parametrize("option,value,message", [
    ("--samples", "0", "--samples must be between 1 and 100000, got 0"),
    ("--inner-points", "-1", "--inner-points must be between 1 and 1e+06, got -1"),
    ("--pass-threshold", "nan", "--pass-threshold must be between 0 and 1, got nan"),
])
def test_bad_options_are_one_line_naming_the_option(option: str, value: str, message: str) -> None:
    run = invoke("check-attack", "example:digits", "--suite", "digits", option, value)
    assert run.exit_code == 2 and one_error_line(run) == f"robench: error: {message}"
