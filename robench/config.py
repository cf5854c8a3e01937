"""``EvalConfig``: every option of one evaluation, validated once.

``robench eval`` and ``robench.evaluate`` both build one; the checks (ranges,
choices, formats) live here and nowhere else, and their messages name the
command-line option, as the CLI has always printed them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dataclasses import dataclass

from pydantic import field_validator
from torch import nn

from robench.data.images import check_pixel_limit
from robench.data.sources import DataOptions
from robench.attacks.registry import load_plugins
from robench.errors import UsageError
from robench.validated import Options
from robench.models.loading import LoadedModel, load_model
from robench.models.preprocessing import Normalization, resolve_normalization
from robench.evaluation.engine import EngineOptions
from robench.evaluation.precision import PRECISIONS
from robench.evaluation.speed import COMPILE_MODES
from robench.suites import LoadedSuite, Suite, load_suite
from robench.expressions import eval_expr
from robench.suites.loader import parse_suite, with_overrides

MAX_SAVE_EVERY = 7 * 24 * 3600.0  # seconds
MAX_WORKERS = 256
MAX_BATCH_SIZE = 1 << 20
MAX_EPS_VALUES = 64
REID_BATCH_SIZE = 64  # what `--batch-size auto` means for ReID: a safe size on any GPU
CHOICES = {"compile": COMPILE_MODES, "precision": PRECISIONS,
           "distance": ("euclidean", "cosine"), "ap": ("noninterp", "trapezoid"),
           "denominator": ("valid", "all"), "perturb": ("query", "gallery")}
OVERRIDE_NORMS = ("linf", "l2")  # what --norm may replace a suite's norms with


def check_range(option: str, value: float, low: float, high: float) -> None:
    """Options are bounded and finite: nan slips through every comparison, 1e9 trials run for ever."""
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{option} must be between {low:g} and {high:g}, got {value:g}")


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``--image-size HxW``, e.g. 256x128."""
    if text is None:
        return None
    rows, _, cols = text.lower().partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise UsageError(f"--image-size takes HxW, e.g. 256x128, got {text!r}")
    return int(rows), int(cols)


def parse_eps_override(value: Any) -> tuple[str, ...]:
    """``--eps``: a number, an expression (``8/255``) or several, as a list or comma-separated.

    The written text is kept (tables show ``4/255``); each value must be a finite number >= 0.
    """
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else value
    if not isinstance(items, (list, tuple)):
        raise UsageError(f"--eps takes a number, an expression such as 8/255, or a list of them, got {value!r}")
    if len(items) > MAX_EPS_VALUES:
        # Every value re-runs each attack of the suite: thousands of them is a typo, not a sweep.
        raise UsageError(f"--eps takes at most {MAX_EPS_VALUES} values, got {len(items)}; "
                         "split the sweep into several runs")
    texts = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
        try:
            number = eval_expr(item)
        except UsageError as exc:
            raise UsageError(f"--eps: {exc}") from None
        if number < 0:
            raise UsageError(f"--eps values must be >= 0, got {item}")
        texts.append(str(item))
    if not texts:
        raise UsageError("--eps needs at least one value")
    return tuple(texts)


def _choice(option: str, value: str) -> str:
    if value not in CHOICES[option]:
        raise UsageError(f"--{option} must be one of {', '.join(CHOICES[option])}, got {value!r}")
    return value


