"""Suite files: the built-ins, validation messages with file:line:field, safe expressions."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robench.errors import UsageError
from robench.expressions import eval_expr
from robench.suites import builtin_suites, load_suite
from robench.suites.loader import parse_suite

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"clean", "fgsm", "bim", "pgd-linf", "pgd-l2", "fdd-fashion-mnist", "fdd-cifar100",
            "alignment-mnist", "alignment-fashion-mnist", "alignment-cifar10", "alignment-stl10",
            "reid-clean", "reid-pgd", "reid-misrank-transfer", "reid-dmr"}


def test_every_builtin_suite_validates():
    names = set(builtin_suites())
    assert REQUIRED <= names
    for name in names:
        suite = load_suite(name).suite
        assert suite.name == name
        for spec in suite.attacks:
            for eps in spec.eps:
                assert 0 <= eps <= 1


def entries(name):
    return {(a.display_name(), round(e, 6)): a for a in load_suite(name).suite.attacks for e in a.eps}


def step_size(spec, eps):
    return spec.attack_class.step_size_at(spec.settings, eps)


def test_fdd_suites_mirror_table_3():
    fm = entries("fdd-fashion-mnist")
    assert sorted(k for k in fm) == sorted(
        [("fgsm", e) for e in (0.03, 0.06, 0.12)] + [(a, e) for a in ("bim", "pgd") for e in (0.02, 0.03)]
    )
    for (name, eps), spec in fm.items():
        if name != "fgsm":
            assert spec.settings.steps == 10
            assert step_size(spec, eps) == pytest.approx(eps / 10)
    cifar = load_suite("fdd-cifar100").suite
    assert cifar.eps_space == "normalized" and cifar.normalize == "cifar100"
    assert sorted(entries("fdd-cifar100")) == sorted(
        [("fgsm", e) for e in (0.015, 0.03, 0.06)] + [(a, e) for a in ("bim", "pgd") for e in (0.015, 0.03)]
    )


@pytest.mark.parametrize("data, eps", [("mnist", (0.2, 0.3)), ("fashion-mnist", (0.2, 0.3)),
                                       ("cifar10", (0.02, 0.03)), ("stl10", (0.02, 0.03))])
def test_alignment_suites_mirror_the_paper(data, eps):
    suite = load_suite(f"alignment-{data}").suite
    assert suite.dataset == data
    got = entries(f"alignment-{data}")
    assert sorted(got) == sorted((a, e) for a in ("fgsm", "pgd-k10", "pgd-k20") for e in eps)
    assert got[("pgd-k10", eps[0])].settings.steps == 10
    assert got[("pgd-k20", eps[0])].settings.steps == 20


def parse_error(text: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_suite(text, "s.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    stepz: 3\n",
         "s.yaml:5 attacks[0].stepz: pgd does not take this field; did you mean 'steps'"),
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    steps: ten\n", "s.yaml:5 attacks[0].steps:"),
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    eps: 0.2\n", "s.yaml:5 attacks[0].eps: duplicate key"),
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 2\n", "absurd"),
        ("name: a\nattacks:\n  - attack: fgsm\n    eps: 0.1\n    steps: 5\n", "steps: fgsm does not take this field"),
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    params: {a: 1}\n", "only ta.* attacks take params"),
        ("name: a\nattacks:\n  - attack: pgd\n", "at least one value"),
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    step_size: 0\n",
         "s.yaml:5 attacks[0].step_size: '0' is 0 at eps 0.1, steps 10; it must be > 0"),
        ("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    steps: 0\n", "attacks[0].steps"),
        ("name: a\nattacks:\n  - attack: ta.PGD\n    eps: 0.1\n    steps: 3\n", "put steps under params"),
        ("name: a\neps_space: normalized\nattacks:\n  - attack: pgd\n    norm: l2\n    eps: 0.5\n",
         "only defined for linf"),
        ("name: a\n", "attacks: field required"),
        ("- 1\n- 2\n", "a suite is a mapping"),
        ("", "empty"),
        ("name: a\nattacks: [\n", "malformed YAML"),
    ],
    ids=["unknown-key", "wrong-type", "duplicate-key", "absurd-eps", "fgsm-steps", "native-params", "no-eps",
         "zero-step", "zero-steps", "ta-fields", "normalized-l2", "no-attacks", "not-mapping", "empty",
         "malformed"],
)
def test_errors_name_file_line_and_field(text, expected):
    assert expected in parse_error(text)


def test_yaml_tags_are_not_executed(tmp_path):
    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\nattacks: []\n"
    parse_error(text)
    assert not marker.exists()


def test_eps_expressions_and_text_are_kept():
    suite = parse_suite("name: a\nattacks:\n  - attack: pgd\n    eps: [8/255, 0.5*2**-4]\n").suite
    assert suite.attacks[0].eps == [8 / 255, 0.5 * 2 ** -4]
    assert suite.attacks[0].eps_text == ["8/255", "0.5*2**-4"]
    assert step_size(suite.attacks[0], 8 / 255) == pytest.approx(2.5 * (8 / 255) / 10)


@pytest.mark.parametrize("text", ["__import__('os').system('x')", "open('f')", "(1).__class__", "eps", "[1][0]",
                                  "lambda: 1", "1 if 1 else 2", "9**9**9", "1/0", "'8/255'", "1e999"])
def test_non_arithmetic_expressions_are_rejected(text):
    with pytest.raises(UsageError):
        eval_expr(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 10_000))
def test_fractions_evaluate_exactly(num, den):
    assert eval_expr(f"{num}/{den}") == num / den
    assert eval_expr(f" ( {num} ) / ( {den} ) ") == num / den


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_is_rejected_or_a_number(text):
    try:
        value = eval_expr(text)
    except UsageError:
        return
    assert isinstance(value, float)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=5), st.integers(1, 50))
def test_valid_suites_round_trip(eps, steps):
    text = f"name: h\nattacks:\n  - attack: bim\n    eps: {eps!r}\n    steps: {steps}\n"
    spec = parse_suite(text).suite.attacks[0]
    assert spec.eps == pytest.approx(eps) and spec.settings.steps == steps
    assert step_size(spec, eps[0]) == pytest.approx(eps[0] / steps)


@settings(max_examples=100, deadline=None)
@given(st.floats(-1e6, -1e-9))
def test_negative_eps_is_always_refused(eps):
    assert "must be >= 0" in parse_error(f"name: h\nattacks:\n  - attack: fgsm\n    eps: {eps!r}\n")


def test_suite_hash_ignores_comments_and_layout():
    a = parse_suite("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n")
    b = parse_suite("# comment\nname: a\nattacks: [{attack: pgd, eps: [0.1]}]\n")
    c = parse_suite("name: a\nattacks:\n  - attack: pgd\n    eps: 0.2\n")
    assert a.sha256 == b.sha256 != c.sha256


def test_wheel_carries_the_builtin_suites_and_example(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("robench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for suite in REQUIRED:
        assert f"robench/_builtin_suites/{suite}.yaml" in names
    assert "robench/examples/digits_cnn.safetensors" in names
    assert "robench/examples/digits_test.npz" in names
    assert "robench/data/imagenet_wnids.txt" in names


def test_a_folder_named_like_a_builtin_suite_does_not_hide_it(tmp_path, monkeypatch):
    from robench.suites.loader import find_suite

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # e.g. the bundled digits saved as images for robench pixel-index
    assert find_suite("digits") == builtin_suites()["digits"]
    (tmp_path / "mine").mkdir()  # any other folder is still taken as the path it names, and refused
    with pytest.raises(UsageError, match="suite file mine is a directory"):
        load_suite("mine")
