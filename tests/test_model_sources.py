"""Models by name (timm:, torchvision:, hf:, robustbench:) with the preprocessing their source documents.

Everything runs offline: timm and torchvision weights come from files written here, the
Hugging Face hub from a local cache laid out as huggingface_hub lays it out, and RobustBench
from a small stand-in package that follows its documented ``load_model`` signature and zoo
layout (the real package is not installed in the test environment; see test_robustbench_*).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cli_helpers import invoke, one_error_line
from robench.config import EvalConfig, data_options_for, resolve
from robench.data.sources import load_data
from robench.errors import RunError, UsageError
from robench.models import PRESETS, Normalization, load_model
from robench.models.architectures import build_arch
from robench.models.checkpoints import sha256_file

timm = pytest.importorskip("timm")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_timm(name: str, num_classes: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def outputs_equal(a: torch.nn.Module, b: torch.nn.Module, size: int) -> bool:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# --- timm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t"])
def test_timm_weights_file_with_timms_own_preprocessing(name, tmp_path):
    original = random_timm(name, num_classes=7)
    path = tmp_path / f"{name}.safetensors"
    save_file(original.state_dict(), str(path))
    loaded = load_model(f"timm:{name}", weights=str(path))  # the 7 classes are read from the file
    assert outputs_equal(loaded.model, original, 64)
    assert loaded.source == f"timm:{name}" and loaded.sha256 == sha256_file(path) and loaded.weights == str(path)
    # What timm itself resolves for this model, and the transform it would build from that.
    config = timm.data.resolve_data_config(model=timm.create_model(name))
    prep = loaded.preprocessing
    assert prep.mean == tuple(config["mean"]) and prep.std == tuple(config["std"])
    assert prep.input_size == tuple(config["input_size"]) and prep.interpolation == config["interpolation"]
    assert dict(prep.details)["crop_pct"] == config["crop_pct"]
    steps = {type(t).__name__: t for t in timm.data.create_transform(**config).transforms}
    assert prep.resize == steps["Resize"].size and [prep.crop] * 2 == list(steps["CenterCrop"].size)
    assert steps["Resize"].interpolation.value == prep.interpolation
    assert loaded.normalization == Normalization(tuple(config["mean"]), tuple(config["std"]))
    if name == "resnet10t":  # an ImageNet cfg: bicubic, crop_pct 0.875 -> shorter side floor(176 / 0.875) = 201
        assert (prep.mean, prep.interpolation, prep.resize, prep.crop) == (IMAGENET_MEAN, "bicubic", 201, 176)


def test_timm_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="did you mean 'test_resnet'"):
        load_model("timm:test_resnt", weights=str(tmp_path / "none.pt"))
    wrong = tmp_path / "vit.safetensors"
    save_file(random_timm("test_vit", num_classes=3).state_dict(), str(wrong))
    with pytest.raises(UsageError, match=r"does not fit timm:test_resnet: .*") as caught:
        load_model("timm:test_resnet", weights=str(wrong), num_classes=3)
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="--arch is for checkpoint files"):
        load_model("timm:test_resnet", arch="torchvision:resnet18", weights=str(wrong))
    with pytest.raises(UsageError, match="--threat-model applies to robustbench: models only"):
        load_model("timm:test_resnet", weights=str(wrong), threat_model="L2")
    with pytest.raises(UsageError, match="--weights applies to models by name"):
        load_model(str(wrong), weights=str(wrong))


def test_explicit_normalization_wins_over_the_models(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(random_timm("test_resnet", 10).state_dict(), str(path))
    common = dict(model="timm:test_resnet", weights=str(path), suite="fgsm", data="example:digits")
    assert resolve(EvalConfig.of(**common)).normalization.mean == (0.5, 0.5, 0.5)
    assert resolve(EvalConfig.of(**common, normalize="imagenet")).normalization == PRESETS.get("imagenet")
    assert resolve(EvalConfig.of(**common, mean="0.1", std="0.2")).normalization.std == (0.2,)


def test_resume_key_follows_the_weights_file(tmp_path):
    from robench.tasks.classification import resume_key

    keys = []
    for seed in (0, 1):
        path = tmp_path / f"w{seed}.safetensors"
        save_file(random_timm("test_resnet", 10, seed=seed).state_dict(), str(path))
        config = EvalConfig.of(model="timm:test_resnet", weights=str(path), suite="fgsm", data="example:digits")
        keys.append(resume_key(config, resolve(config)))
    assert keys[0] != keys[1]  # a run resumed with other weights is refused


# --- the whole command on images in a folder -----------------------------------------------------


@pytest.fixture(scope="module")
def digit_folder(digits_split, tmp_path_factory):
    """60 test digits as 32x32 RGB PNG files in one folder per class."""
    _, x_te, _, y_te = digits_split
    root = tmp_path_factory.mktemp("digits-png")
    for i, (image, label) in enumerate(zip(x_te[:60], y_te[:60])):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(image[..., 0]).convert("RGB").resize((32, 32), Image.NEAREST).save(folder / f"{i:03d}.png")
    return root


def timm_pipeline_predictions(model: torch.nn.Module, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Predictions through timm's own evaluation transform, file by file in sorted class-folder order."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    classes = sorted(p.name for p in folder.iterdir())
    files = [(f, classes.index(c)) for c in classes for f in sorted((folder / c).iterdir())]
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f, _ in files])
    with torch.no_grad():
        return model(batch).argmax(1).numpy(), np.array([label for _, label in files])


def test_timm_model_end_to_end_from_the_command_line(digit_folder, digits_split, tmp_path):
    # Random residual branches (timm zero-initialises them) give features a linear probe can use.
    model = linear_probe(random_timm("test_resnet", 10, zero_init_last=False), digits_split)
    weights = tmp_path / "probe.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "run"
    result = invoke("eval", "timm:test_resnet", "--weights", weights, "--data", f"imagefolder:{digit_folder}",
                    "--suite", "fgsm", "--limit", 40, "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    record = doc["model"]
    assert record["source"] == "timm:test_resnet" and record["sha256"] == sha256_file(weights)
    assert record["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert record["preprocessing"]["resize"] == 168 and record["preprocessing"]["crop"] == 160
    # The same images through timm's own pipeline give the same predictions, sample by sample.
    expected, labels = timm_pipeline_predictions(model, digit_folder)
    samples = pd.read_csv(out / "samples.csv")
    idx = samples["index"].to_numpy()
    assert (samples["clean_pred"].to_numpy() == expected[idx]).all()
    assert doc["clean"]["accuracy"] == pytest.approx((expected[idx] == labels[idx]).mean())
    assert doc["clean"]["accuracy"] > 0.5  # the probe learnt something: the attack has work to do
    robust = [a["accuracy"] for a in doc["attacks"]]
    assert robust and all(r <= doc["clean"]["accuracy"] for r in robust) and min(robust) < doc["clean"]["accuracy"]


def linear_probe(model: torch.nn.Module, digits_split, n: int = 200) -> torch.nn.Module:
    """Fit the classifier of a random-feature timm model on n training digits (a few seconds)."""
    x_tr, _, y_tr, _ = digits_split
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    images = [Image.fromarray(x[..., 0]).convert("RGB").resize((32, 32), Image.NEAREST) for x in x_tr[:n]]
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.stack([transform(i) for i in images])),
                                      pre_logits=True)
    mean, scale = features.mean(0), features.std(0) + 1e-6  # standardised: the features' scales differ widely
    head = torch.nn.Linear(features.shape[1], 10)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300)
    inputs, targets = (features - mean) / scale, torch.from_numpy(y_tr[:n])

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(inputs), targets) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    classifier = model.get_classifier()
    with torch.no_grad():  # the standardisation folded into the model's own classifier
        classifier.weight.copy_(head.weight / scale)
        classifier.bias.copy_(head.bias - (head.weight / scale) @ mean)
    return model.eval()


# --- torchvision ---------------------------------------------------------------------------------


def test_torchvision_weights_enum_preprocessing_is_as_documented():
    # torchvision's documentation of ResNet50_Weights.IMAGENET1K_V2: resize 232 (bilinear), crop 224, ImageNet mean/std.
    from torchvision.models import ResNet50_Weights

    from robench.models.sources import torchvision_preprocessing

    prep = torchvision_preprocessing(ResNet50_Weights.IMAGENET1K_V2)
    assert (prep.resize, prep.crop, prep.interpolation) == (232, 224, "bilinear")
    assert prep.mean == IMAGENET_MEAN and prep.std == IMAGENET_STD and prep.input_size == (3, 224, 224)


def test_torchvision_by_name_with_a_weights_file(tmp_path):
    import torchvision

    original = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    path = tmp_path / "mnv3.pt"
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, path)
    loaded = load_model("torchvision:mobilenet_v3_small:IMAGENET1K_V1", weights=str(path))
    assert outputs_equal(loaded.model, original, 64)  # 7 classes, read from the file
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (256, 224)
    assert loaded.normalization.mean == IMAGENET_MEAN and loaded.sha256 == sha256_file(path)
    # Without a weights name there is no documented preprocessing: the images are used as given.
    assert load_model("torchvision:mobilenet_v3_small", weights=str(path)).preprocessing is None
    with pytest.raises(UsageError, match="names no weights: .*IMAGENET1K_V1.* or pass --weights FILE"):
        load_model("torchvision:mobilenet_v3_small")
    with pytest.raises(UsageError, match="has no weights 'V9'; known: IMAGENET1K_V1"):
        load_model("torchvision:mobilenet_v3_small:V9", weights=str(path))
    # --arch torchvision:NAME for a state-dict file is unchanged: no preprocessing is guessed.
    plain = load_model(str(path), arch="torchvision:mobilenet_v3_small", num_classes=7)
    assert plain.preprocessing is None and plain.arch == "torchvision:mobilenet_v3_small"


# --- the Hugging Face hub (offline, from a local cache) ---------------------------------------------


def test_hf_repo_from_the_local_cache(tmp_path, monkeypatch, digit_folder):
    hub = pytest.importorskip("huggingface_hub")
    original = random_timm("test_resnet", num_classes=5, seed=3)
    snapshot = tmp_path / "hub" / "models--acme--tiny-digits" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    save_file(original.state_dict(), str(snapshot / "model.safetensors"))
    cfg = {"input_size": [3, 96, 96], "interpolation": "bicubic", "crop_pct": 0.8, "crop_mode": "center",
           "mean": [0.25, 0.5, 0.75], "std": [0.2, 0.3, 0.4], "classifier": "fc", "first_conv": "conv1.0"}
    (snapshot / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 5,
                                                      "pretrained_cfg": cfg}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub reads both once, at import: its constants are set too.
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("hf:acme/tiny-digits")
    assert outputs_equal(loaded.model, original, 96)
    prep = loaded.preprocessing
    assert (prep.mean, prep.std, prep.input_size) == ((0.25, 0.5, 0.75), (0.2, 0.3, 0.4), (3, 96, 96))
    assert (prep.resize, prep.crop, prep.interpolation) == (120, 96, "bicubic")  # floor(96 / 0.8) = 120
    assert loaded.sha256 == sha256_file(snapshot / "model.safetensors") and loaded.source == "hf:acme/tiny-digits"
    # An image folder read for this model gets its bicubic resize and crop: timm's own transform, pixel for pixel.
    config = EvalConfig.of(model="hf:acme/tiny-digits", data=f"imagefolder:{digit_folder}", suite="fgsm")
    options = data_options_for(config, resolve(config))
    assert (options.resize, options.crop, options.interpolation) == (120, 96, "bicubic")
    images = load_data(config.data.source, options).base.x.float() / 255
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=loaded.model))
    first = sorted(p for p in digit_folder.iterdir())[0]
    reference = transform(Image.open(sorted(first.iterdir())[0]).convert("RGB"))
    normalised = (images[0] - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)
    assert torch.allclose(normalised, reference, atol=1e-5)
    # Given --resize/--crop (or tensor data) keep the user's geometry.
    given = EvalConfig.of(model="hf:acme/tiny-digits", data=f"imagefolder:{digit_folder}", suite="fgsm", resize=64)
    kept = data_options_for(given, resolve(given))
    assert (kept.resize, kept.crop, kept.interpolation) == (64, None, None)
    tensors = EvalConfig.of(model="hf:acme/tiny-digits", data="example:digits", suite="fgsm")
    assert data_options_for(tensors, resolve(tensors)).resize is None
    with pytest.raises(RunError, match="cannot load the pretrained weights of hf:acme/absent") as caught:
        load_model("hf:acme/absent")
    assert "\n" not in str(caught.value)


# --- RobustBench -------------------------------------------------------------------------------------


@pytest.fixture
def clean_robustbench_modules():
    """Whatever these tests import as `robustbench` is gone afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "robustbench" or k.startswith("robustbench.")}
    for key in saved:
        del sys.modules[key]
    yield
    for key in [k for k in sys.modules if k == "robustbench" or k.startswith("robustbench.")]:
        del sys.modules[key]
    sys.modules.update(saved)