class EvalConfig(Options):
    """One evaluation: model, data, suite and every run option.

    ``model``, ``data`` and ``suite`` also take objects (a module or ``LoadedModel``,
    an ``(x, y)`` pair or ``ImageDataset``, a ``Suite``/``LoadedSuite``/dict), as
    ``robench.evaluate`` does. Fields are checked in declaration order, so the
    first problem reported is the one the command line has always reported first.
    Any invalid value raises ``UsageError`` with a one-line message.
    """


    # checked first, in the order of the command line's checks
    batch_size: int | str = 256
    save_every: float = 2.0
    workers: int = 0
    max_image_pixels: int | None = None
    compile: str = "auto"
    precision: str = "fp32"
    distance: str = "euclidean"
    ranks: tuple[int, ...] = (1, 5, 10)
    ap: str = "noninterp"
    denominator: str = "valid"
    perturb: str = "query"
    image_size: tuple[int, int] | None = None
    # what is evaluated
    model: Any
    arch: str | None = None
    num_classes: int | None = None
    weights: str | None = None  # a local weights file for timm:/torchvision: models
    dataset: str | None = None  # robustbench: models: cifar10 (default), cifar100, imagenet
    threat_model: str | None = None  # robustbench: models: Linf (default), L2, corruptions
    model_dir: str | None = None  # robustbench: checkpoints (default: models)
    trust_checkpoint: bool = False
    trust_suite: bool = False
    suite: Any = "pgd-linf"
    eps: tuple[str, ...] | None = None  # replaces the eps of every entry that has one (expressions, as written)
    norm: str | None = None  # replaces the norm of those entries
    data: Any = None
    normalize: str | Normalization | None = None  # a preset name or a Normalization
    mean: str | None = None
    std: str | None = None
    # how
    device: str = "auto"
    compile_backend: str = "inductor"
    channels_last: bool = False
    sweep_reuse: bool = False
    refill: bool = True  # continuous batching: fooled or finished samples' slots go to the next ones
    seed: int = 0
    plugins: tuple[str, ...] = ()  # modules that register attacks, imported before the suite is read
    # data options (see DataOptions)
    limit: int | None = None
    data_root: str | None = None
    download: bool = False
    split: str = "test"
    resize: int | None = None
    crop: int | None = None
    gray: bool | None = None
    # where the results go
    out: Path | None = None
    resume: Path | None = None
    save_adversarial: int | None = None  # keep the first N samples' examples as 8-bit images; 0 ("all"): every one
    # re-identification
    feature_layer: str | None = None
    flip: bool = False
    l2: bool = False
    rerank: bool = False
    reid_pattern: str | None = None
    surrogate: str | None = None
    surrogate_arch: str | None = None
    surrogate_num_classes: int | None = None

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> int | str:
        if value == "auto":
            return value
        text = str(value)
        # isdigit alone accepts "²" and other digits int() refuses.
        if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_BATCH_SIZE:
            # One message for the CLI and the Python API, with the words each of them has always used.
            raise UsageError(f"--batch-size must be an integer (a positive integer or auto, at most "
                             f"{MAX_BATCH_SIZE}), got {text!r}")
        return int(text)

    @field_validator("save_every")
    @classmethod
    def _save_every(cls, value: float) -> float:
        check_range("--save-every", value, 0, MAX_SAVE_EVERY)
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        check_range("--workers", value, 0, MAX_WORKERS)
        return value

    @field_validator("max_image_pixels", mode="before")
    @classmethod
    def _max_image_pixels(cls, value: Any) -> Any:
        check_pixel_limit(value)
        return value

    @field_validator(*CHOICES)
    @classmethod
    def _one_of(cls, value: str, info: Any) -> str:
        return _choice(info.field_name, value)

    @field_validator("ranks", mode="before")
    @classmethod
    def _ranks(cls, value: Any) -> tuple[int, ...]:
        values = value
        if isinstance(value, str):
            try:
                values = tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise UsageError(f"--ranks takes comma-separated integers, got {value!r}") from None
        values = tuple(values)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise UsageError(f"--ranks values must be >= 1, got {_as_text(value)!r}")
        return values

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: Any) -> tuple[str, ...] | None:
        return None if value is None else parse_eps_override(value)

    @field_validator("norm")
    @classmethod
    def _norm(cls, value: str | None) -> str | None:
        if value is not None and value not in OVERRIDE_NORMS:
            raise UsageError(f"--norm must be one of {', '.join(OVERRIDE_NORMS)}, got {value!r}")
        return value

    @field_validator("save_adversarial", mode="before")
    @classmethod
    def _save_adversarial(cls, value: Any) -> int | None:
        from robench.results.adversarial import parse_count

        return parse_count(value)

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> tuple[int, int] | None:
        return parse_image_size(value) if isinstance(value, str) else value

    def engine_options(self) -> EngineOptions:
        """The part the evaluation engine runs by."""
        return EngineOptions(batch_size=self.batch_size, precision=self.precision, seed=self.seed,
                             workers=self.workers, compile=self.compile, compile_backend=self.compile_backend,
                             channels_last=self.channels_last, sweep_reuse=self.sweep_reuse, refill=self.refill,
                             save_adversarial=self.save_adversarial, save_every=self.save_every)

    def data_options(self) -> DataOptions:
        """A fresh DataOptions each call: nothing the run does can reach the caller's copy."""
        return DataOptions(root=self.data_root, download=self.download, limit=self.limit, resize=self.resize,
                           crop=self.crop, split=self.split, gray=self.gray, max_image_pixels=self.max_image_pixels)

    def reid_batch_size(self) -> int:
        return REID_BATCH_SIZE if self.batch_size == "auto" else int(self.batch_size)


def data_option_fields(options: DataOptions) -> dict[str, Any]:
    """EvalConfig's fields for a DataOptions (read, never changed)."""
    return {"data_root": options.root, "download": options.download, "limit": options.limit,
            "resize": options.resize, "crop": options.crop, "split": options.split, "gray": options.gray,
            "max_image_pixels": options.max_image_pixels}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


@dataclass(frozen=True)
class Resolved:
    """What a config names, loaded once: the model, the suite, the normalisation and the data."""

    loaded: LoadedModel
    suite: LoadedSuite
    normalization: Normalization | None  # None: the model's own (a checkpoint may record one)
    data: Any


