"""Loading checkpoints in every supported form, and refusing the unsafe and the broken."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from robench.errors import RunError, UsageError
from robench.examples import digits_cnn
from robench.models import load_model

ARCH = "robench.examples:digits_cnn"


def same_outputs(a, b, x):
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.fixture(scope="module")
def probe(test_tensors):
    return test_tensors[0][:32]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"model_ema": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "optimizer": {}},
    ],
    ids=["plain", "state_dict-key", "model-key-ddp", "ema-compiled", "nested-prefixes"],
)
def test_state_dict_variants(wrap, trained_model, probe, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(trained_model.state_dict()), path)
    loaded = load_model(str(path), arch=ARCH, num_classes=10)
    assert same_outputs(loaded.model, trained_model, probe)
    assert loaded.arch == ARCH and len(loaded.sha256) == 64


def test_safetensors(trained_model, probe, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained_model.state_dict().items()}, str(path))
    loaded = load_model(str(path), arch=ARCH, num_classes=10)
    assert same_outputs(loaded.model, trained_model, probe)


def test_torchscript(trained_model, probe, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.trace(trained_model, probe).save(str(path))
    with pytest.raises(UsageError, match="TorchScript program: .*--trust-checkpoint"):
        load_model(str(path))  # a TorchScript file is a program: it runs only when trusted
    loaded = load_model(str(path), trust_checkpoint=True)
    assert loaded.arch == "torchscript" and loaded.info["was_training"] is False
    assert same_outputs(loaded.model, trained_model, probe)


def test_torchvision_arch(tmp_path):
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model(str(path), arch="torchvision:resnet18", num_classes=7)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    net.eval()
    loaded.model.eval()
    assert same_outputs(loaded.model, net, x)
    with pytest.raises(UsageError, match="did you mean 'resnet18'"):
        load_model(str(path), arch="torchvision:resnet-18", num_classes=7)


def test_state_dict_needs_an_arch(trained_model, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(trained_model.state_dict(), path)
    with pytest.raises(UsageError, match="pass --arch"):
        load_model(str(path))


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path):
    import torchvision

    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(UsageError) as info:
        load_model(str(path), arch=ARCH, num_classes=10)
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message and "conv1.weight" in message


def test_wrong_num_classes_reports_shapes(trained_model, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(trained_model.state_dict(), path)
    with pytest.raises(UsageError, match=r"shape mismatch .*\(10, 64\) vs \(5, 64\)"):
        load_model(str(path), arch=ARCH, num_classes=5)


def test_bad_arch_specs(trained_model, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(trained_model.state_dict(), path)
    with pytest.raises(UsageError, match="must look like"):
        load_model(str(path), arch="resnet18")
    with pytest.raises(UsageError, match="cannot import"):
        load_model(str(path), arch="no_such_module_xyz:net")
    with pytest.raises(UsageError, match="no callable"):
        load_model(str(path), arch="robench.examples:nothing_here")


def test_pickled_module_needs_trust(trained_model, probe, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(trained_model, path)
    with pytest.raises(UsageError, match="--trust-checkpoint"):
        load_model(str(path))
    loaded = load_model(str(path), trust_checkpoint=True)
    assert same_outputs(loaded.model, trained_model, probe)


class _CreatesFile:
    """Unpickling this object calls os.system: the classic checkpoint exploit."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _CreatesFile(marker)}, f)
    torch_path = tmp_path / "evil-zip.pt"
    torch.save({"state_dict": _CreatesFile(marker)}, torch_path)
    for p in (path, torch_path):
        with pytest.raises(UsageError, match="--trust-checkpoint"):
            load_model(str(p), arch=ARCH)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, error, message",
    [
        (b"", RunError, "empty"),
        (b"this is not a checkpoint at all", RunError, "cannot read checkpoint"),
        (b"PK\x03\x04 truncated zip", RunError, "cannot read"),
    ],
    ids=["zero-byte", "garbage", "truncated-zip"],
)
def test_unreadable_files(content, error, message, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_model(str(path), arch=ARCH)


def test_truncated_checkpoint(trained_model, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(trained_model.state_dict(), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RunError, match="cannot read"):
        load_model(str(bad), arch=ARCH)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(RunError, match="safetensors"):
        load_model(str(path), arch=ARCH)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_model(str(tmp_path / "nope.pt"))
    with pytest.raises(UsageError, match="directory"):
        load_model(str(tmp_path))


def test_non_state_dict_content(tmp_path):
    path = tmp_path / "list.pt"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(RunError, match="not a state dict"):
        load_model(str(path), arch=ARCH)


def test_example_model_loads_and_is_accurate(test_tensors):
    loaded = load_model("example:digits")
    assert isinstance(loaded.model, type(digits_cnn()))
    x, y = test_tensors
    with torch.no_grad():
        # The bundled model was trained on a different split: most of these it has seen,
        # so only check it is a working classifier, not a held-out figure.
        assert (loaded.model(x).argmax(1) == y).float().mean() > 0.9
