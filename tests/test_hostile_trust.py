"""Hostile checkpoints and suites: nothing in a file runs code unless the user trusts it.

TorchScript files are programs; suites are shared files and may not import code;
YAML alias bombs and deep nesting are refused before they are expanded; unreadable
model and suite files are one clear line (exit 2).
"""

from __future__ import annotations

import copy
import json
import sys
import time

import pytest
import torch
from PIL import Image
from torch import nn

from robench.errors import UsageError
from robench.models import ARCHITECTURES, load_model, register_architecture
from robench.models import architectures
from robench.suites import builtin_suites, load_suite, parse_suite
from cli_helpers import invoke, one_error_line

ARCH = "robench.examples:digits_cnn"
VICTIM_BYTES = b"precious data, do not touch"


class FileWriter(nn.Module):
    """A digits classifier whose scripted forward creates one file and overwrites another."""

    def __init__(self, marker: str, victim: str) -> None:
        super().__init__()
        self.marker = marker
        self.victim = victim
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        created = torch.from_file(self.marker, shared=True, size=4, dtype=torch.uint8)
        created.fill_(65)
        clobbered = torch.from_file(self.victim, shared=True, size=4, dtype=torch.uint8)
        clobbered.fill_(65)
        # Using the results keeps TorchScript from dropping the writes as dead code.
        return self.head(x.flatten(1)) + (created[0] + clobbered[0]).float() * 0


@pytest.fixture
def writer(tmp_path):
    marker, victim = tmp_path / "created-by-model", tmp_path / "victim.bin"
    victim.write_bytes(VICTIM_BYTES)
    path = tmp_path / "writer.pt"
    torch.jit.script(FileWriter(str(marker), str(victim))).save(str(path))
    return path, marker, victim


def assert_untouched(marker, victim):
    assert not marker.exists(), "the TorchScript payload ran"
    assert victim.read_bytes() == VICTIM_BYTES


@pytest.fixture(scope="module")
def market(digits_split, tmp_path_factory):
    """A tiny Market-1501 layout: enough for the loaders to reach the surrogate."""
    x_tr, x_te, y_tr, y_te = digits_split
    root = tmp_path_factory.mktemp("market")
    for folder, images, labels in (("query", x_te[:6], y_te[:6]), ("bounding_box_test", x_te[6:20], y_te[6:20]),
                                   ("bounding_box_train", x_tr[:20], y_tr[:20])):
        (root / folder).mkdir()
        for i, (img, label) in enumerate(zip(images, labels)):
            name = f"{int(label) + 1:04d}_c{1 + i % 2}s1_{i:06d}_00.png"
            Image.fromarray(img[..., 0]).convert("RGB").save(root / folder / name)
    return root


# --- TorchScript is a program ------------------------------------------------------------

def test_torchscript_payload_never_runs_without_trust(writer, tmp_path):
    path, marker, victim = writer
    result = invoke("eval", path, "--data", "example:digits", "--suite", "clean", "--out", tmp_path / "run")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{path} is a TorchScript program" in line and "--trust-checkpoint" in line
    assert_untouched(marker, victim)
    # The payload is real: loaded with trust and called, it does what the CLI prevented.
    trusted = load_model(str(path), trust_checkpoint=True)
    trusted.model(torch.zeros(1, 1, 8, 8))
    assert marker.exists() and victim.read_bytes()[:4] == b"AAAA"