def resolve(config: EvalConfig) -> Resolved:
    """Load the suite and the model and settle normalisation and data, in the order errors are reported."""
    load_plugins(config.plugins)
    suite = as_suite(config.suite, trust_code=config.trust_suite, plugins=config.plugins)
    suite = with_overrides(suite, eps=config.eps, norm=config.norm)
    normalization = normalization_for(config, suite)
    loaded = as_loaded_model(config.model, arch=config.arch, num_classes=config.num_classes,
                             trust_checkpoint=config.trust_checkpoint, **model_source_options(config))
    if loaded.preprocessing is not None and not _explicit_normalization(config):
        # A model by name knows its preprocessing; the suite's suggestion is only a guess about files.
        normalization = loaded.preprocessing.normalization
    data = config.data if config.data is not None else suite.suite.dataset
    if data is None and isinstance(config.model, str) and config.model.startswith("example:"):
        data = config.model  # the bundled example model comes with its data
    if data is None:
        raise UsageError(f"suite {suite.suite.name} names no dataset: pass --data")
    return Resolved(loaded, suite, normalization, data)


def model_source_options(config: EvalConfig) -> dict[str, Any]:
    """The options that pick a named model's weights, passed to ``load_model`` as given."""
    return {"weights": config.weights, "dataset": config.dataset, "threat_model": config.threat_model,
            "model_dir": config.model_dir}


def unnormalised_weights_note(resolved: Resolved) -> str | None:
    """A torchvision architecture with a ``--weights`` file and no weights name brings no preprocessing,
    and nothing else gave one: the model then sees raw [0,1] pixels, which is wrong for the usual
    fine-tuned ImageNet model and right for one trained without normalisation, so it is said, not guessed."""
    loaded = resolved.loaded
    if not (loaded.weights and (loaded.arch or "").startswith("torchvision:") and loaded.preprocessing is None):
        return None
    if resolved.normalization is not None or loaded.normalization is not None:
        return None
    return (f"{loaded.source} --weights {loaded.weights}: no normalisation is applied (the model sees [0,1] "
            f"pixels); if it was fine-tuned from torchvision's weights, name them "
            f"({loaded.source}:DEFAULT --weights FILE takes their preprocessing) or pass --normalize imagenet")


def _explicit_normalization(config: EvalConfig) -> bool:
    return bool(config.normalize or config.mean or config.std)


def data_options_for(config: EvalConfig, resolved: Resolved) -> DataOptions:
    """The config's data options; an image folder read for a model that brings its preprocessing
    takes that model's resize, crop and interpolation unless --resize/--crop were given.

    Tensor datasets (npz, torchvision sets) keep their size: resampling them is the user's choice.
    """
    options = config.data_options()
    prep = resolved.loaded.preprocessing
    spec = resolved.data if isinstance(resolved.data, str) else ""
    if prep is None or options.resize or options.crop or spec.partition(":")[0] != "imagefolder":
        return options
    options.resize, options.crop, options.interpolation = prep.resize, prep.crop, prep.interpolation
    return options


def normalization_for(config: EvalConfig, suite: LoadedSuite) -> Normalization | None:
    """An explicit normalize/mean/std wins over the suite's suggestion."""
    explicit = config.normalize or config.mean or config.std
    preset = config.normalize if explicit else suite.suite.normalize
    return resolve_normalization(preset, config.mean, config.std)


def as_loaded_model(model: nn.Module | LoadedModel | str, *, arch: str | None = None,
                    num_classes: int | None = None, trust_checkpoint: bool = False,
                    **source_options: Any) -> LoadedModel:
    """A checkpoint path or spec is loaded; a module is taken as it is (not copied, not changed).

    ``source_options`` (weights, dataset, threat_model, model_dir) pick a named model's weights.
    """
    if isinstance(model, str):
        return load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                          **source_options)
    given = [name for name, value in source_options.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} need a model given by name (timm:, torchvision:, hf:, "
                         f"robustbench:), not {type(model).__name__}")
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, type(model).__name__, "<module>")
    raise UsageError(f"model must be a checkpoint path, an nn.Module or a LoadedModel, got {type(model).__name__}")


def as_suite(suite: str | Suite | LoadedSuite | dict, *, trust_code: bool = False,
             plugins: tuple[str, ...] = ()) -> LoadedSuite:
    """A suite name or path, a Suite, a LoadedSuite or a dict in the YAML layout (never changed).

    ``plugins`` are the modules the caller allows a suite's ``plugins:`` to import.
    """
    import yaml

    if isinstance(suite, LoadedSuite):
        return suite
    if isinstance(suite, Suite):
        text, source = yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True)), f"<{suite.name}>"
        return parse_suite(text, source, trust_code=trust_code, plugins=plugins)
    if isinstance(suite, dict):
        return parse_suite(yaml.safe_dump(suite), "<dict>", trust_code=trust_code, plugins=plugins)
    return load_suite(suite, trust_code=trust_code, plugins=plugins)
