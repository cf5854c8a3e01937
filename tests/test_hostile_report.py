"""The report and the gate on hostile run directories, impossible documents and very long entry labels.

* A ``results.json``, an adversarial grid or a ``config.json`` that is a device (a link to /dev/zero,
  which never ends) or a FIFO (which blocks its reader for ever): the commands run in a subprocess with
  a time and a memory limit that must not be reached; results.json is refused in one line, an image or
  config.json costs the page only that part.
* A document whose numbers are each in range but contradict each other (robust accuracy above clean
  accuracy, a success rate that is not 1 - robust / attacked, ...) is refused; every real one passes.
* An entry label of 300 characters (or 90 CJK characters, 3 bytes each) names files that fit a file
  system, the same ones on a resumed run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robench.api import EvaluationInterrupted
from robench.config import EvalConfig
from robench.errors import Interrupted, UsageError
from robench.models import load_model
from robench.results.adversarial import read_examples
from robench.results.file_names import MAX_STEM_BYTES, file_stem, unique_stems
from robench.results.locking import release_run_dirs
from robench.results.reading import read_result, validate_document
from robench.tasks import Hooks
from robench.tasks.run import run_evaluation
from cli_helpers import invoke, one_error_line, stop_after, evaluate_with_state

GOLDEN = Path(__file__).with_name("golden")
TIME_LIMIT_S = 60
# torch's libraries map about 3 GiB of address space on import; reading /dev/zero to the end would pass this.
MEMORY_LIMIT = 6 * 2 ** 30
IMAGE = "fgsm_4_255.png"  # one of the three grids of the fgsm suite
LONG = "x" * 300
CJK = "数" * 90
PARTIAL_SUITE = {"name": "partial", "attacks": [{"attack": "fgsm", "eps": [0.1, 0.2]},
                                                {"attack": "pgd", "eps": 0.1, "steps": 3}]}
LONG_SUITE = f"""name: long
attacks:
  - attack: fgsm
    eps: 0.1
    label: {LONG}
  - attack: fgsm
    eps: 0.1
    label: {CJK}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-report")
    for name, extra in (("fgsm", ("--save-adversarial", 4)), ("digits", ())):
        done = invoke("eval", "example:digits", "--suite", name, "--limit", 32, "--out", root / name, "--quiet",
                      *extra)
        assert done.exit_code == 0, done.stderr
    return root


@pytest.fixture()
def run(runs, tmp_path) -> Path:
    """A fresh copy of the fgsm run (with saved grids) to damage."""
    return Path(shutil.copytree(runs / "fgsm", tmp_path / "run"))


