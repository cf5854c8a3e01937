"""The attack check (``robench check-attack``): is each attack of a suite strong enough for this model?

For every gradient, query or external entry of the suite and each of its eps, the check builds one
two-class problem per test point on the model's own features, in which an adversarial example within
eps is known to exist (:mod:`robench.evaluation.binarization`), and runs the entry's attack on them
through the ordinary evaluation engine. The share of problems solved is the entry's pass rate: below
the threshold, the attack is too weak for this model and its robust accuracy is not evidence of
robustness. A pass is evidence of strength, not proof of robustness: it says the attack finds an
adversarial example where a linear readout of these features offers one.

Points are the first clean-correct samples of the data (after ``--limit``) that lie more than two
radii apart, so every attacked input belongs to exactly one problem. The run folder, its lock, the
progress file (a finished check is never run again on ``--resume``) and the interruption message are
the run directory's, as for every task.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from pydantic import field_validator

from robench.config import EvalConfig, Resolved, data_options_for, resolve
from robench.errors import UsageError
from robench.evaluation.binarization import GAP, PROBES, Construction, Problems, binarized, build_problems, \
    readout_layer
from robench.evaluation.entries import Entry, build_entries
from robench.evaluation.precision import resolve_device
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.results.attack_check import attack_check_document
from robench.results.result import Result
from robench.results.writers import default_run_dir
from robench.suites import AttackSpec
from robench.tasks import Hooks
from robench.tasks.classification import ClassificationTask, EvaluationInterrupted, as_dataset, evaluate_config
from robench.tasks.rundir import RunDirectory
from robench.validated import Options, check_range

CHECKED_FAMILIES = ("gradient", "query", "external")
# AutoAttack's members that need more than two classes (DLR losses): the test problems have two.
MANY_CLASS_MEMBERS = ("apgd-t", "apgd-dlr")
CHECK_FIELDS = ("samples", "inner_points", "readout", "pass_threshold")
MAX_SAMPLES = 100_000
MAX_INNER_POINTS = 1_000_000  # a million forward passes per problem: beyond any sensible check


class AttackCheckConfig(Options):
    """One attack check: an evaluation's options (model, data, suite, engine) and how problems are built."""

    evaluation: EvalConfig
    samples: int = 50
    inner_points: int = 999
    readout: str | None = None
    pass_threshold: float = 0.95

    @field_validator("samples")
    @classmethod
    def _samples(cls, value: int) -> int:
        check_range("--samples", value, 1, MAX_SAMPLES)
        return value

    @field_validator("inner_points")
    @classmethod
    def _inner_points(cls, value: int) -> int:
        check_range("--inner-points", value, 1, MAX_INNER_POINTS)
        return value

    @field_validator("pass_threshold")
    @classmethod
    def _pass_threshold(cls, value: float) -> float:
        check_range("--pass-threshold", value, 0, 1)
        return value

    @classmethod
    def of(cls, **options: Any) -> "AttackCheckConfig":
        """From flat options: ``samples``, ``inner_points``, ``readout``, ``pass_threshold`` and every option
        of ``robench eval`` (``EvalConfig.of``); ``evaluation=EvalConfig(...)`` gives that part whole."""
        own = {name: options.pop(name) for name in CHECK_FIELDS if name in options}
        evaluation = options.pop("evaluation", None) or EvalConfig.of(**options)
        return cls(evaluation=evaluation, **own)