def test_robustbench_refuses_torchattacks_copy(clean_robustbench_modules):
    owners = metadata.packages_distributions().get("robustbench", [])
    if "torchattacks" not in owners or "robustbench" in [o.lower() for o in owners]:
        pytest.skip("the robustbench package here is not torchattacks' copy")
    with pytest.raises(UsageError, match="installed by torchattacks.*pip uninstall torchattacks") as caught:
        load_model("robustbench:Standard")
    assert "\n" not in str(caught.value)
    result = invoke("eval", "robustbench:Standard", "--suite", "fgsm", "--data", "example:digits")
    assert result.exit_code == 2 and "torchattacks" in one_error_line(result)


STAND_IN = {
    "__init__.py": "",
    "model_zoo/__init__.py": "from .models import model_dicts\n",
    "model_zoo/enums.py": """
        from enum import Enum

        class BenchmarkDataset(Enum):
            cifar_10 = "cifar10"
            cifar_100 = "cifar100"
            imagenet = "imagenet"

        class ThreatModel(Enum):
            Linf = "Linf"
            L2 = "L2"
            corruptions = "corruptions"
        """,
    "model_zoo/models.py": """
        from collections import OrderedDict
        from torch import nn
        from .enums import BenchmarkDataset, ThreatModel

        class Normalized(nn.Module):  # RobustBench models normalise inside
            def __init__(self, classes):
                super().__init__()
                self.register_buffer("mean", __import__("torch").tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
                self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, classes))
            def forward(self, x):
                return self.net(x - self.mean)

        model_dicts = OrderedDict([
            (BenchmarkDataset.cifar_10, OrderedDict([(ThreatModel.Linf, OrderedDict([
                ("Tiny2024", {"model": lambda: Normalized(10), "gdrive_id": "x"})]))])),
            (BenchmarkDataset.imagenet, OrderedDict([(ThreatModel.Linf, OrderedDict([
                ("TinyNet2024", {"model": lambda: Normalized(1000), "gdrive_id": "y",
                                 "preprocessing": "BicubicRes256Crop224"})]))])),
        ])
        """,
    "utils.py": """
        from pathlib import Path
        import torch
        from robustbench.model_zoo import model_dicts as all_models
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        def load_model(model_name, model_dir="./models", dataset=BenchmarkDataset.cifar_10,
                       threat_model=ThreatModel.Linf, custom_checkpoint="", norm=None):
            dataset_, threat_ = BenchmarkDataset(dataset), ThreatModel(threat_model)
            model = all_models[dataset_][threat_][model_name]["model"]()
            path = Path(model_dir) / dataset_.value / threat_.value / f"{model_name}.pt"
            model.load_state_dict(torch.load(path, map_location="cpu"))
            return model.eval()
        """,
}