def limited_cli(*args) -> subprocess.CompletedProcess:
    """``robench ARGS`` in a subprocess that may neither outgrow MEMORY_LIMIT nor outlast TIME_LIMIT_S."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    # A hang raises TimeoutExpired, failing the test; a memory blow-up fails with exit 3 (MemoryError).
    return subprocess.run([sys.executable, "-m", "robench", *map(str, args)], capture_output=True, text=True,
                          timeout=TIME_LIMIT_S, preexec_fn=limit_memory)


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robench: error: "), done.stderr
    return lines[0]


def make_hostile(path: Path, kind: str) -> None:
    """Replace ``path`` by a link to a device that never ends, or by a FIFO no one writes to."""
    path.unlink()
    if kind == "device":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)


KIND_TEXT = {"device": "is a device, not a regular file", "fifo": "is a pipe (FIFO), not a regular file"}


# ------------------------------------------------------------------ devices and pipes in a run directory
@pytest.mark.parametrize("kind", ["device", "fifo"])
@pytest.mark.parametrize("named", ["directory", "file"])
def test_report_refuses_a_results_json_that_is_not_a_file(run, tmp_path, kind, named):
    make_hostile(run / "results.json", kind)
    page = tmp_path / "report.html"
    done = limited_cli("report", run if named == "directory" else run / "results.json", "--out", page)
    assert done.returncode == 2, done.stderr
    assert error_line(done) == f"robench: error: results.json {run / 'results.json'} {KIND_TEXT[kind]}"
    assert not page.exists()


@pytest.mark.parametrize("command, kind", [("gate", "device"), ("compare", "fifo"), ("plot", "fifo")])
def test_gate_compare_and_plot_refuse_it_too(runs, run, tmp_path, command, kind):
    make_hostile(run / "results.json", kind)
    args = {"gate": ("gate", run, "--baseline", runs / "fgsm"), "compare": ("compare", runs / "fgsm", run),
            "plot": ("plot", run, "--out", tmp_path / "fig.png")}[command]
    done = limited_cli(*args)
    assert done.returncode == 2, done.stderr
    # compare does not take the directory for an unfinished run: the file is there, and refused
    assert error_line(done) == f"robench: error: results.json {run / 'results.json'} {KIND_TEXT[kind]}"


@pytest.mark.parametrize("image, config", [("device", "fifo"), ("fifo", "device")])
def test_report_leaves_out_an_image_or_config_json_that_is_not_a_file(run, tmp_path, image, config):
    doc = json.loads((run / "results.json").read_text())
    assert "command" not in doc["env"]  # so the report looks for the command in config.json
    make_hostile(run / "adversarial" / IMAGE, image)
    make_hostile(run / "config.json", config)
    page = tmp_path / "report.html"
    done = limited_cli("report", run, "--out", page)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("robench: warning:")]
    assert warnings == [f"robench: warning: image {run / 'adversarial' / IMAGE} {KIND_TEXT[image]}: "
                        "left out of the report"]
    text = page.read_text(encoding="utf-8")
    assert text.count("<img ") == 2 and 'alt="fgsm_4_255"' not in text  # the other two grids are there
    assert "Not embedded" in text and f"<li>{IMAGE}</li>" in text
    assert "Not recorded (no config.json" in text  # an unreadable config.json costs only the command line


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_saved_examples_are_read_only_from_files(run, kind):
    npz = run / "adversarial" / "fgsm_4_255.npz"
    assert len(read_examples(npz).index) == 4
    make_hostile(npz, kind)
    with pytest.raises(UsageError, match=re.escape(KIND_TEXT[kind])):
        read_examples(npz)  # refused before numpy opens it (a FIFO would block it)


# ------------------------------------------------------------------ documents that contradict themselves
# A real document with room for every edit: 118 of 120 correct, entries from 113 down to 1 robust image.
DIGITS = GOLDEN / "digits.json"


def golden_doc() -> dict:
    return json.loads(DIGITS.read_text())


def gate_doc(tmp_path, doc):
    path = tmp_path / "cur.json"
    path.write_text(json.dumps(doc))
    return invoke("gate", path, "--baseline", DIGITS)


def robust_count(entry: dict) -> int:
    return round(entry["accuracy"] * entry["n"])


def consistent(doc: dict, robust: list[int]) -> dict:
    """``doc`` with each entry keeping ``robust[i]`` images, every derived number as the writer derives it."""
    out = copy.deepcopy(doc)
    n, correct = out["clean"]["n"], out["clean"]["correct"]
    for entry, k in zip(out["attacks"], robust):
        entry.update(accuracy=k / n, attacked=correct, success_rate=(correct - k) / correct)
    out["robust_accuracy"] = min(robust) / n
    out["mean_attack_accuracy"] = sum(e["accuracy"] for e in out["attacks"]) / len(out["attacks"])
    return out


def test_every_real_document_is_consistent(runs, test_tensors, tmp_path):
    for path in [*sorted(GOLDEN.glob("*.json")), runs / "fgsm", runs / "digits"]:
        read_result(path)  # raises if any identity fails
    digits = json.loads((runs / "digits" / "results.json").read_text())
    assert {a["attack"] for a in digits["attacks"]} == {"fgsm", "bim", "pgd"}
    # An interrupted run's partial document holds the same identities over its finished samples.
    with pytest.raises(EvaluationInterrupted) as info:
        evaluate_with_state(load_model("example:digits").model, test_tensors, PARTIAL_SUITE, device="cpu",
                         batch_size=4, on_batch=stop_after(1))
    partial = json.loads((info.value.result.save(tmp_path / "partial") / "results.json").read_text())
    assert partial["complete"] is False and 0 < partial["clean"]["n"] < len(test_tensors[1])
    validate_document({**partial, "complete": True}, "partial")
    page = invoke("report", tmp_path / "partial", "--out", tmp_path / "partial.html")
    assert page.exit_code == 0, page.stderr


def test_a_consistent_edit_is_gated_not_refused(tmp_path):
    doc = golden_doc()
    fewer = consistent(doc, [robust_count(e) - 1 for e in doc["attacks"]])
    done = gate_doc(tmp_path, fewer)
    assert done.exit_code == 1 and "FAILED" in done.stderr, done.stderr


def test_every_attack_above_clean_accuracy_is_refused(tmp_path):
    """The issue's document: every attack at 1.0 under a clean accuracy of 0.98, a success rate of 0.04."""
    doc = golden_doc()
    for entry in doc["attacks"]:
        entry.update(accuracy=1.0, success_rate=0.04)
    doc.update(robust_accuracy=1.0, mean_attack_accuracy=1.0)
    done = gate_doc(tmp_path, doc)
    assert done.exit_code == 2
    assert ("cur.json: attacks[0].accuracy: 1.0 is above clean.accuracy 0.9833333333333333: only samples "
            "classified correctly can stay robust") in one_error_line(done)