def test_every_surrogate_path_refuses_torchscript(writer, market, tmp_path):
    path, marker, victim = writer
    suite = tmp_path / "transfer.yaml"
    suite.write_text(f"name: t\ntask: reid\nsurrogate:\n  model: {path}\nattacks:\n"
                     "  - attack: fgsm\n    eps: 0.1\n    objective: away\n    source: surrogate\n")
    base = ("eval", "example:digits", "--data", f"market1501:{market}", "--quiet", "--json")
    runs = {
        "suite surrogate": invoke(*base, "--suite", suite, "--out", tmp_path / "a"),
        "--surrogate": invoke(*base, "--suite", "reid-clean", "--surrogate", path, "--out", tmp_path / "b"),
        "dmr train": invoke("dmr", "train", path, "--data", f"market1501:{market}", "--out", tmp_path / "g.pt"),
    }
    for how, result in runs.items():
        assert result.exit_code == 2, (how, result.stderr)
        assert "TorchScript program" in one_error_line(result), how
    assert "--surrogate-arch" in one_error_line(runs["--surrogate"])
    assert_untouched(marker, victim)
    assert not (tmp_path / "g.pt").exists()


def test_trusted_torchscript_evaluates(trained_model, test_tensors, tmp_path):
    path = tmp_path / "traced.pt"
    torch.jit.trace(trained_model, test_tensors[0][:8]).save(str(path))
    result = invoke("eval", path, "--trust-checkpoint", "--data", "example:digits", "--suite", "clean",
                    "--out", tmp_path / "run", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["arch"] == "torchscript" and doc["clean"]["accuracy"] > 0.9


def test_train_mode_is_recorded_before_eval(trained_model, tmp_path):
    training = copy.deepcopy(trained_model).train()
    torch.jit.script(training).save(str(tmp_path / "train.pt"))
    torch.jit.script(copy.deepcopy(trained_model).eval()).save(str(tmp_path / "eval.pt"))
    torch.save(training, tmp_path / "pickled-train.pt")
    torch.save(trained_model.state_dict(), tmp_path / "sd.pt")
    for name, expected in (("train.pt", True), ("eval.pt", False), ("pickled-train.pt", True)):
        loaded = load_model(str(tmp_path / name), trust_checkpoint=True)
        assert loaded.info["was_training"] is expected, name
        assert not any(m.training for m in loaded.model.modules()), name
    assert "was_training" not in load_model(str(tmp_path / "sd.pt"), arch=ARCH).info  # weights have no mode


def test_exported_program_needs_trust_and_is_refused_clearly(tmp_path):
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.zeros(1, 4),)), str(path))
    with pytest.raises(UsageError, match=r"torch\.export program: loading it runs code.*--trust-checkpoint"):
        load_model(str(path))
    with pytest.raises(UsageError, match="cannot evaluate"):
        load_model(str(path), trust_checkpoint=True)


# --- suites may not import code ----------------------------------------------------------

ABORT_SUITE = """\
name: hostile
surrogate:
  model: weights.pt
  arch: "os:abort"
attacks:
  - attack: fgsm
    eps: 0.1
"""


