"""``--track mlflow`` and ``mlflow:`` baselines against a real MLflow store (SQLite), no mocks.

Two runs of the bundled digits model are logged once per module: the model as shipped, and the same
model with noise on its weights (less robust, so gating it against the first regresses). Every gate
against an MLflow baseline is checked against the same gate on the run directory it stands for.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

if importlib.util.find_spec("mlflow") is None:  # a broken install fails below instead of skipping
    pytest.skip("MLflow (part of dev) is not installed", allow_module_level=True)
from mlflow.tracking import MlflowClient  # noqa: E402

from robench.results.reading import read_result  # noqa: E402
from robench.tracking import baseline_from_mlflow, log_run, store_text  # noqa: E402
from robench.tracking.run_record import MAX_KEY, git_commit, tracking_key  # noqa: E402
from cli_helpers import invoke, one_error_line  # noqa: E402

EXPERIMENT = "robench-tests"
COMMIT = "c0ffee" * 6 + "0123"
LIMIT = "48"
SUITE = """name: tracked
attacks:
  - attack: fgsm
    eps: 0.1
  - attack: pgd
    eps: 0.1
    steps: 3
    step_size: 0.05
"""


@dataclass(frozen=True)
class Logged:
    root: Path
    uri: str
    base: Path  # the bundled model's run folder
    worse: Path  # the noisy model's
    base_id: str
    worse_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def eval_args(root: Path, model: str, out: Path) -> list:
    """A small eval: FGSM and a 3-step PGD on 48 digits (a few seconds)."""
    checkpoint = [] if model == "example:digits" else ["--arch", "robench.examples:digits_cnn", "--num-classes",
                                                        "10", "--data", "example:digits"]
    return ["eval", model, *checkpoint, "--suite", root / "suite.yaml", "--limit", LIMIT, "--quiet", "--out", out]


def noisy_model(path: Path) -> Path:
    """The bundled model with noise on every weight: less accurate under attack, deterministically."""
    import robench

    model = robench.load_model("example:digits").model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.6 * param.std() * torch.randn(param.shape, generator=generator))
    torch.save(model.state_dict(), path)
    return path


def run_ids(client: MlflowClient, experiment: str) -> list[str]:
    """The experiment's runs, oldest first."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    return [run.info.run_id for run in runs]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Iterator[Logged]:
    """One store for the module: its first connection creates the tables (seconds). The module runs in the
    store's folder: experiments robench creates keep their artifacts in ./mlruns, MLflow's default, and
    outside a git repository the commit tag comes from CI's variable."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    (root / "suite.yaml").write_text(SUITE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("GITHUB_SHA", COMMIT)
        track = ["--track", f"mlflow:{uri}", "--track-experiment", EXPERIMENT]
        base = invoke(*eval_args(root, "example:digits", root / "base"), *track, "--save-adversarial", "2")
        assert base.exit_code == 0, base.stderr
        worse = invoke(*eval_args(root, str(noisy_model(root / "noisy.pt")), root / "worse"), *track)
        assert worse.exit_code == 0, worse.stderr
        base_id, worse_id = run_ids(MlflowClient(uri), EXPERIMENT)
        yield Logged(root, uri, root / "base", root / "worse", base_id, worse_id)


@pytest.fixture
def store_env(logged, monkeypatch) -> Logged:
    """MLflow's own variable names the store, as in CI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)
    return logged


def test_the_logged_run_holds_params_metrics_tags_and_artifacts(logged, tmp_path):
    client = logged.client()
    run = client.get_run(logged.base_id)
    doc = read_result(logged.base).doc
    assert run.info.status == "FINISHED" and run.info.run_name == "example-digits · tracked"
    params = run.data.params
    assert params["model.name"] == "example-digits" and params["suite.name"] == "tracked"
    assert params["limit"] == LIMIT and params["seed"] == "0" and params["precision"] == "fp32"
    assert params["data"] == "example:digits" and params["batch_size"] == "256"
    assert params["suite.attacks.1.steps"] == "3"

    metrics = run.data.metrics
    assert metrics["robust_accuracy"] == doc["robust_accuracy"]
    assert metrics["clean_accuracy"] == doc["clean"]["accuracy"]
    assert metrics["mean_attack_accuracy"] == doc["mean_attack_accuracy"]
    pgd = next(a for a in doc["attacks"] if a["attack"] == "pgd")
    assert metrics["accuracy/pgd_0.1"] == pgd["accuracy"] and metrics["success_rate/pgd_0.1"] == pgd["success_rate"]
    rows = (logged.base / "results.csv").read_text().strip().splitlines()[1:]
    assert len(metrics) == len(rows), "one metric per row of the tidy table"

    tags = run.data.tags
    assert tags["robench.model_sha256"] == doc["model"]["sha256"]
    assert tags["robench.suite_sha256"] == doc["suite"]["sha256"]
    assert tags["robench.data_fingerprint"] == doc["data"]["fingerprint"]
    assert tags["robench.run_dir"] == str(logged.base.resolve())
    assert tags["robench.version"] == doc["env"]["robench"]
    assert tags["git.commit"] == COMMIT  # GITHUB_SHA, outside a git repository

    top = {item.path for item in client.list_artifacts(logged.base_id)}
    assert {"results.json", "results.csv", "samples.csv", "config.json", "report.html", "adversarial"} <= top
    grids = {item.path for item in client.list_artifacts(logged.base_id, "adversarial")}
    assert grids == {"adversarial/fgsm_0.1.png", "adversarial/pgd_0.1.png"}
    page = Path(client.download_artifacts(logged.base_id, "report.html", str(tmp_path))).read_text()
    assert page.startswith("<!DOCTYPE html>") and "example-digits" in page and "data:image/png;base64," in page
    results = Path(client.download_artifacts(logged.base_id, "results.json", str(tmp_path)))
    assert json.loads(results.read_text()) == doc


