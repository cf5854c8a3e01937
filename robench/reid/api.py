"""Re-identification from Python: ``robench.evaluate_reid`` and the ReID data specs."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from robench.errors import UsageError
from robench.evaluation import distributed
from robench.config import as_loaded_model, as_suite
from robench.examples import is_reid_example, load_example_reid_data
from robench.models.loading import LoadedModel
from robench.models.preprocessing import PRESETS, Normalization
from robench.evaluation.precision import resolve_device
from robench.reid.datasets import PATTERNS, ReIDData, load_reid
from robench.reid.engine import ReIDOptions, ReIDOutcome, ReIDRunInterrupted, run_reid
from robench.reid.features import ReIDFeatures
from robench.results.document import SCHEMA, data_block, env_block, header, model_block, suite_block
from robench.suites import LoadedSuite, Suite

REID_KINDS = tuple(PATTERNS)


def is_reid_spec(spec: str | None) -> bool:
    """``market1501:ROOT``, ``dukemtmc:ROOT``, ``reid:ROOT`` or a bundled ReID example (``example:reid-digits``)."""
    if not spec or ":" not in spec:
        return False
    kind, _, name = spec.partition(":")
    if kind.lower() == "example":
        return is_reid_example(name)
    return kind.lower() in REID_KINDS


def load_reid_spec(spec: str, pattern: str | None = None) -> ReIDData:
    kind, _, root = spec.partition(":")
    if kind.lower() == "example" and is_reid_spec(spec):
        if pattern is not None:
            raise UsageError(f"--reid-pattern does not apply to {spec}: its ids and cameras are stored with it")
        return load_example_reid_data(root)
    return load_reid(kind.lower(), root, pattern)


def _normalization(value: Normalization | str | None) -> Normalization | None:
    return PRESETS.get(value) if isinstance(value, str) else value


def evaluate_reid(
    model: nn.Module | LoadedModel | str,
    data: ReIDData | str,
    suite: str | Suite | LoadedSuite | dict,
    *,
    normalization: Normalization | str | None = None,
    options: ReIDOptions | None = None,
    surrogate: nn.Module | LoadedModel | str | None = None,
    surrogate_normalization: Normalization | str | None = None,
    feature_layer: str | None = None,
    surrogate_layer: str | None = None,
    flip: bool = False,
    l2: bool = False,
    device: str = "auto",
    on_step: Callable[[str], None] | None = None,
    pattern: str | None = None,
    trust_checkpoint: bool = False,
    resume_state: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Re-identification metrics (CMC, mAP, mINP) of ``model``'s features, clean and under ``suite``'s attacks.

    ``data`` is a spec (``market1501:ROOT``, ``dukemtmc:ROOT``, ``reid:ROOT`` with
    ``pattern``) or a loaded ``ReIDData``; ``options`` holds the protocol (distance,
    ranks, AP convention, re-ranking, which split is perturbed). ``surrogate`` is
    the model transfer attacks are computed on. Returns the results document
    (the ``results.json`` of ``robench eval`` on the same data); no argument is changed.
    ``save_state`` receives a progress snapshot after each finished setting (attack entry
    at one eps) and ``resume_state`` (such a snapshot) skips the settings it holds (see
    ``robench.reid.engine.run_reid``); an interrupted run (Ctrl-C) raises
    ``ReIDEvaluationInterrupted`` holding the partial document (``complete: false``).
    """
    loaded = as_loaded_model(model, trust_checkpoint=trust_checkpoint)
    data = load_reid_spec(data, pattern) if isinstance(data, str) else data
    suite = as_suite(suite)
    normalization = _normalization(normalization)
    options = options or ReIDOptions()
    if surrogate is not None:
        surrogate = as_loaded_model(surrogate, trust_checkpoint=trust_checkpoint)
        surrogate_normalization = _normalization(surrogate_normalization)
    dev = distributed.local_device(resolve_device(device))
    target = ReIDFeatures(loaded.model, normalization, layer=feature_layer, flip=flip, l2=l2)
    sur = None
    if surrogate is not None:
        sur = ReIDFeatures(surrogate.model, surrogate_normalization, layer=surrogate_layer, flip=flip, l2=l2)
    run = {"surrogate": sur, "options": options, "device": dev, "resume_state": resume_state,
           "save_state": save_state}
    try:
        if distributed.world()[1] > 1:
            with distributed.process_group(dev):
                outcome = run_reid(target, data, suite.suite,
                                   on_step=on_step if distributed.is_main_process() else None, **run)
        else:
            outcome = run_reid(target, data, suite.suite, on_step=on_step, **run)
    except ReIDRunInterrupted as stopped:
        doc = _document(stopped.outcome, loaded, normalization, surrogate, suite, data, options, feature_layer,
                        flip, l2, dev)
        raise ReIDEvaluationInterrupted(doc) from stopped
    return _document(outcome, loaded, normalization, surrogate, suite, data, options, feature_layer, flip, l2, dev)


class ReIDEvaluationInterrupted(KeyboardInterrupt):
    """The run was stopped; ``doc`` holds the finished settings (``doc["complete"]`` is False)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__("the re-identification run was interrupted")
        self.doc = doc


def _document(outcome: ReIDOutcome, loaded: LoadedModel, normalization: Normalization | None,
              surrogate: LoadedModel | None, suite: LoadedSuite, data: ReIDData, options: ReIDOptions,
              feature_layer: str | None, flip: bool, l2: bool, dev: Any) -> dict[str, Any]:
    """The results document of a finished or an interrupted run (``progress``: settings finished of all)."""
    return {
        **header(SCHEMA, "reid", outcome.complete),
        "progress": {"evaluated": len(outcome.attacks), "total": outcome.total, "unit": "settings"},
        "model": model_block(loaded, normalization=normalization, feature_layer=feature_layer, flip=flip, l2=l2),
        "surrogate": None if surrogate is None else model_block(surrogate),
        "suite": suite_block(suite.suite.name, suite.path, suite.sha256, overrides=suite.overrides),
        "data": data_block({"spec": data.spec, "queries": len(data.query),
                            "gallery": len(data.gallery), "junk_excluded": data.junk, "skipped": data.skipped},
                           outcome.fingerprint),
        "protocol": {"distance": options.metric, "ranks": list(options.ranks), "ap_convention": options.ap,
                     "denominator": options.denominator, "perturb": options.perturb, "rerank": options.rerank},
        "clean": outcome.clean,
        "clean_reranked": outcome.clean_reranked,
        "attacks": outcome.attacks,
        "sanity": {"nonfinite_features": outcome.nonfinite_features},
        # A ReID run has no precision option: it always runs in fp32.
        "env": env_block(dev, precision="fp32", seed=options.seed, batch_size=options.batch_size,
                         checkpoint_sha256=loaded.sha256, processes=distributed.world()[1],
                         suite_sha256=suite.sha256, dataset_fingerprint=outcome.fingerprint,
                         seconds=outcome.seconds),
    }
