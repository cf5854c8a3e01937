"""The training loop of ``robench train``: a recipe in, a checkpoint ``robench eval`` loads out.

The output folder holds

* ``model.safetensors``: the network's weights with its architecture and preprocessing in the
  metadata (:mod:`robench.models.trained`), written when training ends;
* ``training.json``: the recipe, the overrides and data it ran with, the environment and one record
  per epoch (loss, train and test accuracy, learning rate, seconds), rewritten after every epoch;
* ``state.pt``: model and optimiser after the last finished epoch, with the run's settings, so a
  killed run resumes where it stopped (``robench train`` with the same recipe, data and ``--out``);
  removed at the end. It is checked entry by entry before use: a resumed run trusts nothing in it
  that the recipe does not fix.

The folder is created and locked as ``robench eval``'s run folders are
(:func:`robench.results.writers.prepare_run_dir`): one run at a time, never over a finished one.

Every epoch draws from its own seeds (shuffling, the defences' randomness, the attacks' random
starts), so a resumed run computes what the uninterrupted run would have.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from robench.attacks.randomness import stream_key
from robench.errors import RunError, UsageError
from robench.training.recipe import AdversarialSpec, LoadedRecipe, Recipe

if TYPE_CHECKING:
    from robench.attacks.base import Attack
    from robench.defenses.hfa import HierarchicalAlignment
    from robench.models.wrapper import RobustModel

STATE = "state.pt"
STATE_FORMAT = "robench-train-state-2"
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


# The types state.pt may hold for each EpochRecord field (checked on resume).
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,), "loss": (float,), "train_accuracy": (float,), "test_accuracy": (float, type(None)),
    "lr": (float,), "seconds": (float,), "parts": (dict,)}


@dataclass(frozen=True)
class RunSettings:
    """What a resumed run must share with the interrupted one besides the recipe: its data and overrides."""

    data: str  # the training data's spec
    test_data: str  # the per-epoch test data's spec, or "none"
    limit: int | None
    epochs: int
    dataset_fingerprint: str  # of the training images and labels, as robench eval computes it


@dataclass
class TrainResult:
    out: Path
    model_path: Path
    epochs: list[EpochRecord]
    resumed_from: int  # epochs already done when this call started


@dataclass
class _Trainable:
    """What training changes and state.pt saves. The schedule is not saved: it is a function of the
    epoch, so it is rebuilt by replaying it (see ``_replay_schedule``)."""

    model: nn.Module
    alignment: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Any


ProgressFn = Callable[[int, int, int, int], None]  # (epoch, epochs, batches done, batches)


def train(loaded: LoadedRecipe, out: Path, options: TrainOptions | None = None,
          progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``loaded.recipe`` into ``out`` (resuming an interrupted run there)."""
    from robench.evaluation.precision import resolve_device
    from robench.results.writers import prepare_run_dir

    options = options or TrainOptions()
    recipe_sha256 = loaded.recipe.sha256()  # as written: an --epochs override is a setting of its own
    if options.epochs is not None and options.epochs != loaded.recipe.epochs:
        loaded = _with_epochs(loaded, options.epochs)
    recipe = loaded.recipe
    say = log or (lambda _msg: None)
    # Locked before any work: a second run on this folder is refused now, and a run that fails
    # before writing anything leaves no empty folder behind (the lock's release removes it).
    out = prepare_run_dir(Path(out), complete=_trained_model)
    device = resolve_device(options.device)
    specs = _data_specs(recipe, options)
    train_set, test_set = _datasets(specs, options)
    net, model = _build_model(loaded, device)
    _check_data_fits(loaded, model, train_set, test_set, device)
    settings = _settings(specs, options, recipe, train_set)
    alignment = _alignment(loaded, model, train_set, device)
    params = list(model.parameters()) + (list(alignment.parameters()) if alignment is not None else [])
    optimizer = _optimizer(recipe, params)
    parts = _Trainable(model, alignment, optimizer, _schedule(recipe, optimizer))
    history: list[EpochRecord] = []
    steps_per_epoch = math.ceil(len(train_set) / recipe.batch_size)
    start = _resume(out, recipe_sha256, settings, parts, history, steps_per_epoch)
    say(f"resuming {recipe.name} in {out} after epoch {start} of {recipe.epochs}" if start
        else f"training {recipe.name} into {out}: {len(train_set)} images, {recipe.epochs} epochs")
    header = _log_header(loaded, settings, options, device, len(train_set))
    last = recipe.epochs
    step = _Step(recipe, model, net, alignment, device)
    for epoch in range(start, last):
        began = time.perf_counter()
        loss, acc, extra = _run_epoch(step, recipe, train_set, epoch, optimizer, options, progress, last)
        parts.schedule.step()
        test_acc = None if test_set is None else _accuracy(model, test_set, device)
        history.append(EpochRecord(epoch + 1, loss, acc, test_acc, optimizer.param_groups[0]["lr"],
                                   time.perf_counter() - began, extra))
        say(_epoch_line(history[-1], recipe.epochs))
        _save_state(out, recipe_sha256, settings, parts, history)
        _write_log(out, header, history, done=False)
    model_path = out / MODEL
    _write_model(model_path, recipe, net)
    _write_log(out, header, history, done=True)
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
    return LoadedRecipe(recipe, loaded.path, loaded.text, loaded.lines)


