"""Training the DMR generator (Deep Mis-Ranking, Wang et al. 2020): ``robench dmr train`` and
``train_dmr_generator`` build the same ``DMRTrainConfig`` and train here.

The generator file is written once: refused when it exists, written by atomic rename (a
reader never sees half a file), and trained under a lock, so two processes started with the
same ``--out`` cannot both train and write it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from pydantic import ConfigDict, field_validator

# robench.config first: it imports the attacks, which the ReID modules need loaded before them.
from robench.models.config import as_loaded_model
from robench.reid.config import parse_image_size
from robench.errors import UsageError
from robench.validated import Options, check_range
from robench.evaluation.precision import resolve_device
from robench.expressions import eval_expr
from robench.models.preprocessing import Normalization, resolve_normalization
from robench.reid.datasets import ReIDImages
from robench.reid.features import ReIDFeatures
from robench.reid.generator import GeneratorConfig, generator_bytes, train_generator
from robench.reid.specs import is_reid_spec, load_reid_spec
from robench.results.locking import lock_run_dir, release_run_dirs
from robench.results.atomic import write_file_atomically

# Bounded and finite: a NaN weight or rate passes every comparison and trains garbage.
BOUNDS = {"lr": ("--lr", 1e-12, 10.0), "margin": ("--margin", 0.0, 100.0), "ce_weight": ("--ce-weight", 0.0, 1e6),
          "msssim_weight": ("--msssim-weight", 0.0, 1e6), "steps": ("--steps", 1, 10_000_000),
          "width": ("--width", 1, 4096), "blocks": ("--blocks", 1, 64)}
# The smallest useful value of the counts: a PxK batch needs two identities to rank against each other.
AT_LEAST = {"steps": ("--steps", 1), "ids_per_batch": ("--ids-per-batch", 2), "images_per_id": ("--images-per-id", 1),
            "val_every": ("--val-every", 1)}


class DMRTrainConfig(Options):
    """One generator training: the surrogate, the data, the output file and every option of
    ``robench dmr train``. ``surrogate`` is a checkpoint path or spec, an ``nn.Module`` or a
    ``LoadedModel``. Fields are checked in declaration order, the order the command line has
    always reported problems in; an invalid value raises ``UsageError`` naming the option.
    """

    model_config = ConfigDict(**Options.model_config, validate_default=True)

    # checked first, in the order of the command line's checks
    out: Path
    data: str
    eps: float = 16 / 255  # L-inf budget in [0,1] pixel units; an expression such as 16/255 is evaluated
    steps: int = 2000
    ids_per_batch: int = 8
    images_per_id: int = 4
    val_every: int = 200
    lr: float = 2e-4
    margin: float = 0.3
    ce_weight: float = 1.0
    msssim_weight: float = 0.0
    width: int = 32
    blocks: int = 4
    val_fraction: float = 0.1
    image_size: tuple[int, int] | None = None
    normalize: str | Normalization | None = None
    mean: str | None = None
    std: str | None = None
    # what the generator is trained against
    surrogate: Any
    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    feature_layer: str | None = None
    classifier_layer: str | None = None
    # how
    dmr_compat: bool = False
    seed: int = 0
    device: str = "auto"

    @field_validator("out")
    @classmethod
    def _out(cls, value: Path) -> Path:
        _refuse_existing(value)
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        if not is_reid_spec(value):
            raise UsageError("--data must be market1501:ROOT, dukemtmc:ROOT or reid:ROOT")
        return value

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: Any) -> float:
        budget = eval_expr(value)
        if not 0 < budget <= 1:
            raise UsageError(f"--eps must be in (0, 1], got {budget:g}")
        return budget

    @field_validator(*AT_LEAST, *BOUNDS)
    @classmethod
    def _bounded(cls, value: float, info: Any) -> float:
        if info.field_name in AT_LEAST:
            option, least = AT_LEAST[info.field_name]
            if value < least:
                raise UsageError(f"{option} is too small")
        if info.field_name in BOUNDS:
            option, low, high = BOUNDS[info.field_name]
            check_range(option, value, low, high)
        return value

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise UsageError("--val-fraction must be in [0, 1)")
        return value

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> tuple[int, int] | None:
        return parse_image_size(value) if isinstance(value, str) else value

    @field_validator("std")
    @classmethod
    def _normalization(cls, value: str | None, info: Any) -> str | None:
        resolve_normalization(info.data.get("normalize"), info.data.get("mean"), value)
        return value

    def normalization(self) -> Normalization | None:
        """The surrogate's input normalisation (None: it takes [0,1] pixels)."""
        return resolve_normalization(self.normalize, self.mean, self.std)

    def generator_config(self) -> GeneratorConfig:
        """What the generator file records about its training."""
        return GeneratorConfig(eps=self.eps, width=self.width, blocks=self.blocks, margin=self.margin,
                               exclude_self=not self.dmr_compat,
                               ce_weight=self.ce_weight if self.classifier_layer else 0.0,
                               msssim_weight=self.msssim_weight, ids_per_batch=self.ids_per_batch,
                               images_per_id=self.images_per_id, steps=self.steps, lr=self.lr,
                               val_fraction=self.val_fraction, val_every=self.val_every, seed=self.seed)


def train_dmr_generator(config: DMRTrainConfig, log: Callable[[str], None] | None = None) -> Path:
    """Train the generator against ``config.surrogate`` on the data's training identities and write it
    to ``config.out`` (never overwritten); the checkpoint with the lowest validation mAP under attack
    is kept. ``log`` gets a line per validation. Returns the file written."""
    with _exclusive(config.out):
        _refuse_existing(config.out)  # again under the lock: another process may have written it meanwhile
        dataset = load_reid_spec(config.data)
        if dataset.train is None or len(dataset.train) == 0:
            raise UsageError(f"{dataset.root} has no bounding_box_train/ images to train on")
        device = resolve_device(config.device)
        features, logits = _surrogate(config, device)
        images = ReIDImages(dataset.train, config.image_size)
        settings = config.generator_config()
        generator, history = train_generator(
            features, lambda idx: torch.stack([images[i][0] for i in idx]), dataset.train.pids,
            dataset.train.camids, settings, device=device, logits_fn=logits, log=log)
        write_file_atomically(config.out, generator_bytes(generator.cpu(), settings, history))
    return config.out


def _surrogate(config: DMRTrainConfig, device: torch.device) -> tuple[ReIDFeatures, ReIDFeatures | None]:
    """The surrogate's features and, with --classifier-layer, its identity logits (the cross-entropy term)."""
    loaded = as_loaded_model(config.surrogate, arch=config.arch, num_classes=config.num_classes,
                             trust_checkpoint=config.trust_checkpoint)
    features = ReIDFeatures(loaded.model, config.normalization(), layer=config.feature_layer).to(device)
    if config.classifier_layer is None:
        return features, None
    return features, ReIDFeatures(loaded.model, features.normalization, layer=config.classifier_layer).to(device)


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise UsageError(f"{out} exists; generators are never overwritten")


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``<out>.lock`` while training. The run-directory lock of robench.results.locking works on a
    folder, so the lock is a folder of its own beside the generator, made for the run: releasing it
    removes its lock file and then the folder, leaving nothing behind (after a kill, the next run
    takes over the stale folder and removes it). The release gives back every lock this process
    holds: a command holds only this one, and a run directory locked earlier from Python is finished."""
    lock = out.with_name(f"{out.name}.lock")
    try:
        lock.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    try:
        lock_run_dir(lock, fresh=True)
        yield
    finally:
        release_run_dirs()
