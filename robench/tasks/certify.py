"""Certified accuracy by randomized smoothing (``robench certify``), as a task.

Every sample of the data is certified in order (``robench.evaluation.certification``): the base
model's clean prediction, then CERTIFY's class and L2 radius and PREDICT's class for the smoothed
classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) (``robench.evaluation.smoothing``). The run
folder, its lock, the progress file (a finished sample is never certified again on ``--resume``) and
the interruption message are the run directory's, as for every task. Under torchrun the processes
share the samples through the work queue and rank 0 alone writes; the answers are a single process's.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Callable

from pydantic import ConfigDict, field_validator

from robench.data.config import DataConfig
from robench.data.sources import DataOptions, ImageDataset
from robench.errors import UsageError
from robench.evaluation import distributed
from robench.evaluation.certification import CertificationInterrupted, CertifiedSamples, CertifyWork, \
    run_certification
from robench.evaluation.config import MAX_BATCH_SIZE, MAX_SAVE_EVERY
from robench.evaluation.precision import resolve_device
from robench.evaluation.smoothing import Smoothing
from robench.evaluation.work_queue import is_queue_progress
from robench.expressions import eval_expr
from robench.models.config import ModelConfig
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.models.wrapper import RobustModel
from robench.results.certify import certify_document, samples_table
from robench.results.output import OutputConfig
from robench.results.result import Result
from robench.results.writers import default_run_dir
from robench.tasks import Hooks, normalize_option, refuse_output_options
from robench.tasks.classification import as_dataset
from robench.tasks.rundir import RunDirectory
from robench.validated import Options, check_range, from_flat

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_SIGMA = 10.0  # pixel units: images are in [0, 1], so a larger sigma leaves nothing of them
MAX_SELECTION = 10_000_000
MAX_ESTIMATION = 1_000_000_000
MAX_RADII = 1000
MAX_SEED = 2 ** 32 - 1  # the noise streams take a 32-bit seed: larger ones would repeat smaller ones' draws
# Options of the certification itself; the others are the model's, the data's and the output's.
CERTIFY_FIELDS = ("sigma", "n0", "n", "alpha", "radii", "batch_size", "seed", "device", "save_every")
ALIASES = {"model": "model.source", "data": "data.source", "data_root": "data.root"}


def parse_radii(value: Any) -> tuple[float, ...]:
    """``--radii``: comma-separated numbers >= 0 (or a list of them), reported in increasing order."""
    if isinstance(value, str):
        parts: list[Any] = [part for part in value.replace(" ", "").split(",") if part]
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else [value]
    radii = []
    for part in parts:
        try:
            radius = eval_expr(part) if isinstance(part, str) else float(part)
        except (UsageError, TypeError, ValueError):
            raise UsageError(f"--radii takes comma-separated numbers >= 0, got {value!r}") from None
        if isinstance(part, bool) or not math.isfinite(radius) or radius < 0:
            raise UsageError(f"--radii takes comma-separated numbers >= 0, got {value!r}")
        radii.append(float(radius))
    if not radii or len(radii) > MAX_RADII:
        raise UsageError(f"--radii needs between 1 and {MAX_RADII} radii, got {value!r}")
    return tuple(sorted(set(radii)))


class CertifyConfig(Options):
    """One certification: the smoothing (``sigma``, ``n0``, ``n``, ``alpha``), the radii reported, how the
    copies are batched, and the model, data and output parts ``robench eval`` has too.

    ``CertifyConfig.of`` takes every option of ``robench certify`` by its flat name; an invalid value
    raises ``UsageError`` with a one-line message naming the command-line option.
    """

    model_config = ConfigDict(**Options.model_config, validate_default=True)

    sigma: float | None = None
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    radii: tuple[float, ...] = DEFAULT_RADII
    batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    save_every: float = 2.0
    model: ModelConfig
    data: DataConfig = DataConfig()
    output: OutputConfig = OutputConfig()

    @classmethod
    def of(cls, **options: Any) -> "CertifyConfig":
        """From the flat options of ``robench certify`` (``model``, ``data``, ``sigma``, ``n``, ``limit``,
        ``normalize``, ``out``, ...), each sent to its part."""
        return from_flat(cls, options, ALIASES)

    @field_validator("sigma", mode="before")
    @classmethod
    def _sigma(cls, value: Any) -> float:
        if value is None:
            raise UsageError("--sigma is required: the standard deviation of the Gaussian noise, in [0, 1] pixel "
                             "units (e.g. 0.25)")
        sigma = _number("--sigma", value)
        if not 0 < sigma <= MAX_SIGMA:
            raise UsageError(f"--sigma must be > 0 and at most {MAX_SIGMA:g} ([0, 1] pixel units), got {sigma:g}")
        return sigma

    @field_validator("n0", mode="before")
    @classmethod
    def _n0(cls, value: Any) -> int:
        return _count("--n0", value, MAX_SELECTION)

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, value: Any) -> int:
        return _count("--n", value, MAX_ESTIMATION)

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> float:
        alpha = _number("--alpha", value)
        if not 0 < alpha < 0.5:
            raise UsageError(f"--alpha must be in (0, 0.5), got {alpha:g}")
        return alpha

    @field_validator("radii", mode="before")
    @classmethod
    def _radii(cls, value: Any) -> tuple[float, ...]:
        return parse_radii(value)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> int:
        return _count("--batch-size", value, MAX_BATCH_SIZE)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_SEED:
            raise UsageError(f"--seed must be an integer from 0 to {MAX_SEED}, got {value!r}")
        return int(value)

    @field_validator("save_every")
    @classmethod
    def _save_every(cls, value: float) -> float:
        check_range("--save-every", value, 0, MAX_SAVE_EVERY)
        return value

    def smoothing(self) -> Smoothing:
        assert self.sigma is not None  # required by its validator
        return Smoothing(self.sigma, self.n0, self.n, self.alpha, self.seed)


def _number(option: str, value: Any) -> float:
    try:
        number = eval_expr(value) if isinstance(value, str) else float(value)
    except (UsageError, TypeError, ValueError):
        raise UsageError(f"{option} takes a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise UsageError(f"{option} takes a finite number, got {value!r}")
    return number


def _count(option: str, value: Any, most: int) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
        raise UsageError(f"{option} must be an integer from 1 to {most:,}, got {value!r}")
    return int(text)


class CertifyInterrupted(KeyboardInterrupt):
    """A run without a run directory was stopped; ``result`` holds the finished samples (``complete`` False)."""

    def __init__(self, result: Result) -> None:
        super().__init__("the certification was interrupted")
        self.result = result


class CertifyTask:
    """The task behind ``robench certify``; loading the model settles its preprocessing, reading the data
    the number of samples."""

    name = "certify"
    queued = True  # under torchrun: the work queue, which keeps a progress file too

    def __init__(self, config: CertifyConfig) -> None:
        self.config = config
        self.loaded = config.model.load()
        self.normalization = _normalization(config.model, self.loaded)
        self.data_spec = _data_spec(config.data, config.model)
        self.dataset: ImageDataset = as_dataset(self.data_spec, self._data_options())
        if len(self.dataset) == 0:
            raise UsageError(f"{self._data_name()} holds no samples")

    @property
    def total(self) -> int:
        return len(self.dataset)

    def resume_settings(self) -> dict[str, Any]:
        """What the answers depend on; the radii only summarise them, so a resumed run may report others."""
        config, loaded = self.config, self.loaded
        return {"task": self.name, "model": loaded.sha256 or loaded.source, "arch": loaded.arch,
                "normalization": self.normalization.as_dict() if self.normalization else None,
                "data": self._data_name(), "data_options": dict(self._data_options().__dict__),
                "sigma": config.sigma, "n0": config.n0, "n": config.n, "alpha": config.alpha, "seed": config.seed,
                "batch_size": config.batch_size, "device": config.device}

    def default_dir(self) -> Path:
        return default_run_dir("certify", self.loaded.name)

    def run(self, directory: RunDirectory | None = None, hooks: Hooks = Hooks()) -> Result:
        """Every sample certified; an interruption raises ``directory.stopped``'s error (``CertifyInterrupted``
        without a directory) after saving what finished. Under torchrun the processes other than rank 0
        return an empty result (``complete`` False): rank 0 holds the answers."""
        config = self.config
        if self.dataset.skipped and hooks.on_warning:
            hooks.on_warning(f"skipped {len(self.dataset.skipped)} file(s) that are not readable images")
        device = distributed.local_device(resolve_device(config.device))
        model = RobustModel(self.loaded.model, self.normalization)
        resume = directory.resume_state if directory else None
        save = directory.saver(hooks.on_warning) if directory else None
        # torchrun, or one process resuming a torchrun job: the work queue.
        queued = distributed.world()[1] > 1 or is_queue_progress(resume)
        work = CertifyWork(model, self.dataset, config.smoothing(), config.batch_size, device, hooks.on_batch) \
            if queued else None
        try:
            if work is not None:
                samples = work.run(resume, save, config.save_every)
            else:
                samples = run_certification(model, self.dataset, config.smoothing(), batch_size=config.batch_size,
                                            device=device, on_sample=hooks.on_batch, resume_state=resume,
                                            save_state=save, save_every=config.save_every)
        except CertificationInterrupted as stopped:
            partial = self._result(stopped.samples, device, complete=False, work=work)
            if directory is None:
                raise CertifyInterrupted(partial) from None
            raise directory.stopped(partial, "samples", "sample") from None
        if samples is None:  # another process of a torchrun job
            return self._result(CertifiedSamples(), device, complete=False)
        return self._result(samples, device, complete=True, work=work)

    def _data_options(self) -> DataOptions:
        return self.config.data.options()

    def _data_name(self) -> str:
        return self.data_spec if isinstance(self.data_spec, str) else getattr(self.data_spec, "name", "arrays")

    def _result(self, samples: CertifiedSamples, device: Any, *, complete: bool,
                work: CertifyWork | None = None) -> Result:
        config = self.config
        settings = {"sigma": config.sigma, "n0": config.n0, "n": config.n, "alpha": config.alpha,
                    "radii": list(config.radii), "seed": config.seed}
        data = {"spec": self._data_name(), "fingerprint": samples.fingerprint if complete else ""}
        doc = certify_document(samples.columns, self.total, self.loaded, self.normalization, data, settings, device,
                               num_classes=samples.classes or None, batch_size=config.batch_size,
                               seconds=samples.seconds, complete=complete,
                               work_units=work.work_units if work else None)
        return Result(doc, self._run_config(device), samples_table(samples.columns))

    def _run_config(self, device: Any) -> dict[str, Any]:
        """config.json: what was asked for, with the preprocessing as settled by the model."""
        config = self.config
        return {"model": self.loaded.source, "arch": self.loaded.arch, "data": self._data_name(),
                "limit": config.data.limit,
                "normalization": self.normalization.as_dict() if self.normalization else None,
                "device": str(device), **config.model_dump(include=set(CERTIFY_FIELDS) - {"device"})}


def _normalization(model: ModelConfig, loaded: LoadedModel) -> Normalization | None:
    """An explicit --normalize/--mean/--std, else a model by name's own preprocessing, else the checkpoint's."""
    if loaded.preprocessing is not None and not model.explicit_normalization():
        return loaded.preprocessing.normalization
    return model.normalization() or loaded.normalization


def _data_spec(data: DataConfig, model: ModelConfig) -> Any:
    if data.source is not None:
        return data.source
    source = model.source
    if isinstance(source, str) and source.startswith("example:"):
        return source  # the bundled example model comes with its data
    raise UsageError("certify needs --data (a spec such as npz:FILE, cifar10 or example:digits)")


def certify(model: Any, data: Any = None, *, on_sample: Callable[[int], None] | None = None,
            on_warning: Callable[[str], None] | None = None, **options: Any) -> Result:
    """Certified accuracy of ``model`` smoothed with Gaussian noise, on ``data`` (what
    ``robench.evaluate(model, data, task="certify", sigma=...)`` runs).

    ``options`` are those of ``robench certify``, named as ``CertifyConfig``'s fields (``sigma`` is
    required; ``n0``, ``n``, ``alpha``, ``radii``, ``batch_size``, ``seed``, ``device``) and the model and
    data options of ``robench eval`` (``normalize`` or ``normalization``, ``limit``, ``arch``, ...).
    Returns the ``Result``; ``result.save(DIR)`` writes the run directory. Ctrl-C raises
    ``CertifyInterrupted`` holding the partial result.
    """
    refuse_output_options("certify", options)
    config = CertifyConfig.of(model=model, data=data, **normalize_option(options))
    return CertifyTask(config).run(None, Hooks(on_batch=on_sample, on_warning=on_warning))
