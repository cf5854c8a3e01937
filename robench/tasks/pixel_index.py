"""The Pixel-index of a model on a folder of images, as a task: ``robench pixel-index`` and
``robench.tasks.pixel_index.pixel_index`` build the same ``PixelIndexConfig`` and run it here.

Images are read in folder order and go through the experiments batch by batch; the run's
progress file holds the counts of the finished batches, so an interrupted run continues
where it stopped and ends with the numbers of an uninterrupted one. Under torchrun the
processes share the images through a work queue (``robench.pixels.queued``) and rank 0
alone writes; the numbers are a single process's.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ConfigDict, field_validator

from robench.evaluation import distributed
from robench.evaluation.config import MAX_SAVE_EVERY
from robench.evaluation.work_queue import is_queue_progress
from robench.models.config import ModelConfig
from robench.results.output import OutputConfig
from robench.data.images import ImageFolderScan, check_pixel_limit, class_indices, input_geometry, load_folder, \
    scan_folder
from robench.errors import UsageError
from robench.validated import Options, check_range, from_flat, parse_count
from robench.evaluation.precision import resolve_device
from robench.expressions import eval_expr
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.pixels.examples import pixel_examples
from robench.pixels.experiment import PixelCounts, PixelExperimentsInterrupted, build_settings, run_pixel_experiments
from robench.pixels.perturb import CHANNEL_MODES, MAX_TRIALS
from robench.pixels.queued import PixelWork
from robench.results.adversarial import SavedExamples
from robench.results.pixel_index import FolderImages, pixel_index_document
from robench.results.result import Result
from robench.results.writers import default_run_dir
from robench.tasks import Hooks, normalize_option, refuse_output_options
from robench.tasks.rundir import RunDirectory

DEFAULT_PIXELS = (4, 8, 16, 32, 64)
ATTACKS = ("fgsm",)  # what --on-attack can put before the pixel changes (experiment 4)


def parse_counts(value: Any, option: str) -> tuple[int, ...]:
    """``--pixels``/``--delta``: comma-separated integers (or a list of them), none negative."""
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return ()
    if isinstance(value, str):
        try:
            values = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise UsageError(f"--{option} takes comma-separated integers, got {value!r}") from None
    else:
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise UsageError(f"--{option} takes comma-separated integers, got {value!r}")
        values = tuple(int(v) for v in values)
    if any(v < 0 for v in values) or not values:
        raise UsageError(f"--{option} values must be non-negative integers, got {value!r}")
    return values


def parse_areas(value: Any) -> tuple[tuple[int, int], ...]:
    """``--area``: sides such as ``200`` (a square) or ``200x150``, comma-separated; or a list of
    sides and (rows, cols) pairs."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = value.replace(" ", "").split(",")
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else [value]
    areas = []
    for part in parts:
        if isinstance(part, (tuple, list)) and len(part) == 2:
            part = f"{part[0]}x{part[1]}"
        part = str(part)
        if not part:
            continue
        rows, _, cols = part.lower().partition("x")
        if not rows.isdigit() or (cols and not cols.isdigit()) or int(rows) < 1 or (cols and int(cols) < 1):
            raise UsageError(f"--area takes sides such as 200 or 200x150, got {part!r}")
        areas.append((int(rows), int(cols or rows)))
    return tuple(areas)


