"""The docs site: it builds strictly, the README stays short, and the blocks only the docs pages hold run as
written (tests/test_readme.py checks that every block of the README and the docs is run or checked, and
runs the blocks the README shares with the docs)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_helpers import DOCS, README, ROOT, readme_block

README_MAX_LINES = 200


def fresh_python(script: str, folder: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``script`` saved in ``folder`` and run there by a fresh interpreter, as a user runs it (no PYTHONPATH)."""
    path = folder / "block.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBENCH_DEBUG")}
    return subprocess.run([sys.executable, path.name], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, a page missing from the navigation, an API name
    mkdocstrings cannot find or a snippet file that is gone fails the build."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is part of the dev extra"
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    site = tmp_path / "site"
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")}
    for page in pages:
        target = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert target.is_file(), f"docs/{page}.md was not rendered"
    cli = (site / "reference/cli/index.html").read_text()
    for command in ("eval", "pixel-index", "compare", "plot", "report", "gate", "train", "attacks"):
        assert f"robench {command}" in cli, f"the CLI reference lacks `robench {command}`"
    assert "--suite" in cli and "--max-drop" in cli
    api = (site / "reference/api/index.html").read_text()
    assert "robench.evaluate" in api and "EvalConfig" in api and "data" in api


def test_the_readme_is_short_and_points_into_the_docs():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the guides belong in docs/"
    linked = set(re.findall(r"\]\((docs/[^)#]+)", README.read_text()))
    assert linked and all((ROOT / link).is_file() for link in linked), sorted(linked)


def test_coming_from_torchattacks_runs_as_written(tmp_path):
    """torchattacks' PGD and robench's, both without a random start and scored on the last iterate, leave
    the same accuracy: the side-by-side block prints both."""
    run = fresh_python(readme_block("coming-from-torchattacks"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.findall(r"accuracy under (torchattacks|robench)'?s? PGD: *([0-9.]+)", run.stdout)
    assert [name for name, _ in found] == ["torchattacks", "robench"], run.stdout
    theirs, ours = (float(value) for _, value in found)
    assert theirs == ours and 0 < ours < 1


# -- the torchrun commands of docs/distributed.md ----------------------------------------------------------------

def torchrun_lines(text: str) -> list[list[str]]:
    """The torchrun command lines of a shell block (continuations joined, `srun` before it dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line[line.index("torchrun"):]) for line in joined.splitlines() if "torchrun " in line]


def check_torchrun_block(block: str) -> None:
    """torchrun's own argument parser takes the block's command, and what it starts (`-m robench eval ...`) is a
    command robench's parser takes. (Running them needs several GPUs or nodes; tests/test_distributed.py runs
    robench under torchrun on this machine.)"""
    from torch.distributed.run import get_args_parser

    import typer

    from robench.cli import app

    [argv] = torchrun_lines(block)
    args = get_args_parser().parse_args(argv[1:])
    assert args.module and args.training_script == "robench"
    group = typer.main.get_command(app)
    command, *rest = args.training_script_args
    with group.make_context("robench", [command, *rest]) as ctx:
        sub = group.get_command(ctx, command)
        sub.make_context(command, list(rest), parent=ctx)  # raises on an unknown or ill-typed option


def test_one_machine_torchrun_command_parses():
    check_torchrun_block(readme_block("torchrun-one-machine"))


def test_several_nodes_torchrun_command_parses():
    check_torchrun_block(readme_block("torchrun-nodes"))


def test_slurm_script_is_bash_and_its_torchrun_command_parses():
    block = readme_block("torchrun-slurm")
    assert subprocess.run(["bash", "-n"], input=block, text=True).returncode == 0
    check_torchrun_block(block)


def test_schema_example_runs_as_written(tmp_path):
    """A run through the installed script, then its document checked from a fresh python: valid as written,
    refused with the field's path once an accuracy is made negative."""
    robench = Path(sys.executable).parent / "robench"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBENCH_DEBUG")}
    run = subprocess.run(shlex.split(readme_block("schema-run").replace("robench ", f"{robench} ", 1)), cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    checked = fresh_python(readme_block("schema-validate.py"), tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert checked.stdout.splitlines() == [
        "valid: robench.results/1", "refused: attacks[0].accuracy: -0.1 is less than the minimum of 0"]


# -- MLflow (docs/ci/mlflow.md) ----------------------------------------------------------------------------------

def user_shell(command: str, folder: Path, **extra: str) -> subprocess.CompletedProcess:
    """``command`` in bash from ``folder``, with this environment's scripts first on PATH and no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBENCH_DEBUG", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return subprocess.run(["bash", "-e", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)


def test_mlflow_tracking_runs_as_written(tmp_path):
    """Two runs logged to a SQLite store, the second gated against the first in the same step, then against
    the best run with `robench gate`: all three pass (the same model and data), and the store holds both."""
    pytest.importorskip("mlflow")
    for command in re.sub(r"\\\n\s*", " ", readme_block("mlflow-tracking")).strip().splitlines():
        run = user_shell(command, tmp_path)
        assert run.returncode == 0, (command, run.stderr[-3000:])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == 2 and {r.data.tags["robench.gate"] for r in runs if "robench.gate" in r.data.tags} == {"passed"}
    assert all(0 <= r.data.metrics["robust_accuracy"] <= r.data.metrics["clean_accuracy"] for r in runs)


def test_mlflow_workflow_steps_run_as_written(tmp_path):
    """The workflow's `run:` steps in order against a local SQLite store (the secret's stand-in), once as on
    main (the step that logs) and once as on a pull request (the step that gates against @best)."""
    pytest.importorskip("mlflow")
    workflow = yaml.safe_load(readme_block("mlflow-github-actions"))
    steps = workflow["jobs"]["robench"]["steps"]
    runs = {step.get("if", ""): step["run"] for step in steps if "run" in step and "pip install" not in step["run"]}
    store = {"MLFLOW_TRACKING_URI": "sqlite:///mlruns.db"}
    for condition in ("github.ref == 'refs/heads/main'", "github.event_name == 'pull_request'"):
        run = user_shell(runs[condition], tmp_path, **store)
        assert run.returncode == 0, (condition, run.stderr[-3000:])
    assert "gate" in run.stderr.lower() or "baseline" in run.stderr.lower()
