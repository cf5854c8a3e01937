"""The training loop of ``robench train``: a recipe in, a checkpoint ``robench eval`` loads out.

The output folder holds

* ``model.safetensors``: the network's weights with its architecture and preprocessing in the
  metadata (:mod:`robench.models.trained`), written when training ends;
* ``training.json``: the recipe, the environment and one record per epoch (loss, train and test
  accuracy, learning rate, seconds), rewritten after every epoch;
* ``state.pt``: model, optimiser and schedule after the last finished epoch, so a killed run
  resumes where it stopped (``robench train`` with the same recipe and ``--out``); removed at the end.

Every epoch draws from its own seeds (shuffling, the defences' randomness, the attacks' random
starts), so a resumed run computes what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from robench.attacks.randomness import stream_key
from robench.errors import RunError, UsageError
from robench.training.recipe import AdversarialSpec, LoadedRecipe, Recipe

STATE = "state.pt"
MODEL = "model.safetensors"
LOG = "training.json"
TEST_BATCH = 512


@dataclass
class TrainOptions:
    data: str | None = None  # overrides the recipe's data (its train split)
    test_data: str | None = None  # overrides the recipe's test data; "none" skips the per-epoch test
    # (default: the test split of a named dataset or example; npz files and image folders have none)
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    workers: int = 0
    limit: int | None = None  # train on a fixed subset (quick checks)
    epochs: int | None = None  # train this many epochs instead of the recipe's (the schedule spans them)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float | None
    lr: float
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    out: Path
    model_path: Path
    epochs: list[EpochRecord]
    resumed_from: int  # epochs already done when this call started


ProgressFn = Callable[[int, int, int, int], None]  # (epoch, epochs, batches done, batches)


def train(loaded: LoadedRecipe, out: Path, options: TrainOptions | None = None,
          progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``loaded.recipe`` into ``out`` (resuming an interrupted run there)."""
    from robench.evaluation.precision import resolve_device

    options = options or TrainOptions()
    if options.epochs is not None and options.epochs != loaded.recipe.epochs:
        loaded = _with_epochs(loaded, options.epochs)
    recipe = loaded.recipe
    say = log or (lambda _msg: None)
    out = Path(out)
    _check_out(out, recipe)
    device = resolve_device(options.device)
    train_set, test_set = _datasets(recipe, options)
    net, model = _build_model(recipe, device)
    alignment = _alignment(recipe, model, train_set, device)
    params = list(model.parameters()) + (list(alignment.parameters()) if alignment is not None else [])
    optimizer = _optimizer(recipe, params)
    schedule = _schedule(recipe, optimizer)
    history: list[EpochRecord] = []
    start = _resume(out, recipe, model, alignment, optimizer, schedule, history)
    say(f"resuming {recipe.name} in {out} after epoch {start} of {recipe.epochs}" if start
        else f"training {recipe.name} into {out}: {len(train_set)} images, {recipe.epochs} epochs")
    last = recipe.epochs
    step = _Step(recipe, model, net, alignment, device)
    for epoch in range(start, last):
        began = time.perf_counter()
        loss, acc, parts = _run_epoch(step, recipe, train_set, epoch, optimizer, options, progress, last)
        schedule.step()
        test_acc = None if test_set is None else _accuracy(model, test_set, device)
        history.append(EpochRecord(epoch + 1, loss, acc, test_acc, optimizer.param_groups[0]["lr"],
                                   time.perf_counter() - began, parts))
        say(_epoch_line(history[-1], recipe.epochs))
        _save_state(out, recipe, model, alignment, optimizer, schedule, history)
        _write_log(out, loaded, history, device, done=False)
    model_path = out / MODEL
    _write_model(model_path, recipe, net)
    _write_log(out, loaded, history, device, done=True)
    (out / STATE).unlink(missing_ok=True)
    return TrainResult(out, model_path, history, start)


