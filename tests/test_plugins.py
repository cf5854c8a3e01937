"""Attacks written outside robench: ``--plugin``, a suite's ``plugins:``, entry points, the README example.

The plugin modules are written into ``tmp_path`` at test time and imported from there,
as a user's own module would be; the ``plugin_dir`` fixture puts the registry,
its entry-point cache and ``sys.modules`` back as they were, so other tests never
see these attacks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import robench
from cli_helpers import invoke, one_error_line, plugins_from, readme_block
from robench.attacks import ATTACKS, PGD, Attack, GradientAttack, RunOutput, StepSizeParams, randomness
from robench.errors import RunError, UsageError
from robench.evaluation.findings import attack_kind

LIMIT = 60

# A user's module: a uniform-noise attack with one bounded parameter. It leaves a marker file
# when imported, so a test can tell that it was never imported.
NOISE_MODULE = '''
from pathlib import Path

import torch
from pydantic import Field

import robench
from robench.attacks import Attack, AttackParams, Cost, RunOutput

Path(__file__).with_name(__name__ + ".imported").write_text("imported")


class NoiseParams(AttackParams):
    draws: int = Field(default=4, ge=1, le=50)


class NoiseAttack(Attack):
    name = "noise"
    Params = NoiseParams
    family = "query"
    norms = ("linf",)

    @classmethod
    def cost(cls, params):
        return Cost(forward=params.draws + 1)

    def run(self, model, x, y, eps, context):
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for draw in range(self.params.draws):
            u = context.uniform(tuple(x.shape[1:]), draw).to(x.dtype)
            candidate = (x + (2 * u - 1) * self.radius(eps, x)).clamp(0, 1)
            x_adv[~fooled] = candidate[~fooled]
            fooled |= context.in_batches(lambda xs, ys: self.loss.fooled(model(xs), ys), x_adv, y)
        return RunOutput(x_adv, forward_evals=self.params.draws * len(x))
'''
REGISTER = "\nrobench.register_attack(NoiseAttack)\n"


def write_module(directory: Path, name: str = "noise_attack", *, register: bool = True) -> Path:
    path = directory / f"{name}.py"
    path.write_text(NOISE_MODULE + (REGISTER if register else ""))
    return path


def write_suite(directory: Path, text: str, name: str = "suite.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def marker(directory: Path, module: str = "noise_attack") -> Path:
    return directory / f"{module}.imported"


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    with plugins_from(tmp_path, monkeypatch) as folder:
        yield folder


def eval_args(suite: Path, out: Path, *extra) -> list:
    return ["eval", "example:digits", "--suite", suite, "--limit", LIMIT, "--out", out, "--quiet", *extra]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


NOISE_SUITE = """
    name: plugin-noise
    attacks:
      - attack: noise
        eps: [0.3, 0.6]
        draws: 3