def _trained_model(out: Path) -> str | None:
    """What makes a train folder complete, for prepare_run_dir: the model, with no resume state beside it."""
    return f"a trained model ({MODEL})" if (out / MODEL).exists() and not (out / STATE).exists() else None


# --- set-up --------------------------------------------------------------------------------------------------


def _data_specs(recipe: Recipe, options: TrainOptions) -> tuple[str, str]:
    """The training data's spec and the test data's ("none": no per-epoch test)."""
    spec = options.data or recipe.data
    return spec, options.test_data or recipe.test_data or (spec if _has_test_split(spec) else "none")


def _datasets(specs: tuple[str, str], options: TrainOptions):
    from robench.data.sources import DataOptions, load_data

    spec, test_spec = specs
    train_set = load_data(spec, DataOptions(split="train", limit=options.limit, root=options.data_root,
                                            download=options.download))
    if test_spec == "none":
        return train_set, None
    return train_set, load_data(test_spec, DataOptions(split="test", root=options.data_root, download=options.download))


def _has_test_split(spec: str) -> bool:
    """Named datasets and the digits example have one; an npz file or an image folder is one set of images,
    so its "test" accuracy would be measured on the training images (--test-data names another)."""
    from robench.data.sources import TORCHVISION_SETS
    from robench.examples import TRAIN_SPLITS

    kind, _, arg = spec.partition(":")
    return kind.lower() in TORCHVISION_SETS or (kind == "example" and arg in TRAIN_SPLITS)


def _settings(specs: tuple[str, str], options: TrainOptions, recipe: Recipe, train_set) -> RunSettings:
    from robench.evaluation.engine import dataset_fingerprint

    # eval's fingerprint of its data: one pass over the images, small beside an epoch of training,
    # and it tells a resumed run that the file behind the same --data has changed.
    fingerprint = dataset_fingerprint(train_set, TEST_BATCH, options.workers)
    return RunSettings(specs[0], specs[1], options.limit, recipe.epochs, fingerprint)


def _build_model(loaded: LoadedRecipe, device: torch.device) -> tuple[nn.Module, RobustModel]:
    """The bare network (what the checkpoint holds) and the model training sees: [0,1] pixels in."""
    from robench.models.architectures import build_arch
    from robench.models.preprocessing import Normalization
    from robench.models.wrapper import RobustModel

    recipe = loaded.recipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the initial weights depend on the recipe's seed only
        net = build_arch(recipe.model.arch, recipe.model.num_classes)
    _insert_defences(loaded, net)
    mean, std = recipe.model.normalization()
    # normalization() gives both or neither.
    model = RobustModel(net, Normalization(mean, std) if mean is not None and std is not None else None)
    return net, model.to(device)


def _insert_defences(loaded: LoadedRecipe, net: nn.Module) -> None:
    for index, spec in enumerate(loaded.recipe.defenses):
        try:
            _insert_defence(spec, net)
        except UsageError as exc:  # e.g. a module name the network does not have
            raise UsageError(f"{loaded.where('defenses', index, 'after')}: {exc}") from None