@pytest.fixture
def stand_in_robustbench(tmp_path, monkeypatch, clean_robustbench_modules):
    """A RobustBench with its documented layout in a folder first on sys.path, and a checkpoint in model_dir."""
    for name, text in STAND_IN.items():
        file = tmp_path / "site" / "robustbench" / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from robustbench.model_zoo.models import Normalized  # the stand-in, as RobustBench would build it

    weights = tmp_path / "models" / "cifar10" / "Linf" / "Tiny2024.pt"
    weights.parent.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(Normalized(10).state_dict(), weights)
    return tmp_path / "models", weights


def test_robustbench_stand_in_loads_without_normalisation(stand_in_robustbench):
    model_dir, weights = stand_in_robustbench
    loaded = load_model("robustbench:Tiny2024", model_dir=str(model_dir))
    assert loaded.sha256 == sha256_file(weights) and loaded.arch == "robustbench:cifar10/Linf/Tiny2024"
    assert loaded.normalization is None and loaded.preprocessing.resize is None
    state = torch.load(weights)
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())
    # A suite's normalize: suggestion must not normalise a second time.
    config = EvalConfig.of(model="robustbench:Tiny2024", model_dir=str(model_dir), data="example:digits",
                        suite={"name": "s", "normalize": "cifar10", "attacks": [{"attack": "fgsm", "eps": 0.1}]})
    assert resolve(config).normalization is None
    with pytest.raises(UsageError, match="RobustBench has no cifar10 Linf model 'Tiny2042'; did you mean 'Tiny2024'"):
        load_model("robustbench:Tiny2042", model_dir=str(model_dir))
    with pytest.raises(UsageError, match="--dataset must be one of cifar10, cifar100, imagenet"):
        load_model("robustbench:Tiny2024", dataset="mnist")