class PixelIndexConfig(Options):
    """One Pixel-index run: the folder, the experiments and how images are read and batched, with the
    model part (``ModelConfig``) and the output part (``OutputConfig``) ``robench eval`` has too.

    ``PixelIndexConfig.of`` takes every option of ``robench pixel-index`` by its flat name. Any
    invalid value raises ``UsageError`` with a one-line message naming the command-line option.
    """

    model_config = ConfigDict(**Options.model_config, validate_default=True)

    model: ModelConfig
    output: OutputConfig = OutputConfig()  # the command line's; the Python function returns the Result instead
    pixels: tuple[int, ...] = DEFAULT_PIXELS
    delta: tuple[int, ...] = ()
    area: tuple[tuple[int, int], ...] = ()
    channels: str = "all"
    trials: int = 1
    batch_size: int = 256
    save_every: float = 2.0
    on_attack: str | None = None
    eps: float | None = None  # of --on-attack, in [0,1] pixel units; an expression such as 8/255 is evaluated
    input_size: int | None = None
    resize: int | None = None
    crop: int | None = None
    max_image_pixels: int | None = None
    save_adversarial: int | None = None  # the first N images as trial 0 changed them; 0 ("all"): every one
    folder: Path
    seed: int = 0
    shared_positions: bool = False
    class_map: str | None = None
    gray: bool | None = None
    device: str = "auto"

    @classmethod
    def of(cls, **options: Any) -> "PixelIndexConfig":
        """From the flat options of ``robench pixel-index`` (``model``, ``folder``, ``pixels``, ``arch``,
        ``normalize``, ``out``, ...), each sent to its part."""
        return from_flat(cls, options, {"model": "model.source"})

    @field_validator("pixels", mode="before")
    @classmethod
    def _pixels(cls, value: Any) -> tuple[int, ...]:
        counts = parse_counts(value, "pixels")
        if 0 in counts:
            raise UsageError("--pixels values must be >= 1")
        if not counts:
            raise UsageError("--pixels needs at least one pixel count")
        return counts

    @field_validator("delta", mode="before")
    @classmethod
    def _delta(cls, value: Any) -> tuple[int, ...]:
        deltas = parse_counts(value, "delta")
        if any(d > 255 for d in deltas):
            raise UsageError("--delta values must be in [0, 255]")
        return deltas

    @field_validator("area", mode="before")
    @classmethod
    def _area(cls, value: Any) -> tuple[tuple[int, int], ...]:
        return parse_areas(value)

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: str) -> str:
        if value not in CHANNEL_MODES:
            raise UsageError(f"--channels must be one of {', '.join(CHANNEL_MODES)}, got {value!r}")
        return value

    @field_validator("trials")
    @classmethod
    def _trials(cls, value: int) -> int:
        check_range("--trials", value, 1, MAX_TRIALS)
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int) -> int:
        if value < 1:
            raise UsageError(f"--batch-size must be >= 1, got {value}")
        return value

    @field_validator("save_every")
    @classmethod
    def _save_every(cls, value: float) -> float:
        check_range("--save-every", value, 0, MAX_SAVE_EVERY)
        return value

    @field_validator("on_attack")
    @classmethod
    def _on_attack(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ATTACKS:
            raise UsageError(f"--on-attack supports {', '.join(ATTACKS)}, got {value!r}")
        return value

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: Any, info: Any) -> float | None:
        if info.data.get("on_attack") is None:
            if value is not None:
                raise UsageError("--eps is only used with --on-attack")
            return None
        if value is None:
            raise UsageError("--on-attack needs --eps")
        eps = eval_expr(value)
        if not 0 < eps <= 1:
            raise UsageError(f"--eps must be in (0, 1] pixel units, got {eps:g}")
        return eps

    @field_validator("crop")
    @classmethod
    def _geometry(cls, value: int | None, info: Any) -> int | None:
        input_geometry(info.data.get("input_size"), info.data.get("resize"), value)
        return value

    @field_validator("max_image_pixels", mode="before")
    @classmethod
    def _max_image_pixels(cls, value: Any) -> Any:
        check_pixel_limit(value)
        return value

    @field_validator("save_adversarial", mode="before")
    @classmethod
    def _save_adversarial(cls, value: Any) -> int | None:
        return parse_count(value)

    def requested_geometry(self) -> tuple[int | None, int | None]:
        """(resize, crop) as asked: --input-size N is resize N/0.875 and crop N."""
        return input_geometry(self.input_size, self.resize, self.crop)


class PixelIndexInterrupted(KeyboardInterrupt):
    """A run without a run directory was stopped; ``result`` holds the finished images (``complete`` False)."""

    def __init__(self, result: Result) -> None:
        super().__init__("the Pixel-index run was interrupted")
        self.result = result


@dataclass
class _FolderRead:
    """The folder as read: the scan (files, skipped, converted), the images and their labels."""

    scan: ImageFolderScan
    images: torch.Tensor  # uint8 NCHW, folder order
    kept: list[int]  # position in scan.files of each image
    labels: torch.Tensor | None = None  # None: the clean prediction is the reference
    class_names: list[str] | None = None


