"""The public Python API: ``robench.evaluate(model, data, suite)``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robench.data.sources import DataOptions, ImageDataset, from_arrays, load_data
from robench.evaluation import distributed
from robench.evaluation.engine import ProgressSink, dataset_fingerprint, run
from robench.metrics import MetricCollection
from robench.evaluation.state import RunInterrupted, RunOutcome, merge_shards
from robench.config import EvalConfig, Resolved, data_option_fields, data_options_for, resolve
from robench.errors import UsageError
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.models.wrapper import RobustModel
from robench.evaluation.precision import resolve_device
from robench.results.document import SCHEMA, data_block, env_block, header, model_block, suite_block
from robench.results.tidy import pixels_text, tidy_frame
from robench.evaluation.sanity import named_flags
from robench.results.writers import write_run
from robench.results.adversarial import SavedExamples, examples_of_run, rounding_warning, saved_summaries
from robench.reporting.adversarial_grid import save_examples
from robench.suites import LoadedSuite, Suite


@dataclass
class EvaluationResult:
    doc: dict[str, Any]
    samples: pd.DataFrame
    config: dict[str, Any]
    # --save-adversarial: one per entry, written to adversarial/ by ``save`` (empty when not asked)
    adversarial: list[SavedExamples] = field(default_factory=list)
    class_names: list[str] | None = None  # the data's class names, for the example grids

    @property
    def clean_accuracy(self) -> float:
        return self.doc["clean"]["accuracy"]

    @property
    def robust_accuracy(self) -> float | None:
        return self.doc["robust_accuracy"]

    def tidy(self) -> pd.DataFrame:
        """The rows of results.csv: one per value, the columns ``robench compare`` reads."""
        return tidy_frame(self.doc)

    # A notebook shows a result by its repr: the numbers a person looks for, not the whole
    # document, the samples frame and the config (kilobytes); those stay one attribute away.
    def __repr__(self) -> str:
        doc = self.doc
        robust = doc.get("robust_accuracy")
        worst = "n/a" if robust is None else f"{100 * robust:.2f}%"
        partial = "" if doc.get("complete", True) else ", partial"
        return (f"EvaluationResult(model={doc['model'].get('name')!r}, suite={doc['suite'].get('name')!r}, "
                f"n={doc['clean']['n']}, clean={100 * doc['clean']['accuracy']:.2f}%, worst={worst}, "
                f"entries={len(doc['attacks'])}{partial})")

    def _repr_html_(self) -> str:
        import html

        rows = [("clean", "", self.doc["clean"]["accuracy"])]
        rows += [(a["label"], _setting_text(a), a["accuracy"]) for a in self.doc["attacks"]]
        cells = "".join(f"<tr><td>{html.escape(str(label))}</td><td>{html.escape(setting)}</td>"
                        f"<td style='text-align:right'>{100 * acc:.2f}</td></tr>" for label, setting, acc in rows)
        return (f"<p>{html.escape(repr(self))}</p><table><thead><tr><th>attack</th><th>setting</th>"
                f"<th>accuracy %</th></tr></thead><tbody>{cells}</tbody></table>")

    def to_json(self) -> str:
        return json.dumps(self.doc, indent=2)

    def rounding_warnings(self) -> list[str]:
        """One line per entry whose saved 8-bit examples lost some of the run's successes (``robench eval``
        prints them); empty without ``save_adversarial``."""
        lines = [rounding_warning(f"{a['label']} {_setting_text(a)}".strip(), a["saved_examples"])
                 for a in self.doc["attacks"] if a.get("saved_examples")]
        return [line for line in lines if line]

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write results.json, samples.csv and the tidy table into ``directory``.

        A complete results.json already there is kept unless ``overwrite=True``, as the CLI
        never overwrites a run; partial results (an interrupted run) are replaced.
        """
        from robench.results.progress import finished

        path = Path(directory)
        if not overwrite and finished(path):
            raise UsageError(f"{path} already holds a complete results.json; choose another directory "
                             "or pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        if self.adversarial:  # before results.json: its presence means every file is there
            save_examples(path, self.adversarial, self.class_names)
        write_run(path, self.doc, self.samples, self.config)
        return path


def _setting_text(entry: dict[str, Any]) -> str:
    """eps as the suite wrote it, or the pixel count of an entry that sweeps pixels."""
    params = entry.get("params") or {}
    if entry.get("eps") is not None:
        return f"eps {params.get('eps_expr') or format(entry['eps'], 'g')}"
    return pixels_text(params.get("pixels"))


def _as_dataset(data: Any, options: DataOptions) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data.subset(options.limit)
    if isinstance(data, str):
        return load_data(data, options)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else d for d in data)
        return from_arrays(x, y).subset(options.limit)
    raise TypeError("data must be a spec string, an (x, y) pair or an ImageDataset")