def test_robustbench_imagenet_entry_takes_the_zoos_transform(stand_in_robustbench, tmp_path):
    from robustbench.model_zoo.models import Normalized

    path = tmp_path / "models" / "imagenet" / "Linf" / "TinyNet2024.pt"
    path.parent.mkdir(parents=True)
    torch.save(Normalized(1000).state_dict(), path)
    loaded = load_model("robustbench:TinyNet2024", dataset="ImageNet", threat_model="linf",
                        model_dir=str(tmp_path / "models"))
    prep = loaded.preprocessing
    assert (prep.resize, prep.crop, prep.interpolation, prep.mean) == (256, 224, "bicubic", None)
    assert dict(prep.details)["zoo_preprocessing"] == "BicubicRes256Crop224"


# --- --arch module:factory from the current folder ------------------------------------------------------


def test_arch_module_is_found_in_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_local_nets.py").write_text(
        "from torch import nn\n\ndef small(num_classes=10):\n    return nn.Linear(4, num_classes)\n")
    monkeypatch.chdir(tmp_path)
    # As under the `robench` console script: neither the folder nor "" is on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    monkeypatch.delitem(sys.modules, "my_local_nets", raising=False)
    before = list(sys.path)
    model = build_arch("my_local_nets:small", 3)
    assert model.out_features == 3 and sys.path == before
    sys.modules.pop("my_local_nets", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UsageError, match="run robench from the folder that holds it or add that folder to PYTHONPATH"):
        build_arch("my_local_nets:small", 3)
