"""What a new user ran into: failed runs leaving folders, overwritten results, cut messages, slow start-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robench
from robench.config import EvalConfig
from robench.errors import UsageError
from robench.tasks.run import run_evaluation

from cli_helpers import invoke, one_error_line, readme_block


@pytest.fixture()
def bad_labels(tmp_path, digits_split):
    """Digits whose labels are outside the model's 10 classes: the run fails at its first batch."""
    _, x_te, _, y_te = digits_split
    path = tmp_path / "bad.npz"
    np.savez(path, x=x_te[:20], y=np.full(20, 99))
    return path


def test_a_failed_run_leaves_no_empty_run_directory(bad_labels, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "example:digits", "--suite", "fgsm", "--data", f"npz:{bad_labels}", "-q")
    assert result.exit_code == 2, result.stderr
    assert "label" in one_error_line(result)
    # The run directory runs/fgsm/example-digits/<time> was made (and locked) before the failure,
    # and removed again: no run folder, no file anywhere.
    assert (tmp_path / "runs" / "fgsm" / "example-digits").is_dir()
    assert list((tmp_path / "runs").rglob("*")) == [tmp_path / "runs" / "fgsm",
                                                    tmp_path / "runs" / "fgsm" / "example-digits"]


def test_a_failed_run_keeps_a_directory_that_existed(bad_labels, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("eval", "example:digits", "--suite", "fgsm", "--data", f"npz:{bad_labels}", "-o", out, "-q")
    assert result.exit_code == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_compare_skips_run_directories_without_results(tmp_path):
    done = tmp_path / "runs" / "a"
    result = invoke("eval", "example:digits", "--suite", "fgsm", "--limit", 60, "-o", done, "-q")
    assert result.exit_code == 0, result.stderr
    empty = tmp_path / "runs" / "b"
    empty.mkdir()
    shown = invoke("compare", done, empty, "--format", "csv")
    assert shown.exit_code == 0, shown.stderr
    assert "skipped 1 run directory without results.json" in shown.stderr
    assert str(empty) in shown.stderr
    doc = json.loads((done / "results.json").read_text())
    assert f"{doc['clean']['accuracy'] * 100:.2f}" in shown.stdout
    only_empty = invoke("compare", empty)
    assert only_empty.exit_code == 2
    assert "no results.json" in one_error_line(only_empty)


def test_api_save_never_overwrites_complete_results(tmp_path):
    out = tmp_path / "run"
    _, result = run_evaluation(EvalConfig.of(model="example:digits", suite="fgsm", limit=40, out=out))
    before = (out / "results.json").read_bytes()
    with pytest.raises(UsageError, match="already holds a complete results.json"):
        result.save(out)
    assert (out / "results.json").read_bytes() == before
    again = tmp_path / "copy"
    result.save(again)
    result.save(again, overwrite=True)  # asked for explicitly
    assert json.loads((again / "results.json").read_text())["clean"] == result.doc["clean"]


def test_an_interruption_before_any_sample_finished_writes_nothing(tmp_path, monkeypatch):
    from robench.evaluation import engine

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_attack_entries", stop)  # Ctrl-C during the first segment's attacks
    out = tmp_path / "run"
    result = invoke("eval", "example:digits", "--suite", "fgsm", "-o", out, "-q")
    assert result.exit_code == 130
    line = one_error_line(result, "interrupted")
    assert "nothing to save (0 of 540 samples)" in line and "--resume" not in line
    assert not out.exists()


def test_the_pickle_refusal_names_the_refused_object_whole(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), path)
    result = invoke("eval", path, "--data", "example:digits", "--suite", "fgsm")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.endswith("(refused: it holds torch.nn.modules.container.Sequential)"), line


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_robench_and_help_do_not_load_torch():
    """Start-up cost is the imports: --help and ``import robench`` must not pay for torch or pandas."""
    assert not {"torch", "pandas"} & _modules_after("import robench")
    loaded = _modules_after("from robench.cli import app\nfrom typer.testing import CliRunner\n"
                            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
                            "r = CliRunner().invoke(app, ['eval', '--help']); assert r.exit_code == 0, r.output")
    assert not {"torch", "torchvision", "pandas", "matplotlib"} & loaded


