"""Finished runs logged to an MLflow store, and gate baselines read back from one.

MLflow is imported inside the functions that talk to a store: robench works without the extra, and
only ``--track mlflow`` and ``mlflow:`` baselines need it. Which store: the URI given, else MLflow's
own default (``MLFLOW_TRACKING_URI``, else its local store).

Logging never loses a run: the run folder is complete before anything is sent, every local step (the
record, the HTML report) is done first, and a store that cannot be written is one ``RunError`` naming
the folder. A run that fails half-way is marked FAILED, so it is never picked as a ``latest`` baseline.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from robench.errors import RobenchError, RunError, UsageError, describe, one_line
from robench.tracking.run_record import PRIMARY_METRICS, RunRecord, run_record

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

INSTALL_HINT = "pip install 'robench[mlflow]'"
MLFLOW_PREFIX = "mlflow:"
DEFAULT_EXPERIMENT = "robench"
SELECTORS = ("latest", "best")
BASELINE_SYNTAX = "mlflow:EXPERIMENT[@RUN_ID|@latest|@best]"
# What may follow the last @ of a baseline: a selector or a run ID. Anything else (a '/' or a '.', as in
# Databricks' /Users/me@example.com/exp) belongs to the experiment's name.
_SELECTOR = re.compile(r"[A-Za-z0-9_-]+")
_FINISHED = "attributes.status = 'FINISHED'"
# MLflow's log_batch limits (mlflow.utils.validation): params and tags 100, metrics 1000 a call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_REASON = 300  # characters of a store's error message (SQLAlchemy's run to screens)
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def require_mlflow() -> None:
    """MLflow importable, or one UsageError naming the extra: called before a run starts, not after."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "mlflow"
        state = "is not installed" if missing else f"cannot be imported ({describe(exc)})"
        raise UsageError(f"MLflow {state}: {INSTALL_HINT}") from None


def experiment_name(name: str | None = None) -> str:
    """The experiment named, else ``MLFLOW_EXPERIMENT_NAME`` (MLflow's own variable), else "robench"."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def store_text(uri: str | None) -> str:
    """The store as messages name it, without any password a URI carries (CI logs are read by many)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return "MLflow's default store"
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _client(uri: str | None) -> MlflowClient:
    require_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_store(uri: str | None) -> None:
    """MLflow installed and the store's URI usable (a scheme MLflow knows; a database store opens): checked
    before a run, so that a typo costs no evaluation. A tracking server is first contacted when the run is
    logged. Each failure is one UsageError."""
    require_mlflow()
    try:
        _client(uri)
    except Exception as exc:  # noqa: BLE001 - MLflow's own errors for a URI it cannot use
        raise UsageError(f"MLflow cannot use the store {store_text(uri)}: {_reason(exc)}") from exc


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow's artifact progress bars off (they fill CI logs with carriage returns), unless the user set
    MLflow's variable for them."""
    if PROGRESS_BAR_VARIABLE in os.environ:
        yield
        return
    os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_BAR_VARIABLE, None)


def _reason(exc: BaseException) -> str:
    text = one_line(exc) if isinstance(exc, RobenchError) else describe(exc)  # robench's own say what they are
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


# ------------------------------------------------------------------ logging a run
def log_run(run_dir: str | Path, uri: str | None = None, experiment: str | None = None,
            tags: dict[str, str] | None = None) -> str:
    """Log a finished run folder as one MLflow run in ``experiment`` (created if missing); returns its run ID.

    Params: the run's settings; metrics: every value of its tidy table (``accuracy/pgd-linf_0.03``) and its
    summaries (``clean_accuracy``, ``robust_accuracy``, ``mean_attack_accuracy``); artifacts: results.json,
    results.csv, samples.csv, config.json, the HTML report and the adversarial example grids; tags: the
    model, suite and data hashes, the folder, the robench version and the commit, plus ``tags``.

    A folder that is not a finished run is a UsageError, MLflow missing too; a store that cannot be reached
    or written is a RunError that names the folder (which is left as it was).
    """
    require_mlflow()
    record = run_record(Path(run_dir))
    name = experiment_name(experiment)
    try:
        with tempfile.TemporaryDirectory(prefix="robench-mlflow-") as scratch, _no_progress_bars():
            report = _write_report(record, Path(scratch))  # local work first: a failure sends nothing
            return _send(_client(uri), record, name, {**record.tags, **(tags or {})}, report)
    except Exception as exc:  # noqa: BLE001 - whatever the store raised (HTTP, SQL, files), the run is safe
        raise RunError(f"could not log the run to MLflow ({store_text(uri)}, experiment {name!r}): "
                       f"{_reason(exc)}; the results are in {record.run_dir}") from exc


def _write_report(record: RunRecord, folder: Path) -> Path:
    """The same self-contained page as ``robench report RUN``."""
    from robench.reporting.html import write_report

    return write_report([record.run_dir], folder / "report.html", title=f"robench · {record.name}")


def _send(client: MlflowClient, record: RunRecord, experiment: str, tags: dict[str, str], report: Path) -> str:
    run = client.create_run(_experiment_id(client, experiment), run_name=record.name, tags=tags)
    run_id = run.info.run_id
    try:
        _log_values(client, run_id, record)
        for path in [*record.files, report]:
            client.log_artifact(run_id, str(path))
        for grid in record.grids:
            client.log_artifact(run_id, str(grid), artifact_path="adversarial")
    except BaseException:
        _mark_failed(client, run_id)
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's ID, the experiment created if it does not exist (by this process or a concurrent one)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except Exception:  # another job created it first; anything else fails again below
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise UsageError(f"experiment {name!r} is deleted in this store: restore it, or name another one "
                         "(--track-experiment)")
    return found.experiment_id