def _insert_defence(spec, net: nn.Module) -> None:
    from robench.defenses.fdd import FeatureDensityDropout
    from robench.defenses.insertion import defence_site, insert_after
    from robench.defenses.lfm import LocalFeatureMasking

    layer: nn.Module
    if spec.kind == "lfm":
        layer = LocalFeatureMasking(p=spec.p, channels=spec.channels, area=spec.area, aspect=spec.aspect)
        insert_after(net, spec.after or defence_site(net, "lfm"), layer)
    elif spec.kind == "fdd":
        layer = FeatureDensityDropout(dims=spec.dims, grids=spec.grids, kappa=spec.kappa, alpha=spec.alpha)
        insert_after(net, spec.after or defence_site(net, "fdd-fc" if spec.dims == 1 else "fdd-maps"), layer)
    elif spec.kind == "dropout":
        insert_after(net, spec.after, nn.Dropout2d(spec.p) if spec.spatial else nn.Dropout(spec.p))


def _input_transforms(recipe: Recipe) -> list:
    """Augmentation first, then the input-level defences (Cutout, few-pixel changes, Gaussian noise), in recipe
    order."""
    from robench.training.augment import CropFlip

    transforms: list = []
    if recipe.augment.crop_padding or recipe.augment.flip:
        transforms.append(CropFlip(recipe.augment.crop_padding, recipe.augment.flip))
    return transforms + [t for t in map(_input_defence, recipe.defenses) if t is not None]


def _input_defence(spec):
    """The transform of an input-level defence; None for those inside the network."""
    from robench.defenses.few_pixel import Cutout, FewPixelAugment
    from robench.defenses.noise import GaussianNoiseAugment

    if spec.kind == "cutout":
        return Cutout(spec.size, spec.p)
    if spec.kind == "few-pixel":
        return FewPixelAugment(spec.pixels, spec.p, spec.delta, spec.channels)
    if spec.kind == "gaussian-noise":
        return GaussianNoiseAugment(spec.sigma, spec.p)
    return None


# --- what only the data can show, checked before the first epoch rather than found in it ---------------------