class PixelIndexTask:
    """The task behind ``robench pixel-index``; loading the model settles its preprocessing."""

    name = "pixel-index"

    def __init__(self, config: PixelIndexConfig) -> None:
        self.config = config
        self.loaded = config.model.load()
        self.normalization = config.model.normalization()
        self.resize, self.crop = config.requested_geometry()
        preprocessing = self.loaded.preprocessing
        if preprocessing is not None:
            # A model by name brings its preprocessing; explicit options still win.
            if not config.model.explicit_normalization():
                self.normalization = preprocessing.normalization
            if self.resize is None and self.crop is None:
                self.resize, self.crop = preprocessing.resize, preprocessing.crop
        self.settings = build_settings(list(config.delta), list(config.area))

    def resume_settings(self) -> dict[str, Any]:
        """What changes the counts: the model, the folder, the experiments and how images are read.
        The batch size is checked by the progress file itself, with its own message."""
        config, loaded = self.config, self.loaded
        return {"task": self.name, "model": loaded.sha256 or loaded.source, "arch": loaded.arch,
                "folder": str(config.folder), "pixels": list(config.pixels), "delta": list(config.delta),
                "area": [list(a) for a in config.area], "trials": config.trials, "seed": config.seed,
                "shared_positions": config.shared_positions, "channels": config.channels,
                "attack_eps": config.eps, "resize": self.resize, "crop": self.crop, "gray": config.gray,
                "class_map": config.class_map, "max_image_pixels": config.max_image_pixels,
                "normalization": self.normalization.as_dict() if self.normalization else None,
                "device": config.device}

    def default_dir(self) -> Path:
        return default_run_dir("pixel-index", self.loaded.name)

    def run(self, directory: RunDirectory | None = None, hooks: Hooks = Hooks()) -> Result:
        """The experiments on every image of the folder; an interruption raises ``directory.stopped``'s
        error (``PixelIndexInterrupted`` without a directory) after saving what finished. Under torchrun
        the processes other than rank 0 return an empty result (``complete`` False): rank 0 holds the counts."""
        config = self.config
        folder = self._read_folder(hooks.on_warning)
        device = distributed.local_device(resolve_device(config.device))
        model = RobustModel(self.loaded.model, self.normalization).to(device)
        if folder.scan.class_structured:
            self._label(folder, model, device)
        resume = directory.resume_state if directory else None
        # torchrun, or one process resuming a torchrun job: the work queue.
        queued = distributed.world()[1] > 1 or is_queue_progress(resume)
        work = PixelWork(model, folder.images, folder.labels, self._options(device), hooks.on_batch) if queued \
            else None
        try:
            counts = self._experiments(model, folder, device, directory, hooks, work)
        except PixelExperimentsInterrupted as stopped:
            partial = self._result(stopped.counts, folder, device, complete=False, work=work)
            if directory is None:
                raise PixelIndexInterrupted(partial) from None
            raise directory.stopped(partial, "images", "images") from None
        if counts is None:  # another process of a torchrun job
            return self._result(PixelCounts(), folder, device, complete=False)
        if counts.evaluated == 0:
            raise UsageError(f"no image of {folder.scan.root} is classified correctly by the model before the "
                             f"change ({counts.clean_total} read); check --class-map and the preprocessing options")
        count = config.save_adversarial
        # Under torchrun rank 0 alone gets here: it computes the examples, from the whole folder.
        examples = self._examples(model, folder, device, count) if count is not None else []
        return self._result(counts, folder, device, complete=True, examples=examples, work=work)

    def _read_folder(self, warn: Callable[[str], None] | None) -> _FolderRead:
        config = self.config
        scan = scan_folder(config.folder)
        images, kept = load_folder(scan, self.resize, self.crop, config.gray, config.max_image_pixels)
        if scan.skipped and warn:
            warn(f"skipped {len(scan.skipped)} file(s) that are not readable images (listed in results.json)")
        if scan.converted and warn and config.gray is None:  # forced conversions were asked for: no warning
            target = "grayscale" if images.shape[1] == 1 else "RGB"
            warn(f"converted {len(scan.converted)} image(s) to {target}, the channels of most images "
                 "(listed in results.json under images.converted; --gray/--rgb chooses)")
        return _FolderRead(scan, images, kept)

    def _label(self, folder: _FolderRead, model: RobustModel, device: torch.device) -> None:
        """Class sub-folders name the labels: mapped to the model's classes (--class-map where needed)."""
        with evaluation_mode(model), torch.no_grad():
            num_classes = model(folder.images[:1].to(device).float() / 255.0).shape[1]
        # Called for class sub-folders only, where every file has its folder's name.
        names = [name for name in (folder.scan.class_names[i] for i in folder.kept) if name is not None]
        indices = class_indices(names, num_classes, self.config.class_map)
        folder.labels = torch.tensor(indices, dtype=torch.long)
        folder.class_names = _class_names(names, indices, num_classes)

    def _options(self, device: torch.device) -> dict[str, Any]:
        """What ``run_pixel_experiments`` computes and how, for one process or a work queue's units."""
        config = self.config
        return {"pixels": list(config.pixels), "settings": self.settings, "trials": config.trials,
                "seed": config.seed, "shared_positions": config.shared_positions, "channels": config.channels,
                "attack_eps": config.eps, "batch_size": config.batch_size, "device": device}

    def _experiments(self, model: RobustModel, folder: _FolderRead, device: torch.device,
                     directory: RunDirectory | None, hooks: Hooks, work: PixelWork | None) -> PixelCounts | None:
        """Every image's counts (None: a torchrun process other than rank 0)."""
        resume = directory.resume_state if directory else None
        save = directory.saver(hooks.on_warning) if directory else None
        if work is not None:
            return work.run(resume, save, self.config.save_every)
        return run_pixel_experiments(model, folder.images, folder.labels, **self._options(device),
                                     on_batch=hooks.on_batch, resume_state=resume, save_state=save,
                                     save_every=self.config.save_every)

    def _examples(self, model: RobustModel, folder: _FolderRead, device: torch.device,
                  count: int) -> list[SavedExamples]:
        """Computed from the whole folder once the counts are in: the same whether or not the run was resumed."""
        config = self.config
        examples = pixel_examples(model, folder.images, folder.labels, count=count,
                                  pixels=list(config.pixels), settings=self.settings, seed=config.seed,
                                  shared_positions=config.shared_positions, channels=config.channels,
                                  batch_size=config.batch_size, device=device)
        scan = folder.scan
        for ex in examples:  # which file each saved image came from
            ex.extra["source_file"] = np.array([_relative(scan.files[i], scan.root)
                                                for i in folder.kept[:len(ex.index)]])
        return examples

    def _result(self, counts: PixelCounts, folder: _FolderRead, device: torch.device, *, complete: bool,
                examples: list[SavedExamples] | None = None, work: PixelWork | None = None) -> Result:
        config, scan = self.config, folder.scan
        h, w = folder.images.shape[2:]
        images = FolderImages(str(config.folder), len(scan.files), len(folder.kept), (int(h), int(w)),
                              folder.labels is not None, scan.skipped, scan.converted)
        run_settings = {"pixels": list(config.pixels), "trials": config.trials, "seed": config.seed,
                        "shared_positions": config.shared_positions, "channels": config.channels,
                        "attack_eps": config.eps}
        doc = pixel_index_document(counts, self.loaded, self.normalization, images, self.settings, run_settings,
                                   device, config.batch_size, complete=complete,
                                   work_units=work.work_units if work else None)
        return Result(doc, self._run_config(), adversarial=examples or [], class_names=folder.class_names)

    def _run_config(self) -> dict[str, Any]:
        """config.json: what was asked for, with the preprocessing as settled by the model."""
        config = self.config
        return {"model": self.loaded.source, "arch": config.model.arch, "folder": str(config.folder),
                "pixels": list(config.pixels), "delta": list(config.delta), "area": [list(a) for a in config.area],
                "trials": config.trials, "seed": config.seed, "shared_positions": config.shared_positions,
                "channels": config.channels, "resize": self.resize, "crop": self.crop, "class_map": config.class_map,
                "gray": config.gray, "max_image_pixels": config.max_image_pixels,
                "normalization": self.normalization.as_dict() if self.normalization else None,
                "on_attack": config.on_attack, "eps": config.eps, "device": config.device,
                "batch_size": config.batch_size,
                **({"save_adversarial": config.save_adversarial} if config.save_adversarial is not None else {})}