def edit_success_rate(doc):
    doc["attacks"][1]["success_rate"] = min(1.0, doc["attacks"][1]["success_rate"] + 0.1)


def edit_attacked(doc):
    doc["attacks"][0]["attacked"] -= 1


def edit_entry_n(doc):
    doc["attacks"][2]["n"] += 1


def edit_half_sample(doc):
    doc["attacks"][0]["accuracy"] = (robust_count(doc["attacks"][0]) - 0.5) / doc["clean"]["n"]


def edit_clean_accuracy(doc):
    doc["clean"]["accuracy"] = (doc["clean"]["correct"] - 1) / doc["clean"]["n"]


def edit_mean(doc):
    doc["mean_attack_accuracy"] -= 0.01


def edit_robust_above_weakest(doc):
    doc["robust_accuracy"] = max(a["accuracy"] for a in doc["attacks"])


def edit_robust_below_floor(doc):
    # No entry breaks any image, so no image can fall in the worst case.
    doc.update(consistent(doc, [doc["clean"]["correct"]] * len(doc["attacks"])))
    doc["robust_accuracy"] -= 1 / doc["clean"]["n"]


@pytest.mark.parametrize("edit, field, says", [
    (edit_success_rate, "attacks[1].success_rate", "must be 1 - robust / attacked"),
    (edit_attacked, "attacks[0].attacked", "must equal clean.correct"),
    (edit_entry_n, "attacks[2].n", "must equal clean.n"),
    (edit_half_sample, "attacks[0].accuracy", "is not a whole number of samples out of n = 120"),
    (edit_clean_accuracy, "clean.accuracy", "must be correct / n"),
    (edit_mean, "mean_attack_accuracy", "must be the mean of the entries' accuracies"),
    (edit_robust_above_weakest, "robust_accuracy", "and the lowest entry accuracy"),
    (edit_robust_below_floor, "robust_accuracy", "must lie between 118/120 and the lowest entry accuracy 118/120"),
])
def test_contradicting_numbers_are_refused(tmp_path, edit, field, says):
    doc = golden_doc()
    robust = [robust_count(e) for e in doc["attacks"]]
    assert min(robust) < max(robust) < doc["clean"]["correct"] < doc["clean"]["n"], "room for each edit"
    edit(doc)
    done = gate_doc(tmp_path, doc)
    assert done.exit_code == 2, done.stderr
    line = one_error_line(done)
    assert f"cur.json: {field}: " in line and says in line, line


def test_a_success_rate_with_nothing_attacked_is_refused(tmp_path):
    doc = golden_doc()
    n = doc["clean"]["n"]
    doc["clean"].update(correct=0, accuracy=0.0)
    for entry in doc["attacks"]:
        entry.update(accuracy=0.0, attacked=0, success_rate=None)
    doc.update(robust_accuracy=0.0, mean_attack_accuracy=0.0)
    path = tmp_path / "none.json"
    path.write_text(json.dumps(doc))
    assert read_result(path).doc["clean"]["n"] == n  # what robench writes when every image is misclassified
    doc["attacks"][0]["success_rate"] = 0.0
    done = gate_doc(tmp_path, doc)
    assert done.exit_code == 2
    assert "attacks[0].success_rate: must be null when no sample was attacked" in one_error_line(done)


