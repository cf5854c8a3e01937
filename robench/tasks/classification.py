"""Classification: clean and robust accuracy of a classifier under a suite's attacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robench.config import EvalConfig, Resolved, data_options_for, resolve
from robench.data.sources import DataOptions, ImageDataset, from_arrays, load_data
from robench.errors import UsageError
from robench.evaluation import distributed
from robench.evaluation.engine import run
from robench.evaluation.precision import resolve_device
from robench.evaluation.state import RunInterrupted, RunOutcome
from robench.evaluation.queued import run_queued
from robench.evaluation.work_queue import is_queue_progress
from robench.models.loading import LoadedModel
from robench.models.wrapper import RobustModel
from robench.results.adversarial import examples_of_run
from robench.results.classification import add_saved_counts, class_names, classification_document, samples_frame
from robench.results.progress import run_key
from robench.results.result import Result
from robench.results.writers import default_run_dir
from robench.suites import LoadedSuite
from robench.tasks import Hooks
from robench.tasks.rundir import RunDirectory


class EvaluationInterrupted(KeyboardInterrupt):
    """The run was stopped; ``result`` holds what was finished (``doc["complete"]`` is False)."""

    def __init__(self, result: Result) -> None:
        super().__init__("the evaluation was interrupted")
        self.result = result


class ClassificationTask:
    name = "classification"
    queued = True  # under torchrun: a work queue that keeps a progress file (robench.evaluation.work_queue)

    def __init__(self, config: EvalConfig, resolved: Resolved | None = None) -> None:
        # Each process holds only its shard's examples; a single process keeps the first N of the whole set.
        if distributed.world()[1] > 1 and config.engine.save_adversarial is not None:
            raise UsageError("--save-adversarial is not available under torchrun; run it with a single process")
        self.config = config
        self.resolved = resolved or resolve(config)

    def resume_settings(self) -> dict[str, Any]:
        engine, resolved = self.config.engine, self.resolved
        loaded = resolved.loaded
        return {"model": loaded.sha256 or loaded.source, "arch": loaded.arch, "suite": resolved.suite.sha256,
                "data": resolved.data, "options": _key_options(self.config), "normalization": resolved.normalization,
                "device": engine.device, "batch_size": engine.batch_size, "precision": engine.precision,
                "seed": engine.seed, "compile": engine.compile, "channels_last": engine.channels_last,
                "sweep_reuse": engine.sweep_reuse,
                # Only when asked: the keys of runs without it stay as they were.
                **({"save_adversarial": engine.save_adversarial} if engine.save_adversarial is not None else {})}

    def default_dir(self) -> Path:
        return default_run_dir(self.resolved.suite.suite.name, self.resolved.loaded.name)

    def run(self, directory: RunDirectory | None, hooks: Hooks = Hooks()) -> Result:
        resume = directory.resume_state if directory else None
        saver = directory.saver(hooks.on_warning) if directory else None
        try:
            return evaluate_config(self.config, self.resolved, hooks=hooks, resume_state=resume, save_state=saver)
        except EvaluationInterrupted as stopped:
            if directory is None:
                raise
            raise directory.stopped(stopped.result, "samples", "samples") from None


def resume_key(config: EvalConfig, resolved: Resolved) -> str:
    """The key a progress file is matched by (what must be identical for a resume to be exact)."""
    return run_key(ClassificationTask(config, resolved).resume_settings())


def _key_options(config: EvalConfig) -> dict:
    # Options added later enter the key only when set: runs interrupted before they existed still resume.
    options = dict(config.data.options().__dict__)
    if options.get("interpolation") is None:
        options.pop("interpolation", None)
    return options


def evaluate_config(config: EvalConfig, resolved: Resolved | None = None, *, hooks: Hooks = Hooks(),
                    resume_state: dict | None = None, save_state: Any = None) -> Result:
    """The run behind ``robench.evaluate`` for a classification config; ``resolved`` saves loading again.

    ``save_state`` receives progress snapshots and ``resume_state`` continues from one (see
    ``robench.evaluation.engine.run``); an interruption raises ``EvaluationInterrupted`` with the partial result.
    """
    resolved = resolved or resolve(config)
    loaded, suite = resolved.loaded, resolved.suite
    norm = resolved.normalization or loaded.normalization
    # Before anything touches the mode: the loaders call .eval() and record what they found.
    was_training = handed_over_in_train_mode(loaded)
    options = data_options_for(config, resolved)
    dataset = as_dataset(resolved.data, options)
    device = distributed.local_device(resolve_device(config.engine.device))
    outcome, interrupted = _run(RobustModel(loaded.model, norm), dataset, suite, device, config, hooks,
                                resume_state, save_state)
    if was_training:
        outcome.state.sanity["model_was_training"] = True
    doc = classification_document(outcome, loaded, norm, suite, dataset, device, config.engine.precision,
                                  config.engine.seed, outcome.batch_size, resolved.data)
    examples = examples_of_run(outcome)
    add_saved_counts(doc, examples)
    result = Result(doc, _run_config(config, resolved, dataset, options, device), samples_frame(outcome), examples,
                    class_names(dataset, outcome.state.num_classes))
    if interrupted is not None:
        raise EvaluationInterrupted(result) from interrupted
    return result


def _run(model: RobustModel, dataset: ImageDataset, suite: LoadedSuite, device: torch.device, config: EvalConfig,
         hooks: Hooks, resume_state: dict | None, save_state: Any) -> tuple[RunOutcome, RunInterrupted | None]:
    """The engine over the whole set, or the work queue (torchrun, or one process resuming a torchrun job);
    an interruption's outcome too."""
    options = config.engine
    reporting = {"on_batch": hooks.on_batch, "progress": hooks.progress}
    queued = distributed.world()[1] > 1 or is_queue_progress(resume_state)
    runner = run_queued if queued else run
    try:
        return runner(model, dataset, suite.suite, options, device=device, resume_state=resume_state,
                      save_state=save_state, **reporting), None
    except RunInterrupted as exc:
        return exc.outcome, exc


def _run_config(config: EvalConfig, resolved: Resolved, dataset: ImageDataset, options: DataOptions,
                device: torch.device) -> dict[str, Any]:
    """config.json: what was asked for, as resolved (the model's source, the suite as run)."""
    loaded, suite, data, engine = resolved.loaded, resolved.suite, resolved.data, config.engine
    norm = resolved.normalization or loaded.normalization
    return {
        "model": loaded.source, "arch": loaded.arch, "normalization": norm.as_dict() if norm else None,
        "data": data if isinstance(data, str) else dataset.name, "limit": options.limit,
        "suite": suite.suite.model_dump(mode="json"), "suite_source": suite.path, "suite_overrides": suite.overrides,
        "device": str(device), "batch_size": engine.batch_size, "precision": engine.precision, "seed": engine.seed,
        **({"save_adversarial": engine.save_adversarial} if engine.save_adversarial is not None else {}),
    }


def as_dataset(data: Any, options: DataOptions) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data.subset(options.limit)
    if isinstance(data, str):
        return load_data(data, options)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else d for d in data)
        return from_arrays(x, y).subset(options.limit)
    raise TypeError("data must be a spec string, an (x, y) pair or an ImageDataset")


def handed_over_in_train_mode(loaded: LoadedModel) -> bool:
    """Train mode as handed over: recorded by the loader (which switched to eval) or still set on a module."""
    info = getattr(loaded, "info", None) or {}
    return info.get("was_training") is True or any(m.training for m in loaded.model.modules())