def evaluate(
    model: nn.Module | LoadedModel | str,
    data: Any,
    suite: str | Suite | LoadedSuite | dict,
    *,
    eps: float | str | Sequence[float | str] | None = None,
    norm: str | None = None,
    normalization: Normalization | str | None = None,
    device: str = "auto",
    batch_size: int | str = 256,
    precision: str = "fp32",
    seed: int = 0,
    limit: int | None = None,
    workers: int = 0,
    data_options: DataOptions | None = None,
    on_batch: Callable[[int], None] | None = None,
    extra_config: dict[str, Any] | None = None,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    save_every: float = 10.0,
    compile: str = "auto",
    compile_backend: str = "inductor",
    channels_last: bool = False,
    sweep_reuse: bool = False,
    refill: bool = True,
    trust_checkpoint: bool = False,
    plugins: tuple[str, ...] | list[str] = (),
    save_adversarial: int | str | None = None,
) -> EvaluationResult:
    """Evaluate ``model`` on ``data`` under every attack of ``suite``.

    ``data`` is a spec (``npz:file.npz``, ``cifar10``, ``example:digits``), an
    ``(x, y)`` pair (uint8 NHWC or float NCHW in [0,1]) or an ``ImageDataset``.
    The model sees images in [0,1]; pass ``normalization`` (a preset name or
    ``Normalization``) if it expects normalised input; without one, the suite's
    suggestion applies, then the model's own. ``save_state`` receives
    progress snapshots and ``resume_state`` continues from one (see ``engine.run``);
    an interrupted run raises ``EvaluationInterrupted`` holding the partial result.
    ``trust_checkpoint`` lets a ``model`` path that is a program (TorchScript, a pickled
    module) load, which runs code from the file. ``plugins`` are modules that register
    attacks (imported first; a suite's ``plugins:`` may name them). ``refill`` (continuous
    batching) changes the speed, never the results. ``eps`` (a number, an expression such as
    ``"8/255"``, or a list of them) and ``norm`` (``"linf"`` or ``"l2"``) replace those of every
    suite entry that has an eps budget, as ``--eps``/``--norm`` do. ``save_adversarial`` (a number of
    samples, or 0 or ``"all"``) keeps the first samples' adversarial examples as 8-bit images in
    ``result.adversarial``; ``result.save`` writes them to ``adversarial/``. The options are validated as an
    ``EvalConfig`` (a bad value raises ``UsageError``); no argument is changed.
    """
    data_fields = data_option_fields(data_options or DataOptions())
    if limit is not None:
        data_fields["limit"] = limit
    config = EvalConfig(
        model=model, data=data, suite=suite, eps=eps, norm=norm, normalize=normalization, device=device,
        batch_size=batch_size, precision=precision, seed=seed, workers=workers, save_every=save_every, compile=compile,
        compile_backend=compile_backend, channels_last=channels_last, sweep_reuse=sweep_reuse, refill=refill,
        trust_checkpoint=trust_checkpoint, plugins=tuple(plugins), save_adversarial=save_adversarial, **data_fields,
    )
    return evaluate_config(config, on_batch=on_batch, extra_config=extra_config, resume_state=resume_state,
                           save_state=save_state)