class AttackCheckTask:
    name = "attack-check"

    def __init__(self, config: AttackCheckConfig, resolved: Resolved | None = None) -> None:
        self.config = config
        self.resolved = resolved or resolve(config.evaluation)
        if self.resolved.suite.suite.eps_space != "pixel":
            raise UsageError("the attack check takes suites with eps in pixel units (eps_space: pixel)")

    def resume_settings(self) -> dict[str, Any]:
        check = self.config.model_dump(include=set(CHECK_FIELDS))
        return {**ClassificationTask(self.config.evaluation, self.resolved).resume_settings(), "check": check}

    def default_dir(self) -> Path:
        return default_run_dir(f"{self.resolved.suite.suite.name}-check", self.resolved.loaded.name)

    def run(self, directory: RunDirectory | None, hooks: Hooks = Hooks()) -> Result:
        checker = _Checker(self.config, self.resolved, hooks)
        done = (directory.resume_state or {}).get("checks", []) if directory else []
        save = directory.saver(hooks.on_warning) if directory else None
        try:
            checker.run(done, save)
        except KeyboardInterrupt:  # inside an attack (the engine's EvaluationInterrupted) or between checks
            partial = checker.result(complete=False)
            if directory is None:
                raise EvaluationInterrupted(partial) from None
            raise directory.stopped(partial, "checks", "check") from None
        return checker.result(complete=True)