def _log_values(client: MlflowClient, run_id: str, record: RunRecord) -> None:
    from mlflow.entities import Metric, Param

    params = [Param(key, value) for key, value in record.params.items()]
    for chunk in _chunks(params, PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in record.metrics.items()]
    for chunk in _chunks(metrics, METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _mark_failed(client: MlflowClient, run_id: str) -> None:
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the store is failing already; the first error is the one to report
        pass


# ------------------------------------------------------------------ baselines
@dataclass(frozen=True)
class BaselineSpec:
    """``mlflow:EXPERIMENT[@RUN_ID|@latest|@best]`` taken apart."""

    experiment: str
    selector: str  # "latest", "best" or a run ID


@dataclass(frozen=True)
class FetchedBaseline:
    path: Path  # the run's results.json, downloaded
    run_id: str
    experiment: str


def is_mlflow_baseline(spec: str | Path | None) -> bool:
    return isinstance(spec, str) and spec.startswith(MLFLOW_PREFIX)


def parse_baseline(spec: str) -> BaselineSpec:
    body = spec[len(MLFLOW_PREFIX):] if spec.startswith(MLFLOW_PREFIX) else spec
    name, at, selector = body.rpartition("@")
    if not at or not _SELECTOR.fullmatch(selector):
        name, selector = body, "latest"
    if not name.strip():
        raise UsageError(f"baseline {spec!r} names no experiment: {BASELINE_SYNTAX}")
    return BaselineSpec(name, selector)


def baseline_from_mlflow(spec: str, uri: str | None = None, dst: str | Path | None = None) -> Path:
    """Download the results.json of the run ``spec`` names (``mlflow:EXPERIMENT[@RUN_ID|@latest|@best]``) into
    ``dst`` (default: a new temporary folder, the caller's to delete); returns its path, which
    ``read_result`` and ``robench gate`` read as they read a run directory's."""
    return fetch_baseline(spec, uri, dst).path


def fetch_baseline(spec: str, uri: str | None = None, dst: str | Path | None = None) -> FetchedBaseline:
    """``baseline_from_mlflow``, also saying which run it chose. ``latest``: the experiment's most recent
    finished run; ``best``: its finished run with the highest primary metric (robust_accuracy; a Pixel-index
    run's lowest recognition_rate, a ReID run's lowest mAP: the ``robench.primary_metric`` tag of the latest run
    says which); a run ID: that run. Every failure is one UsageError."""
    wanted = parse_baseline(spec)
    require_mlflow()
    try:
        client = _client(uri)
        experiment = _existing_experiment(client, wanted.experiment, uri)
        run = _chosen_run(client, experiment, wanted)
        path = _download_results(client, run, Path(dst) if dst else None)
    except RobenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store could not be read: say which and why, in one line
        raise UsageError(f"cannot read the baseline {spec!r} from MLflow ({store_text(uri)}): {_reason(exc)}") \
            from exc
    return FetchedBaseline(path, run.info.run_id, wanted.experiment)


def _existing_experiment(client: MlflowClient, name: str, uri: str | None) -> Experiment:
    found = client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage != "active":
        raise UsageError(f"no MLflow experiment named {name!r} in {store_text(uri)}")
    return found


def _chosen_run(client: MlflowClient, experiment: Experiment, wanted: BaselineSpec) -> Run:
    name = wanted.experiment
    if wanted.selector not in SELECTORS:
        return _run_by_id(client, experiment, wanted.selector)
    latest = _first_run(client, experiment, _FINISHED, ["attributes.start_time DESC"])
    if latest is None:
        raise UsageError(f"MLflow experiment {name!r} has no finished run")
    if wanted.selector == "latest":
        return latest
    # @best ranks by the metric of the kind of run the experiment holds (its latest run says which).
    metric = latest.data.tags.get("robench.primary_metric") or PRIMARY_METRICS["classification"]
    best = _first_run(client, experiment, f"{_FINISHED} and metrics.`{metric}` >= 0",
                      [f"metrics.`{metric}` DESC", "attributes.start_time DESC"])
    if best is None:
        raise UsageError(f"no finished run of MLflow experiment {name!r} has a {metric} metric")
    return best


def _first_run(client: MlflowClient, experiment: Experiment, where: str, order_by: list[str]) -> Run | None:
    runs = client.search_runs([experiment.experiment_id], filter_string=where, order_by=order_by, max_results=1)
    return runs[0] if runs else None


def _run_by_id(client: MlflowClient, experiment: Experiment, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UsageError(f"no MLflow run {run_id!r}") from None
    if run.info.experiment_id != experiment.experiment_id:
        raise UsageError(f"MLflow run {run_id!r} is not in experiment {experiment.name!r}")
    return run


def _download_results(client: MlflowClient, run: Run, folder: Path | None) -> Path:
    run_id = run.info.run_id
    if "results.json" not in {item.path for item in client.list_artifacts(run_id)}:
        raise UsageError(f"MLflow run {run_id} has no results.json artifact (runs logged by robench --track have "
                         "one)")
    folder = folder or Path(tempfile.mkdtemp(prefix="robench-baseline-"))
    folder.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        return Path(client.download_artifacts(run_id, "results.json", str(folder)))
