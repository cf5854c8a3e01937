"""One configured evaluation into a run directory: what ``robench eval`` does, without the printing.

``prepare_run`` loads what the config names, picks classification or
re-identification, prepares the run directory and checks that a run to be
resumed was started with the same settings. ``PreparedRun.evaluate`` runs it
(an interrupted classification run leaves its partial results and raises
``Interrupted``; so does a re-identification run, by setting), ``PreparedRun.finish``
writes the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from robench.evaluation import distributed
from robench.evaluation.engine import ProgressSink
from robench.api import EvaluationInterrupted, EvaluationResult, check_no_adversarial_under_torchrun, evaluate_config
from robench.config import EvalConfig, Resolved, resolve
from robench.errors import Interrupted, RunError, UsageError
from robench.models import load_model, resolve_normalization
from robench.reid.api import ReIDEvaluationInterrupted, evaluate_reid, is_reid_spec, load_reid_spec
from robench.reid.engine import ReIDOptions
from robench.results import default_run_dir, prepare_run_dir
from robench.results.progress import PROGRESS_FILE, has_progress, load_progress, run_key, save_progress
from robench.results.tidy import tidy_frame
from robench.results.writers import write_results

Callback = Callable[[str], None]


@dataclass
class ReIDResult:
    """A finished re-identification run: its results document and the settings that made it."""

    doc: dict[str, Any]
    config: dict[str, Any]


@dataclass
class PreparedRun:
    config: EvalConfig
    resolved: Resolved
    task: str  # "classification" or "reid"
    run_dir: Path
    main: bool  # only the first process writes (torchrun)
    key: str | None = None  # the resume key of a run in a single process
    resume_state: dict | None = None
    surrogate: tuple[Any, Any, str | None] | None = None  # ReID: the loaded transfer model (see _surrogate)

    def evaluate(self, *, on_batch: Callable[[int], None] | None = None, on_step: Callback | None = None,
                 on_warning: Callback | None = None,
                 progress: ProgressSink | None = None) -> EvaluationResult | ReIDResult:
        """Run it. ``on_batch`` counts finished samples, ``on_step`` reports ReID stages, ``on_warning``
        gets problems that do not stop the run (a full disk for progress snapshots, skipped files)."""
        if self.task == "reid":
            return self._evaluate_reid(on_step, on_warning)
        saver = progress_saver(self.run_dir, self.key, on_warning) if self.key else None
        try:
            return evaluate_config(self.config, self.resolved, on_batch=on_batch, progress=progress,
                                   resume_state=self.resume_state,
                                   save_state=saver)
        except EvaluationInterrupted as stopped:
            partial = stopped.result
            raise self._stopped(partial.doc["progress"], "samples", "samples",
                                lambda: partial.save(self.run_dir)) from None

    def _stopped(self, done: dict, unit: str, first: str, save: Callable[[], None]) -> Interrupted:
        """Every task's interruption: the partial results written (first process only, and only when
        something finished or a resumed run had), and one line saying how to go on."""
        if not self.main:
            return Interrupted("interrupted")
        kept = self.key is not None and has_progress(self.run_dir)
        if not done["evaluated"] and self.resume_state is None and not kept:
            return Interrupted(f"interrupted before the first {first} finished; nothing to save "
                               f"(0 of {done['total']} {unit})")
        if not done["evaluated"]:  # attacks finished some samples, no sample has passed every attack yet
            return Interrupted(f"interrupted before the first {first} finished every attack; what the attacks "
                               f"finished is kept in {self.run_dir}/{PROGRESS_FILE}: run the same command with "
                               f"--resume {self.run_dir}")
        save()  # the progress file, where there is one, stays for --resume
        again = (f"run the same command with --resume {self.run_dir}" if self.key else
                 "not resumable: runs under torchrun keep no progress file")
        return Interrupted(f"interrupted after {done['evaluated']} of {done['total']} {unit}; partial results in "
                           f"{self.run_dir}/results.json (complete: false); {again}")

    def finish(self, result: EvaluationResult | ReIDResult) -> None:
        """Write the results (first process only); a finished run needs no progress file any more."""
        if not self.main:
            return
        if isinstance(result, ReIDResult):
            write_results(self.run_dir, result.doc, tidy_frame(result.doc), result.config)
        else:
            result.save(self.run_dir)
        (self.run_dir / PROGRESS_FILE).unlink(missing_ok=True)

    def _evaluate_reid(self, on_step: Callback | None, on_warning: Callback | None) -> ReIDResult:
        config, resolved = self.config, self.resolved
        if not isinstance(resolved.data, str) or not is_reid_spec(resolved.data):
            raise UsageError(f"suite {resolved.suite.suite.name} is for re-identification: pass --data "
                             "market1501:ROOT, dukemtmc:ROOT or reid:ROOT, or try the model example:reid-digits")
        options = reid_options(config)
        data = load_reid_spec(resolved.data, config.reid_pattern)
        if data.skipped and on_warning:
            on_warning(f"skipped {len(data.skipped)} file(s) whose names do not match the pattern "
                       "(listed in results.json)")
        surrogate, sur_norm, sur_layer = self.surrogate or _surrogate(config, resolved)
        settings = {"model": resolved.loaded.source, "arch": resolved.loaded.arch, "data": resolved.data,
                    "suite": resolved.suite.suite.model_dump(mode="json"),
                    "surrogate": surrogate.source if surrogate else None,
                    "options": {**options.__dict__, "ranks": list(options.ranks),
                                "size": list(options.size) if options.size else None},
                    "feature_layer": config.feature_layer, "flip": config.flip, "l2": config.l2,
                    "device": config.device}
        saver = progress_saver(self.run_dir, self.key, on_warning) if self.key else None
        try:
            doc = evaluate_reid(
                resolved.loaded, data, resolved.suite, normalization=resolved.normalization, options=options,
                surrogate=surrogate, surrogate_normalization=sur_norm, feature_layer=config.feature_layer,
                surrogate_layer=sur_layer, flip=config.flip, l2=config.l2, device=config.device, on_step=on_step,
                resume_state=self.resume_state, save_state=saver,
            )
        except ReIDEvaluationInterrupted as stopped:
            partial = stopped.doc
            raise self._stopped(partial["progress"], "settings", "setting",
                                lambda: write_results(self.run_dir, partial, tidy_frame(partial), settings)) from None
        return ReIDResult(doc, settings)


def run_evaluation(config: EvalConfig, *, on_batch: Callable[[int], None] | None = None,
                   on_step: Callback | None = None,
                   on_warning: Callback | None = None) -> tuple[Path, EvaluationResult | ReIDResult]:
    """Prepare, evaluate and write one run; returns its directory and its result."""
    prepared = prepare_run(config)
    result = prepared.evaluate(on_batch=on_batch, on_step=on_step, on_warning=on_warning)
    prepared.finish(result)
    return prepared.run_dir, result


def prepare_run(config: EvalConfig) -> PreparedRun:
    resolved = resolve(config)
    _check_resume_options(config)
    rank, processes, _ = distributed.world()
    main = rank == 0
    if processes > 1 and (config.resume is not None or (config.out is not None and has_progress(config.out))):
        raise UsageError("--resume is not available under torchrun; resume with a single process")
    check_no_adversarial_under_torchrun(config, processes)
    reid = (isinstance(resolved.data, str) and is_reid_spec(resolved.data)) or resolved.suite.suite.task == "reid"
    if reid and config.save_adversarial is not None:
        raise UsageError("--save-adversarial saves classification examples; it is not available for "
                         "re-identification runs")
    # Under torchrun every process evaluates its shard; only rank 0 writes anything.
    name = resolved.suite.suite.name
    run_dir = prepare_run_dir(config.resume or config.out or default_run_dir(name, resolved.loaded.name)) if main \
        else Path(".")
    if reid:
        return _prepare_reid(config, resolved, run_dir, main and processes == 1, main)
    if not (main and processes == 1):
        return PreparedRun(config, resolved, "classification", run_dir, main)
    key = resume_key(config, resolved)
    state = load_progress(run_dir, key) if has_progress(run_dir) else None
    return PreparedRun(config, resolved, "classification", run_dir, main, key, state)


def _prepare_reid(config: EvalConfig, resolved: Resolved, run_dir: Path, single: bool, main: bool) -> PreparedRun:
    """A ReID run resumes by setting; the surrogate is loaded now, as its checkpoint is part of the key."""
    if not single:
        return PreparedRun(config, resolved, "reid", run_dir, main)
    surrogate = _surrogate(config, resolved)
    key = reid_resume_key(config, resolved, surrogate[0])
    state = load_progress(run_dir, key) if has_progress(run_dir) else None
    return PreparedRun(config, resolved, "reid", run_dir, main, key, state, surrogate)


def reid_resume_key(config: EvalConfig, resolved: Resolved, surrogate: Any = None) -> str:
    """Everything that must be identical for a resumed ReID run to equal an uninterrupted one.

    ``task`` keeps it apart from every classification key; DataLoader workers do not change results.
    """
    loaded = resolved.loaded
    options = {k: v for k, v in reid_options(config).__dict__.items() if k != "workers"}
    return run_key({"task": "reid", "model": loaded.sha256 or loaded.source, "arch": loaded.arch,
                    "suite": resolved.suite.sha256, "data": resolved.data, "reid_pattern": config.reid_pattern,
                    "options": options, "normalization": resolved.normalization,
                    "surrogate": (surrogate.sha256 or surrogate.source, surrogate.arch) if surrogate else None,
                    "feature_layer": config.feature_layer, "flip": config.flip, "l2": config.l2,
                    "device": config.device, "seed": config.seed})


def _check_resume_options(config: EvalConfig) -> None:
    if config.resume is not None and config.out is not None and config.resume != config.out:
        raise UsageError("give either --resume DIR or --out DIR")
    if config.resume is not None and not has_progress(config.resume):
        raise UsageError(f"{config.resume} holds no interrupted run to resume")


def resume_key(config: EvalConfig, resolved: Resolved) -> str:
    """Everything that must be identical for a resumed run to equal an uninterrupted one."""
    loaded = resolved.loaded
    return run_key({"model": loaded.sha256 or loaded.source, "arch": loaded.arch, "suite": resolved.suite.sha256,
                    "data": resolved.data, "options": _key_options(config),
                    "normalization": resolved.normalization, "device": config.device,
                    "batch_size": config.batch_size, "precision": config.precision, "seed": config.seed,
                    "compile": config.compile, "channels_last": config.channels_last,
                    "sweep_reuse": config.sweep_reuse,
                    # Only when asked: the keys of runs without it stay as they were.
                    **({"save_adversarial": config.save_adversarial} if config.save_adversarial is not None else {})})


def _key_options(config: EvalConfig) -> dict:
    # Options added later enter the key only when set: runs interrupted before they existed still resume.
    options = dict(config.data_options().__dict__)
    if options.get("interpolation") is None:
        options.pop("interpolation", None)
    return options


def progress_saver(run_dir: Path, key: str, warn: Callback | None = None) -> Callable[[dict], None]:
    """Snapshots go to disk as the run goes; a full disk is a warning there, not the end of the run.

    The last good progress file stays in place (writes are atomic), and the
    results are still in memory: if space is freed, the final write succeeds.
    """
    warned = False

    def save(state: dict) -> None:
        nonlocal warned
        try:
            save_progress(run_dir, state, key)
        except RunError as exc:
            if not warned and warn:
                warn(str(exc))
            warned = True

    return save


def reid_options(config: EvalConfig) -> ReIDOptions:
    return ReIDOptions(metric=config.distance, ranks=config.ranks, ap=config.ap, denominator=config.denominator,
                       rerank=config.rerank, perturb=config.perturb, size=config.image_size,
                       batch_size=config.reid_batch_size(), workers=config.workers, seed=config.seed)


def _surrogate(config: EvalConfig, resolved: Resolved) -> tuple[Any, Any, str | None]:
    """The transfer attacks' model: --surrogate over the suite's ``surrogate:`` block."""
    spec = resolved.suite.suite.surrogate
    if not (config.surrogate or spec):
        return None, None, None
    path = config.surrogate or spec.model
    arch = config.surrogate_arch or (spec.arch if spec else None)
    classes = config.surrogate_num_classes or (spec.num_classes if spec else None)
    # Same rule as the target: TorchScript and pickled modules need --trust-checkpoint.
    loaded = load_model(path, arch=arch, num_classes=classes, trust_checkpoint=config.trust_checkpoint,
                        arch_option="--surrogate-arch (or surrogate.arch in the suite)")
    norm = resolve_normalization(spec.normalize, None, None) if spec and spec.normalize else resolved.normalization
    return loaded, norm, spec.feature_layer if spec else None