def _check_data_fits(loaded: LoadedRecipe, model: nn.Module, train_set, test_set, device: torch.device) -> None:
    """Labels the model has outputs for, images the network and the input defences take."""
    for which, dataset in (("training", train_set), ("test", test_set)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise UsageError(f"the {which} data holds no images")
        _check_labels(loaded, dataset, which)
        image = dataset[0][0]
        _check_image_shape(loaded, model, image, which)
        _check_forward(loaded, model, image.to(device), which)
    _check_input_defences(loaded, train_set[0][0])


def _check_labels(loaded: LoadedRecipe, dataset, which: str) -> None:
    from robench.evaluation.engine import dataset_labels

    labels = dataset_labels(dataset)
    if labels is None:  # a dataset without a label array: read the labels once
        labels = np.array([dataset[i][1] for i in range(len(dataset))])
    low, high, classes = int(labels.min()), int(labels.max()), loaded.recipe.model.num_classes
    if low < 0:
        raise UsageError(f"the {which} data has label {low}; labels count classes from 0")
    if high >= classes:
        raise UsageError(f"{loaded.where('model', 'num_classes')}: the {which} data has labels up to {high}, "
                         f"but the recipe's model has {classes} classes; set num_classes: {high + 1} (or more)")


def _check_image_shape(loaded: LoadedRecipe, model: nn.Module, image: torch.Tensor, which: str) -> None:
    spec = loaded.recipe.model
    if image.dim() != 3:
        raise UsageError(f"the {which} images have shape {list(image.shape)}, not channels x height x width")
    channels = image.shape[0]
    mean, _ = spec.normalization()
    if mean is not None and len(mean) not in (1, channels):
        field_name = "normalize" if spec.normalize else "mean"
        raise UsageError(f"{loaded.where('model', field_name)}: {len(mean)} normalisation values for the "
                         f"{which} data's {_channels(channels)}; give one value or {channels}")
    # The first layer with in_channels (a convolution) says what the network takes.
    sizes = (getattr(m, "in_channels", None) for m in model.modules())
    takes = next((size for size in sizes if isinstance(size, int)), None)
    if takes is not None and takes != channels:
        raise UsageError(f"{loaded.where('model', 'arch')}: the {which} data has {_channels(channels)}; the "
                         f"recipe's model takes {takes}; give data with {_channels(takes)} or another arch")


def _channels(count: int) -> str:
    return f"{count} channel" + ("" if count == 1 else "s")


def _check_forward(loaded: LoadedRecipe, model: nn.Module, image: torch.Tensor, which: str) -> None:
    """One image through the model in eval mode, the random state untouched: an image size the network
    cannot take is said now, not after an epoch of training."""
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(image.unsqueeze(0))
    except (RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{loaded.where('model', 'arch')}: the model cannot take the {which} images "
                         f"({'x'.join(map(str, image.shape))}): {reason}") from None
    finally:
        model.train()


def _check_input_defences(loaded: LoadedRecipe, image: torch.Tensor) -> None:
    height, width = image.shape[-2:]
    for index, spec in enumerate(loaded.recipe.defenses):
        transform = _input_defence(spec)
        try:
            if transform is not None:
                transform.check_image_size(height, width)
        except ValueError as exc:
            field_name = "size" if spec.kind == "cutout" else "pixels"
            raise UsageError(f"{loaded.where('defenses', index, field_name)}: {exc}") from None


def _alignment(loaded: LoadedRecipe, model: RobustModel, train_set,
               device: torch.device) -> HierarchicalAlignment | None:
    """The feature-alignment heads, sized by one forward of a training image through the network."""
    recipe = loaded.recipe
    if recipe.alignment is None:
        return None
    from robench.defenses.hfa import HierarchicalAlignment

    example = model.normalize(train_set[0][0].unsqueeze(0).to(device))
    spec = recipe.alignment
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_key(recipe.seed, 7))
        try:
            heads = HierarchicalAlignment.for_model(model.model, spec.layers, example, lam=spec.lam,
                                                    eps=spec.sinkhorn_eps, iters=spec.sinkhorn_iters,
                                                    nodes=spec.nodes)
        except UsageError as exc:  # e.g. a layer name the network does not have
            raise UsageError(f"{loaded.where('alignment', 'layers')}: {exc}") from None
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

    def __init__(self, recipe: Recipe, model: nn.Module, net: nn.Module, alignment: HierarchicalAlignment | None,
                 device: torch.device) -> None:
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
        examples = self.adversarial  # None without the recipe's adversarial training
        if examples is None or epoch < examples.spec.start_epoch:
            logits = self.forward(x)
            return nn.functional.cross_entropy(logits, y), logits, {}
        adv = examples.spec
        x_adv = examples(x, y, ids, epoch)
        if self.alignment is not None and self.recipe.alignment is not None:  # both or neither
            return self._aligned(x, x_adv, y, adv, self.alignment, self.recipe.alignment.layers)
        logits_adv = self.forward(x_adv)
        loss = adv.adversarial_weight * nn.functional.cross_entropy(logits_adv, y)
        logits = logits_adv
        if adv.clean_weight:
            logits = self.forward(x)
            loss = loss + adv.clean_weight * nn.functional.cross_entropy(logits, y)
        return loss, logits, {}

    def _aligned(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, adv: AdversarialSpec,
                 alignment: HierarchicalAlignment, layers: list[str]):
        """Eq. 8: CE(clean) + CE(adversarial) + lambda * sum of the layers' Wasserstein distances
        (the recipe's weights scale the two cross-entropy terms: 1 and 1 in the paper)."""
        from robench.defenses.features import FeatureTap

        with FeatureTap(self.net, layers) as tap:
            logits = self.forward(x)
            clean_feats = [f.float() for f in tap.features]
            tap.clear()
            logits_adv = self.forward(x_adv)
            adv_feats = [f.float() for f in tap.features]
        ce_clean = nn.functional.cross_entropy(logits, y)
        ce_adv = nn.functional.cross_entropy(logits_adv, y)
        aligned = alignment(clean_feats, adv_feats)
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
        self._epoch = -1
        self._attack: Attack | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        from robench.attacks.registry import ATTACKS

        if self._attack is None or epoch != self._epoch:  # one per epoch (None: not made yet)
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
    total_loss, correct, seen = 0.0, 0, 0
    sums: dict[str, float] = {}
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


def _save_state(out: Path, recipe_sha256: str, settings: RunSettings, parts: _Trainable,
                history: list[EpochRecord]) -> None:
    from robench.results.atomic import write_file_atomically

    # Serialised in memory first: a full disk is then reported by the shared writer, naming the disk.
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "recipe_sha256": recipe_sha256, "settings": asdict(settings),
                "epoch": len(history), "model": parts.model.state_dict(),
                "alignment": parts.alignment.state_dict() if parts.alignment is not None else None,
                "optimizer": parts.optimizer.state_dict(), "history": [asdict(h) for h in history]}, buffer)
    write_file_atomically(out / STATE, buffer.getvalue())


