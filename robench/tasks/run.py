"""One evaluation config to its task, and a task into its run directory: what ``robench eval`` runs."""

from __future__ import annotations

from pathlib import Path

from robench.config import EvalConfig, Resolved, resolve
from robench.results.result import Result
from robench.tasks import Hooks, Task
from robench.tasks.classification import ClassificationTask
from robench.tasks.reid import ReIDTask, is_reid_config
from robench.tasks.rundir import RunDirectory


def eval_task(config: EvalConfig, resolved: Resolved | None = None) -> ClassificationTask | ReIDTask:
    """Classification or re-identification, as the data and the suite say."""
    resolved = resolved or resolve(config)
    if is_reid_config(config, resolved):
        return ReIDTask(config, resolved)
    return ClassificationTask(config, resolved)


def open_run_directory(task: Task, out: Path | None = None, resume: Path | None = None) -> RunDirectory:
    return RunDirectory.open(task.resume_settings(), task.default_dir, out=out, resume=resume,
                             queued=getattr(task, "queued", False))


def run_evaluation(config: EvalConfig, hooks: Hooks = Hooks()) -> tuple[Path, Result]:
    """Evaluate into a run directory (``config.output``'s or a new one); returns it and the result."""
    task = eval_task(config)
    directory = open_run_directory(task, config.output.out, config.output.resume)
    result = task.run(directory, hooks)
    directory.finish(result)
    return directory.path, result