class _Checker:
    """The state of one check as it runs: the chosen points, the rows finished, the per-sample table."""

    def __init__(self, config: AttackCheckConfig, resolved: Resolved, hooks: Hooks) -> None:
        self.config, self.resolved, self.hooks = config, resolved, hooks
        self.started = time.perf_counter()
        engine = config.evaluation.engine
        self.device = resolve_device(engine.device)
        self.batch_size = 256 if engine.batch_size == "auto" else int(engine.batch_size)
        loaded = resolved.loaded
        self.normalization = resolved.normalization or loaded.normalization
        self.model = RobustModel(loaded.model, self.normalization).to(self.device)
        self.layer_name, self.layer = readout_layer(loaded.model, config.readout)
        self.entries = build_entries(resolved.suite.suite, self.model, engine.seed)
        self.checks: list[dict[str, Any]] = []
        self.rows: list[list[dict[str, Any]]] = []  # per check, its per-sample rows
        self.features = 0
        self.points, self.ids, self.data_name = self._choose_points()

    # -- choosing the points --------------------------------------------------------------------------------
    def _choose_points(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The first clean-correct samples more than two radii apart (the largest eps checked)."""
        evaluation = self.config.evaluation
        dataset = as_dataset(self.resolved.data, data_options_for(evaluation, self.resolved))
        radius = max([float(e.eps or 0.0) for e in self.entries if _checkable(e) is None] or [0.0])
        reach = 2 * radius / float(self.model.std.min()) * (1 + 1e-3) + 1e-6
        kept_x: list[torch.Tensor] = []
        kept_ids: list[int] = []
        kept_seen = torch.zeros(0, 0)
        with evaluation_mode(self.model), torch.no_grad():
            for start in range(0, len(dataset), self.batch_size):
                items = [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]
                x = torch.stack([item[0] for item in items]).to(self.device)
                y = torch.tensor([item[1] for item in items], device=self.device)
                correct = self.model(x).argmax(dim=1) == y
                seen = self.model.normalize(x).flatten(1).cpu()
                for row in torch.nonzero(correct).squeeze(1).tolist():
                    if len(kept_ids) and float(torch.cdist(seen[row:row + 1], kept_seen, p=math.inf).min()) <= reach:
                        continue
                    kept_x.append(x[row])
                    kept_ids.append(items[row][2])
                    kept_seen = torch.cat([kept_seen.view(-1, seen.shape[1]), seen[row:row + 1]])
                    if len(kept_ids) == self.config.samples:
                        break
                if len(kept_ids) == self.config.samples:
                    break
        if not kept_ids:
            raise UsageError("the model classifies none of these samples correctly: nothing to build problems on")
        return torch.stack(kept_x), torch.tensor(kept_ids), dataset.name

    # -- running the checks ---------------------------------------------------------------------------------
    def run(self, done: list[dict[str, Any]], save: Callable[[dict], None] | None) -> None:
        # A saved check carries its per-sample rows; they are kept apart until the table is built.
        self.checks = [{k: v for k, v in check.items() if k != "rows"} for check in done]
        self.rows = [list(check.get("rows", [])) for check in done]
        problems: dict[tuple[str, float], Problems] = {}
        for entry in self.entries[len(done):]:
            reason = _checkable(entry)
            if reason is not None:
                self._say(f"skipping {entry.spec.display_name()}: {reason}")
                self._record(self._skipped(entry, reason), [], save)
                continue
            key = (entry.spec.norm, float(entry.eps))  # type: ignore[arg-type]  # checkable: has an eps
            if key not in problems:  # built once per threat model, whichever entries share it
                self._say(f"building {len(self.points)} problems at {key[0]} eps {entry.eps_text}")
                problems[key] = self._build(*key)
            check, rows = self._check(entry, problems[key])
            self._record(check, rows, save)

    def _record(self, check: dict[str, Any], rows: list[dict[str, Any]], save: Callable[[dict], None] | None) -> None:
        self.checks.append(check)
        self.rows.append(rows)
        if save is not None:  # a finished check is never run again on --resume
            save({"checks": [{**c, "rows": r} for c, r in zip(self.checks, self.rows)]})

    def _build(self, norm: str, eps: float) -> Problems:
        construction = Construction(norm, eps, self.config.inner_points, GAP, PROBES,
                                    self.config.evaluation.engine.seed)
        with evaluation_mode(self.model):
            built = build_problems(self.model, self.layer, self.points, self.ids, construction, self.batch_size)
        self.features = int(built.weight.shape[2])
        built.built &= self._answers_inner(built)
        return built

    def _check(self, entry: Entry, problems: Problems) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        usable = problems.built
        chosen = torch.nonzero(usable).squeeze(1)
        subset = problems.subset(chosen)
        check = self._row_base(entry) | {"problems": len(chosen), "not_built": int((~usable).sum()),
                                         "trivial": int(subset.trivial.sum())}
        self._say(f"checking {check['label']} eps {entry.eps_text} on {len(chosen)} problems")
        if not len(chosen):
            return check | {"solved": 0, "pass_rate": None, "verdict": "skipped",
                            "reason": "no problem could be built (no linear readout separated the points)"}, []
        try:
            with binarized(self.model, self.layer, subset):
                result = evaluate_config(self._inner_config(entry, subset))
        except UsageError as exc:  # e.g. an attack that needs more than two classes
            return check | {"solved": 0, "pass_rate": None, "verdict": "skipped", "reason": str(exc)}, []
        return self._scored(check, entry, result, chosen)

    def _answers_inner(self, problems: Problems) -> torch.Tensor:
        """Whether each problem's readout calls its own clean point class 0 (the fit guarantees it up to
        rounding; a problem where rounding says otherwise would count as solved for free): asked once per
        threat model, with the build, and such problems count as not built."""
        with binarized(self.model, self.layer, problems), evaluation_mode(self.model), torch.no_grad():
            logits = torch.cat([self.model(problems.anchors[s:s + self.batch_size])
                                for s in range(0, len(problems.anchors), self.batch_size)])
        return (logits.argmax(dim=1) == 0).cpu()

    def _inner_config(self, entry: Entry, problems: Problems) -> EvalConfig:
        spec = two_class_spec(entry)
        suite = self.resolved.suite.suite.model_copy(update={"name": f"{self.resolved.suite.suite.name}-check",
                                                              "attacks": [spec]})
        engine = self.config.evaluation.engine.model_copy(update={"compile": "off", "save_adversarial": None})
        labels = torch.zeros(len(problems.anchors), dtype=torch.long)
        return EvalConfig.of(model=self.resolved.loaded, data=(problems.anchors.cpu(), labels), suite=suite,
                             normalize=self.normalization, engine=engine)

    def _scored(self, check: dict[str, Any], entry: Entry, result: Result,
                chosen: torch.Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        attacked = result.doc["attacks"][0]
        samples = result.samples
        assert samples is not None  # a classification run always has its per-sample table
        robust_column = next(c for c in samples.columns if c.startswith("robust["))
        robust = samples[robust_column].to_numpy(dtype=bool)
        solved = int((~robust).sum())
        threshold = self.config.pass_threshold
        rate = solved / len(robust)
        check = check | {"solved": solved, "pass_rate": rate, "verdict": "passed" if rate >= threshold else "failed",
                         "params": attacked.get("params", {}), "seconds": attacked.get("seconds"),
                         "gradient_evals": attacked.get("gradient_evals"),
                         "sanity_flags": list(result.doc.get("sanity", {}).get("flags", []))}
        name = _check_name(check)
        ids = self.ids[chosen].tolist()
        rows = [{"check": name, "index": i, "solved": bool(not r)} for i, r in zip(ids, robust)]
        return check, rows

    def _row_base(self, entry: Entry) -> dict[str, Any]:
        return {"attack": entry.spec.attack, "label": entry.spec.display_name(), "norm": entry.spec.norm,
                "eps": entry.eps, "eps_text": entry.eps_text if entry.eps is not None else None,
                "family": type(entry.attack).family}

    def _skipped(self, entry: Entry, reason: str) -> dict[str, Any]:
        return self._row_base(entry) | {"problems": 0, "not_built": 0, "trivial": 0, "solved": 0, "pass_rate": None,
                                        "verdict": "skipped", "reason": reason}

    def _say(self, line: str) -> None:
        if self.hooks.on_step is not None:
            self.hooks.on_step(line)

    # -- the result -----------------------------------------------------------------------------------------
    def result(self, complete: bool) -> Result:
        config, resolved = self.config, self.resolved
        settings = {"samples": config.samples, "chosen": len(self.ids), "inner_points": config.inner_points,
                    "gap": GAP, "probes": PROBES, "readout": self.layer_name, "features": self.features,
                    "pass_threshold": config.pass_threshold}
        data = {"name": self.data_name, "n": len(self.ids), "fingerprint": self._fingerprint()}
        doc = attack_check_document(self.checks, len(self.entries), resolved.loaded, self.normalization,
                                    resolved.suite, data, settings, self.device,
                                    seed=config.evaluation.engine.seed, batch_size=self.batch_size,
                                    seconds=time.perf_counter() - self.started, complete=complete)
        samples = pd.DataFrame([row for rows in self.rows for row in rows], columns=["check", "index", "solved"])
        run_config = {"model": resolved.loaded.source, "suite": resolved.suite.suite.model_dump(mode="json"),
                      "suite_source": resolved.suite.path, "device": str(self.device), "batch_size": self.batch_size,
                      "seed": config.evaluation.engine.seed, **config.model_dump(include=set(CHECK_FIELDS))}
        return Result(doc, run_config, samples)

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.points.detach().cpu().float().numpy().tobytes())
        digest.update(self.ids.numpy().tobytes())
        return digest.hexdigest()


def _checkable(entry: Entry) -> str | None:
    """Why an entry is not checked, or None."""
    family = type(entry.attack).family
    if family not in CHECKED_FAMILIES:
        return f"{family} attacks are not checked: the test is for white-box gradient and query attacks"
    if entry.eps is None:
        return "the attack has no eps budget"
    if entry.spec.attack in MANY_CLASS_MEMBERS:
        return f"{entry.spec.attack} needs logits of more than two classes; the test problems have two"
    return None


def _check_name(check: dict[str, Any]) -> str:
    return f"{check['label']}@{check['eps_text']}"


def two_class_spec(entry: Entry) -> AttackSpec:
    """The entry at its one eps, as it runs on a two-class problem: AutoAttack without the members whose
    losses need more classes, and FAB-T with its one possible target."""
    fields = entry.spec.model_dump(mode="json", exclude_none=True)
    fields["eps"] = [entry.eps_text]
    if entry.spec.attack == "autoattack":
        members = [m for m in entry.attack.parts() if m not in MANY_CLASS_MEMBERS]
        fields["attacks"] = members
        overrides = dict(fields.get("members") or {})
        for name in MANY_CLASS_MEMBERS:
            overrides.pop(name, None)
        if "fab-t" in members:
            overrides["fab-t"] = {**overrides.get("fab-t", {}), "targets": 1}
        fields["members"] = overrides
    return AttackSpec.model_validate(fields)