def _resume(out: Path, recipe_sha256: str, settings: RunSettings, parts: _Trainable, history: list,
            steps_per_epoch: int) -> int:
    """The epochs an interrupted run in ``out`` finished (0: none), with its model and optimiser restored."""
    path = out / STATE
    if not path.exists():
        return 0
    state = _read_state(path, _state_limit(parts))
    if state.get("recipe_sha256") != recipe_sha256:
        raise UsageError(f"{out} holds an interrupted run of a different recipe; choose another --out or remove "
                         f"{path}")
    try:
        _require(state.get("format") == STATE_FORMAT, f"its format is {_brief(state.get('format'))}, not "
                 f"{STATE_FORMAT}")  # e.g. an older robench's, whose entries were trusted as they were
        _check_settings(state.get("settings"), settings, out, path)
        epoch = _check_state(state, parts, settings.epochs, steps_per_epoch)
    except _ForeignState as exc:
        raise _not_ours(path, str(exc)) from None
    parts.model.load_state_dict(state["model"])
    if parts.alignment is not None:
        parts.alignment.load_state_dict(state["alignment"])
    parts.optimizer.load_state_dict(state["optimizer"])
    history.extend(EpochRecord(**h) for h in state["history"])
    return epoch


class _ForeignState(Exception):
    """What shows that a state.pt is not one this recipe wrote (reported by ``_not_ours``)."""


def _not_ours(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} is not a training state this recipe wrote ({what}); remove it to start again")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _ForeignState(what)


def _state_limit(parts: _Trainable) -> int:
    """The most bytes a state.pt of this model can take: the weights once in the model's state and at most
    twice in the optimiser's (Adam's two moments), so 4x leaves room, plus 64 MiB for pickling and the
    epoch records. A larger file did not come from this recipe: it is refused before being read."""
    tensors = list(parts.model.state_dict().values())
    if parts.alignment is not None:
        tensors += list(parts.alignment.state_dict().values())
    return 4 * sum(t.numel() * t.element_size() for t in tensors) + (64 << 20)


def _read_state(path: Path, limit: int) -> dict:
    from robench.files import read_bounded

    try:
        # The shared bounded reader: a FIFO, a device, a folder or a huge file is refused, never read.
        data = read_bounded(path, "training state", limit)
    except UsageError as exc:
        raise UsageError(f"{exc}; remove it to start again") from None
    if not data:
        raise _not_ours(path, "the file is empty")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's own messages suggest unsafe loading; name the kind only
        raise _not_ours(path, f"torch cannot read it: {type(exc).__name__}") from None
    if not isinstance(state, dict):
        raise _not_ours(path, f"its top level is a {type(state).__name__}, not a mapping")
    return state


_SETTING_FLAGS = {"data": "--data", "test_data": "--test-data", "limit": "--limit", "epochs": "--epochs"}


def _check_settings(saved: Any, settings: RunSettings, out: Path, path: Path) -> None:
    """Another data set or override than the interrupted run's is the user's choice to fix, said by name."""
    expected = asdict(settings)
    _require(isinstance(saved, dict) and set(saved) == set(expected)
             and all(_plain(v) for v in saved.values()), "its settings are not a training run's")
    fix = f"choose another --out or remove {path}"
    for name, flag in _SETTING_FLAGS.items():
        if saved[name] != expected[name]:
            raise UsageError(f"{out} holds an interrupted run with {flag} {_shown(saved[name])}, not "
                             f"{_shown(expected[name])}; {fix}")
    if saved["dataset_fingerprint"] != settings.dataset_fingerprint:
        raise UsageError(f"{out} holds an interrupted run on other training data (dataset fingerprint "
                         f"{saved['dataset_fingerprint'][:12]}, now {settings.dataset_fingerprint[:12]}): the data "
                         f"behind {settings.data} has changed; {fix}")