def test_the_commands_that_read_results_do_not_load_torch(tmp_path):
    """gate, compare, plot and report read JSON: a CI step that gates a run pays no torch start-up (about
    3 s on a CPU)."""
    golden = Path(__file__).with_name("golden")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(golden / "fgsm.json", run / "results.json")
    commands = [["gate", run / "results.json", "--baseline", golden / "fgsm.json"],
                ["compare", golden / "fgsm.json", golden / "pgd-linf.json"],
                ["plot", golden / "pgd-linf.json", "--out", tmp_path / "curve.png"],
                ["report", run, "--out", tmp_path / "report.html"]]
    code = "from robench.cli import app\nfrom typer.testing import CliRunner\n" + "".join(
        f"r = CliRunner().invoke(app, {list(map(str, args))!r}); assert r.exit_code == 0, r.output\n"
        for args in commands)
    assert not {"torch", "torchvision"} & _modules_after(code)
    assert (tmp_path / "curve.png").stat().st_size and (tmp_path / "report.html").stat().st_size


def test_a_run_does_not_load_torchvision(tmp_path):
    """torchvision loads torch._dynamo (about 2 s): a run of a bundled model on bundled data needs none of it,
    and results.json still names its version."""
    code = ("from robench.cli import app\nfrom typer.testing import CliRunner\n"
            f"r = CliRunner().invoke(app, ['eval', 'example:digits', '--suite', 'fgsm', '--limit', '8', '--quiet', "
            f"'--out', {str(tmp_path / 'run')!r}]); assert r.exit_code == 0, r.output\n")
    assert not {"torchvision", "torch._dynamo"} & _modules_after(code)
    import torchvision

    assert json.loads((tmp_path / "run" / "results.json").read_text())["env"]["torchvision"] == torchvision.__version__


def test_lazy_public_names_are_the_real_ones():
    from robench.api import evaluate
    from robench.tasks.run import run_evaluation as real

    assert robench.evaluate is evaluate and robench.run_evaluation is real
    assert set(robench.__all__) <= set(dir(robench))
    with pytest.raises(AttributeError):
        robench.no_such_name  # noqa: B018


def test_progress_counts_sample_attacks_and_prints_plain_lines_off_a_terminal(tmp_path, monkeypatch):
    """Not a terminal (CI): periodic plain lines with the total in samples x entries and an ETA."""
    from robench.cli import progress_view

    monkeypatch.setattr(progress_view, "PLAIN_EVERY_SECONDS", 0.0)  # a line per entry and segment
    result = invoke("eval", "example:digits", "--suite", "digits", "-b", 64, "-o", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "sample-attacks" in line]
    total = 540 * 9  # the digits suite has 9 entries
    assert lines and all(f"/{total:,} sample-attacks" in line for line in lines)
    done = [int(line.split(": ")[2].split("/")[0].replace(",", "")) for line in lines]
    assert done == sorted(done) and done[-1] == total
    # The bar moves per entry: some lines fall inside a segment (not a multiple of 9 entries' worth).
    assert any(d % (9 * 64) for d in done)
    assert "eta 0:00:00" in lines[-1]


def test_progress_eta_weighs_entries_by_their_cost():
    from rich.console import Console

    from robench.cli.progress_view import EvalProgress

    progress = EvalProgress(Console(file=open("/dev/null", "w")), "run", [1.0, 99.0], live=False)
    with progress:
        progress.start(100, 0)
        progress.entry_done(-1, 100)
        progress.entry_done(0, 100)
        # Half the sample-attacks are done but only ~2% of the work: the ETA must say so.
        assert progress.work.done_units == progress.work.total_units // 2
        assert progress.work.done_weight / progress.work.total_weight < 0.02
        assert "(2% of the work)" in progress.plain_line()


def _options_without_help(command, prefix=""):
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options_without_help(sub, f"{prefix} {name}")
    for param in command.params:
        if param.param_type_name in ("option", "argument") and not getattr(param, "help", None):
            yield f"robench{prefix} {param.name}"


def test_every_option_has_help_and_no_python_type_tags():
    import typer

    from robench.cli import app

    assert list(_options_without_help(typer.main.get_command(app))) == []
    shown = invoke("eval", "--help", env={"COLUMNS": "160"}).stdout
    assert "Usage: robench eval [OPTIONS] MODEL" in shown
    for tag in ("<bool>", "<str>", "<int>", "{model}"):
        assert tag not in shown
    assert "--num-classes" in shown and "INTEGER" in shown