def test_suite_cannot_call_os_abort(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(ABORT_SUITE)
    result = invoke("eval", "example:digits", "--suite", suite, "--data", "example:digits", "--out", tmp_path / "r")
    assert result.exit_code == 2  # and we are still here: os.abort was never called
    line = one_error_line(result)
    assert f"{suite}:4 surrogate.arch: 'os:abort' imports Python code" in line
    assert "robench:digits_cnn" in line and "--trust-suite" in line


def test_suite_module_is_never_imported_without_trust(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    module = "hostile_suite_arch_module"
    (tmp_path / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from robench.examples import digits_cnn as net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    suite = tmp_path / "suite.yaml"
    suite.write_text(ABORT_SUITE.replace("os:abort", f"{module}:net"))
    result = invoke("eval", "example:digits", "--suite", suite, "--data", "example:digits", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--trust-suite" in one_error_line(result)
    assert not marker.exists() and module not in sys.modules
    # Trusted, the suite validates (still importing nothing); building the arch imports the module.
    spec = load_suite(str(suite), trust_code=True).suite.surrogate
    assert spec.arch == f"{module}:net" and not marker.exists()
    try:
        assert isinstance(architectures.build_arch(spec.arch, 10), nn.Module) and marker.exists()
    finally:
        sys.modules.pop(module, None)


def test_suites_may_name_torchvision_and_registered_architectures():
    def make(text: str):
        return parse_suite(f"name: s\nsurrogate:\n  model: m.pt\n  arch: {text}\nattacks: []\n", "s.yaml").suite

    assert make("torchvision:resnet18").surrogate.arch == "torchvision:resnet18"
    assert make("robench:digits_cnn").surrogate.arch == "robench:digits_cnn"
    with pytest.raises(UsageError, match=r"s\.yaml:4 surrogate\.arch: unknown torchvision architecture 'resnet-18'"):
        make("torchvision:resnet-18")
    with pytest.raises(UsageError, match="imports Python code"):
        make("mypkg.nets:tiny")
    register_architecture("mypkg.nets:tiny", lambda num_classes=3: nn.Linear(2, num_classes))
    try:
        assert make("mypkg.nets:tiny").surrogate.arch == "mypkg.nets:tiny"  # registered: imports nothing
        assert architectures.build_arch("mypkg.nets:tiny", 5).out_features == 5
        with pytest.raises(ValueError, match="registered twice"):
            register_architecture("mypkg.nets:tiny", lambda: nn.Linear(1, 1))
    finally:
        architectures._ARCHITECTURES.pop("mypkg.nets:tiny")  # the registry is process-wide


def test_registered_digits_cnn_needs_no_import(trained_model, test_tensors, tmp_path):
    assert "robench:digits_cnn" in ARCHITECTURES
    path = tmp_path / "sd.pt"
    torch.save(trained_model.state_dict(), path)
    loaded = load_model(str(path), arch="robench:digits_cnn", num_classes=10)
    x = test_tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(loaded.model(x), trained_model(x))


# --- YAML bounds ---------------------------------------------------------------------------

def billion_laughs(levels: int = 9) -> str:
    lines = ["name: bomb", 'lol0: &lol0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 9) + "]")
    lines += ["attacks:", "  - attack: fgsm", "    eps: 0.1", f"    label: *lol{levels}"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name, text, message", [
    ("bomb.yaml", billion_laughs(), "values (aliases expanded)"),
    ("aliases.yaml", "name: a\nx: &x 1\ny: [" + ", ".join(["*x"] * 101) + "]\nattacks: []\n",
     "aliases.yaml:3: too many YAML aliases (101; at most 100)"),
    ("deep.yaml", "[" * 100_000 + "]" * 100_000, "deep.yaml:1: nesting deeper than 64 levels"),
    ("cycle.yaml", "name: c\nattacks:\n  - &a {attack: ta.PGD, params: {p: *a}}\n", "refers to the collection"),
], ids=["billion-laughs", "many-aliases", "deep-nesting", "recursive-alias"])
def test_yaml_bombs_are_refused_before_expansion(name, text, message, tmp_path):
    suite = tmp_path / name
    suite.write_text(text)
    start = time.perf_counter()
    result = invoke("eval", "example:digits", "--suite", suite, "--data", "example:digits", "--out", tmp_path / "r")
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2
    line = one_error_line(result)
    assert message in line and f"{suite}:" in line


def test_oversized_suite_is_refused(tmp_path):
    suite = tmp_path / "big.yaml"
    suite.write_text("name: big\nattacks: []\n# " + "x" * (1 << 20) + "\n")
    with pytest.raises(UsageError, match=r"big\.yaml: suite file is larger than 1048576 bytes"):
        load_suite(str(suite))


def test_non_scalar_keys_are_a_config_error():
    with pytest.raises(UsageError, match=r"s\.yaml:2 \(top level\): keys must be plain names"):
        parse_suite("name: k\n? [a, b]\n: 1\nattacks: []\n", "s.yaml")


def test_builtin_suites_load_with_unchanged_hashes():
    """A suite's hash keys baselines (gate, compare, resume): it must never change for the same suite."""
    for name, path in builtin_suites().items():
        loaded = load_suite(name)
        assert loaded.sha256 == BUILTIN_SUITE_SHA256[name], name
        assert loaded.text == path.read_text(encoding="utf-8"), name
    assert sorted(builtin_suites()) == sorted(BUILTIN_SUITE_SHA256)


# The hashes the built-in suites have had since they were written.
BUILTIN_SUITE_SHA256 = {
    "autoattack": "52e64dac43a2e0391889b173067dd8b9a4c137fdf91f7c4355c715ebd7df4d44",
    "alignment-cifar10": "35a0d6391be685d9e5fd328b85d837b02968081a4e3625c7d6e5ca73ffeb2d8d",
    "alignment-fashion-mnist": "c76353027ff6f508eebe0fb0eeac366539f511ee3c476f5e0e18e383ab92b986",
    "alignment-mnist": "f7b9190ac2bac4df76659da7614be15890a0ce6d48d3815b1d97554b08ee7b85",
    "alignment-stl10": "e2548c84f40e0c1da4c8fe22dadc636b3a2380276c08d4931d3f258b57f74e17",
    "bim": "2d8996f174bb46e91f506f6107785c8d4613fbbe51af8071a5fd03e88bb52b9b",
    "clean": "e3fb3719feb38161d698063622af50af8ff9a0009dbd97486078cb5ea95a6c2c",
    "digits": "f7591de3ab4334098ca42c52e2711b5b9426857d93530759df709036b3b780ab",
    "fdd-cifar100": "55fcaa56364b95ff9504718b9a1ef9b8d7e29ff7c84ed3cef6929d37d5233ddc",
    "fdd-fashion-mnist": "6040be6dfb936f32ba92c413262941f11b9d8ee51b2ecaf33c896efdbf765e2c",
    "fgsm": "efeca71338ecfaf66ad6db0f838aeb59578020c4c7fc5ba6d2bcc59bbda8143c",
    "mifgsm": "548ba6db634de71c3ff3e5413bf42fa63436981cc88a6faefa3c14adca0eac91",
    "pgd-l2": "4ce6228117b30722285afcf8bfa1ac0a13c6174f0f69cbcc72586a3b9a74c6bd",
    "pgd-linf": "1e6c008ef3415f259c693a269216c0df9e7601f33dfcd44eb5b47ca76f7ee084",
    "reid-clean": "d2f41e5f31f51468dad900cf06f898bb8a78d4cfe46ca639f5aaaa309877a11e",
    "reid-dmr": "b1d34c2ce083502b56e1e34f3427e823bce5453eb49d9ab8342eda26f9ec9410",
    "reid-misrank-transfer": "9e14bf4d94bb278940af505536043aca501baf8fb16fe1a97329d76a0a1503fb",
    "reid-pgd": "014546cdda4a556ffb7b9e0ac00a3dcf4157afbcd40be8679f0cd25aea0eb33c",
}


# --- unreadable files --------------------------------------------------------------------

def test_unreadable_model_file_is_one_clear_line(tmp_path):
    # /proc/self/mem is a regular file whose first page cannot be read, even by root.
    result = invoke("eval", "/proc/self/mem", "--data", "example:digits", "--suite", "clean",
                    "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "cannot read model file /proc/self/mem: " in one_error_line(result)
    with pytest.raises(UsageError, match="not a regular file"):
        load_model("/dev/zero", arch=ARCH)  # would never finish hashing


def test_unreadable_suite_file_is_one_clear_line(tmp_path):
    result = invoke("eval", "example:digits", "--suite", "/proc/self/mem", "--data", "example:digits",
                    "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "cannot read suite file /proc/self/mem: " in one_error_line(result)


def test_permission_denied_model_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00" * 16)
    real_open = open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(UsageError, match=r"cannot read model file .*model\.pt: Permission denied$"):
        load_model(str(path), arch=ARCH)