def test_gating_against_mlflow_agrees_with_gating_against_the_run_directory(store_env):
    logged = store_env
    cases = [  # (current, MLflow baseline, the run directory it stands for, expected exit code)
        (logged.base, f"mlflow:{EXPERIMENT}@{logged.base_id}", logged.base, 0),
        (logged.worse, f"mlflow:{EXPERIMENT}@{logged.base_id}", logged.base, 1),
        (logged.worse, f"mlflow:{EXPERIMENT}", logged.worse, 0),  # latest: the noisy model's run
        (logged.worse, f"mlflow:{EXPERIMENT}@latest", logged.worse, 0),
        (logged.base, f"mlflow:{EXPERIMENT}@latest", logged.worse, 0),  # an improvement passes
        (logged.worse, f"mlflow:{EXPERIMENT}@best", logged.base, 1),  # best: the shipped model's run
    ]
    for current, spec, directory, code in cases:
        from_mlflow = invoke("gate", current, "--baseline", spec)
        from_directory = invoke("gate", current, "--baseline", directory)
        assert from_directory.exit_code == code, (spec, from_directory.stderr)
        assert from_mlflow.exit_code == code, (spec, from_mlflow.stderr)
        run_id = logged.base_id if directory == logged.base else logged.worse_id
        assert f"robench: baseline {spec}: MLflow run {run_id}" in from_mlflow.stderr
        assert from_mlflow.stdout == from_directory.stdout, spec  # the same verdicts, row by row


def test_gate_reads_the_store_named_by_tracking_uri(logged):
    gated = invoke("gate", logged.worse, "--baseline", f"mlflow:{EXPERIMENT}@best", "--tracking-uri", logged.uri)
    assert gated.exit_code == 1, gated.stderr
    assert "regression" in gated.stderr