def _plain(value: Any) -> bool:
    return value is None or (type(value) in (int, str) and len(str(value)) <= 4096)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def _check_state(state: dict, parts: _Trainable, epochs: int, steps_per_epoch: int) -> int:
    """Every entry against what this recipe's fresh model and optimiser hold; returns the epochs done.

    Replays the schedule to the saved epoch first: the optimiser's learning rates must then be the
    saved ones."""
    _require_keys("the file", state, ("format", "recipe_sha256", "settings", "epoch", "model", "alignment",
                                      "optimizer", "history"))
    epoch = state["epoch"]
    _require(type(epoch) is int and 1 <= epoch <= epochs, f"epoch {_brief(epoch)} is not one of 1..{epochs}")
    _check_history(state["history"], epoch)
    _check_tensors("model", state["model"], parts.model.state_dict())
    if parts.alignment is None:
        _require(state["alignment"] is None, "it holds alignment heads this recipe does not have")
    else:
        _check_tensors("alignment", state["alignment"], parts.alignment.state_dict())
    _replay_schedule(parts.schedule, epoch)
    _check_optimizer(state["optimizer"], parts.optimizer, epoch * steps_per_epoch)
    return epoch


def _replay_schedule(schedule, epochs_done: int) -> None:
    """The learning-rate schedule is a pure function of the epoch, so it is not saved but stepped again
    from a fresh one: nothing in state.pt can bend it (a forged T_max or base rate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no training is replayed
        for _ in range(epochs_done):
            schedule.step()


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require_keys(what: str, saved: dict, expected) -> None:
    for key in expected:
        _require(key in saved, f"{what} has no {_brief(key)} entry")
    for key in saved:
        _require(key in expected, f"{what} has an unexpected entry {_brief(key)}")


def _check_history(history: Any, epoch: int) -> None:
    _require(isinstance(history, list), f"history is a {type(history).__name__}, not a list")
    _require(len(history) == epoch, f"history has {len(history)} records for {epoch} epochs")
    for number, record in enumerate(history, 1):
        _check_record(record, number)


def _check_record(record: Any, number: int) -> None:
    what = f"history record {number}"
    _require(isinstance(record, dict), f"{what} is a {type(record).__name__}, not a mapping")
    _require_keys(what, record, [f.name for f in fields(EpochRecord)])
    for name, value in record.items():
        _require(type(value) in _RECORD_TYPES[name], f"{what}: {name} is a {type(value).__name__}")
    _require(record["epoch"] == number, f"{what} is numbered {record['epoch']}")
    extra = record["parts"]
    _require(all(type(k) is str and type(v) is float for k, v in extra.items()), f"{what}: parts are not numbers")
    numbers = [v for v in record.values() if type(v) is float] + list(extra.values())
    _require(all(math.isfinite(v) for v in numbers), f"{what} holds a value that is not a finite number")
    accuracies = [record["train_accuracy"]] + ([record["test_accuracy"]] if record["test_accuracy"] is not None
                                               else [])
    _require(all(0 <= a <= 1 for a in accuracies), f"{what} has an accuracy outside [0, 1]")
    _require(record["lr"] >= 0 and record["seconds"] >= 0, f"{what} has a negative learning rate or time")


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _check_tensors(what: str, saved: Any, expected: dict[str, torch.Tensor]) -> None:
    """Exactly the fresh state dict's entries, each of its shape and dtype, with finite values."""
    _require(isinstance(saved, dict), f"{what} is a {type(saved).__name__}, not a mapping of tensors")
    _require_keys(what, saved, expected)
    for key, want in expected.items():
        got = saved[key]
        same = (isinstance(got, torch.Tensor) and got.layout == torch.strided and got.dtype == want.dtype
                and got.shape == want.shape)
        _require(same, f"{what} entry {key} is {_described(got)}, expected {_described(want)}")
        _require(not got.is_floating_point() or bool(torch.isfinite(got).all()),
                 f"{what} entry {key} holds NaN or infinite values")


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer, steps_done: int) -> None:
    fresh = optimizer.state_dict()
    _require(isinstance(saved, dict), f"optimizer is a {type(saved).__name__}, not an optimiser state")
    _require_keys("optimizer", saved, fresh)
    _check_param_groups(saved["param_groups"], fresh["param_groups"])
    params = dict(enumerate(p for group in optimizer.param_groups for p in group["params"]))
    _check_moments(saved["state"], params, steps_done)