def _with_epochs(loaded: LoadedRecipe, epochs: int) -> LoadedRecipe:
    """The recipe with another epoch count, validated again (milestones, start_epoch must still fit)."""
    from pydantic import ValidationError

    from robench.training.recipe import Recipe

    try:
        recipe = Recipe.model_validate({**loaded.recipe.model_dump(), "epochs": epochs})
    except ValidationError as exc:
        raise UsageError(f"--epochs {epochs}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return LoadedRecipe(recipe, loaded.path, loaded.text)


# --- set-up --------------------------------------------------------------------------------------------------


def _check_out(out: Path, recipe: Recipe) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if (out / MODEL).exists() and not (out / STATE).exists():
        raise UsageError(f"{out} already holds a trained model ({MODEL}); choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)


def _datasets(recipe: Recipe, options: TrainOptions):
    from robench.data.sources import DataOptions, load_data

    spec = options.data or recipe.data
    common = dict(root=options.data_root, download=options.download)
    train_set = load_data(spec, DataOptions(split="train", limit=options.limit, **common))
    test_spec = options.test_data or recipe.test_data or (spec if _has_test_split(spec) else "none")
    if test_spec == "none":
        return train_set, None
    return train_set, load_data(test_spec, DataOptions(split="test", **common))


def _has_test_split(spec: str) -> bool:
    """Named datasets and the digits example have one; an npz file or an image folder is one set of images,
    so its "test" accuracy would be measured on the training images (--test-data names another)."""
    from robench.data.sources import TORCHVISION_SETS
    from robench.examples import TRAIN_SPLITS

    kind, _, arg = spec.partition(":")
    return kind.lower() in TORCHVISION_SETS or (kind == "example" and arg in TRAIN_SPLITS)


def _build_model(recipe: Recipe, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The bare network (what the checkpoint holds) and the model training sees: [0,1] pixels in."""
    from robench.models.loading import build_arch
    from robench.models.preprocessing import Normalization
    from robench.models.wrapper import RobustModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the initial weights depend on the recipe's seed only
        net = build_arch(recipe.model.arch, recipe.model.num_classes)
    _insert_defences(recipe, net)
    mean, std = recipe.model.normalization()
    model = RobustModel(net, Normalization(mean, std) if mean is not None else None)
    return net, model.to(device)


def _insert_defences(recipe: Recipe, net: nn.Module) -> None:
    from robench.defenses.fdd import FeatureDensityDropout
    from robench.defenses.insertion import defence_site, insert_after
    from robench.defenses.lfm import LocalFeatureMasking

    for spec in recipe.defenses:
        if spec.kind == "lfm":
            layer = LocalFeatureMasking(p=spec.p, channels=spec.channels, area=spec.area, aspect=spec.aspect)
            insert_after(net, spec.after or defence_site(net, "lfm"), layer)
        elif spec.kind == "fdd":
            layer = FeatureDensityDropout(dims=spec.dims, grids=spec.grids, kappa=spec.kappa, alpha=spec.alpha)
            insert_after(net, spec.after or defence_site(net, "fdd-fc" if spec.dims == 1 else "fdd-maps"), layer)
        elif spec.kind == "dropout":
            insert_after(net, spec.after, nn.Dropout2d(spec.p) if spec.spatial else nn.Dropout(spec.p))


def _input_transforms(recipe: Recipe) -> list:
    """Augmentation first, then the input-level defences (Cutout, few-pixel changes), in recipe order."""
    from robench.defenses.few_pixel import Cutout, FewPixelAugment
    from robench.training.augment import CropFlip

    transforms: list = []
    if recipe.augment.crop_padding or recipe.augment.flip:
        transforms.append(CropFlip(recipe.augment.crop_padding, recipe.augment.flip))
    for spec in recipe.defenses:
        if spec.kind == "cutout":
            transforms.append(Cutout(spec.size, spec.p))
        elif spec.kind == "few-pixel":
            transforms.append(FewPixelAugment(spec.pixels, spec.p, spec.delta, spec.channels))
    return transforms


def _alignment(recipe: Recipe, model: nn.Module, train_set, device: torch.device):
    """The feature-alignment heads, sized by one forward of a training image through the network."""
    if recipe.alignment is None:
        return None
    from robench.defenses.hfa import HierarchicalAlignment

    example = model.normalize(train_set[0][0].unsqueeze(0).to(device))
    spec = recipe.alignment
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_key(recipe.seed, 7))
        heads = HierarchicalAlignment.for_model(model.model, spec.layers, example, lam=spec.lam,
                                                eps=spec.sinkhorn_eps, iters=spec.sinkhorn_iters, nodes=spec.nodes)
    return heads.to(device)


def _optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    spec = recipe.optimizer
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               nesterov=spec.nesterov and spec.momentum > 0)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _schedule(recipe: Recipe, optimizer: torch.optim.Optimizer):
    spec = recipe.schedule
    if spec.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    if spec.name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=spec.milestones, gamma=spec.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


# --- one epoch -----------------------------------------------------------------------------------------------


class _Step:
    """One optimisation step's loss for a batch: plain, adversarial, or with feature alignment."""

    def __init__(self, recipe: Recipe, model: nn.Module, net: nn.Module, alignment, device: torch.device) -> None:
        self.recipe, self.model, self.net, self.alignment, self.device = recipe, model, net, alignment, device
        self.transforms = _input_transforms(recipe)
        self.autocast = recipe.precision == "bf16"
        self.adversarial = None if recipe.adversarial is None else _AdversarialExamples(
            recipe.adversarial, model, recipe.seed, self.autocast, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(x).float()

    def loss(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int):
        key = stream_key(self.recipe.seed, epoch, 3)
        for i, transform in enumerate(self.transforms):
            x = transform(x, ids, stream_key(key, i))
        adv = self.recipe.adversarial
        if adv is None or epoch < adv.start_epoch:
            logits = self.forward(x)
            return nn.functional.cross_entropy(logits, y), logits, {}
        x_adv = self.adversarial(x, y, ids, epoch)
        if self.alignment is not None:
            return self._aligned(x, x_adv, y)
        logits_adv = self.forward(x_adv)
        loss = adv.adversarial_weight * nn.functional.cross_entropy(logits_adv, y)
        logits = logits_adv
        if adv.clean_weight:
            logits = self.forward(x)
            loss = loss + adv.clean_weight * nn.functional.cross_entropy(logits, y)
        return loss, logits, {}

    def _aligned(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
        """Eq. 8: CE(clean) + CE(adversarial) + lambda * sum of the layers' Wasserstein distances
        (the recipe's weights scale the two cross-entropy terms: 1 and 1 in the paper)."""
        from robench.defenses.features import FeatureTap

        adv = self.recipe.adversarial
        with FeatureTap(self.net, self.recipe.alignment.layers) as tap:
            logits = self.forward(x)
            clean_feats = [f.float() for f in tap.features]
            tap.clear()
            logits_adv = self.forward(x_adv)
            adv_feats = [f.float() for f in tap.features]
        ce_clean = nn.functional.cross_entropy(logits, y)
        ce_adv = nn.functional.cross_entropy(logits_adv, y)
        aligned = self.alignment(clean_feats, adv_feats)
        loss = adv.clean_weight * ce_clean + adv.adversarial_weight * ce_adv + aligned
        parts = {name: float(value.detach()) for name, value in
                 (("ce_clean", ce_clean), ("ce_adv", ce_adv), ("alignment", aligned))}
        return loss, logits, parts


class _AdversarialExamples:
    """FGSM or PGD examples from robench's own attacks, the model in eval mode (no dropout or masking
    while the attack looks for the worst case), the last iterate as in Madry et al.'s training.

    The attack object is made once per epoch (its seed is the epoch's), not per batch."""

    def __init__(self, spec: AdversarialSpec, model: nn.Module, seed: int, bf16: bool,
                 device: torch.device) -> None:
        from robench.evaluation.precision import PrecisionModel

        self.spec, self.model, self.seed = spec, model, seed
        self.target = PrecisionModel(model, "bf16", device) if bf16 else model
        self.params: dict[str, Any] = {}
        if spec.attack == "pgd":
            self.params = {"steps": spec.steps, "random_start": spec.random_start}
            if spec.step_size is not None:
                self.params["step_size"] = repr(spec.step_size)
        self._epoch, self._attack = -1, None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        from robench.attacks.registry import ATTACKS

        if epoch != self._epoch:
            self._epoch = epoch
            self._attack = ATTACKS.get(self.spec.attack)(self.params, final_iterate=True,
                                                         seed=stream_key(self.seed, epoch, 4))
        was_training = self.model.training
        self.model.eval()
        try:
            result = self._attack(self.target, x.detach(), y, self.spec.eps, ids, batch_size=len(x), refill=False)
        finally:
            self.model.train(was_training)
        return result.x_adv.detach()


def _run_epoch(step: _Step, recipe: Recipe, train_set, epoch: int, optimizer, options: TrainOptions,
               progress: ProgressFn | None, last: int) -> tuple[float, float, dict[str, float]]:
    from torch.utils.data import DataLoader

    # The epoch's seeds: shuffling, and the global generator that dropout and masking draw from.
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(stream_key(recipe.seed, epoch)))
    torch.manual_seed(stream_key(recipe.seed, epoch, 1))
    loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=order.tolist(),
                        num_workers=options.workers, pin_memory=step.device.type == "cuda")
    step.model.train()
    total_loss, correct, seen, sums = 0.0, 0, 0, {}
    batches = math.ceil(len(train_set) / recipe.batch_size)
    for b, (x, y, ids) in enumerate(loader):
        x, y, ids = x.to(step.device, non_blocking=True), y.to(step.device), ids.to(step.device)
        loss, logits, parts = step.loss(x, y, ids, epoch)
        if not torch.isfinite(loss):
            raise RunError(f"epoch {epoch + 1}, batch {b + 1}: the loss is {float(loss)}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(y)
        if progress:
            progress(epoch, last, b + 1, batches)
    return total_loss / seen, correct / seen, {k: v / seen for k, v in sums.items()}


@torch.no_grad()
def _accuracy(model: nn.Module, dataset, device: torch.device) -> float:
    from torch.utils.data import DataLoader

    model.eval()
    correct = 0
    for x, y, _ in DataLoader(dataset, batch_size=TEST_BATCH):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / len(dataset)


def _epoch_line(record: EpochRecord, epochs: int) -> str:
    test = "" if record.test_accuracy is None else f", test accuracy {record.test_accuracy:.4f}"
    return (f"epoch {record.epoch}/{epochs}: loss {record.loss:.4f}, train accuracy {record.train_accuracy:.4f}"
            f"{test}, lr {record.lr:.3g}, {record.seconds:.1f} s")


# --- state on disk -------------------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_state(out: Path, recipe: Recipe, model, alignment, optimizer, schedule, history) -> None:
    _atomic_save({"recipe_sha256": recipe.sha256(), "epoch": len(history), "model": model.state_dict(),
                  "alignment": alignment.state_dict() if alignment is not None else None,
                  "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                  "history": [asdict(h) for h in history]}, out / STATE)


def _resume(out: Path, recipe: Recipe, model, alignment, optimizer, schedule, history: list) -> int:
    path = out / STATE
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"cannot resume from {path}: {exc}; remove it to start again") from exc
    if state.get("recipe_sha256") != recipe.sha256():
        raise UsageError(f"{out} holds an interrupted run of a different recipe; choose another --out or remove "
                         f"{path}")
    model.load_state_dict(state["model"])
    if alignment is not None and state.get("alignment") is not None:
        alignment.load_state_dict(state["alignment"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    history.extend(EpochRecord(**h) for h in state["history"])
    return int(state["epoch"])


def _write_model(path: Path, recipe: Recipe, net: nn.Module) -> None:
    from robench.models.trained import write_trained

    mean, std = recipe.model.normalization()
    write_trained(path, net.state_dict(), arch=recipe.model.arch, num_classes=recipe.model.num_classes,
                  mean=mean, std=std, input_size=None, recipe=recipe.name)


def _write_log(out: Path, loaded: LoadedRecipe, history: list[EpochRecord], device: torch.device,
               done: bool) -> None:
    from robench.evaluation.precision import device_name

    doc = {"format": "robench-training-1", "complete": done, "recipe": loaded.recipe.model_dump(mode="json"),
           "recipe_file": loaded.path, "recipe_sha256": loaded.recipe.sha256(),
           "env": {"torch": torch.__version__, "device": device_name(device)},
           "epochs": [asdict(h) for h in history]}
    tmp = out / (LOG + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / LOG)