def test_eval_gates_against_the_latest_run_before_it_and_logs_the_verdict(logged, monkeypatch, tmp_path):
    """--baseline mlflow:EXP is fetched before the run: logging the new run to the same experiment does not
    make it its own baseline. The regressed run is logged all the same, tagged with the verdict."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pinned")
    base_id = log_run(logged.base)  # the Python API: MLflow's variables name the store and the experiment
    failed = invoke(*eval_args(logged.root, str(logged.root / "noisy.pt"), tmp_path / "run"), "--track", "mlflow",
                    "--baseline", "mlflow:pinned")
    assert failed.exit_code == 1, failed.stderr
    assert f"MLflow run {base_id}" in failed.stderr and "logged to MLflow" in failed.stderr
    client = logged.client()
    first, second = run_ids(client, "pinned")
    assert first == base_id
    assert client.get_run(second).data.tags["robench.gate"] == "failed"
    assert (tmp_path / "run" / "results.json").is_file()


def test_the_python_api_downloads_a_baseline_the_reader_takes(logged, tmp_path):
    path = baseline_from_mlflow(f"mlflow:{EXPERIMENT}@best", uri=logged.uri, dst=tmp_path)
    assert path.parent == tmp_path
    assert read_result(path).doc == read_result(logged.base).doc


def test_baseline_errors_are_one_line_exit_2(store_env):
    logged = store_env
    client = logged.client()
    client.create_experiment("empty")
    bare = client.create_experiment("bare")
    run_id = client.create_run(bare).info.run_id
    client.set_terminated(run_id)  # finished, but nothing logged: not a robench run
    cases = [
        ("mlflow:nope", "no MLflow experiment named 'nope'"),
        ("mlflow:empty", "MLflow experiment 'empty' has no finished run"),
        ("mlflow:bare", f"MLflow run {run_id} has no results.json artifact"),
        (f"mlflow:{EXPERIMENT}@0123456789abcdef", "no MLflow run '0123456789abcdef'"),
        (f"mlflow:bare@{logged.base_id}", f"MLflow run '{logged.base_id}' is not in experiment 'bare'"),
    ]
    for spec, message in cases:
        result = invoke("gate", logged.base, "--baseline", spec)
        assert result.exit_code == 2, (spec, result.stderr)
        assert message in one_error_line(result), spec
    refused = invoke(*eval_args(logged.root, "example:digits", logged.root / "never"), "--baseline", "mlflow:nope")
    assert refused.exit_code == 2 and "no MLflow experiment named 'nope'" in one_error_line(refused)
    assert not (logged.root / "never" / "results.json").exists(), "refused before the run"


def test_bad_track_options_fail_before_the_run(logged, monkeypatch, tmp_path):
    cases = [
        (["--track", "wandb"], "--track takes mlflow or mlflow:URI"),
        (["--track-experiment", "x"], "--track-experiment needs --track mlflow"),
        (["--track", "mlflow:htp://typo"], "MLflow cannot use the store htp://typo"),
    ]
    for options, message in cases:
        result = invoke(*eval_args(logged.root, "example:digits", tmp_path / "run"), *options)
        assert result.exit_code == 2 and message in one_error_line(result), result.stderr
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where the extra is missing
    missing = invoke(*eval_args(logged.root, "example:digits", tmp_path / "run"), "--track", "mlflow")
    assert missing.exit_code == 2
    assert one_error_line(missing) == "robench: error: MLflow is not installed: pip install 'robench[mlflow]'"
    gate = invoke("gate", logged.base, "--baseline", f"mlflow:{EXPERIMENT}")
    assert gate.exit_code == 2 and "pip install 'robench[mlflow]'" in one_error_line(gate)
    assert not (tmp_path / "run" / "results.json").exists()


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_store_that_cannot_be_reached_keeps_the_run(logged, monkeypatch, tmp_path):
    # MLflow's own variables: no retries with backoff (minutes), a short wait.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    server = f"http://127.0.0.1:{closed_port()}"
    out = tmp_path / "run"
    result = invoke(*eval_args(logged.root, "example:digits", out), "--track", f"mlflow:{server}")
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == f"results written to {out}"  # the run is reported, then the one line on the store
    assert lines[-1].startswith(f"robench: error: could not log the run to MLflow ({server}, experiment 'robench')")
    assert lines[-1].endswith(f"; the results are in {out}")
    assert read_result(out).doc["complete"] is True, "the run folder is complete"
    assert {"results.json", "results.csv", "config.json", "samples.csv"} <= {p.name for p in out.iterdir()}


def test_a_pixel_index_run_is_logged_and_ranked_by_its_recognition_rate(store_env, digits_split, tmp_path):
    from PIL import Image

    _, images, _, labels = digits_split
    for i, (image, label) in enumerate(zip(images[:24], labels[:24])):
        (tmp_path / "digits" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(tmp_path / "digits" / str(label) / f"{i}.png")
    out = tmp_path / "pixels"
    result = invoke("pixel-index", "example:digits", tmp_path / "digits", "--pixels", "2,8", "--out", out, "--quiet",
                    "--track", "mlflow", "--track-experiment", "pixels")
    assert result.exit_code == 0, result.stderr
    client = store_env.client()
    (run_id,) = run_ids(client, "pixels")
    run = client.get_run(run_id)
    doc = read_result(out).doc
    rates = [row["recognition_rate"] for exp in doc["experiments"] for row in exp["results"]]
    assert run.data.metrics["recognition_rate"] == min(rates)
    eight = doc["experiments"][0]["results"][1]
    assert eight["pixels"] == 8 and run.data.metrics["recognition_rate/range_0-255_8px"] == eight["recognition_rate"]
    assert run.data.metrics["clean_accuracy"] == doc["clean"]["accuracy"]
    assert run.data.tags["robench.primary_metric"] == "recognition_rate"
    assert run.data.params["pixels"] == "[2, 8]" and run.data.params["folder"] == str(tmp_path / "digits")
    gated = invoke("gate", out, "--baseline", "mlflow:pixels@best")
    assert gated.exit_code == 0 and f"MLflow run {run_id}" in gated.stderr, gated.stderr


def test_the_commit_is_the_checked_out_one(monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.setenv("GITHUB_SHA", COMMIT)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert git_commit() == (head.stdout.strip() if head.returncode == 0 else COMMIT)


def test_messages_never_show_a_password_in_a_store_uri():
    assert store_text("https://ci:s3cret@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert store_text("sqlite:///mlruns.db") == "sqlite:///mlruns.db"


def test_keys_are_ones_every_mlflow_store_accepts():
    assert tracking_key("accuracy/pgd@8/255") == "accuracy/pgd_8/255"
    assert tracking_key("../a//b/./c ") == "_/a/_/b/_/c"
    long = tracking_key("x" * 400)
    assert len(long) <= MAX_KEY and long != tracking_key("x" * 401)
