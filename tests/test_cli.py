"""The ``robench`` command line: outputs, files and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robench import __version__
from cli_helpers import invoke, one_error_line

ARCH = "robench.examples:digits_cnn"
QUICK_SUITE = """\
name: quick
attacks:
  - attack: fgsm
    eps: [0.1, 0.2]
  - attack: pgd
    eps: 8/255
    steps: 3
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_model, digits_split):
    root = tmp_path_factory.mktemp("cli")
    _, x_te, _, y_te = digits_split
    torch.save(trained_model.state_dict(), root / "model.pt")
    np.savez(root / "uint8.npz", x=x_te, y=y_te)
    np.savez(root / "float.npz", x=(x_te.transpose(0, 3, 1, 2) / 255.0).astype(np.float32), y=y_te)
    (root / "quick.yaml").write_text(QUICK_SUITE)
    return root


def test_version():
    for args in (["version"], ["--version"]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stdout.strip() == __version__, args


def test_eval_json_on_the_bundled_example(tmp_path):
    out = tmp_path / "run"
    result = invoke("eval", "example:digits", "--suite", "digits", "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert doc["clean"]["accuracy"] > 0.95 and doc["clean"]["n"] == 540
    assert len(doc["attacks"]) == 9
    fgsm = [a["accuracy"] for a in doc["attacks"] if a["attack"] == "fgsm"]
    assert fgsm == sorted(fgsm, reverse=True) and fgsm[0] > fgsm[-1]
    assert doc["robust_accuracy"] <= min(a["accuracy"] for a in doc["attacks"])
    assert json.loads((out / "results.json").read_text()) == doc
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["suite"]["name"] == "digits"
    assert (out / "results.csv").read_text().startswith(
        "model,kind,suite,entry,attack,norm,settings,eps,eps_text,pixels,metric,value,n,ap_convention\n")
    assert "results written to" in result.stderr


def test_eval_prints_a_table_and_never_overwrites(files, tmp_path):
    out = tmp_path / "run"
    args = ("eval", files / "model.pt", "--arch", ARCH, "--num-classes", 10, "--data", f"npz:{files / 'uint8.npz'}",
            "--suite", files / "quick.yaml", "--out", out, "--quiet")
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    assert "clean" in first.stdout and "worst case" in first.stdout and "fgsm" in first.stdout
    before = (out / "results.json").read_text()
    second = invoke(*args)
    assert second.exit_code == 2
    assert "already holds results.json" in one_error_line(second)
    assert (out / "results.json").read_text() == before


def test_uint8_and_float_npz_give_the_same_numbers(files, tmp_path):
    docs = []
    for name in ("uint8.npz", "float.npz"):
        result = invoke("eval", files / "model.pt", "--arch", ARCH, "--data", f"npz:{files / name}",
                        "--suite", files / "quick.yaml", "--out", tmp_path / name, "--json", "--quiet")
        assert result.exit_code == 0, result.stderr
        docs.append(json.loads(result.stdout))
    assert docs[0]["clean"] == docs[1]["clean"]
    assert [a["accuracy"] for a in docs[0]["attacks"]] == [a["accuracy"] for a in docs[1]["attacks"]]


def test_limit_and_default_run_directory(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "example:digits", "--suite", "clean", "--limit", 50, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["clean"]["n"] == 50
    runs = list((tmp_path / "runs" / "clean" / "example-digits").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.json").is_file()
    again = invoke("eval", "example:digits", "--suite", "clean", "--limit", 50, "--json", "--quiet")
    assert json.loads(again.stdout)["env"]["dataset_fingerprint"] == doc["env"]["dataset_fingerprint"]
    assert len(list((tmp_path / "runs" / "clean" / "example-digits").iterdir())) == 2


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_args, code, message",
    [
        (lambda f, t: ["eval", t / "missing.pt", "--data", "example:digits"], 2, "model file not found"),
        (lambda f, t: ["eval", f / "model.pt", "--data", "example:digits"], 2, "pass --arch"),
        (lambda f, t: ["eval", f / "model.pt", "--arch", "torchvision:resnet18", "--data", "example:digits"],
         2, "does not fit --arch"),
        (lambda f, t: ["eval", "example:digits", "--suite", "pgd-linff"], 2, "did you mean 'pgd-linf'"),
        (lambda f, t: ["eval", "example:digits", "--suite", write(t / "bad.yaml", "name: [x\n")],
         2, "malformed YAML"),
        (lambda f, t: ["eval", "example:digits", "--suite",
                       write(t / "neg.yaml", "name: n\nattacks:\n  - attack: fgsm\n    eps: -0.1\n")],
         2, "neg.yaml:4 attacks[0].eps: must be >= 0"),
        (lambda f, t: ["eval", "example:digits", "--suite",
                       write(t / "unk.yaml", "name: n\nattacks:\n  - attack: pdg\n    eps: 0.1\n")],
         2, "unknown attack 'pdg'; did you mean 'pgd'"),
        (lambda f, t: ["eval", "example:digits", "--suite",
                       write(t / "inj.yaml", "name: n\nattacks:\n  - attack: fgsm\n    eps: __import__('os')\n")],
         2, "not plain arithmetic"),
        (lambda f, t: ["eval", "example:digits", "--suite", "clean", "--data", f"npz:{t / 'labels.npz'}"],
         2, "outside the model's 10 classes"),
        (lambda f, t: ["eval", "example:digits", "--data", "npz:" + str(t / "none.npz")], 2, "data file not found"),
        (lambda f, t: ["eval", "example:digits", "--precision", "fp8"], 2, "--precision must be one of"),
        (lambda f, t: ["eval", write(t / "junk.pt", "garbage"), "--arch", ARCH, "--data", "example:digits"],
         3, "cannot read checkpoint"),
    ],
    ids=["missing-model", "no-arch", "wrong-arch", "unknown-suite", "malformed-yaml", "negative-eps",
         "unknown-attack", "eps-injection", "label-out-of-range", "missing-data", "bad-precision",
         "unreadable-checkpoint"],
)
def test_bad_input_gets_one_line_and_the_right_exit_code(make_args, code, message, files, tmp_path):
    x = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "labels.npz", x=x, y=np.array([0, 1, 2, 11]))
    result = invoke(*make_args(files, tmp_path), "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == code, result.stderr
    assert message in one_error_line(result)
    assert not (tmp_path / "out" / "results.json").exists()


def test_pickled_module_refused_without_trust(files, trained_model, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(trained_model, path)
    refused = invoke("eval", path, "--data", "example:digits", "--suite", "clean", "--out", tmp_path / "a")
    assert refused.exit_code == 2 and "--trust-checkpoint" in one_error_line(refused)
    trusted = invoke("eval", path, "--trust-checkpoint", "--data", "example:digits", "--suite", "clean",
                     "--out", tmp_path / "b", "--json", "--quiet")
    assert trusted.exit_code == 0, trusted.stderr
    assert json.loads(trusted.stdout)["clean"]["accuracy"] > 0.9


def test_debug_shows_the_traceback(tmp_path):
    args = ("eval", tmp_path / "missing.pt", "--data", "example:digits")
    plain = invoke(*args)
    assert "Traceback" not in plain.stderr
    debug = invoke(*args, env={"ROBENCH_DEBUG": "1"})
    assert debug.exit_code == 2
    assert "Traceback" in debug.stderr and "model file not found" in debug.stderr


def test_suites_list_and_show():
    listing = invoke("suites")
    assert listing.exit_code == 0
    for name in ("clean", "fgsm", "bim", "pgd-linf", "pgd-l2", "fdd-cifar100", "alignment-mnist"):
        assert name in listing.stdout
    shown = invoke("suites", "show", "fdd-fashion-mnist")
    assert shown.exit_code == 0 and "eps:" in shown.stdout
    missing = invoke("suites", "show", "fdd-fashon-mnist")
    assert missing.exit_code == 2 and "did you mean 'fdd-fashion-mnist'" in one_error_line(missing)


def test_python_dash_m_entry_point(tmp_path):
    """The real process: exit code and stdout/stderr separation as a shell sees them."""
    env = {**os.environ, "ROBENCH_DEBUG": ""}
    ok = subprocess.run([sys.executable, "-m", "robench", "eval", "example:digits", "--suite", "clean",
                         "--out", str(tmp_path / "r"), "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["attacks"] == []
    bad = subprocess.run([sys.executable, "-m", "robench", "eval", "example:digits", "--suite", "nope"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().startswith("robench: error: unknown suite 'nope'")


def test_imagefolder_skips_and_lists_bad_files(digits_split, tmp_path):
    from PIL import Image

    _, x_te, _, y_te = digits_split
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(zip(x_te[:60], y_te[:60])):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / str(label) / f"{i}.png")
    good = (root / str(y_te[0]) / "0.png").read_bytes()
    (root / str(y_te[0]) / "zero.png").write_bytes(b"")
    (root / str(y_te[0]) / "cut.png").write_bytes(good[: len(good) // 2])
    (root / str(y_te[0]) / "notes.txt").write_text("x")
    result = invoke("eval", "example:digits", "--data", f"imagefolder:{root}", "--suite", "fgsm", "--json",
                    "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["clean"]["n"] == 60 and doc["clean"]["accuracy"] > 0.9
    names = sorted(s["file"].rsplit("/", 1)[-1] for s in doc["data"]["skipped"])
    assert names == ["cut.png", "notes.txt", "zero.png"]


def test_attacks_lists_every_attack_with_its_traits_and_defaults():
    result = invoke("attacks", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) >= {"fgsm", "bim", "pgd", "mifgsm", "pixels", "dmr"}
    assert rows["pgd"]["family"] == "gradient" and rows["pgd"]["norms"] == ["linf", "l2"]
    assert rows["pgd"]["params"] == {"steps": 10, "step_size": "2.5*eps/steps", "random_start": True, "restarts": 1}
    assert rows["pixels"]["eps"] == "none" and rows["pixels"]["norms"] == ["l0"]
    assert rows["dmr"]["params"]["generator"] == "(required)"
    table = invoke("attacks")
    assert table.exit_code == 0 and "mifgsm" in table.stdout and "decay=1.0" in table.stdout
    missing = invoke("attacks", "--plugin", "no_such_module_here")
    assert missing.exit_code == 2 and "no_such_module_here" in one_error_line(missing)