"""


# -- a plugin module named with --plugin ---------------------------------------------------------------------

def test_plugin_attack_runs_from_a_yaml_suite(plugin_dir):
    write_module(plugin_dir)
    suite = write_suite(plugin_dir, NOISE_SUITE)
    result = invoke(*eval_args(suite, plugin_dir / "run", "--plugin", "noise_attack"))
    assert result.exit_code == 0, result.stderr
    doc = results(plugin_dir / "run")
    clean = doc["clean"]["accuracy"]
    assert [(a["attack"], a["eps"]) for a in doc["attacks"]] == [("noise", 0.3), ("noise", 0.6)]
    for entry in doc["attacks"]:
        assert entry["n"] == LIMIT and entry["accuracy"] <= clean
        assert entry["gradient_evals"] == 0 and entry["input_gradient"] is None  # a query attack
        assert entry["params"]["norm"] == "linf" and entry["params"]["eps_expr"] == str(entry["eps"])
    # At eps 0.6 uniform noise does fool the model on some digits: the attack really ran.
    assert doc["attacks"][1]["accuracy"] < clean
    assert doc["robust_accuracy"] <= min(a["accuracy"] for a in doc["attacks"])
    # The attack's own parameter is part of what the run records.
    assert [a["params"].get("draws") for a in doc["attacks"]] == [3, 3], doc["attacks"][0]["params"]


def test_plugin_attack_from_the_python_api_is_batch_size_invariant(plugin_dir, trained_model, test_tensors):
    write_module(plugin_dir)
    suite = {"name": "api-noise", "attacks": [{"attack": "noise", "eps": 0.6, "draws": 3}]}
    runs = [robench.evaluate(trained_model, test_tensors, suite, plugins=["noise_attack"], limit=LIMIT,
                             batch_size=size, device="cpu") for size in (7, 64)]
    assert "noise_attack" in sys.modules and ATTACKS.get("noise").__module__ == "noise_attack"
    first = runs[0]
    assert first.doc["attacks"][0]["attack"] == "noise"
    assert first.doc["attacks"][0]["accuracy"] < first.clean_accuracy
    # Noise keyed by sample index: the same examples whatever the batch size.
    assert runs[1].doc["attacks"][0]["accuracy"] == first.doc["attacks"][0]["accuracy"]
    assert runs[1].samples.equals(first.samples)


def test_misspelled_plugin_parameter_names_file_line_and_field(plugin_dir):
    write_module(plugin_dir)
    suite = write_suite(plugin_dir, """
        name: plugin-noise
        attacks:
          - attack: noise
            eps: 0.3
            drawz: 3
    """)
    result = invoke(*eval_args(suite, plugin_dir / "run", "--plugin", "noise_attack"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith(f"robench: error: {suite}:5 attacks[0].drawz: noise does not take this field"), line
    assert "did you mean 'draws'?" in line
    assert not (plugin_dir / "run" / "results.json").exists()


@pytest.mark.parametrize("value, problem", [(0, "greater than or equal to 1"), (51, "less than or equal to 50"),
                                            ("many", "valid integer")])
def test_out_of_bounds_plugin_parameter_names_the_field(plugin_dir, value, problem):
    write_module(plugin_dir)
    suite = write_suite(plugin_dir, f"""
        name: plugin-noise
        attacks:
          - attack: noise
            eps: 0.3
            draws: {value}
    """)
    result = invoke(*eval_args(suite, plugin_dir / "run", "--plugin", "noise_attack"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith(f"robench: error: {suite}:5 attacks[0].draws: "), line
    assert problem in line


# -- a suite's plugins: -----------------------------------------------------------------------------------------

SUITE_WITH_PLUGINS = """
    name: plugin-noise
    plugins: [noise_attack]
    attacks:
      - attack: noise
        eps: 0.3
        draws: 2
