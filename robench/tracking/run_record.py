"""What a finished run folder gives an experiment tracker: params, metrics, tags and files, as plain data.

Nothing here talks to MLflow. Keys and values are made valid for any MLflow store before anything
is sent: keys from the characters every store accepts (Windows' too), no path tricks, at most
``MAX_KEY`` characters; param values cut to ``MAX_PARAM_VALUE``. A store that refuses a key after
the run has been computed would lose the record of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from robench import __version__
from robench.results.file_names import entry_label, file_stem
from robench.results.reading import ResultFile, load_json, read_result
from robench.results.tidy import document_kind, tidy_rows

# MLflow's own limits (mlflow.utils.validation): longer values are refused by older servers.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
# The run's summary rows, logged under their plain names: what a dashboard plots first.
HEADLINE_NAMES = {("clean", "accuracy"): "clean_accuracy", ("worst-case", "robust_accuracy"): "robust_accuracy",
                  ("mean", "mean_attack_accuracy"): "mean_attack_accuracy"}
# What @best ranks runs by, per kind of run: the metric ``robench gate`` checks, at its worst over the run
# (classification's robust_accuracy is the worst case over the attacks already).
PRIMARY_METRICS = {"classification": "robust_accuracy", "reid": "mAP", "pixel": "recognition_rate"}
# The identity of what was evaluated, from results.json (config.json says how it was asked for).
DOCUMENT_PARAMS = ("task", "model.name", "model.source", "model.arch", "model.num_classes", "suite.name",
                   "suite.source", "suite.eps_space", "data.spec", "data.folder", "data.n")
RUN_FILES = ("results.json", "results.csv", "samples.csv", "config.json")


@dataclass(frozen=True)
class RunRecord:
    """One run folder as a tracker sees it; ``files`` and ``grids`` are paths inside the folder."""

    run_dir: Path
    name: str
    kind: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    files: list[Path]
    grids: list[Path]  # the adversarial example grids (adversarial/*.png), when the run saved examples


def run_record(run_dir: Path) -> RunRecord:
    """The record of a finished run folder; a missing, partial or damaged results.json is a UsageError."""
    result = read_result(run_dir)  # validated, and refused unless complete
    folder = result.path.parent
    config_file = folder / "config.json"
    config = load_json(config_file, "config.json") if config_file.is_file() else {}
    return RunRecord(
        run_dir=folder, name=run_name(result), kind=result.kind,
        params=run_params(result.doc, config if isinstance(config, dict) else {}),
        metrics=run_metrics(result.doc), tags=run_tags(result, folder),
        files=[folder / name for name in RUN_FILES if (folder / name).is_file()],
        grids=sorted((folder / "adversarial").glob("*.png")))


def run_name(result: ResultFile) -> str:
    suite = result.doc.get("suite", {}).get("name") or result.kind
    return f"{result.label} · {suite}"


# ------------------------------------------------------------------ keys and values
def tracking_key(text: str) -> str:
    """``text`` as a key every MLflow store accepts: unsafe characters become ``_``, each ``/``-separated
    part is a plain name (no empty, ``.`` or ``..`` part: MLflow keys double as file paths), and a key over
    ``MAX_KEY`` keeps its start and ends in a hash of the whole text (distinct texts stay distinct)."""
    parts = [part.strip(" ") for part in _UNSAFE_KEY_CHARS.sub("_", text).split("/")]
    key = "/".join(part if part.strip(".") else "_" for part in parts)
    if len(key) <= MAX_KEY:
        return key
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{key[:MAX_KEY - 13].rstrip('/. ')}-{digest}"


def _cut(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _with_unique_keys(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Keys that clean to the same text (``pgd@0.1`` and ``pgd_0.1``) get -2, -3, ...: no value overwrites
    another."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        unique, n = key, 2
        while unique in out:
            unique = f"{key}-{n}"
            n += 1
        out[unique] = value
    return out


# ------------------------------------------------------------------ params
def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested objects as ``a.b.c`` keys, lists of objects as ``a.0.b``; a list of plain values stays one value.
    Empty values (null, "", [], {}) are left out: a param says what was set."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        for i, item in enumerate(value):
            yield from flatten(item, f"{prefix}.{i}")
    elif value not in (None, "", []) and prefix:
        yield prefix, value


def run_params(doc: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """config.json's settings (model, suite and its eps overrides, data, limit, seed, batch size, precision,
    device ...), flattened, then what results.json says was evaluated (``DOCUMENT_PARAMS``)."""
    values = dict(flatten(config))
    for path in DOCUMENT_PARAMS:
        value = _lookup(doc, path)
        if value is not None:
            values[path] = value
    return _with_unique_keys((tracking_key(key), _cut(_text(value), MAX_PARAM_VALUE)) for key, value in values.items())


def _lookup(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# ------------------------------------------------------------------ metrics
def metric_key(row: dict[str, Any]) -> str:
    """``metric/entry_eps`` (``accuracy/pgd-linf_0.03``, ``recognition_rate/range_0-255_8px``): the entry named
    as its saved-example files are; the summary rows under their plain names (``robust_accuracy``)."""
    headline = HEADLINE_NAMES.get((row["entry"], row["metric"]))
    if headline:
        return headline
    if row.get("pixels") is not None and row["kind"] == "pixel":
        budget = f"{int(row['pixels'])}px"
    else:
        budget = row.get("eps_text") or ("" if row.get("eps") is None else f"{row['eps']:g}")
    return tracking_key(f"{row['metric']}/{file_stem(entry_label(row['entry'], budget))}")


def run_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """Every value of the run's tidy table (results.csv), its summaries, and its primary metric."""
    rows = tidy_rows(doc)
    metrics = _with_unique_keys((metric_key(row), float(row["value"])) for row in rows)
    clean = doc.get("clean") or {}
    if clean.get("accuracy") is not None:  # a Pixel-index run's clean accuracy has no tidy row
        metrics.setdefault("clean_accuracy", float(clean["accuracy"]))
    primary = PRIMARY_METRICS[document_kind(doc)]
    worst = [float(row["value"]) for row in rows if row["metric"] == primary]
    if primary not in metrics and worst:
        metrics[primary] = min(worst)
    return metrics


# ------------------------------------------------------------------ tags
def run_tags(result: ResultFile, folder: Path) -> dict[str, str]:
    """What identifies the run: its model, suite and data hashes, its folder, the robench version, the code's
    commit; ``robench.primary_metric`` says which metric @best ranks it by."""
    doc = result.doc
    tags = {
        "robench.model_sha256": doc.get("model", {}).get("sha256"),
        "robench.suite_sha256": doc.get("suite", {}).get("sha256"),
        "robench.data_fingerprint": result.fingerprint,
        "robench.run_dir": str(folder.resolve()),
        "robench.version": doc.get("env", {}).get("robench") or __version__,
        "robench.kind": result.kind,
        "robench.primary_metric": PRIMARY_METRICS[result.kind],
        "git.commit": git_commit(),
    }
    return {key: _cut(str(value), MAX_TAG_VALUE) for key, value in tags.items() if value}


def git_commit() -> str | None:
    """The commit checked out in the current directory, else CI's (``GITHUB_SHA``); None outside both."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or a hung one: the tag is a convenience
        done = None
    if done is not None and done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    return os.environ.get("GITHUB_SHA") or None
