"""What ``robench eval`` shows around the run: the progress, the results and their warnings, and the
CI gate (checked before the run, applied after it)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

from robench.cli.common import interrupt_on_sigterm, stderr, stdout_console, warn
from robench.errors import UsageError

if TYPE_CHECKING:
    from robench.results.result import Result
    from robench.tasks.classification import ClassificationTask
    from robench.tasks.reid import ReIDTask
    from robench.tasks.rundir import RunDirectory

# The modules that need torch are imported when a function runs, not with this module: `robench eval --help`
# imports it.


@dataclass(frozen=True)
class Gate:
    """--baseline and its options: the run's results against a baseline run's, in the same step."""

    baseline: Optional[str]
    max_drop: float
    rules: Optional[List[str]]
    require_significant: bool
    junit: Optional[Path]
    allow_flags: Optional[List[str]]
    metrics: Optional[List[str]]

    def checked(self, tracking_uri: Optional[str] = None) -> Gate:
        """Fail before the run, not after it: a gate option without --baseline, or a baseline, metric, rule or
        flag that cannot be used. Returns the gate with its baseline as a local file: an ``mlflow:`` baseline
        is fetched now (from ``tracking_uri``, --track's store), so that ``@latest`` means the latest run
        before this one, even when this one is logged to the same experiment."""
        from robench.cli.track import local_baseline
        from robench.reporting.gate import check_allowed_flags, check_metrics, parse_metrics, parse_rule, \
            reported_metrics
        from robench.results.reading import read_result

        if self.baseline is None:
            if self.rules or self.junit or self.require_significant or self.max_drop or self.allow_flags \
                    or self.metrics:
                raise UsageError("--max-drop, --rule, --metric, --require-significant, --junit and --allow-flag "
                                 "need --baseline")
            return self
        local = local_baseline(self.baseline, tracking_uri)
        base = read_result(local)
        check_metrics(parse_metrics(self.metrics), reported_metrics(base))
        for text in self.rules or []:
            parse_rule(text)
        check_allowed_flags(self.allow_flags or [])
        return dataclasses.replace(self, baseline=local)

    def verdict(self, run_dir: Path) -> Optional[int]:
        """The gate's exit code (None without --baseline). The results are written first: a failing gate never
        loses the run."""
        from robench.cli.gate_cmd import run_gate

        if self.baseline is None:
            return None
        return run_gate(run_dir, self.baseline, self.max_drop, self.rules or [], self.require_significant,
                        self.junit, as_json=False, quiet=True, allow_flags=self.allow_flags, metrics=self.metrics)


def run_with_progress(task: ClassificationTask | ReIDTask, directory: RunDirectory, quiet: bool) -> Result:
    """The run, its progress on stderr (a bar, or a line per ReID stage); Ctrl-C and SIGTERM stop it with the
    finished work saved."""
    from robench.cli.progress_view import EvalProgress
    from robench.evaluation.entries import entry_weights
    from robench.tasks import Hooks

    progress: contextlib.AbstractContextManager[Any]
    if task.name == "classification":
        suite = task.resolved.suite.suite
        progress = EvalProgress(stderr, f"{task.resolved.loaded.name} · {suite.name}", entry_weights(suite),
                                enabled=not quiet and directory.main)
        hooks = Hooks(progress=progress, on_warning=warn)
    else:  # ReID: a line per stage, unless quiet
        progress = contextlib.nullcontext()
        hooks = Hooks() if quiet else Hooks(on_warning=warn, on_step=_note)
    if directory.resume_state is not None:
        stderr.print(f"robench: resuming {directory.path} after {_finished_text(task, directory.resume_state)}",
                     highlight=False)
    # SIGTERM is turned into an interruption only while evaluating: the final progress file is on
    # disk before the results are written, so a kill at any later moment still resumes to the end.
    with progress, interrupt_on_sigterm():
        return task.run(directory, hooks)


def print_result(task: ClassificationTask | ReIDTask, result: Result, as_json: bool, forced_channels: bool) -> None:
    """The results table (or JSON) on stdout, after the warnings about them on stderr."""
    from robench.reid.report import reid_table
    from robench.reporting.tables import results_table

    if task.name == "reid":
        _print(result.doc, reid_table(result.doc), as_json)
        return
    _warn_about(result.doc, forced_channels)
    for line in result.rounding_warnings():  # the saved 8-bit images do not reproduce the reported number
        warn(line)
    _print(result.doc, results_table(result.doc), as_json)


def _finished_text(task: ClassificationTask | ReIDTask, state: dict) -> str:
    if task.name == "reid":
        return f"{len(state.get('settings', ()))} finished setting(s)"
    from robench.evaluation.work_queue import finished_units_text, is_queue_progress

    if is_queue_progress(state):
        return finished_units_text(state)
    text = f"{state['batches']} finished batch(es)"
    partial = state.get("partial")
    if partial:  # what the attacks finished of the segment under way
        pairs = sum(int(entry["done"].sum()) for entry in partial["entries"])
        text += f", keeping {pairs} finished (sample, attack) pair(s) of the next segment"
    return text


def _warn_about(doc: dict, forced_channels: bool) -> None:
    if doc["data"].get("skipped"):
        warn(f"skipped {len(doc['data']['skipped'])} unreadable file(s) (listed in results.json under "
              "data.skipped)")
    if doc["data"].get("converted") and not forced_channels:  # forced conversions were asked for: no warning
        warn(f"converted {len(doc['data']['converted'])} image(s) to the channels of most images (listed in "
              "results.json under data.converted)")
    for flag in doc["sanity"]["flags"]:
        warn(flag)


def _print(doc: dict, table: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        stdout_console().print(table)


def _note(message: str) -> None:
    stderr.print(f"robench: {message}", highlight=False)
