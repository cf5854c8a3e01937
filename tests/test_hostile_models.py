"""Hostile model and data inputs: planted hub-cache pickles, forged metadata, odd files, absurd option values.

Nothing here touches the network: torch.hub's download is replaced by one that fails, and the
caches (torch.hub, Hugging Face) are folders under ``tmp_path`` laid out as the libraries lay them out.
Payloads create a marker file when unpickled; a test that refuses one checks that the marker is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import invoke, one_error_line
from robench.config import EvalConfig
from robench.suites.config import MAX_EPS_VALUES
from robench.data.sources import load_data
from robench.errors import RunError, UsageError
from robench.examples import digits_cnn
from robench.models import load_model
from robench.models import architectures
from robench.models.architectures import MAX_CLASSES
from robench.models.checkpoints import hub_cache_path, sha256_file
from robench.models.trained import write_trained

DIGITS = "robench/examples/digits_cnn.safetensors"
EVAL = ("--data", "example:digits", "--suite", "clean", "--limit", "4")


class Payload:
    """Unpickled with ``weights_only=False``, it creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker) -> None:
    """A torch checkpoint whose unpickling runs the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": Payload(marker)}, path)


@contextmanager
def deadline(seconds: int):
    """A refusal must come at once: a FIFO or /dev/zero that is read instead would hang the test."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def opened_if_waited_on(fifo):
    """A reader blocked on ``fifo`` (the refusal regressed) gets end-of-file instead of waiting for ever."""
    stop = threading.Event()

    def release() -> None:
        while not stop.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # fails (ENXIO) while no one reads
            except OSError:
                pass

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch.hub's cache under tmp_path; downloading fails as it does without network access."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir elsewhere would win over TORCH_HOME

    def offline(url, dst, *args, **kwargs):
        raise OSError(f"<urlopen error [Errno -3] Temporary failure in name resolution> ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub" / "checkpoints"


# --- 1. torch.hub's cache is read by robench's reader ----------------------------------------------------


def test_pickle_planted_in_the_torch_hub_cache_never_runs(hub, tmp_path):
    import torchvision

    marker = tmp_path / "ran"
    cached = hub / "resnet18-f37072fd.pth"
    assert hub_cache_path(torchvision.models.ResNet18_Weights.DEFAULT.url) == cached
    plant(cached, marker)
    result = invoke("eval", "torchvision:resnet18:DEFAULT", *EVAL, "--out", tmp_path / "run")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{cached} contains pickled Python objects" in line and "--trust-checkpoint" in line
    assert not marker.exists(), "the payload in the hub cache ran"
    # The payload is real: torch.hub's own loader (weights_only=False) runs it.
    torch.hub.load_state_dict_from_url(torchvision.models.ResNet18_Weights.DEFAULT.url)
    assert marker.exists()


def test_backbone_weights_of_a_named_architecture_are_read_safely_too(hub, tmp_path):
    # A detection model built with weights=None still loads its backbone's published weights.
    import torchvision

    marker = tmp_path / "ran"
    plant(hub_cache_path(torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.url), marker)
    with pytest.raises(UsageError, match="contains pickled Python objects.*--trust-checkpoint"):
        architectures.build_arch("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", None)
    assert not marker.exists()


def test_genuine_weights_in_the_hub_cache_load_without_torch_hubs_loader(hub, monkeypatch):
    import torchvision

    original = torchvision.models.squeezenet1_1(num_classes=1000).eval()
    cached = hub_cache_path(torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url)
    cached.parent.mkdir(parents=True)
    torch.save(original.state_dict(), cached)

    def unsafe_loader(*args, **kwargs):
        raise AssertionError("torchvision's own loader (weights_only=False) was used")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unsafe_loader)
    loaded = load_model("torchvision:squeezenet1_1:DEFAULT")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), original(x))
    assert loaded.sha256 == sha256_file(cached) and loaded.preprocessing.crop == 224


