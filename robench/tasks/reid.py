"""Re-identification: CMC, mAP and mINP of a model's features, clean and under a suite's attacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robench.config import EvalConfig, Resolved, resolve
from robench.errors import UsageError
from robench.evaluation import distributed
from robench.evaluation.precision import resolve_device
from robench.models import load_model, resolve_normalization
from robench.models.config import as_loaded_model
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.reid.datasets import ReIDData
from robench.reid.engine import ReIDOptions, ReIDOutcome, ReIDRunInterrupted, run_reid
from robench.reid.features import ReIDFeatures
from robench.reid.specs import is_reid_spec, load_reid_spec
from robench.results.reid import reid_document
from robench.results.result import Result
from robench.results.writers import default_run_dir
from robench.tasks import Hooks
from robench.tasks.rundir import RunDirectory


class ReIDEvaluationInterrupted(KeyboardInterrupt):
    """The run was stopped; ``result`` holds the finished settings (``doc["complete"]`` is False)."""

    def __init__(self, result: Result) -> None:
        super().__init__("the re-identification run was interrupted")
        self.result = result


def is_reid_config(config: EvalConfig, resolved: Resolved) -> bool:
    """ReID data, or a suite written for re-identification."""
    data = resolved.data
    return (isinstance(data, str) and is_reid_spec(data)) or resolved.suite.suite.task == "reid"


class ReIDTask:
    name = "reid"
    queued = True  # under torchrun: work units, and rank 0 keeps a progress file (robench.reid.queued)

    def __init__(self, config: EvalConfig, resolved: Resolved | None = None) -> None:
        self.config, self.resolved = config, resolved or resolve(config)
        if config.engine.save_adversarial is not None:
            raise UsageError("--save-adversarial saves classification examples; it is not available for "
                             "re-identification runs")
        data = self.resolved.data
        if not isinstance(data, (str, ReIDData)) or (isinstance(data, str) and not is_reid_spec(data)):
            raise UsageError(f"suite {self.resolved.suite.suite.name} is for re-identification: pass --data "
                             "market1501:ROOT, dukemtmc:ROOT or reid:ROOT, or try the model example:reid-digits")
        self.options = reid_options(config)
        # Loaded now: its checkpoint is part of what a resumed run must share.
        self.surrogate, self.surrogate_normalization, self.surrogate_layer = _surrogate(config, self.resolved)

    def resume_settings(self) -> dict[str, Any]:
        """``task`` keeps ReID keys apart from classification ones."""
        reid, engine, loaded, surrogate = self.config.reid, self.config.engine, self.resolved.loaded, self.surrogate
        # Neither DataLoader workers nor how often progress is saved change the results.
        options = {k: v for k, v in self.options.__dict__.items() if k not in ("workers", "save_every")}
        return {"task": "reid", "model": loaded.sha256 or loaded.source, "arch": loaded.arch,
                "suite": self.resolved.suite.sha256, "data": self.resolved.data if isinstance(self.resolved.data, str)
                else self.resolved.data.spec, "reid_pattern": reid.pattern, "options": options,
                "normalization": self.resolved.normalization,
                "surrogate": (surrogate.sha256 or surrogate.source, surrogate.arch) if surrogate else None,
                "feature_layer": reid.feature_layer, "flip": reid.flip, "l2": reid.l2,
                "device": engine.device, "seed": engine.seed}

    def default_dir(self) -> Path:
        return default_run_dir(self.resolved.suite.suite.name, self.resolved.loaded.name)

    def run(self, directory: RunDirectory | None, hooks: Hooks = Hooks()) -> Result:
        config, resolved = self.config, self.resolved
        data = resolved.data if isinstance(resolved.data, ReIDData) else load_reid_spec(resolved.data,
                                                                                         config.reid.pattern)
        if data.skipped and hooks.on_warning:
            hooks.on_warning(f"skipped {len(data.skipped)} file(s) whose names do not match the pattern "
                             "(listed in results.json)")
        device = distributed.local_device(resolve_device(config.engine.device))
        try:
            outcome = self._run(data, hooks, directory, device)
        except ReIDRunInterrupted as stopped:
            partial = Result(self._document(stopped.outcome, data, device), self._settings())
            if directory is None:
                raise ReIDEvaluationInterrupted(partial) from stopped
            raise directory.stopped(partial, "settings", "setting") from None
        return Result(self._document(outcome, data, device), self._settings())

    def _run(self, data: ReIDData, hooks: Hooks, directory: RunDirectory | None,
             device: torch.device) -> ReIDOutcome:
        reid, loaded = self.config.reid, self.resolved.loaded
        target = ReIDFeatures(loaded.model, self.resolved.normalization, layer=reid.feature_layer, flip=reid.flip,
                              l2=reid.l2)
        surrogate = None
        if self.surrogate is not None:
            surrogate = ReIDFeatures(self.surrogate.model, self.surrogate_normalization, layer=self.surrogate_layer,
                                     flip=reid.flip, l2=reid.l2)
        resume_state = directory.resume_state if directory else None
        save_state = directory.saver(hooks.on_warning) if directory else None
        suite = self.resolved.suite.suite
        if distributed.world()[1] > 1:
            with distributed.process_group(device):
                on_step = hooks.on_step if distributed.is_main_process() else None
                return run_reid(target, data, suite, surrogate=surrogate, options=self.options, device=device,
                                on_step=on_step, resume_state=resume_state, save_state=save_state)
        return run_reid(target, data, suite, surrogate=surrogate, options=self.options, device=device,
                        on_step=hooks.on_step, resume_state=resume_state, save_state=save_state)

    def _document(self, outcome: ReIDOutcome, data: ReIDData, device: torch.device) -> dict[str, Any]:
        reid = self.config.reid
        return reid_document(outcome, self.resolved.loaded, self.resolved.normalization, self.surrogate,
                             self.resolved.suite, data, self.options, reid.feature_layer, reid.flip, reid.l2, device)

    def _settings(self) -> dict[str, Any]:
        """config.json: what was asked for, as resolved."""
        reid, resolved, options = self.config.reid, self.resolved, self.options
        return {"model": resolved.loaded.source, "arch": resolved.loaded.arch,
                "data": resolved.data if isinstance(resolved.data, str) else resolved.data.spec,
                "suite": resolved.suite.suite.model_dump(mode="json"),
                "surrogate": self.surrogate.source if self.surrogate else None,
                "options": {**{k: v for k, v in options.__dict__.items() if k != "save_every"},
                            "ranks": list(options.ranks),
                            "size": list(options.size) if options.size else None},
                "feature_layer": reid.feature_layer, "flip": reid.flip, "l2": reid.l2,
                "device": self.config.engine.device}


def reid_options(config: EvalConfig) -> ReIDOptions:
    """What the ReID engine runs by: the task's own options and the engine part's batching and seed."""
    reid, engine = config.reid, config.engine
    return ReIDOptions(metric=reid.distance, ranks=reid.ranks, ap=reid.ap, denominator=reid.denominator,
                       rerank=reid.rerank, perturb=reid.perturb, size=reid.image_size,
                       batch_size=config.reid_batch_size(), workers=engine.workers, seed=engine.seed,
                       save_every=engine.save_every)


def _surrogate(config: EvalConfig, resolved: Resolved) -> tuple[LoadedModel | None, Normalization | None, str | None]:
    """The transfer attacks' model: --surrogate over the suite's ``surrogate:`` block."""
    spec, reid = resolved.suite.suite.surrogate, config.reid
    if reid.surrogate:
        path = reid.surrogate
    elif spec is not None:
        path = spec.model
    else:
        return None, None, None
    arch = reid.surrogate_arch or (spec.arch if spec else None)
    classes = reid.surrogate_num_classes or (spec.num_classes if spec else None)
    if not isinstance(path, str):  # a module or LoadedModel handed over from Python
        return as_loaded_model(path), resolved.normalization, spec.feature_layer if spec else None
    # Same rule as the target: TorchScript and pickled modules need --trust-checkpoint.
    loaded = load_model(path, arch=arch, num_classes=classes, trust_checkpoint=config.model.trust_checkpoint,
                        arch_option="--surrogate-arch (or surrogate.arch in the suite)")
    norm = resolve_normalization(spec.normalize, None, None) if spec and spec.normalize else resolved.normalization
    return loaded, norm, spec.feature_layer if spec else None