"""


@pytest.mark.parametrize("allow", [["--plugin", "noise_attack"], ["--trust-suite"]])
def test_suite_plugins_are_imported_when_allowed(plugin_dir, allow):
    write_module(plugin_dir)
    suite = write_suite(plugin_dir, SUITE_WITH_PLUGINS)
    result = invoke(*eval_args(suite, plugin_dir / "run", *allow))
    assert result.exit_code == 0, result.stderr
    assert marker(plugin_dir).exists()
    assert [a["attack"] for a in results(plugin_dir / "run")["attacks"]] == ["noise"]


def test_suite_plugins_are_not_imported_without_permission(plugin_dir):
    write_module(plugin_dir)
    suite = write_suite(plugin_dir, SUITE_WITH_PLUGINS)
    result = invoke(*eval_args(suite, plugin_dir / "run"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith(f"robench: error: {suite}:2 plugins: importing noise_attack runs its code"), line
    assert "pass --plugin noise_attack" in line and "--trust-suite" in line
    # Refused before anything ran: the module's top level never executed.
    assert not marker(plugin_dir).exists()
    assert "noise_attack" not in sys.modules and "noise" not in ATTACKS._items


def test_suite_plugins_from_the_python_api(plugin_dir, trained_model, test_tensors):
    write_module(plugin_dir)
    suite = {"name": "api-noise", "plugins": ["noise_attack"], "attacks": [{"attack": "noise", "eps": 0.3}]}
    with pytest.raises(UsageError, match="pass --plugin noise_attack"):
        robench.evaluate(trained_model, test_tensors, suite, limit=LIMIT, device="cpu")
    assert not marker(plugin_dir).exists()
    result = robench.evaluate(trained_model, test_tensors, suite, plugins=["noise_attack"], limit=LIMIT, device="cpu")
    assert result.doc["attacks"][0]["attack"] == "noise"


# -- plugins that cannot be imported, classes that cannot be registered ----------------------------------------

@pytest.mark.parametrize("module, expected", [
    ("no_such_plugin_module", "--plugin: cannot import no_such_plugin_module: ModuleNotFoundError"),
    ("broken_plugin", "--plugin: cannot import broken_plugin: RuntimeError: broken on purpose"),
    ("../noise_attack", "--plugin: '../noise_attack' is not a module name"),
    ("shadow_plugin", "attack name 'pgd' is taken by robench; register NoiseAttack under another name"),
])
def test_plugin_that_cannot_be_imported_is_one_line(plugin_dir, module, expected):
    (plugin_dir / "broken_plugin.py").write_text('raise RuntimeError("broken on purpose")\n')
    (plugin_dir / "shadow_plugin.py").write_text(NOISE_MODULE + '\nrobench.register_attack(NoiseAttack, name="pgd")\n')
    write_module(plugin_dir)
    suite = write_suite(plugin_dir, NOISE_SUITE)
    result = invoke(*eval_args(suite, plugin_dir / "run", "--plugin", module))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith(f"robench: error: {expected}"), line
    assert "broken_plugin" not in sys.modules and "shadow_plugin" not in sys.modules
    assert not marker(plugin_dir).exists() and ATTACKS.get("pgd") is PGD


def test_plugin_that_cannot_be_imported_from_the_python_api(plugin_dir, trained_model, test_tensors):
    with pytest.raises(UsageError, match="cannot import no_such_plugin_module: ModuleNotFoundError"):
        robench.evaluate(trained_model, test_tensors, "fgsm", plugins=["no_such_plugin_module"], limit=LIMIT)


class Noise(Attack):
    name = "plain-noise"
    family = "query"

    def run(self, model, x, y, eps, context):
        return RunOutput(x.clone())


def test_registering_under_a_taken_name_or_a_non_attack_is_refused(plugin_dir):
    for name in ("pgd", "PGD", "fgsm", "ta.Square"):
        with pytest.raises(UsageError, match=f"attack name {re.escape(repr(name))} is taken by robench; "
                                             "register Noise under another name"):
            robench.register_attack(Noise, name=name)

    class Shadow(Noise):
        name = "pgd"

    with pytest.raises(UsageError, match="'pgd' is taken by robench"):
        robench.register_attack(Shadow)  # the class attribute is the default name
    assert ATTACKS.get("pgd") is PGD

    class NotAnAttack:
        name = "not-an-attack"

        def run(self, *args):
            return None

    with pytest.raises(UsageError, match="is not an attack: subclass robench.attacks.Attack"):
        robench.register_attack(NotAnAttack)
    with pytest.raises(UsageError, match="is not an attack"):
        robench.register_attack(lambda *a: None, name="function")

    class LooseParams(Noise):
        name = "loose-params"
        Params = dict

    with pytest.raises(UsageError, match="LooseParams.Params must subclass robench.attacks.AttackParams"):
        robench.register_attack(LooseParams)

    class NoRun(Attack):
        name = "no-run"

    class NoStep(GradientAttack):
        name = "no-step"
        Params = StepSizeParams

    for cls in (NoRun, NoStep):
        with pytest.raises(UsageError, match=f"{cls.__name__} writes neither run nor step"):
            robench.register_attack(cls)

    robench.register_attack(Noise)
    robench.register_attack(Noise)  # the same class again changes nothing

    class Other(Noise):
        pass

    with pytest.raises(UsageError, match="attack 'plain-noise' is already registered"):
        robench.register_attack(Other)
    assert ATTACKS.get("plain-noise") is Noise
    for refused in ("not-an-attack", "function", "loose-params", "no-run", "no-step"):
        assert refused not in ATTACKS


# -- entry points of installed packages ------------------------------------------------------------------------

def install_fake_distribution(directory: Path, value: str = "noise_attack:NoiseAttack") -> None:
    """What pip leaves in site-packages: a dist-info folder declaring the entry point."""
    info = directory / "fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[robench.attacks]\nnoise = {value}\n")


def test_entry_point_attack_runs_without_plugin(plugin_dir):
    # The module does not register itself: the entry point alone makes it known.
    write_module(plugin_dir, register=False)
    install_fake_distribution(plugin_dir)
    ATTACKS._entry_points_loaded = False  # discover again, now that the distribution is on sys.path
    suite = write_suite(plugin_dir, NOISE_SUITE)
    result = invoke(*eval_args(suite, plugin_dir / "run"))
    assert result.exit_code == 0, result.stderr
    assert [a["attack"] for a in results(plugin_dir / "run")["attacks"]] == ["noise", "noise"]
    cls = ATTACKS.get("noise")
    assert (cls.__module__, cls.__name__) == ("noise_attack", "NoiseAttack")
    assert "noise" in ATTACKS.names()


def test_broken_entry_point_is_named(plugin_dir):
    install_fake_distribution(plugin_dir, "no_such_plugin_module:NoiseAttack")
    ATTACKS._entry_points_loaded = False
    suite = write_suite(plugin_dir, NOISE_SUITE)
    result = invoke(*eval_args(suite, plugin_dir / "run"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "attack plugin noise (no_such_plugin_module:NoiseAttack) failed to load" in line, line


# -- the base checks every output ------------------------------------------------------------------------------

class OutsideBall(Attack):
    """Steps twice as far as eps allows: the base must refuse the result, not report it."""

    name = "outside-ball"
    family = "query"
    norms = ("linf",)

    def run(self, model, x, y, eps, context):
        return RunOutput((x + 2 * eps).clamp(0, 1))


def test_attack_returning_points_outside_its_ball_is_a_run_error(plugin_dir, trained_model, test_tensors):
    robench.register_attack(OutsideBall)
    suite = write_suite(plugin_dir, """
        name: outside
        attacks:
          - attack: outside-ball
            eps: 0.1
    """)
    result = invoke(*eval_args(suite, plugin_dir / "run"))
    assert result.exit_code == 3
    line = one_error_line(result)
    assert "outside-ball returned sample" in line and "outside its threat model (linf, eps 0.1)" in line, line

    x, y = test_tensors
    with pytest.raises(RunError, match=r"^outside-ball returned sample \d+ outside its threat model"):
        OutsideBall()(trained_model, x[:8], y[:8], 0.1)


# -- a run written before the context ---------------------------------------------------------------------------

class LegacyNoise(Attack):
    """Uniform noise with the earlier ``run`` signature: batching by hand from ``batch_size``."""

    name = "legacy-noise"
    family = "query"
    norms = ("linf",)

    def run(self, model, x, y, eps, sample_ids, batch_size, refill):
        key = randomness.stream_key(self.seed, self.stream, 0)
        u = randomness.uniform(sample_ids, tuple(x.shape[1:]), key, x.device).to(x.dtype)
        x_adv = (x + (2 * u - 1) * self.radius(eps, x)).clamp(0, 1)
        self.batches = [len(part) for part in x.split(batch_size)]
        return RunOutput(x_adv, forward_evals=len(x))


class ContextNoise(LegacyNoise):
    name = "context-noise"

    def run(self, model, x, y, eps, context):
        u = context.uniform(tuple(x.shape[1:]), 0).to(x.dtype)
        return RunOutput((x + (2 * u - 1) * self.radius(eps, x)).clamp(0, 1), forward_evals=len(x))


def test_a_run_with_the_earlier_signature_still_works_with_a_deprecation_warning(trained_model, test_tensors):
    x, y = test_tensors[0][:20], test_tensors[1][:20]
    legacy = LegacyNoise()
    with pytest.warns(DeprecationWarning, match=r"LegacyNoise.run\(model, x, y, eps, sample_ids, batch_size, refill\)"):
        old = legacy(trained_model, x, y, 0.3, torch.arange(20) + 5, batch_size=7)
    assert legacy.batches == [7, 7, 6]  # the call's batch size reaches it as before
    new = ContextNoise()(trained_model, x, y, 0.3, torch.arange(20) + 5, batch_size=7)
    assert torch.equal(old.x_adv, new.x_adv) and torch.equal(old.success, new.success)


# -- a user gradient attack is iterative by its traits ---------------------------------------------------------

class SignAscent(GradientAttack):
    """BIM written by a user: only ``step``."""

    name = "sign-ascent"
    Params = StepSizeParams

    def step(self, x_adv, grad, loss, state, t):
        return x_adv + state.step_size * grad.sign()


class OneStep(GradientAttack):
    name = "one-step"
    default_step_size = "eps"

    def step(self, x_adv, grad, loss, state, t):
        return x_adv + state.step_size * grad.sign()


def test_user_attacks_are_classified_by_traits(plugin_dir):
    for cls in (SignAscent, OneStep, Noise):
        robench.register_attack(cls)
    assert attack_kind("sign-ascent") == "iterative"
    assert attack_kind("one-step") == "single-step"
    assert attack_kind("plain-noise") == "black-box"


def test_weaker_attack_beating_a_user_iterative_attack_flags_masking(plugin_dir, trained_model, test_tensors):
    robench.register_attack(SignAscent)
    suite = {"name": "masking", "attacks": [
        # steps far too small to get anywhere: FGSM at the same eps does better
        {"attack": "sign-ascent", "label": "timid", "eps": 0.2, "steps": 10, "step_size": "eps/1000"},
        {"attack": "fgsm", "eps": 0.2},
        # a real iterative attack: FGSM at this eps does not beat it, and no flag is raised for it
        {"attack": "sign-ascent", "label": "bold", "eps": 0.3, "steps": 10},
        {"attack": "fgsm", "eps": 0.3},
    ]}
    result = robench.evaluate(trained_model, test_tensors, suite, limit=LIMIT, device="cpu")
    acc = {(a["label"], a["eps"]): a["accuracy"] for a in result.doc["attacks"]}
    assert acc[("fgsm", 0.2)] < acc[("timid", 0.2)]
    assert acc[("bold", 0.3)] <= acc[("fgsm", 0.3)]
    sanity = result.doc["sanity"]
    assert sanity["flag_names"].count("gradient_masking") == 1
    (flag,) = [message for name, message in zip(sanity["flag_names"], sanity["flags"]) if name == "gradient_masking"]
    assert flag == (f"fgsm (single-step) at eps 0.2 beats the iterative white-box attacks "
                    f"({100 * acc[('fgsm', 0.2)]:.2f}% vs {100 * acc[('timid', 0.2)]:.2f}%): "
                    "a sign of gradient masking")


def test_user_gradient_attack_stops_early(plugin_dir, trained_model, test_tensors):
    robench.register_attack(SignAscent)
    steps = 20
    suite = {"name": "early-stop", "attacks": [
        {"attack": "sign-ascent", "eps": 0.3, "steps": steps},
        {"attack": "sign-ascent", "eps": 0.3, "steps": steps, "final_iterate": True, "label": "final"},
    ]}
    result = robench.evaluate(trained_model, test_tensors, suite, limit=LIMIT, device="cpu")
    anyit, final = result.doc["attacks"]
    assert anyit["accuracy"] < 0.2 * result.clean_accuracy  # an undefended model at a large eps
    assert anyit["gradient_evals"] < steps * anyit["attacked"] / 2
    assert final["gradient_evals"] == steps * final["attacked"]
    assert anyit["params"]["steps"] == steps and anyit["params"]["step_size"] == pytest.approx(0.3 / steps)


# -- the README's example runs as written ----------------------------------------------------------------------

def test_readme_example_runs_as_written(plugin_dir, monkeypatch):
    (plugin_dir / "my_attacks.py").write_text(readme_block("my_attacks.py"))
    (plugin_dir / "my-suite.yaml").write_text(readme_block("my-suite.yaml"))
    command = shlex.split(readme_block("command"))
    assert command[:2] == ["robench", "eval"] and "--plugin" in command
    # As a user runs it: the installed script, from the folder holding the files, no PYTHONPATH help.
    script = Path(sys.executable).with_name("robench")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(script), *command[1:], "--limit", str(LIMIT), "--out", "run", "--quiet"],
                         cwd=plugin_dir, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    monkeypatch.chdir(plugin_dir)  # the checks below name the suite by a relative path
    doc = results(plugin_dir / "run")
    clean = doc["clean"]["accuracy"]
    noise = {a["eps"]: a["accuracy"] for a in doc["attacks"] if a["attack"] == "noise"}
    pgd = {a["eps"]: a["accuracy"] for a in doc["attacks"] if a["attack"] == "pgd"}
    assert set(noise) == set(pgd) == {0.1, 0.3}
    assert all(noise[e] <= clean and pgd[e] <= noise[e] for e in noise)  # gradients beat random noise

    # The comment in the suite holds: a misspelled field and an out-of-range value name file, line and field.
    for wrong, problem in (("drawz: 20", "attacks[0].drawz: noise does not take this field; did you mean "
                                         "'draws'?"),
                           ("draws: 0", "attacks[0].draws: Input should be greater than or equal to 1")):
        bad = (plugin_dir / "my-suite.yaml").read_text().replace("draws: 20", wrong)
        (plugin_dir / "bad-suite.yaml").write_text(bad)
        line_no = bad.splitlines().index(next(line for line in bad.splitlines() if wrong in line)) + 1
        result = invoke("eval", "example:digits", "--suite", "bad-suite.yaml", "--plugin", "my_attacks")
        assert result.exit_code == 2
        assert one_error_line(result) == f"robench: error: bad-suite.yaml:{line_no} {problem}"
    assert ATTACKS.get("noise").__module__ == "my_attacks"


def test_plugins_leave_no_trace():
    """Runs after the tests above (file order): none of their modules or attacks is left behind."""
    leftovers = {"noise_attack", "my_attacks", "broken_plugin", "shadow_plugin"} & set(sys.modules)
    assert not leftovers
    registered = {cls.__module__ for cls in ATTACKS._items.values()}
    assert not registered & {"noise_attack", "my_attacks", __name__}