def pixel_index(model: Any, folder: str | Path, *, on_batch: Callable[[int], None] | None = None,
                on_warning: Callable[[str], None] | None = None, **options: Any) -> Result:
    """The Pixel-index of ``model`` on the images of ``folder`` (class sub-folders, or flat).

    ``options`` are those of ``robench pixel-index``, named as ``PixelIndexConfig``'s fields
    (``pixels=[4, 16, 64]``, ``delta=[10, 40]``, ``area=[200]``, ``trials``, ``seed``,
    ``normalize`` or ``normalization``, ``resize``, ``crop``, ``on_attack="fgsm"`` with ``eps``,
    ``save_adversarial``, ``device``, ``batch_size``, ...). Returns the ``Result``: its ``doc`` is
    the results.json of the command, ``result.save(DIR)`` writes the run directory. Ctrl-C
    raises ``PixelIndexInterrupted`` holding the partial result.
    """
    refuse_output_options("pixel_index", options)
    config = PixelIndexConfig.of(model=model, folder=folder, **normalize_option(options))
    return PixelIndexTask(config).run(None, Hooks(on_batch=on_batch, on_warning=on_warning))


def _class_names(folders: list[str], indices: list[int], num_classes: int) -> list[str]:
    """The model's classes named by the folders mapped to them (the index itself where none is)."""
    names = [str(k) for k in range(num_classes)]
    for folder, k in zip(folders, indices):
        names[k] = folder
    return names


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:  # a file reached through a link outside the folder
        return str(path)