def test_reid_cmc_must_not_fall_with_the_rank(tmp_path):
    run = invoke("eval", "example:reid-digits", "--suite", "reid-clean", "--quiet", "--out", tmp_path / "reid")
    assert run.exit_code == 0, run.stderr
    doc = read_result(tmp_path / "reid").doc
    ranks = sorted((int(k[4:]), k) for k in doc["clean"] if k.startswith("rank"))
    (_, before), (_, last) = ranks[-2], ranks[-1]
    assert doc["clean"][before] > 0
    doc["clean"][last] = doc["clean"][before] / 2
    path = tmp_path / "cur.json"
    path.write_text(json.dumps(doc))
    done = invoke("gate", path, "--baseline", tmp_path / "reid")
    assert done.exit_code == 2
    assert f"cur.json: clean.{last}: must be at least {before}" in one_error_line(done)


@pytest.mark.parametrize("key, value, says", [("recognition_rate", 0.5, "must be 1 - misclassified / total"),
                                              ("w", 0.5, "must be misclassified / total"),
                                              ("pi", 99.0, "must be w / (p r a)")])
def test_pixel_rows_must_agree(tmp_path, key, value, says):
    golden = GOLDEN / "pixel-index.json"
    doc = json.loads(golden.read_text())
    doc["experiments"][0]["results"][1][key] = value
    path = tmp_path / "cur.json"
    path.write_text(json.dumps(doc))
    done = invoke("gate", path, "--baseline", golden)
    assert done.exit_code == 2
    assert f"cur.json: experiments[0].results[1].{key}: {says}" in one_error_line(done)


# ------------------------------------------------------------------ long entry labels
def test_file_stems_fit_stay_distinct_and_stable():
    labels = [LONG + "@0.1", LONG[:-1] + "y@0.1", CJK + "@0.1", "数" * 200, "é" * 120, "a" * 99 + "数" * 3,
              "\ud800" * 300, "." * 300, "pgd@8/255"]
    stems = [file_stem(label) for label in labels]
    assert all(len(s.encode("utf-8")) <= MAX_STEM_BYTES for s in stems), stems
    assert len(set(stems)) == len(stems)  # labels alike for 200 characters still differ
    assert stems == [file_stem(label) for label in labels]  # a resumed run writes the same names
    assert stems[-1] == "pgd_8_255"  # short labels are named as before
    assert stems[0].startswith("x" * 80)  # a long one keeps a readable start
    # Even a hundred equal labels, each with its -N, fit with .npz and the atomic write's temporary affixes.
    assert max(len(s.encode("utf-8")) for s in unique_stems([LONG] * 100)) + len(".npz") + 10 < 255


def check_saved(run: Path) -> None:
    files = sorted((run / "adversarial").iterdir())
    assert len(files) == 4 and {f.suffix for f in files} == {".npz", ".png"}
    assert all(len(f.name.encode("utf-8")) <= 255 for f in files)
    entries = {read_examples(f).entry for f in files if f.suffix == ".npz"}
    assert entries == {f"{LONG}@0.1", f"{CJK}@0.1"}  # the file keeps the whole label


def test_long_labels_run_save_and_report(tmp_path):
    (tmp_path / "long.yaml").write_text(LONG_SUITE, encoding="utf-8")
    run = tmp_path / "run"
    done = invoke("eval", "example:digits", "--suite", tmp_path / "long.yaml", "--limit", 16, "--save-adversarial",
                  2, "--out", run, "--quiet")
    assert done.exit_code == 0, done.stderr
    assert (run / "results.json").is_file()
    check_saved(run)
    page = invoke("report", run, "--out", tmp_path / "report.html")
    assert page.exit_code == 0, page.stderr
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count("<img ") == 2


def test_long_labels_resume(tmp_path):
    (tmp_path / "long.yaml").write_text(LONG_SUITE, encoding="utf-8")
    run = tmp_path / "run"
    options = dict(model="example:digits", suite=str(tmp_path / "long.yaml"), limit=40, batch_size=1,
                   save_every=0, save_adversarial=2)
    with pytest.raises(Interrupted):  # after the first segment (32 samples): a partial result with examples
        run_evaluation(EvalConfig.of(**options, out=run), Hooks(on_batch=stop_after(1)))
    release_run_dirs()
    assert (run / "progress.pt").is_file() and json.loads((run / "results.json").read_text())["complete"] is False
    resumed = invoke("eval", "example:digits", "--suite", tmp_path / "long.yaml", "--limit", 40, "--batch-size", 1,
                     "--save-every", 0, "--save-adversarial", 2, "--quiet", "--resume", run)
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((run / "results.json").read_text())["complete"] is True
    check_saved(run)