def _check_param_groups(saved: Any, expected: list[dict]) -> None:
    """The same groups of the same parameters with the recipe's hyper-parameters and the replayed rates."""
    count = len(saved) if isinstance(saved, list) else _described(saved)
    _require(isinstance(saved, list) and len(saved) == len(expected),
             f"optimizer has {count} parameter groups, this recipe's has {len(expected)}")
    for index, (got, want) in enumerate(zip(saved, expected)):
        what = f"optimizer parameter group {index}"
        _require(isinstance(got, dict), f"{what} is a {type(got).__name__}, not a mapping")
        _require_keys(what, got, want)
        for key, value in want.items():
            _require(_same(got[key], value), f"{what}: {key} is {_brief(got[key])}, this recipe's is {_brief(value)}")


def _same(saved: Any, expected: Any) -> bool:
    """Equal, and of the same type; floats to a relative 1e-9, since a replayed learning rate may differ in
    its last bits from the one computed during the run (under another torch version)."""
    if isinstance(expected, float):
        return type(saved) is float and math.isclose(saved, expected, rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(expected, (list, tuple)):
        return (type(saved) is type(expected) and len(saved) == len(expected)
                and all(_same(a, b) for a, b in zip(saved, expected)))
    return type(saved) is type(expected) and saved == expected


def _check_moments(saved: Any, params: dict[int, torch.Tensor], steps_done: int) -> None:
    """Per-parameter optimiser state (momentum, Adam's moments and step): tensors of the parameter's shape."""
    _require(isinstance(saved, dict), f"optimizer state is a {type(saved).__name__}, not a mapping")
    for pid, entry in saved.items():
        _require(type(pid) is int and pid in params, f"optimizer state for an unknown parameter {_brief(pid)}")
        _require(isinstance(entry, dict) and all(type(k) is str for k in entry),
                 f"optimizer state of parameter {pid} is not a mapping of names")
        for name, value in entry.items():
            _check_moment(f"optimizer state {name} of parameter {pid}", name, value, params[pid], steps_done)


def _check_moment(what: str, name: str, value: Any, param: torch.Tensor, steps_done: int) -> None:
    if value is None:  # SGD without momentum keeps an empty momentum buffer
        return
    _require(isinstance(value, torch.Tensor) and value.layout == torch.strided and value.is_floating_point(),
             f"{what} is {_described(value)}")
    _require(bool(torch.isfinite(value).all()), f"{what} holds NaN or infinite values")
    if name == "step":
        _require(value.dim() == 0 and 0 <= float(value) <= steps_done,
                 f"{what} is not a step count of at most {steps_done}")
        return
    _require(value.shape == param.shape, f"{what} is {_described(value)}, the parameter {_described(param)}")
    # Adam divides by the square root of its second moments: a negative one would poison the weights.
    _require(not name.endswith("exp_avg_sq") or bool((value >= 0).all()), f"{what} has negative values")


def _write_model(path: Path, recipe: Recipe, net: nn.Module) -> None:
    from robench.models.trained import write_trained

    mean, std = recipe.model.normalization()
    write_trained(path, net.state_dict(), arch=recipe.model.arch, num_classes=recipe.model.num_classes,
                  mean=mean, std=std, input_size=None, recipe=recipe.name)


def _log_header(loaded: LoadedRecipe, settings: RunSettings, options: TrainOptions, device: torch.device,
                samples: int) -> dict[str, Any]:
    """What training.json says about the run: the recipe, the command line's overrides, the data, where."""
    from robench.evaluation.precision import device_name

    overrides = {"data": options.data, "test_data": options.test_data, "limit": options.limit,
                 "epochs": options.epochs}  # None: the recipe's
    data = {"train": settings.data, "test": settings.test_data, "limit": settings.limit, "samples": samples,
            "fingerprint": settings.dataset_fingerprint}
    return {"recipe": loaded.recipe.model_dump(mode="json"), "recipe_file": loaded.path,
            "recipe_sha256": loaded.recipe.sha256(), "options": overrides, "data": data,
            "env": {"torch": torch.__version__, "device": device_name(device)}}


def _write_log(out: Path, header: dict[str, Any], history: list[EpochRecord], done: bool) -> None:
    from robench.results.atomic import atomic_write
    from robench.results.schema import TRAINING_FORMAT, check_before_writing

    doc = {"format": TRAINING_FORMAT, "complete": done, **header, "epochs": [asdict(h) for h in history]}
    check_before_writing(doc)
    atomic_write(out / LOG, json.dumps(doc, indent=2) + "\n")
