"""``EvalConfig``: one evaluation, as nested, validated parts — model, data, suite, engine, output
and the re-identification options only that task reads.

``robench eval`` and ``robench.evaluate`` both build one from their flat options with
``EvalConfig.of``; the checks (ranges, choices, formats) live in the parts and nowhere else, and
their messages name the command-line option, as the CLI has always printed them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from robench.data.config import DataConfig
from robench.data.sources import DataOptions
from robench.errors import UsageError
from robench.evaluation.config import EngineConfig
from robench.models.config import ModelConfig
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.reid.config import ReIDConfig
from robench.results.output import OutputConfig
from robench.suites import LoadedSuite
from robench.suites.config import SuiteConfig
from robench.validated import Options, from_flat

REID_BATCH_SIZE = 64  # what `--batch-size auto` means for ReID: a safe size on any GPU
# Flat option names that are not a part's own field name.
ALIASES = {"model": "model.source", "data": "data.source", "suite": "suite.source", "data_root": "data.root",
           "trust_suite": "suite.trust_code", "reid_pattern": "reid.pattern"}


class EvalConfig(Options):
    """One evaluation. The parts are checked in this order, so the first problem reported is the one
    the command line has always reported first; any invalid value raises ``UsageError`` with a
    one-line message."""

    engine: EngineConfig = EngineConfig()
    data: DataConfig = DataConfig()
    reid: ReIDConfig = ReIDConfig()
    model: ModelConfig
    suite: SuiteConfig = SuiteConfig()
    output: OutputConfig = OutputConfig()

    @classmethod
    def of(cls, **options: Any) -> "EvalConfig":
        """From flat options named as ``robench eval``'s (``model``, ``data``, ``suite``, ``batch_size``,
        ``limit``, ``eps``, ``distance``, ``out``, ...), each sent to its part; a whole part may be
        given instead (``engine=EngineConfig(...)``)."""
        return from_flat(cls, options, ALIASES)

    def reid_batch_size(self) -> int:
        batch_size = self.engine.batch_size
        return REID_BATCH_SIZE if batch_size == "auto" else int(batch_size)


@dataclass(frozen=True)
class Resolved:
    """What a config names, loaded once: the model, the suite, the normalisation and the data."""

    loaded: LoadedModel
    suite: LoadedSuite
    normalization: Normalization | None  # None: the model's own (a checkpoint may record one)
    data: Any


def resolve(config: EvalConfig) -> Resolved:
    """Load the suite and the model and settle normalisation and data, in the order errors are reported."""
    suite = config.suite.load()
    normalization = config.model.normalization(suite.suite.normalize)
    loaded = config.model.load()
    if loaded.preprocessing is not None and not config.model.explicit_normalization():
        # A model by name knows its preprocessing; the suite's suggestion is only a guess about files.
        normalization = loaded.preprocessing.normalization
    data = config.data.source if config.data.source is not None else suite.suite.dataset
    source = config.model.source
    if data is None and isinstance(source, str) and source.startswith("example:"):
        data = source  # the bundled example model comes with its data
    if data is None:
        raise UsageError(f"suite {suite.suite.name} names no dataset: pass --data")
    return Resolved(loaded, suite, normalization, data)


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


def data_options_for(config: EvalConfig, resolved: Resolved) -> DataOptions:
    """The config's data options; an image folder read for a model that brings its preprocessing
    takes that model's resize, crop and interpolation unless --resize/--crop were given.

    Tensor datasets (npz, torchvision sets) keep their size: resampling them is the user's choice.
    """
    options = config.data.options()
    prep = resolved.loaded.preprocessing
    spec = resolved.data if isinstance(resolved.data, str) else ""
    if prep is None or options.resize or options.crop or spec.partition(":")[0] != "imagefolder":
        return options
    options.resize, options.crop, options.interpolation = prep.resize, prep.crop, prep.interpolation
    return options
