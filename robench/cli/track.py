"""``--track mlflow[:URI]``: the finished run logged to MLflow (checked before the run, logged after it), and
``mlflow:EXPERIMENT[@RUN_ID|@latest|@best]`` baselines fetched for the gate."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from robench.cli.common import stderr
from robench.errors import UsageError

# robench.tracking (and MLflow) is imported only when --track or an mlflow: baseline is given.
TRACK_SYNTAX = "mlflow or mlflow:URI (e.g. mlflow:sqlite:///mlruns.db)"
GATE_TAGS = {0: "passed", 1: "failed", 3: "not comparable"}  # robench.gate, by the gate's exit code


@dataclass(frozen=True)
class Tracking:
    """Where the run is logged; ``enabled`` is False without --track."""

    enabled: bool = False
    uri: Optional[str] = None
    experiment: Optional[str] = None

    @classmethod
    def of(cls, track: Optional[str], experiment: Optional[str]) -> Tracking:
        """The options checked before the run: a bad --track, MLflow missing or a store URI MLflow cannot use
        costs no evaluation."""
        if track is None:
            if experiment is not None:
                raise UsageError("--track-experiment needs --track mlflow")
            return cls()
        kind, _, uri = track.partition(":")
        if kind != "mlflow":
            raise UsageError(f"--track takes {TRACK_SYNTAX}, got {track!r}")
        from robench.tracking import check_store

        check_store(uri or None)
        return cls(True, uri or None, experiment)

    def log(self, run_dir: Path, gate_code: Optional[int] = None, baseline: Optional[str] = None,
            announce: bool = True) -> None:
        """Log the finished run folder; a store that fails is one line naming the folder, exit 3."""
        if not self.enabled:
            return
        from robench.tracking import experiment_name, log_run, store_text

        tags = {}
        if gate_code is not None:  # gated in the same step: the history says which runs passed
            tags = {"robench.gate": GATE_TAGS.get(gate_code, str(gate_code)), "robench.gate_baseline": str(baseline)}
        run_id = log_run(run_dir, self.uri, self.experiment, tags)
        if announce:
            stderr.print(f"logged to MLflow ({store_text(self.uri)}): experiment {experiment_name(self.experiment)}, "
                         f"run {run_id}", highlight=False, markup=False)


def local_baseline(spec: str, tracking_uri: Optional[str] = None) -> str:
    """A baseline as a local path: ``mlflow:...`` is downloaded (into a folder removed at exit), anything else
    is returned as it is. The one place the gate's baselines are resolved: ``robench gate`` and
    ``robench eval --baseline`` both read through it."""
    from robench.tracking import fetch_baseline, is_mlflow_baseline

    if not is_mlflow_baseline(spec):
        return spec
    folder = Path(tempfile.mkdtemp(prefix="robench-baseline-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    fetched = fetch_baseline(spec, tracking_uri, folder)
    stderr.print(f"robench: baseline {spec}: MLflow run {fetched.run_id}", highlight=False, markup=False)
    return str(fetched.path)