def evaluate_config(
    config: EvalConfig,
    resolved: Resolved | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
    progress: ProgressSink | None = None,
    extra_config: dict[str, Any] | None = None,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
) -> EvaluationResult:
    """``evaluate`` for a validated config; ``resolved`` saves loading the model and suite again.

    ``on_batch(samples)`` and ``progress`` report progress (see ``robench.evaluation.engine.run``).
    """
    resolved = resolved or resolve(config)
    loaded, loaded_suite, data = resolved.loaded, resolved.suite, resolved.data
    norm = resolved.normalization or loaded.normalization
    # Before anything touches the mode: the loaders call .eval() and record what they found.
    was_training = handed_over_in_train_mode(loaded)
    wrapped = RobustModel(loaded.model, norm)
    options = data_options_for(config, resolved)
    dataset = _as_dataset(data, options)
    dev = distributed.local_device(resolve_device(config.device))
    batch_size, precision, seed = config.batch_size, config.precision, config.seed
    run_options = {"batch_size": batch_size, "precision": precision, "seed": seed, "workers": config.workers,
                   "on_batch": on_batch, "progress": progress, "compile": config.compile, "compile_backend": config.compile_backend,
                   "channels_last": config.channels_last, "sweep_reuse": config.sweep_reuse, "refill": config.refill,
                   "save_adversarial": config.save_adversarial}
    interrupted = None
    rank, size, _ = distributed.world()
    check_no_adversarial_under_torchrun(config, size)
    try:
        if size > 1:
            outcome = _run_sharded(wrapped, dataset, loaded_suite, dev, rank, size, **run_options)
        else:
            outcome = run(wrapped, dataset, loaded_suite.suite, device=dev, resume_state=resume_state,
                          save_state=save_state, save_every=config.save_every, **run_options)
    except RunInterrupted as exc:
        outcome, interrupted = exc.outcome, exc
    if was_training:
        outcome.state.sanity["model_was_training"] = True
    doc = _document(outcome, loaded, norm, loaded_suite, dataset, dev, precision, seed, outcome.batch_size, data)
    run_config = {
        "model": loaded.source, "arch": loaded.arch, "normalization": norm.as_dict() if norm else None,
        "data": data if isinstance(data, str) else dataset.name, "limit": options.limit,
        "suite": loaded_suite.suite.model_dump(mode="json"), "suite_source": loaded_suite.path,
        "suite_overrides": loaded_suite.overrides,
        "device": str(dev), "batch_size": batch_size, "precision": precision, "seed": seed,
        **({"save_adversarial": config.save_adversarial} if config.save_adversarial is not None else {}),
        **(extra_config or {}),
    }
    examples = examples_of_run(outcome)
    _add_saved_counts(doc, examples)
    result = EvaluationResult(doc, _samples(outcome), run_config, examples,
                              _class_names(dataset, outcome.state.num_classes))
    if interrupted is not None:
        raise EvaluationInterrupted(result) from interrupted
    return result


def _add_saved_counts(doc: dict[str, Any], examples: list[SavedExamples]) -> None:
    """``saved_examples`` on each attack entry of a run that saved examples (other documents are unchanged):
    ``file`` (the npz, relative to the run directory), ``n`` saved samples, ``attacked`` among them,
    ``fooled_run`` (the run's successes there: what ``adversarial_float`` reproduces), ``fooled_8bit``
    (attacked samples whose 8-bit image is misclassified) and ``undone_8bit`` (run successes the 8-bit
    image loses)."""
    for entry, saved in zip(doc["attacks"], saved_summaries(examples)):  # both in entry order
        entry["saved_examples"] = saved


def check_no_adversarial_under_torchrun(config: EvalConfig, processes: int) -> None:
    # Each process holds only its shard's examples; a single process keeps the first N of the whole set.
    if processes > 1 and config.save_adversarial is not None:
        raise UsageError("--save-adversarial is not available under torchrun; run it with a single process")


def _class_names(dataset: ImageDataset, num_classes: int) -> list[str] | None:
    """The data's class names (torchvision datasets have them), when they fit the model's classes."""
    names = getattr(dataset.base, "classes", None)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return None
    return list(names) if len(names) == num_classes else None


def handed_over_in_train_mode(loaded: LoadedModel) -> bool:
    """Train mode as handed over: recorded by the loader (which switched to eval) or still set on a module."""
    info = getattr(loaded, "info", None) or {}
    return info.get("was_training") is True or any(m.training for m in loaded.model.modules())


class EvaluationInterrupted(KeyboardInterrupt):
    """The run was stopped; ``result`` holds what was finished (``doc["complete"]`` is False)."""

    def __init__(self, result: EvaluationResult) -> None:
        super().__init__("the evaluation was interrupted")
        self.result = result


def _run_sharded(model: RobustModel, dataset: ImageDataset, suite: LoadedSuite, device: torch.device, rank: int,
                 size: int, **options: Any) -> RunOutcome:
    """This process's exact share of the data, then everyone's results merged in index order."""
    start, stop = distributed.shard_bounds(len(dataset), rank, size)
    shard = ImageDataset(dataset.base, dataset.name, dataset.indices[start:stop])
    with distributed.process_group(device):
        outcome = run(model, shard, suite.suite, device=device, **options)
        gathered = distributed.gather({"state": outcome.state.state_dict(), "seconds": outcome.seconds})
    # Only rank 0 writes results: only it reads the whole dataset again for the fingerprint.
    fingerprint = dataset_fingerprint(dataset, outcome.batch_size) if rank == 0 else ""
    return merge_shards(outcome, gathered, fingerprint, len(dataset))