def test_missing_hub_weights_without_network_keep_their_message(hub):
    with pytest.raises(RunError, match=r"cannot load the weights of torchvision:squeezenet1_1:DEFAULT: "
                                       r".*name resolution.*put them in torch's hub cache first") as caught:
        load_model("torchvision:squeezenet1_1:DEFAULT")
    assert "\n" not in str(caught.value)


def test_a_fifo_in_the_hub_cache_is_refused_not_read(hub, tmp_path):
    cached = hub / "squeezenet1_1-b8a52dc0.pth"
    cached.parent.mkdir(parents=True)
    os.mkfifo(cached)
    with deadline(30), opened_if_waited_on(cached):
        result = invoke("eval", "torchvision:squeezenet1_1:DEFAULT", *EVAL, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"cached weights file {cached} is a pipe (FIFO), not a regular file" in one_error_line(result)


def test_pickle_in_the_hugging_face_cache_is_refused_with_the_fix(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    pytest.importorskip("timm")
    marker = tmp_path / "ran"
    revision = "cd" * 20
    repo = tmp_path / "hf" / "models--acme--planted"
    snapshot = repo / "snapshots" / revision
    plant(snapshot / "pytorch_model.bin", marker)
    (snapshot / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 5}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    # What huggingface_hub records when a file is absent from the repo: timm then falls back to the .bin.
    (repo / ".no_exist" / revision).mkdir(parents=True)
    (repo / ".no_exist" / revision / "model.safetensors").touch()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    result = invoke("eval", "hf:acme/planted", *EVAL, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result)
    assert "hf:acme/planted holds pickled Python objects" in line and "--weights FILE --trust-checkpoint" in line
    assert not marker.exists()


# --- 2. robench train's metadata is checked before anything is built ---------------------------------------


def forge(tmp_path, info, arch="robench:digits_cnn"):
    """The bundled digits CNN's tensors with robench-trained metadata written by hand."""
    meta = {"format": "pt", "robench.format": "robench-trained-1"}
    if arch is not None:
        meta["robench.arch"] = arch
    if info is not None:
        meta["robench.info"] = info if isinstance(info, str) else json.dumps(info)
    path = tmp_path / "model.safetensors"
    save_file(load_file(DIGITS), str(path), metadata=meta)
    return path


@pytest.fixture
def builds(monkeypatch):
    """Every build of the digits CNN, with the device it was built on ("meta" costs no memory)."""
    seen = []

    def spy(**kwargs):
        seen.append((kwargs.get("num_classes"), torch.empty(0).device.type))
        return digits_cnn(**kwargs)

    monkeypatch.setitem(architectures._ARCHITECTURES, "robench:digits_cnn", spy)
    return seen


FORGED = [
    ({"num_classes": 10 ** 12}, "robench.info: num_classes must be an integer between 1 and 1048576, "
                                "got 1000000000000"),
    ({"num_classes": -3}, "num_classes must be an integer between 1 and 1048576, got -3"),
    ({"num_classes": 10.5}, "num_classes must be an integer"),
    ({"num_classes": True}, "num_classes must be an integer"),
    ({"mean": ["a"], "std": [1]}, 'mean must be a list of 1 to 64 finite numbers, got ["a"]'),
    ({"std": [0.5]}, "mean and std go together"),
    ([], "robench.info: must be a JSON object, got list"),
    (None, "robench.info: is missing"),
    ("null", "robench.info: must be a JSON object, got NoneType"),
    ("{not json", "robench.info: is not JSON"),
    ({"mean": [0.5], "std": [0]}, "std values must be > 0"),
    ('{"mean": [0.5], "std": [NaN]}', "std must be a list of 1 to 64 finite numbers, got [NaN]"),
    ({"mean": [0.5], "std": [1e400]}, "std must be a list of 1 to 64 finite numbers"),
    ({"mean": [0.5, 0.5], "std": [0.3]}, "mean has 2 values but std has 1"),
    ({"input_size": [1, 10 ** 9, 10 ** 9]}, "input_size must be [channels, height, width]"),
    ({"input_size": [1, 8]}, "input_size must be [channels, height, width]"),
    ({"mean": [0.1, 0.2], "std": [0.3, 0.4], "input_size": [3, 8, 8]}, "2 mean/std values for 3 input channels"),
    ({"recipe": "x\ny"}, "recipe must be a short one-line name"),
]


@pytest.mark.parametrize("info, message", FORGED, ids=[
    "classes-1e12", "classes-negative", "classes-float", "classes-bool", "mean-string", "std-without-mean",
    "info-list", "info-missing", "info-null", "info-not-json", "std-zero", "std-nan", "std-inf",
    "mean-std-lengths", "input-size-huge", "input-size-short", "channels-vs-mean", "recipe-multiline"])
def test_forged_metadata_is_refused_before_anything_is_built(info, message, builds, tmp_path):
    path = forge(tmp_path, info)
    start = time.perf_counter()
    result = invoke("eval", path, *EVAL, "--out", tmp_path / "run")
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{path}: " in line and message in line and "(the file's metadata is damaged or forged)" in line
    assert "pass --arch and --num-classes" in line
    assert builds == [], "a network was built from metadata that was never valid"


def test_metadata_without_an_architecture_is_refused(builds, tmp_path):
    path = forge(tmp_path, {"num_classes": 10}, arch=None)
    result = invoke("eval", path, *EVAL, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"{path}: robench.arch: is missing (the file's metadata is damaged or forged)" in one_error_line(result)
    assert builds == []


def test_class_count_within_bounds_but_not_the_files_is_caught_on_the_meta_device(builds, tmp_path):
    # 2^20 classes would allocate a 256 MB classifier (much more for a wide network) before any shape check.
    path = forge(tmp_path, {"num_classes": MAX_CLASSES})
    result = invoke("eval", path, *EVAL, "--out", tmp_path / "run")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"robench:digits_cnn with num_classes {MAX_CLASSES} does not take the file's tensors" in line
    assert "8.weight (10, 64) vs (1048576, 64)" in line and "damaged or forged" in line
    assert builds == [(MAX_CLASSES, "meta")], "only the meta device may see the forged class count"


def test_forged_architecture_is_caught_before_loading(builds, tmp_path):
    path = forge(tmp_path, {"num_classes": 10}, arch="robench:lenet")
    with pytest.raises(UsageError, match=r"robench:lenet with num_classes 10 does not take the file's tensors: "
                                         r"missing keys .*damaged or forged"):
        load_model(str(path))


def test_genuine_trained_file_still_loads_with_its_preprocessing(builds, tmp_path):
    original = digits_cnn()
    original.load_state_dict(load_file(DIGITS))
    path = tmp_path / "model.safetensors"
    write_trained(path, original.state_dict(), arch="robench:digits_cnn", num_classes=10, mean=(0.5,),
                  std=(0.25,), input_size=(1, 8, 8), recipe="digits-baseline")
    loaded = load_model(str(path))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), original.eval()(x))
    prep = loaded.preprocessing
    assert (prep.mean, prep.std, prep.input_size, loaded.name) == ((0.5,), (0.25,), (1, 8, 8), "digits-baseline")
    assert builds == [(10, "meta"), (10, "cpu")]


def test_num_classes_is_bounded_wherever_a_network_is_built(tmp_path):
    torch.save(load_file(DIGITS), tmp_path / "sd.pt")
    for count in (0, -3, MAX_CLASSES + 1):
        with pytest.raises(UsageError, match=f"num_classes must be an integer between 1 and 1048576, got {count}"):
            load_model(str(tmp_path / "sd.pt"), arch="robench:digits_cnn", num_classes=count)


# --- 3. one clear line for odd data and weights files --------------------------------------------------------


def npz_error(tmp_path, target) -> str:
    with deadline(30):
        result = invoke("eval", "example:digits", "--suite", "clean", "--data", f"npz:{target}",
                        "--out", tmp_path / "run")
    assert result.exit_code == 2
    return one_error_line(result)


def test_npz_that_is_not_an_archive_says_so(tmp_path):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    array = tmp_path / "x.npy"
    np.save(array, np.zeros((2, 8, 8), np.uint8))
    for target in (text, array, "/etc/passwd"):
        if os.path.isfile(target):
            line = npz_error(tmp_path, target)
            assert line == f"robench: error: {target} is not an .npz archive of arrays; save one with " \
                           "numpy.savez(PATH, x=images, y=labels)"
            assert "pickled" not in line


def test_npz_holding_python_objects_is_refused_in_robenchs_words(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    assert npz_error(tmp_path, path) == f"robench: error: {path} holds arrays of Python objects, which robench " \
                                       "does not unpickle (that could run code); save x and y as numeric arrays"


def test_fifo_and_devices_as_npz_are_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    with opened_if_waited_on(fifo):
        assert npz_error(tmp_path, fifo) == f"robench: error: data file {fifo} is a pipe (FIFO), not a regular file"
    assert npz_error(tmp_path, "/dev/zero") == "robench: error: data file /dev/zero is a device, not a regular file"
    assert npz_error(tmp_path, tmp_path) == f"robench: error: data file {tmp_path} is a directory, not a regular file"
    with pytest.raises(UsageError, match="data file not found"):
        load_data(f"npz:{tmp_path / 'absent.npz'}")


def test_fifo_as_a_model_file_is_refused_not_read(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    refused = r"model file .*model\.pt is a pipe \(FIFO\), not a regular"
    with opened_if_waited_on(fifo), pytest.raises(UsageError, match=refused):
        load_model(str(fifo), arch="robench:digits_cnn")


@pytest.fixture
def timm_module():
    return pytest.importorskip("timm")


def test_pickled_timm_weights_name_the_trust_flag(timm_module, tmp_path):
    marker = tmp_path / "ran"
    model = timm_module.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "planted.pt"
    torch.save({"state_dict": model.state_dict(), "payload": Payload(marker)}, path)
    for extra in ((), ("--num-classes", "10")):  # with --num-classes the file used to go straight to timm
        result = invoke("eval", "timm:test_resnet", "--weights", path, *extra, *EVAL, "--out", tmp_path / "run")
        assert result.exit_code == 2
        line = one_error_line(result)
        assert f"{path} contains pickled Python objects" in line and "--trust-checkpoint" in line
        assert "does not fit" not in line
    assert not marker.exists()


def test_trusted_timm_weights_are_read_by_robench(timm_module, tmp_path):
    # A training checkpoint with its arguments: the trust flag decides, not the timm version's own reader.
    model = timm_module.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UsageError, match="refused: it holds argparse.Namespace"):
        load_model("timm:test_resnet", weights=str(path))
    loaded = load_model("timm:test_resnet", weights=str(path), trust_checkpoint=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert "state_dict" not in loaded.model.pretrained_cfg, "the model's cfg keeps a second copy of the weights"
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UsageError, match="holds a whole module; save its state_dict"):
        load_model("timm:test_resnet", weights=str(tmp_path / "whole.pt"), trust_checkpoint=True)


# --- 4. option values that would run for ever ---------------------------------------------------------------


def test_eps_list_is_bounded(tmp_path):
    start = time.perf_counter()
    result = invoke("eval", "example:digits", "--data", "example:digits", "--suite", "fgsm",
                    "--eps", ",".join(["0.01"] * 10_000), "--out", tmp_path / "run")
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2
    assert one_error_line(result) == f"robench: error: --eps takes at most {MAX_EPS_VALUES} values, got 10000; " \
                                     "split the sweep into several runs"
    assert not (tmp_path / "run").exists()
    sweep = [f"{i}/255" for i in range(MAX_EPS_VALUES)]
    assert len(EvalConfig.of(model="example:digits", data="example:digits", suite="fgsm", eps=sweep).suite.eps) == 64
    with pytest.raises(UsageError, match="at most 64 values, got 65"):
        EvalConfig.of(model="example:digits", data="example:digits", suite="fgsm", eps=sweep + ["1/255"])