def test_readme_direct_attack_call_runs_as_written(tmp_path):
    """The README's direct call, saved to a file and run from a fresh folder with no PYTHONPATH help."""
    script = tmp_path / "direct-attack.py"
    script.write_text(readme_block("direct-attack.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    fooled, total, delta = re.fullmatch(r"fooled (\d+) of (\d+); max \|delta\| ([0-9.]+)\n", run.stdout).groups()
    assert int(total) == 100 and 0 < int(fooled) < 100  # PGD at 0.1 fools some digits, not all
    assert float(delta) <= 0.1  # inside the eps-ball the call was given


def test_a_result_shows_a_short_summary_in_a_notebook():
    """repr is one line with the numbers (not the document, samples and config); the HTML view is a
    small table of every entry as evaluated."""
    suite = {"name": "px", "attacks": [{"attack": "pixels", "pixels": [1, 8], "trials": 2},
                                        {"attack": "fgsm", "eps": ["4/255"]}]}
    result = robench.evaluate("example:digits", "example:digits", suite, limit=60)
    text = repr(result)
    assert "\n" not in text and len(text) < 200
    assert f"clean={100 * result.clean_accuracy:.2f}%" in text and f"worst={100 * result.robust_accuracy:.2f}%" in text
    page = result._repr_html_()
    assert page.count("<tr>") == 1 + 1 + 3  # header, clean, three settings
    for setting in ("1 px", "8 px", "eps 4/255"):
        assert setting in page
    assert "<script" not in page


def test_the_progress_bar_fits_80_columns_and_shows_no_early_eta():
    import io

    from rich.console import Console

    from robench.cli.progress_view import EvalProgress

    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    progress = EvalProgress(console, "a-model-with-a-rather-long-name · autoattack", [1.0, 99.0], live=True)
    with progress:
        progress.start(10_000, 0)
        progress.entry_done(-1, 100)  # a sliver of the work: its speed says little
        assert progress.work.seconds_left() is None
        progress.entry_done(-1, 9_900)
        progress.entry_done(0, 5_000)
        progress.entry_done(1, 1_000)  # a tenth of the work (the expensive entry weighs 99)
        table = progress._bar.make_tasks_table(progress._bar.tasks)
    shown = Console(file=io.StringIO(), width=80, record=True, color_system=None)
    shown.print(table)
    lines = shown.export_text().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    assert "6,000/20,000 sample-attacks" in lines[0] and "eta -" not in lines[0]


def test_eval_help_is_grouped_and_nothing_is_cut_at_80_columns():
    result = invoke("eval", "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    text = result.stdout
    for panel in ("Model", "Data", "Suite and attacks", "Speed and precision", "Output and resume",
                  "Re-identification", "CI gate (with --baseline)"):
        assert f"─ {panel} ─" in text, panel
    assert "…" not in text, "an option's description was cut"
    assert all(len(line) <= 80 for line in text.splitlines())
    top = invoke("--help", env={"COLUMNS": "80"}).stdout
    gate = next(line for line in top.splitlines() if "│ gate " in line)
    assert gate.rstrip(" │").endswith("dropped."), "the gate's summary fits one line"


def test_torchvision_weights_file_without_preprocessing_is_said(tmp_path):
    """torchvision:NAME --weights FILE brings no normalisation: said once on stderr, not guessed; naming
    the weights (or --normalize) gives the preprocessing and no note."""
    import torchvision

    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), tmp_path / "sq.pt")
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=images, y=np.array([0, 1, 2, 0]))
    common = ["--weights", tmp_path / "sq.pt", "--data", f"npz:{tmp_path / 'rgb.npz'}", "--suite", "clean",
              "--quiet"]
    plain = invoke("eval", "torchvision:squeezenet1_1", *common, "--out", tmp_path / "a")
    assert plain.exit_code == 0, plain.stderr
    warnings = [line for line in plain.stderr.splitlines() if line.startswith("robench: warning:")]
    assert len(warnings) == 1 and "no normalisation is applied" in warnings[0] and "--normalize" in warnings[0]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["model"]["normalization"] is None
    for extra, spec in ((["--normalize", "imagenet"], "torchvision:squeezenet1_1"),
                        ([], "torchvision:squeezenet1_1:DEFAULT")):
        named = invoke("eval", spec, *common, *extra, "--out", tmp_path / f"b{len(extra)}")
        assert named.exit_code == 0, named.stderr
        assert "no normalisation" not in named.stderr
        doc = json.loads((tmp_path / f"b{len(extra)}" / "results.json").read_text())
        assert doc["model"]["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