def _document(outcome: RunOutcome, loaded: LoadedModel, norm: Normalization | None, suite: LoadedSuite,
              dataset: ImageDataset, device: torch.device, precision: str, seed: int, batch_size: int,
              data: Any) -> dict[str, Any]:
    state = outcome.state
    attacks = [_attack_entry(e, counts, suite, outcome) for e, counts in outcome.with_entries()]
    accs = [a["accuracy"] for a in attacks if a["accuracy"] is not None]
    robust_all = state.robust_all()
    # No sample finished yet (interrupted during the first segment): no accuracy, not NaN.
    robust = float(robust_all.mean()) if robust_all is not None and len(robust_all) else None
    return {
        **header(SCHEMA, "classification", outcome.complete),
        "progress": {"evaluated": state.n, "total": outcome.total},
        "model": model_block(loaded, num_classes=state.num_classes, normalization=norm, **loaded.provenance()),
        "suite": suite_block(suite.suite.name, suite.path, suite.sha256, eps_space=suite.suite.eps_space,
                             overrides=suite.overrides),
        "data": data_block({"spec": data if isinstance(data, str) else dataset.name, "n": state.n},
                           outcome.fingerprint, {"skipped": dataset.skipped, "converted": dataset.converted}),
        "clean": {"accuracy": state.clean.compute(), "n": state.clean.total, "correct": state.clean.correct},
        "attacks": attacks,
        "robust_accuracy": robust,
        "mean_attack_accuracy": sum(accs) / len(accs) if accs else None,
        "sanity": _sanity(outcome, attacks),
        "env": env_block(device, precision=precision, seed=seed, batch_size=batch_size,
                         checkpoint_sha256=loaded.sha256, processes=distributed.world()[1], speed=outcome.speed,
                         suite_sha256=suite.sha256, dataset_fingerprint=outcome.fingerprint,
                         seconds=outcome.seconds),
    }


def _attack_entry(e: Any, counts: MetricCollection, suite: LoadedSuite, outcome: RunOutcome) -> dict[str, Any]:
    has_gradient = outcome.state.sanity.get("input_gradient", True) is not False
    return {
        "attack": e.attack.name,
        "label": e.spec.display_name(),
        "norm": e.attack.norm,
        "eps": e.eps,
        "eps_space": suite.suite.eps_space,
        "accuracy": counts.accuracy.compute(),
        "success_rate": counts.fooled.compute(),
        "n": counts.accuracy.total,
        "attacked": counts.fooled.total,
        "params": e.params(),
        "seconds": round(counts.seconds.compute(), 4),
        "gradient_evals": counts.gradient_evals.compute(),
        "peak_memory_bytes": counts.peak_memory.compute(),
        "attack_chunk": counts.chunk.compute(),
        # Gradient attacks on a model without an input gradient take no step: an upper bound.
        "input_gradient": has_gradient if e.attack.family == "gradient" else None,
        **({"parts": _parts_log(e.attack.parts(), counts)} if e.attack.parts() else {}),
    }


def _parts_log(parts: list[str], counts: MetricCollection) -> list[dict[str, Any]]:
    """A composite attack's log (AutoAttack's): per part, the points it broke first and the accuracy after it."""
    found = counts.found_by.compute()
    n = counts.accuracy.total
    broken = [int((found == k).sum()) for k in range(len(parts))]
    robust = counts.accuracy.correct
    log = []
    for k, name in enumerate(parts):
        # Robust after part k: robust at the end, plus what the later parts broke.
        after = robust + sum(broken[k + 1:])
        log.append({"attack": name, "broken": broken[k], "accuracy_after": after / n if n else None})
    return log


def _sanity(outcome: RunOutcome, attacks: list[dict[str, Any]]) -> dict[str, Any]:
    report = {**outcome.state.sanity, "nonfinite_logits": outcome.state.nonfinite}
    named = named_flags(report, attacks)
    report["flags"] = [message for _, message in named]
    report["flag_names"] = [name for name, _ in named]  # aligned with flags; stable for gates
    return report


def _samples(outcome: RunOutcome) -> pd.DataFrame:
    state = outcome.state
    labels, pred = state.per_sample("labels"), state.per_sample("pred")
    frame = {"index": state.per_sample("index"), "label": labels, "clean_pred": pred, "clean_correct": pred == labels}
    for e, counts in outcome.with_entries():
        column = f"[{e.index}]:{e.spec.display_name()}@{e.eps_text}"
        frame[f"robust{column}"] = counts.robust.compute().numpy().astype(bool)
        parts = e.attack.parts()
        if parts:  # the part that broke each sample ("" where none did)
            names = np.array(["", *parts], dtype=object)
            frame[f"found_by{column}"] = names[counts.found_by.compute().numpy().astype(np.int64) + 1]
    robust_all = state.robust_all()
    if robust_all is not None:
        frame["robust_all"] = robust_all
    return pd.DataFrame(frame)
