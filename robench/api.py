"""The public Python API: ``robench.evaluate(model, data, suite, **options) -> Result`` for every task."""

from __future__ import annotations

from typing import Any

from torch import nn

from robench.config import EvalConfig
from robench.data.config import DataConfig
from robench.data.sources import DataOptions
from robench.errors import UsageError
from robench.models.loading import LoadedModel
from robench.results.result import Result
from robench.suites import LoadedSuite, Suite
from robench.tasks import Hooks, normalize_option
from robench.tasks.classification import EvaluationInterrupted
from robench.tasks.reid import ReIDEvaluationInterrupted
from robench.tasks.run import eval_task

__all__ = ["EvaluationInterrupted", "ReIDEvaluationInterrupted", "Result", "config_for", "evaluate"]

TASKS = ("classification", "reid", "pixel-index", "attack-check", "certify")


def evaluate(model: nn.Module | LoadedModel | str, data: Any = None,
             suite: str | Suite | LoadedSuite | dict | None = None, *, task: str | None = None,
             **options: Any) -> Result:
    """Evaluate ``model`` on ``data``: a suite's attacks (classification or re-identification), or the
    Pixel-index of a folder of images (``task="pixel-index"``), or the attack check of a suite
    (``task="attack-check"``: whether each attack solves test problems built to have a solution; its
    own options are ``samples``, ``inner_points``, ``readout`` and ``pass_threshold``), or the certified
    accuracy of the model smoothed with Gaussian noise (``task="certify"``: ``sigma`` required, ``n0``, ``n``,
    ``alpha``, ``radii``; no suite).

    ``data`` is a spec (``npz:file.npz``, ``cifar10``, ``example:digits``, ``market1501:ROOT``), an
    ``(x, y)`` pair (uint8 NHWC or float NCHW in [0,1]) or an ``ImageDataset``; for the Pixel-index, a
    folder. The task follows from the data and the suite (a ReID data spec or a ``task: reid`` suite
    is re-identification) unless ``task`` names it. ``options`` are those of ``robench eval``, named as
    ``EvalConfig``'s fields (``eps``, ``norm``, ``normalize`` or ``normalization``, ``device``,
    ``batch_size``, ``limit``, ``seed``, ``save_adversarial``, ``bpda``, ``distance``, ``surrogate``, ...; a
    ``DataOptions`` as ``data_options``), or of ``robench pixel-index`` for that task. A bad value
    raises ``UsageError``; no argument is changed. Ctrl-C raises ``EvaluationInterrupted`` (or
    ``ReIDEvaluationInterrupted``) holding the partial ``Result``.
    """
    if task is not None and task not in TASKS:
        raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "pixel-index":
        from robench.tasks.pixel_index import pixel_index

        if suite is not None:
            raise UsageError("the Pixel-index takes no suite: pass pixels=[...] and the other options")
        return pixel_index(model, data, **options)
    if task == "attack-check":
        from robench.tasks.attack_check import AttackCheckConfig, AttackCheckTask

        check = AttackCheckConfig.of(evaluation=config_for(model, data, suite, **_without_check_fields(options)),
                                     **_check_fields(options))
        return AttackCheckTask(check).run(None, Hooks())
    if task == "certify":
        from robench.tasks.certify import certify

        if suite is not None:
            raise UsageError("certification takes no suite: pass sigma=... and the other options")
        return certify(model, data, **options)
    chosen = eval_task(config_for(model, data, suite, **options))
    if task is not None and chosen.name != task:
        raise UsageError(f"this data and suite make a {chosen.name} run, not {task}")
    return chosen.run(None, Hooks())


def config_for(model: nn.Module | LoadedModel | str, data: Any = None,
               suite: str | Suite | LoadedSuite | dict | None = None, *, normalization: Any = None,
               data_options: DataOptions | None = None, **options: Any) -> EvalConfig:
    """The validated ``EvalConfig`` that ``evaluate`` builds from its arguments."""
    options = normalize_option(options, normalization)
    if data_options is not None:  # the base; data options given by name still win
        given = DataConfig.of(None, data_options).model_dump(exclude={"source"})
        options = {"data_root": given.pop("root"), **given, **options}
    return EvalConfig.of(model=model, data=data, suite=suite if suite is not None else "pgd-linf", **options)


def _check_fields(options: dict[str, Any]) -> dict[str, Any]:
    from robench.tasks.attack_check import CHECK_FIELDS

    return {name: value for name, value in options.items() if name in CHECK_FIELDS}


def _without_check_fields(options: dict[str, Any]) -> dict[str, Any]:
    from robench.tasks.attack_check import CHECK_FIELDS

    return {name: value for name, value in options.items() if name not in CHECK_FIELDS}
