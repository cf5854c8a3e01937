"""Every fenced block of README.md and of the docs pages (docs/), run as a user runs it, or checked where it is
not something to run.

The blocks are found by ``readme_blocks`` (tests/cli_helpers.py) and named by the
``<!-- example: NAME -->`` marker above each. ``test_every_readme_block_is_run_or_checked`` fails
for a block without a marker, and for one that no test here runs and that ``CHECKED_DIFFERENTLY``
does not list with its reason.

Commands run through the installed ``robench`` script and python blocks in a fresh ``python``, each
block in a fresh temporary folder of its own (the blocks that read each other's runs share one) that
is also HOME (so ``~/data`` lies inside it), with no PYTHONPATH. A block that needs what a reader
would have (a checkpoint, a dataset that cannot be downloaded offline) gets it from the test, as
``PLANS`` says; what cannot run in seconds as written runs with the substitutions listed there, each
with its reason. Fragments (a suite entry, a recipe, a pyproject.toml table) and output samples are
checked as ``CHECKED_DIFFERENTLY`` says.

The commands' time is mostly interpreter start-up (importing torch and torchvision takes seconds),
so every block selected for the session is started in the background, two at a time, when the first
test here runs; each test waits for its own block. Blocks that take more than ~15 s are marked
``slow`` (deselect them with ``-m "not slow"``; a plain ``python -m pytest`` runs them).
"""

from __future__ import annotations

import ast
import importlib.metadata
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from cli_helpers import documentation_files, plugins_from, readme_blocks

TESTS = Path(__file__).resolve().parent
WORKERS = 2
TIMEOUT = 600  # seconds, per command

slow = pytest.mark.slow  # registered in pyproject.toml


# -- the table ---------------------------------------------------------------------------------------------------

# Blocks that are not run as written here, and how each is checked instead. A reason that starts with
# "run by tests/FILE.py" names the file whose test runs the block (it must read it with ``readme_block``).
CHECKED_DIFFERENTLY = {
    "setup-dev": "installs the dev extras and torchattacks, and runs the whole test suite, this file included: CI "
                 "runs exactly that; the test checks that the `dev` extra exists and brings pytest and what "
                 "torchattacks imports",
    "suite-pgd-linf": "a suite file: loaded with robench's suite loader; its name and entries are those of the "
                      "built-in pgd-linf suite it shows",
    "suite-error": "an error message: the README's my-suite.yaml (without its file-name comment line) with the pgd "
                   "entry's eps set to -0.1, run with the `command` block's command (in this process, the suite's "
                   "path shown as the README names it); stderr compared line for line",
    "my_attacks.py": "run by tests/test_plugins.py (test_readme_example_runs_as_written): saved as "
                     "my_attacks.py and imported by the `command` block through the installed script",
    "my-suite.yaml": "run by tests/test_plugins.py (test_readme_example_runs_as_written), with the `command` "
                     "block",
    "command": "run by tests/test_plugins.py (test_readme_example_runs_as_written): the installed script "
               "from a fresh folder holding the two files, with --limit",
    "entry-point-toml": "a pyproject.toml fragment: parsed; the entry point names the class the my_attacks.py block "
                        "defines, under that attack's own name",
    "results-json": "a sample document (`...` marks elided fields): its keys are compared, at every depth, with "
                    "those of the `setup` block's results.json, and its numbers with that run's",
    "direct-attack.py": "run by tests/test_new_user.py (test_readme_direct_attack_call_runs_as_written): saved to a "
                        "file and run with a fresh python from a fresh folder",
    "pixel-index-table": "an output sample: the 540 bundled test digits saved as PNG files in class folders, "
                         "`robench pixel-index example:digits digit-images --pixels 1,2,4,8 --trials 10`, stdout "
                         "compared line for line",
    "suite-pixels-entry": "a suite entry: wrapped in a suite and loaded with robench's suite loader (its `area: 200` "
                          "is for 224-pixel inputs, larger than any bundled image)",
    "recipe-digits-pgd-at": "a recipe file: loaded with robench's recipe loader; the built-in digits-pgd-at recipe "
                            "but for its description and reference",
    "github-actions": "a workflow: parsed; its `run:` steps run in order in a folder holding what the repository "
                      "would (PLANS), `pip install robench` skipped (robench is installed)",
    "suite-ta-square": "a suite entry: wrapped in a suite and run on 10 bundled digits with robench.evaluate",
    "coming-from-torchattacks": "run by tests/test_docs.py (test_coming_from_torchattacks_runs_as_written): a "
                                "fresh python in a fresh folder; both printed accuracies equal",
    "torchrun-one-machine": "run by tests/test_docs.py (test_one_machine_torchrun_command_parses): parsed by "
                            "torchrun's and robench's own parsers (it needs 4 GPUs; tests/test_distributed.py runs "
                            "torchrun here)",
    "torchrun-nodes": "run by tests/test_docs.py (test_several_nodes_torchrun_command_parses): parsed as "
                      "torchrun-one-machine (it needs two nodes)",
    "schema-run": "run by tests/test_docs.py (test_schema_example_runs_as_written): the installed script in a fresh "
                  "folder",
    "schema-validate.py": "run by tests/test_docs.py (test_schema_example_runs_as_written): a fresh python in the "
                          "folder schema-run wrote to; both lines it prints compared",
    "mlflow-tracking": "run by tests/test_docs.py (test_mlflow_tracking_runs_as_written): each command through the "
                       "installed script from a fresh folder; the store read back",
    "mlflow-github-actions": "run by tests/test_docs.py (test_mlflow_workflow_steps_run_as_written): parsed; its "
                             "`run:` steps run with a local SQLite store as the secret, `pip install` skipped",
    "torchrun-slurm": "run by tests/test_docs.py (test_slurm_script_is_bash_and_its_torchrun_command_parses): "
                      "`bash -n`, and its torchrun line parsed as torchrun-one-machine (it needs a Slurm cluster)",
    "defended.py": "run by tests/test_bpda.py (test_recipe_runs_as_written): saved in a fresh folder and run there "
                   "with a fresh python, as the `bpda-recipe` block's first line",
    "pgd-bpda.yaml": "run by tests/test_bpda.py (test_recipe_runs_as_written), with the `bpda-recipe` block",
    "soft_quantize.py": "run by tests/test_bpda.py (test_recipe_runs_as_written): saved in the folder and imported "
                        "by the `bpda-recipe` block's --plugin",
    "bpda-recipe": "run by tests/test_bpda.py (test_recipe_runs_as_written): each line through the installed script "
                   "from the folder holding the three files; the JPEG run with --limit 200 (the digits suite on "
                   "540 JPEG-compressed images costs ~10 s); the accuracies the page quotes compared",
    "bpda-error": "run by tests/test_bpda.py (test_unknown_module_is_one_line_naming_the_entry): an error message: "
                  "pgd-bpda.yaml with the typo, run with the recipe's command; stderr compared line for line",
    "bpda-api": "run by tests/test_bpda.py (test_api_block_runs_as_written): executed in this process from a fresh "
                "folder; what it prints checked",
    "check-attack-command": "run by tests/test_attack_check.py (test_docs_examples_run_as_written): the installed "
                            "script in a fresh folder; the table, the exit code and the run folder checked",
    "check-attack-api": "run by tests/test_attack_check.py (test_docs_examples_run_as_written): a fresh python in "
                        "a fresh folder; what it prints checked against the command's results",
    "certify-command": "run by tests/test_certify.py (test_docs_examples_run_as_written): the installed script in a "
                       "fresh folder; the table and the run folder checked",
    "certify-api": "run by tests/test_certify.py (test_docs_examples_run_as_written): a fresh python in a fresh "
                   "folder; what it prints checked against the command's results",
    "certify-train": "run by tests/test_certify.py (test_training_block_runs): each line through the installed "
                     "script in a fresh folder, with --epochs 2 and --n 200 --limit 40 (the page's numbers are from "
                     "the block as written: two minutes)",
    "min-norm-suite.yaml": "run by tests/test_min_norm.py (test_docs_example_runs_and_gates): saved as "
                           "min-norm.yaml for the `min-norm-commands` block",
    "min-norm-commands": "run by tests/test_min_norm.py (test_docs_example_runs_and_gates): each line through "
                         "the in-process command line in a fresh folder; then the gate against a baseline with a "
                         "larger median exits 1",
}

# Lines of bash blocks that are not run (a line joined with && is split there first).
SKIPPED_COMMANDS = {
    "python3 -m pip install": "installs robench: the tests use the copy installed in this environment",
    "pip install": "installs robench: the tests use the copy installed in this environment",
}


@dataclass(frozen=True)
class Sub:
    """``old`` replaced by ``new`` in the block's text, and why."""

    old: str
    new: str
    why: str


@dataclass(frozen=True)
class Plan:
    given: str = ""  # what the test puts in the folder first: what a reader would have
    subs: tuple[Sub, ...] = ()
    prelude: str = ""  # python put before the block: the names the block takes as given


NOT_CIFAR = ("torchvision checks CIFAR-10's files against their MD5 sums, so no stand-in can be written in its "
             "own format, and fetching it needs the network: 16 CIFAR-shaped images, labelled with the "
             "checkpoint's own predictions, as an npz")
RESNET_LIMIT = "ResNet-18 under 10-step PGD on 1000 images takes minutes on a CPU"
MARKET = ("Market-1501 cannot be fetched offline: a folder in its layout (query/, bounding_box_test/, names such "
          "as 0001_c1s1_000001_00.jpg) holding 20 identities of the bundled reid-digits images, their gallery "
          "views and 20 distractors")
SMALL_CNN = '''# Given by the test: a small CNN for RGB images of any size.
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
'''
CIFAR_DATA = '''# Given by the test: 16 CIFAR-shaped images (uint8 NHWC), labelled with the model's own predictions.
import numpy as np

x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])  # cifar10
with torch.no_grad():
    y = model((torch.from_numpy(x).permute(0, 3, 1, 2) / 255 - mean[:, None, None]) / std[:, None, None]).argmax(1)
'''

IMPORT = "import robench  # as the block before it\n"

PLANS = {
    "eval-checkpoint": Plan(
        given="resnet18_cifar.pt: a state dict of torchvision's resnet18 with 10 classes (random weights)",
        subs=(Sub("--data cifar10", "--data npz:cifar10-test.npz", NOT_CIFAR),
              Sub("--limit 1000", "--limit 4", RESNET_LIMIT))),
    "api-evaluate": Plan(prelude=SMALL_CNN + CIFAR_DATA),
    "api-evalconfig": Plan(
        given="resnet18.pt: a state dict of torchvision's resnet18 (its 1000 classes; random weights)",
        subs=(Sub('data="cifar10"', 'data="npz:cifar10-test.npz"', NOT_CIFAR),
              Sub("limit=1000", "limit=4", RESNET_LIMIT))),
    "api-reid": Plan(given="data/Market-1501: " + MARKET,
                     prelude=IMPORT + 'model = robench.load_model("example:reid-digits").model  # the bundled one\n'),
    "api-pixel-index": Plan(given="data/images: 6 RGB images of 320x240 in a flat folder", prelude=IMPORT + SMALL_CNN),
    "pixel-index-command": Plan(
        given="resnet50.pt: a state dict of torchvision's resnet50 (random weights); ~/imagenet-val-subset: "
              "a flat folder of 2 RGB images",
        subs=(Sub("--pixels 4,8,16,32,64", "--pixels 4,64", "each setting is a ResNet-50 pass per image and trial"),
              Sub("--delta 10,40,70,100,127", "--delta 10,127", "as --pixels"),
              Sub("--area 200,150,100,50", "--area 200,50", "as --pixels"),
              Sub("--trials 5", "--trials 1", "as --pixels"))),
    "reid-market1501": Plan(
        given="my_models.py with an `osnet` factory (a small embedding CNN) and osnet.pt, its state dict; "
              "~/data/Market-1501: " + MARKET),
    "train-loop": Plan(
        subs=(Sub("for r in baseline fdd lfm pgd-at; do", "for r in baseline pgd-at; do",
                  "each recipe costs two commands' start-up (~10 s): a plain and an adversarially trained model "
                  "keep the loop's point"),
              Sub("robench train digits-$r ", "robench train digits-$r --epochs 2 ",
                  "15 epochs of PGD training take ~30 s on a CPU"))),
    "compare-plot": Plan(
        given="the runs of the `setup`, `train-loop` and `pixel-index-table` blocks (run in the same folder, as a "
              "reader would), and a fdd-fashion-mnist run (robench.evaluate) of a small CNN on 16 Fashion-MNIST "
              "images written in torchvision's own format"),
    "github-actions": Plan(
        given="my_models.py whose `net` is the bundled digits CNN, checkpoints/model.pt its weights as a state dict, "
              "ci/val.npz 60 bundled test digits, ci/baseline/results.json from the same eval without the gate "
              "options (as the README says to make it), $GITHUB_STEP_SUMMARY a file"),
    "autoattack": Plan(
        given="edge.npz: 8 bundled test digits blended towards another class until the bundled model's logit "
              "margin is 0.05",
        subs=(Sub("MODEL", "example:digits --data npz:edge.npz",
                  "AutoAttack's budget (100 APGD steps, 9x100 targeted APGD and FAB steps, 5,000 Square queries per "
                  "robust point) takes minutes per command on a CPU; on points this close to the boundary its "
                  "first member breaks every one at all three budgets and the later members find nothing left"),)),
}

PIXEL_TABLE_COMMAND = "robench pixel-index example:digits digit-images --pixels 1,2,4,8 --trials 10"


# -- running blocks ----------------------------------------------------------------------------------------------

BLOCKS = {b.name: b for b in readme_blocks() if b.name}


def block_text(name: str) -> str:
    """The block as the user runs it: the substitutions of its plan applied (each must still apply)."""
    text = BLOCKS[name].text
    for sub in PLANS.get(name, Plan()).subs:
        assert sub.old in text, f"README block {name!r} no longer holds {sub.old!r}: update PLANS"
        text = text.replace(sub.old, sub.new)
    return text


def bash_commands(text: str) -> list[str]:
    """A bash block's commands: one per line, with continuation lines joined and a loop kept whole."""
    commands, pending, depth = [], "", 0
    for line in text.splitlines():
        pending += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        first = line.split()[0] if line.split() else ""
        depth += (first in ("for", "while", "until", "if")) - (first in ("done", "fi"))
        if depth == 0 and pending.strip():
            commands.append(pending.strip())
            pending = ""
    assert not pending.strip(), f"unfinished command: {pending!r}"
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIPPED_COMMANDS.items() if command.startswith(prefix)), None)


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: HOME is the block's folder, this environment's scripts first on PATH, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROBENCH_DEBUG")}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # two commands at a time on two cores
    env.update(extra)
    return env


@dataclass
class Done:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def ok(self) -> Done:
        assert self.returncode == 0, (f"`{self.command}` exited {self.returncode} after {self.seconds:.0f} s:\n"
                                      f"{self.stderr[-3000:]}")
        return self

    def written(self, cwd: Path) -> Path:
        """The run directory the command reported on stderr."""
        found = re.findall(r"^results written to (.+)$", self.stderr, re.MULTILINE)
        assert found, f"`{self.command}` did not say where it wrote its results:\n{self.stderr[-2000:]}"
        return cwd / found[-1].strip()


def sh(command: str, cwd: Path, env: dict[str, str] | None = None) -> Done:
    start = time.monotonic()
    run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env or user_env(cwd),
                         capture_output=True, text=True, timeout=TIMEOUT)
    return Done(command, run.returncode, run.stdout, run.stderr, time.monotonic() - start)


def run_bash_block(name: str, folder: Path, env: dict[str, str] | None = None) -> list[Done]:
    """Each command of the block in turn (skipped lines left out); stops at the first that fails."""
    done = []
    for command in bash_commands(block_text(name)):
        parts = command.split(" && ") if "\n" not in command else [command]
        for part in parts:
            if skip_reason(part):
                continue
            done.append(sh(part, folder, env))
            if done[-1].returncode:
                return done
    return done


def run_python_block(name: str, folder: Path) -> Done:
    """The block (after its prelude) saved to a file and run with a fresh python in ``folder``."""
    script = folder / f"readme_{name.replace('-', '_')}.py"
    script.write_text(PLANS.get(name, Plan()).prelude + block_text(name))
    return sh(f"python {script.name}", folder)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_attacks_below_clean(doc: dict) -> None:
    clean = doc["clean"]["accuracy"]
    assert doc["complete"] is True and doc["attacks"]
    for entry in doc["attacks"]:
        assert 0 <= entry["accuracy"] <= clean, entry
    assert doc["robust_accuracy"] <= min(entry["accuracy"] for entry in doc["attacks"])


_RNG = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int):
    """torch's global RNG seeded for the block (one thread at a time), and put back afterwards."""
    with _RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- the background work -----------------------------------------------------------------------------------------

@dataclass
class Work:
    fn: Callable[[Background], Any]
    after: tuple[str, ...] = ()


WORK: dict[str, Work] = {}


def work(name: str, after: tuple[str, ...] = ()):
    """Registers what runs block ``name`` (``after``: blocks whose results it reads)."""
    def register(fn):
        WORK[name] = Work(fn, after)
        return fn
    return register


@dataclass
class Background:
    root: Path
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(WORKERS, "readme"))
    futures: dict[str, Future] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def start(self, name: str) -> Future:
        # A block's prerequisites are queued before it, so a worker that waits for one never waits
        # for work that has not started (the pool takes work in order).
        with self.lock:
            if name not in self.futures:
                for earlier in WORK[name].after:
                    self.start(earlier)
                self.futures[name] = self.pool.submit(WORK[name].fn, self)
            return self.futures[name]

    def result(self, name: str) -> Any:
        return self.start(name).result()

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path


# The longest work first, so that the two workers finish together; compare-plot, which waits for three others,
# last. Work not named here starts after these.
START_ORDER = ["train-loop", "autoattack", "reid-example", "github-actions", "pixel-index-command", "reid-market1501",
               "eval-checkpoint", "setup", "pixel-index-table", "api-evalconfig", "api-pixel-index", "api-reid",
               "api-evaluate", "compare-plot"]


@pytest.fixture(scope="module")
def background(request, tmp_path_factory):
    """Starts the work of every selected test of this module."""
    bg = Background(tmp_path_factory.mktemp("readme"))
    selected = {getattr(getattr(item, "function", None), "readme_work", None) for item in request.session.items}
    for name in sorted(selected - {None}, key=lambda n: START_ORDER.index(n) if n in START_ORDER else len(WORK)):
        bg.start(name)
    yield bg
    bg.pool.shutdown(wait=True, cancel_futures=True)


# robench's registries and caches are not meant for two runs at once in one process: the runs made in this
# process (not in a subprocess) take turns.
IN_PROCESS = threading.Lock()


def block_test(name: str, *, background: bool = True):
    """Marks a test as the check of README block ``name``; ``background``: its work (``WORK[name]``) is started
    in the background with the others'."""
    def mark(fn):
        fn.readme_block = name
        if background:
            fn.readme_work = name
        return fn
    return mark


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The work done in this process takes one thread: two threads spinning beside the two background commands
    on two cores cost a hundred times the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- what the tests give a block ---------------------------------------------------------------------------------

def digits() -> tuple[np.ndarray, np.ndarray]:
    from robench.examples import example_data_path

    with np.load(example_data_path("digits")) as d:
        return d["x"], d["y"]


def save_image(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def rgb_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> None:
    """Smooth random RGB images (width x height) in a flat folder."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        image = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
        save_image(folder / f"image_{i}.png", image)


def resnet_checkpoint(path: Path, arch: str, seed: int, **kwargs) -> torch.nn.Module:
    import torchvision

    with seeded(seed):
        model = getattr(torchvision.models, arch)(**kwargs).eval()
    torch.save(model.state_dict(), path)
    return model


def self_labelled_cifar(path: Path, model: torch.nn.Module, n: int = 16) -> None:
    """CIFAR-shaped uint8 NHWC images labelled with the model's predictions under cifar10 normalisation."""
    x = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    with torch.no_grad():
        y = model((torch.from_numpy(x).permute(0, 3, 1, 2) / 255 - mean) / std).argmax(1)
    np.savez(path, x=x, y=y.numpy())


def market1501(root: Path, identities: int = 20) -> None:
    """Market-1501's layout from the bundled reid-digits images: queries, their gallery views, distractors."""
    from robench.examples import HERE

    with np.load(HERE / "reid_digits.npz") as d:
        stored = {k: d[k] for k in d.files}
    q_pids = stored["query_pids"]
    chosen = sorted(set(q_pids.tolist()))[:identities]
    n = 0
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        pids, cams, images = stored[f"{split}_pids"], stored[f"{split}_camids"], stored[f"{split}_images"]
        keep = np.isin(pids, chosen)
        if split == "gallery":
            keep |= (pids == 0) & (np.cumsum(pids == 0) <= identities)  # distractors
        for i in np.flatnonzero(keep):
            n += 1
            save_image(root / folder / f"{pids[i]:04d}_c{cams[i] + 1}s1_{n:06d}_00.jpg", np.repeat(images[i], 3, -1))


def fashion_mnist(root: Path, n: int = 16) -> None:
    """Fashion-MNIST's raw IDX files where torchvision looks for them (random images; four files, as it wants)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def boundary_digits(path: Path, n: int = 8, margin: float = 0.05) -> None:
    """Bundled test digits blended towards a digit of another class until the bundled model's margin is ``margin``
    (float NCHW in [0,1], labelled with the model's prediction)."""
    import robench

    model = robench.load_model("example:digits").model.eval()
    x, y = digits()
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255

    def margin_of(z, label):
        with torch.no_grad():
            logits = model(z[None])[0]
        return float(logits[label] - torch.cat([logits[:label], logits[label + 1:]]).max())

    points, labels = [], []
    for i in range(n):
        a, b = x[i], x[next(j for j in range(len(x)) if y[j] != y[i])]
        label = int(y[i])
        assert margin_of(a, label) > margin
        lo, hi = 0.0, 1.0  # margin(blend(lo)) > margin >= margin(blend(hi))
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if margin_of(a + mid * (b - a), label) > margin else (lo, mid)
        points.append(a + lo * (b - a))
        labels.append(label)
    np.savez(path, x=torch.stack(points).numpy(), y=np.array(labels))


SMALL_MODULE = '''"""Given by the test: small stand-ins for the user's models."""
from torch import nn


def osnet():
    """An embedding CNN for person images (256x128 RGB)."""
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d((4, 2)), nn.Flatten())


def net(num_classes=10):
    """The bundled digits CNN's architecture."""
    from robench.examples import digits_cnn

    return digits_cnn(num_classes)
'''


def small_module(folder: Path, factory: str | None = None, checkpoint: Path | None = None, seed: int = 0) -> None:
    """my_models.py in ``folder``, and ``checkpoint``, a state dict of ``factory``'s network (random weights)."""
    (folder / "my_models.py").write_text(SMALL_MODULE)
    if factory is None or checkpoint is None:
        return
    namespace: dict[str, Any] = {}
    exec(compile(SMALL_MODULE, "my_models.py", "exec"), namespace)
    with seeded(seed):
        model = namespace[factory]()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoint)


# -- the blocks ----------------------------------------------------------------------------------------------------

@work("setup")
def _setup(bg: Background):
    return run_bash_block("setup", bg.folder("session"))


@block_test("setup")
def test_setup_runs_the_bundled_example(background):
    done = background.result("setup")
    assert [d.command for d in done] == ["python3 -m robench eval example:digits --suite digits"]
    run_dir = done[0].ok().written(background.folder("session"))
    doc = results(run_dir)
    assert doc["suite"]["name"] == "digits" and doc["data"]["spec"] == "example:digits"
    assert doc["clean"]["n"] == 540 and len(doc["attacks"]) == 9
    assert_attacks_below_clean(doc)
    assert f"{100 * doc['clean']['accuracy']:.2f}" in done[0].stdout  # the table went to stdout
    assert {p.name for p in run_dir.iterdir()} >= {"results.json", "results.csv", "samples.csv", "config.json"}


@block_test("setup-dev", background=False)
def test_setup_dev_installs_the_extra_the_tests_need():
    tomllib = pytest.importorskip("tomllib")
    commands = BLOCKS["setup-dev"].text.strip().split(" && ")
    assert commands == ['python3 -m pip install -e ".[dev]"', 'python3 -m pip install --no-deps "torchattacks>=3.5.1"',
                        "python3 -m pytest"]
    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())
    dev = project["project"]["optional-dependencies"]["dev"]
    assert any(req.startswith("pytest") for req in dev)
    # What torchattacks imports, since the command installs it without its dependencies.
    assert {"tqdm", "scipy"} <= {re.split(r"[<>=\[ ]", req)[0] for req in dev}
    from packaging.version import Version

    # The command's second step: the reference the tests compare with.
    assert Version(importlib.metadata.version("torchattacks")) >= Version("3.5.1")
    assert project["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


@work("eval-checkpoint")
def _eval_checkpoint(bg: Background):
    folder = bg.folder("eval-checkpoint")
    model = resnet_checkpoint(folder / "resnet18_cifar.pt", "resnet18", seed=1, num_classes=10)
    self_labelled_cifar(folder / "cifar10-test.npz", model)
    return folder, run_bash_block("eval-checkpoint", folder)


@block_test("eval-checkpoint")
def test_eval_checkpoint(background):
    folder, done = background.result("eval-checkpoint")
    assert len(done) == 1
    doc = results(done[0].ok().written(folder))
    assert doc["model"]["arch"] == "torchvision:resnet18" and doc["suite"]["name"] == "pgd-linf"
    assert doc["clean"]["n"] == 4 and doc["clean"]["accuracy"] > 0
    assert [a["params"]["eps_expr"] for a in doc["attacks"]] == ["2/255", "4/255", "8/255"]
    assert_attacks_below_clean(doc)
    assert doc["robust_accuracy"] < doc["clean"]["accuracy"]  # PGD at 8/255 breaks a random network


@block_test("suite-pgd-linf", background=False)
def test_suite_pgd_linf_is_the_builtin_suite(tmp_path):
    from robench.suites.loader import load_suite

    path = tmp_path / "pgd-linf.yaml"
    path.write_text(BLOCKS["suite-pgd-linf"].text)
    shown, builtin = load_suite(str(path)).suite, load_suite("pgd-linf").suite
    assert shown.name == builtin.name == "pgd-linf"
    assert [a.model_dump() for a in shown.attacks] == [a.model_dump() for a in builtin.attacks]


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    with IN_PROCESS, plugins_from(tmp_path, monkeypatch) as folder:  # no run in this process sees the registry change
        yield folder


@block_test("suite-error", background=False)
def test_suite_error_is_what_robench_prints(plugin_folder):
    """In this process (an error stops the command before any work; start-up is what a subprocess would cost)."""
    from cli_helpers import invoke

    (plugin_folder / "my_attacks.py").write_text(BLOCKS["my_attacks.py"].text)
    suite = BLOCKS["my-suite.yaml"].text
    assert suite.startswith("# my-suite.yaml\n")
    at = suite.rindex("eps: [0.1, 0.3]")  # the pgd entry's
    path = plugin_folder / "my-suite.yaml"
    path.write_text(suite[len("# my-suite.yaml\n"):at] + "eps: -0.1" + suite[at + len("eps: [0.1, 0.3]"):])
    command = BLOCKS["command"].text.split()
    assert command[:5] == ["robench", "eval", "example:digits", "--suite", "my-suite.yaml"]
    result = invoke(*command[1:4], path, *command[5:])
    assert result.exit_code == 2
    printed = result.stderr.replace(str(path), "my-suite.yaml")
    assert printed.strip().splitlines() == BLOCKS["suite-error"].text.strip().splitlines()


@block_test("entry-point-toml", background=False)
def test_entry_point_names_the_readme_attack():
    tomllib = pytest.importorskip("tomllib")
    points = tomllib.loads(BLOCKS["entry-point-toml"].text)["project"]["entry-points"]["robench.attacks"]
    [(name, target)] = points.items()
    module, _, cls = target.partition(":")
    assert BLOCKS["my_attacks.py"].text.startswith(f"# {module}.py\n")
    tree = ast.parse(BLOCKS["my_attacks.py"].text)
    [defined] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls]
    names = [stmt.value.value for stmt in defined.body if isinstance(stmt, ast.Assign)
             and [t.id for t in stmt.targets if isinstance(t, ast.Name)] == ["name"]]
    assert names == [name]


ELIDED = "..."


def sample_document(text: str) -> Any:
    """The README's sample with each ``, ...`` made a ``"...": "..."`` member: valid JSON that says where."""
    return json.loads(re.sub(r",\s*\.\.\.(?=\s*[}\]])", f', "{ELIDED}": "{ELIDED}"', text))


def compare_keys(sample: Any, real: Any, where: str = "results.json") -> None:
    if isinstance(sample, dict):
        assert isinstance(real, dict), where
        keys = set(sample) - {ELIDED}
        missing = keys - set(real)
        assert not missing, f"{where}: the sample has {sorted(missing)}, a real run has not"
        if ELIDED not in sample:
            assert set(real) == keys, f"{where}: a real run also has {sorted(set(real) - keys)}"
        for key in keys:
            compare_keys(sample[key], real[key], f"{where}.{key}")
    elif isinstance(sample, list) and sample and isinstance(sample[0], dict):
        assert isinstance(real, list) and real, where
        for i, item in enumerate(sample):
            twin = next((r for r in real if (r.get("label"), r.get("eps")) == (item.get("label"), item.get("eps"))),
                        None)
            assert twin is not None, f"{where}[{i}]: no entry {item.get('label')} at eps {item.get('eps')}"
            compare_keys(item, twin, f"{where}[{i}]")


# The sample's measured values (rounded as printed there), where they are in a real run, and by how much they may
# differ: two of the 540 samples, where another processor's float rounding may turn a near-tie or two.
TWO_SAMPLES = 2 / 540 + 5e-5
SAMPLE_NUMBERS = {("clean", "accuracy"): TWO_SAMPLES, ("clean", "n"): 0, ("clean", "correct"): 2,
                  ("progress", "evaluated"): 0, ("robust_accuracy",): TWO_SAMPLES,
                  ("mean_attack_accuracy",): TWO_SAMPLES}
SAMPLE_ENTRY_NUMBERS = {"accuracy": TWO_SAMPLES, "success_rate": TWO_SAMPLES, "n": 0, "attacked": 2, "eps": 0}


@block_test("results-json", background=False)
def test_results_json_sample_matches_a_real_run(background):
    sample = sample_document(BLOCKS["results-json"].text)
    done = background.result("setup")
    real = results(done[0].ok().written(background.folder("session")))
    compare_keys(sample, real)
    assert sample["schema"] == real["schema"] and sample["task"] == real["task"]
    for path, slack in SAMPLE_NUMBERS.items():
        shown, measured = sample, real
        for key in path:
            shown, measured = shown[key], measured[key]
        assert measured == pytest.approx(shown, abs=slack), path
    entry = sample["attacks"][0]
    [twin] = [a for a in real["attacks"] if (a["label"], a["eps"]) == (entry["label"], entry["eps"])]
    for key, slack in SAMPLE_ENTRY_NUMBERS.items():
        assert twin[key] == pytest.approx(entry[key], abs=slack), key
    for key, value in entry["params"].items():
        if key != ELIDED:
            assert twin["params"][key] == (pytest.approx(value) if isinstance(value, float) else value), key


@work("api-evaluate")
def _api_evaluate(bg: Background):
    folder = bg.folder("api-evaluate")
    return folder, run_python_block("api-evaluate", folder)


@block_test("api-evaluate")
def test_api_evaluate(background):
    folder, done = background.result("api-evaluate")
    clean, robust = map(float, done.ok().stdout.split())
    assert 0 <= robust <= clean and clean >= 0.9  # the images are labelled with the model's own predictions
    doc = results(folder / "runs" / "my-model")
    assert doc["clean"]["accuracy"] == clean and doc["robust_accuracy"] == robust
    assert doc["model"]["normalization"] is not None and doc["suite"]["name"] == "pgd-linf"
    assert_attacks_below_clean(doc)


@work("api-evalconfig")
def _api_evalconfig(bg: Background):
    folder = bg.folder("api-evalconfig")
    model = resnet_checkpoint(folder / "resnet18.pt", "resnet18", seed=2)
    self_labelled_cifar(folder / "cifar10-test.npz", model)
    return folder, run_python_block("api-evalconfig", folder)


@block_test("api-evalconfig")
def test_api_evalconfig(background):
    folder, done = background.result("api-evalconfig")
    printed = done.ok().stdout.splitlines()
    shown = re.findall(r"^print\(.*\)\s*#\s*(.+)$", block_text("api-evalconfig"), re.MULTILINE)
    for expected in shown:  # a print with its output in a comment: the output, the limit substituted
        assert expected.replace("1000", "4") in printed, (expected, printed)
    doc = results(folder / "runs" / "resnet18")
    assert float(printed[-1]) == doc["robust_accuracy"]
    assert doc["clean"]["n"] == 4 and doc["model"]["arch"] == "torchvision:resnet18"
    assert_attacks_below_clean(doc)


@work("api-reid")
def _api_reid(bg: Background):
    folder = bg.folder("api-reid")
    market1501(folder / "data" / "Market-1501")
    return run_python_block("api-reid", folder)


@block_test("api-reid")
def test_api_reid(background):
    done = background.result("api-reid").ok()
    first, second = done.stdout.strip().split(" ", 1)  # print(mAP, [(label, mAP), ...])
    clean = float(first)
    attacked = ast.literal_eval(second)
    assert {label for label, _ in attacked} == {"fgsm-away", "pgd-away", "pgd-odfa"}
    # "away" and "odfa" move features, not rankings, so a small eps may even raise mAP; the largest eps of
    # each entry (entries list their eps in increasing order) lowers it.
    strongest = dict(attacked)
    assert 0 < clean <= 1 and all(m < clean for m in strongest.values()), (clean, attacked)


@work("api-pixel-index")
def _api_pixel_index(bg: Background):
    folder = bg.folder("api-pixel-index")
    rgb_images(folder / "data" / "images", 6, (320, 240), seed=3)
    return run_python_block("api-pixel-index", folder)


@block_test("api-pixel-index")
def test_api_pixel_index(background):
    done = background.result("api-pixel-index").ok()
    shown = ast.literal_eval(done.stdout.strip())
    assert [pixels for pixels, _ in shown] == [4, 16, 64]
    assert all(pi >= 0 for _, pi in shown)


@work("pixel-index-command")
def _pixel_index_command(bg: Background):
    folder = bg.folder("pixel-index-command")
    resnet_checkpoint(folder / "resnet50.pt", "resnet50", seed=4)
    rgb_images(folder / "imagenet-val-subset", 2, (300, 260), seed=4)
    return folder, run_bash_block("pixel-index-command", folder)


@slow
@block_test("pixel-index-command")
def test_pixel_index_command(background):
    folder, done = background.result("pixel-index-command")
    doc = results(done[0].ok().written(folder))
    settings = [(e["experiment"], e["setting"]) for e in doc["experiments"]]
    assert [kind for kind, _ in settings] == ["range", "delta", "delta", "area", "area"], settings
    for experiment in doc["experiments"]:
        assert [r["pixels"] for r in experiment["results"]] == [4, 64]
        assert all(r["total"] == 2 and 0 <= r["misclassified"] <= 2 for r in experiment["results"])


@work("pixel-index-table")
def _pixel_index_table(bg: Background):
    folder = bg.folder("session")
    x, y = digits()
    for i, (image, label) in enumerate(zip(x, y)):
        save_image(folder / "digit-images" / str(label) / f"{i:03d}.png", image)
    return sh(PIXEL_TABLE_COMMAND, folder)


@block_test("pixel-index-table")
def test_pixel_index_table_is_what_robench_prints(background):
    done = background.result("pixel-index-table").ok()
    printed = done.stdout.strip().splitlines()
    shown = BLOCKS["pixel-index-table"].text.strip().splitlines()
    # The table is the end of stdout, after the line the README's text mentions ("says how many were excluded").
    assert len(printed) == len(shown) + 1
    assert printed[0] == "530 of 540 images evaluated: 10 excluded (misclassified before any change), 0 file(s) skipped"
    for ours, theirs in zip(printed[1:], shown):
        assert_same_line(ours, theirs)


NUMBER = re.compile(r"\d+(?:\.(\d+))?")


def assert_same_line(printed: str, shown: str, units: int = 5) -> None:
    """The same text, and numbers within ``units`` of the shown one's last digit: another processor's float
    rounding may turn a near-tie or two (one changed verdict moves a 10-trial mean by 0.1)."""
    def skeleton(line):
        return " ".join(NUMBER.sub("#", line).split())

    assert skeleton(printed) == skeleton(shown), (printed, shown)
    for ours, theirs in zip(NUMBER.finditer(printed), NUMBER.finditer(shown)):
        step = 10.0 ** -len(theirs.group(1) or "")
        assert abs(float(ours.group()) - float(theirs.group())) <= units * step + 1e-9, (printed, shown)


@block_test("suite-pixels-entry", background=False)
def test_suite_pixels_entry_loads(tmp_path):
    from robench.suites.loader import load_suite

    path = tmp_path / "pixels.yaml"
    path.write_text("name: pixels\nattacks:\n" + BLOCKS["suite-pixels-entry"].text)
    [entry] = load_suite(str(path)).suite.attacks
    shown = yaml.safe_load(BLOCKS["suite-pixels-entry"].text)[0]
    assert shown.pop("attack") == entry.attack == "pixels"
    shown["area"] = [shown["area"]] * 2  # "a side or [rows, cols]"
    assert {k: getattr(entry, k) for k in shown} == shown


@work("reid-example")
def _reid_example(bg: Background):
    folder = bg.folder("reid-example")
    return folder, run_bash_block("reid-example", folder)


@slow
@block_test("reid-example")
def test_reid_example(background):
    folder, [done] = background.result("reid-example")
    doc = results(done.ok().written(folder))
    assert doc["task"] == "reid" and doc["protocol"]["rerank"] is True
    clean = doc["clean"]
    assert (doc["data"]["queries"], doc["data"]["gallery"]) == (300, 1500)
    # "Clean Rank-1 is 82.7% and mAP 79.4%; PGD away at 16/255 brings them to 5.3% and 6.0%." (to within a point:
    # another processor's float rounding may turn a near-tie or two)
    [strongest] = [a for a in doc["attacks"] if a["label"] == "pgd-away" and a["params"]["eps_expr"] == "16/255"]
    measured = [100 * clean["rank1"], 100 * clean["mAP"], 100 * strongest["rank1"], 100 * strongest["mAP"]]
    assert measured == pytest.approx([82.7, 79.4, 5.3, 6.0], abs=1.0)
    assert all(a["mAP"] < clean["mAP"] for a in doc["attacks"])
    assert "re-ranking" in done.stdout


@work("reid-market1501")
def _reid_market1501(bg: Background):
    folder = bg.folder("reid-market1501")
    small_module(folder, "osnet", folder / "osnet.pt", seed=5)
    market1501(folder / "data" / "Market-1501")
    return folder, run_bash_block("reid-market1501", folder)


@block_test("reid-market1501")
def test_reid_market1501(background):
    folder, [done] = background.result("reid-market1501")
    doc = results(done.ok().written(folder))
    assert doc["task"] == "reid" and doc["data"]["queries"] == 20
    assert doc["protocol"]["rerank"] is True and doc["clean_reranked"]
    strongest = {a["label"]: a for a in sorted(doc["attacks"], key=lambda a: a["eps"])}  # each entry's largest eps
    assert strongest.keys() == {"fgsm-away", "pgd-away", "pgd-odfa"}
    assert all(a["mAP"] < doc["clean"]["mAP"] for a in strongest.values()), doc["attacks"]


@work("train-loop")
def _train_loop(bg: Background):
    return run_bash_block("train-loop", bg.folder("session"))


@slow
@block_test("train-loop")
def test_train_loop(background):
    folder = background.folder("session")
    done = [d.ok() for d in background.result("train-loop")]
    assert len(done) == 2, [d.command for d in done]
    loop, compare = done
    for recipe in ("baseline", "pgd-at"):
        trained = folder / "runs" / "train" / f"digits-{recipe}"
        assert (trained / "model.safetensors").is_file() and (trained / "training.json").is_file()
    written = [folder / line.strip() for line in re.findall(r"^results written to (.+)$", loop.stderr, re.M)]
    evaluated = [path for path in written if path.parts[-3] == "digits"]
    assert len(evaluated) == 2
    for run_dir in evaluated:
        assert_attacks_below_clean(results(run_dir))
    table = compare.stdout
    assert "digits-baseline" in table and "digits-pgd-at" in table and "Mean" in table


@work("compare-plot", after=("setup", "pixel-index-table", "train-loop"))
def _compare_plot(bg: Background):
    import robench

    folder = bg.folder("session")
    fashion_mnist(folder / "data")
    with seeded(6):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
    with IN_PROCESS:
        made = robench.evaluate(model, "fashion-mnist", "fdd-fashion-mnist", data_root=str(folder / "data"),
                                limit=16, device="cpu")
        made.save(folder / "runs" / "fdd-fashion-mnist" / "small-cnn" / "20260101T000000Z")
    for name in WORK["compare-plot"].after:
        bg.result(name)
    return folder, made.doc, run_bash_block("compare-plot", folder)


@slow
@block_test("compare-plot")
def test_compare_and_plot(background):
    folder, made, done = background.result("compare-plot")
    assert made["data"]["spec"].startswith("fashion-mnist") and made["clean"]["n"] == 16
    alignment, paper, curves, pixels = (d.ok() for d in done)
    for model in ("example-digits", "digits-baseline", "digits-pgd-at"):
        assert re.search(rf"^\| {model} \|", alignment.stdout, re.M), alignment.stdout
    assert "paper: FDD-1D" in paper.stdout and "fgsm ε = 0.03" in paper.stdout  # the paper's column beside ours
    for figure in ("robustness.png", "pixels.png"):
        assert (folder / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@block_test("recipe-digits-pgd-at", background=False)
def test_recipe_is_the_builtin_one(tmp_path):
    from robench.training.recipe import load_recipe

    path = tmp_path / "digits-pgd-at.yaml"
    path.write_text(BLOCKS["recipe-digits-pgd-at"].text)
    ignored = {"description", "reference"}
    shown, builtin = load_recipe(str(path)).recipe, load_recipe("digits-pgd-at").recipe
    assert shown.model_dump(exclude=ignored) == builtin.model_dump(exclude=ignored)


@work("github-actions")
def _github_actions(bg: Background):
    folder = bg.folder("github-actions")
    workflow = yaml.safe_load(BLOCKS["github-actions"].text)
    steps = workflow["jobs"]["robench"]["steps"]
    small_module(folder)
    from safetensors.torch import load_file

    from robench.examples import example_model_file

    (folder / "checkpoints").mkdir()
    torch.save(load_file(example_model_file("digits")[0]), folder / "checkpoints" / "model.pt")
    x, y = digits()
    (folder / "ci").mkdir()
    np.savez(folder / "ci" / "val.npz", x=x[:60], y=y[:60])
    env = user_env(folder, GITHUB_STEP_SUMMARY=str(folder / "summary.md"))
    gated = next(step["run"] for step in steps if "--baseline" in step.get("run", ""))
    baseline = gated
    for gate_option in ("--baseline ci/baseline/results.json", "--max-drop 0.01", "--require-significant",
                        "--junit gate.xml"):
        assert gate_option in baseline
        baseline = baseline.replace(gate_option, "")
    made = sh(baseline.replace("--out run", "--out baseline"), folder, env).ok()
    (folder / "ci" / "baseline").mkdir()
    shutil.copy(folder / "baseline" / "results.json", folder / "ci" / "baseline" / "results.json")
    done = [sh(step["run"], folder, env) for step in steps if "run" in step and not skip_reason(step["run"])]
    return folder, workflow, made, done


@slow
@block_test("github-actions")
def test_github_actions_workflow(background):
    folder, workflow, made, done = background.result("github-actions")
    assert workflow["name"] == "robustness" and workflow[True] == ["pull_request"]  # YAML 1.1 reads `on` as true
    assert [d.command.split()[:2] for d in done] == [["robench", "eval"], ["robench", "compare"]]
    for d in done:
        d.ok()  # the gate passed: the same model on the same data as the baseline
    run, baseline = results(folder / "run"), results(folder / "baseline")
    assert_attacks_below_clean(run)
    assert run["robust_accuracy"] == baseline["robust_accuracy"] and run["data"] == baseline["data"]
    gate = (folder / "gate.xml").read_text()
    assert gate.startswith("<?xml") and 'failures="0"' in gate and gate.count("<testcase ") == 2 + len(run["attacks"])
    rows = [line.split("|")[2:-1] for line in (folder / "summary.md").read_text().splitlines()
            if line.startswith("| model (")]  # the baseline's and the run's: the same model and data
    assert len(rows) == 2 and rows[0] == rows[1], rows
    uploaded = workflow["jobs"]["robench"]["steps"][-1]["with"]["path"].split()
    assert all((folder / path).exists() for path in uploaded)


@work("autoattack")
def _autoattack(bg: Background):
    folder = bg.folder("autoattack")
    boundary_digits(folder / "edge.npz")
    return folder, run_bash_block("autoattack", folder)


@slow
@block_test("autoattack")
def test_autoattack(background):
    folder, done = background.result("autoattack")
    assert len(done) == 3
    budgets = []
    for d in done:
        doc = results(d.ok().written(folder))
        [entry] = doc["attacks"]
        assert entry["attack"] == "autoattack" and doc["clean"]["accuracy"] == 1.0
        assert_attacks_below_clean(doc)
        assert [part["attack"] for part in entry["parts"]][0] == "apgd-ce"
        budgets.append((entry["norm"], entry["params"]["eps_expr"]))
    assert budgets == [("linf", "8/255"), ("linf", "4/255"), ("l2", "0.5")]


@block_test("suite-ta-square", background=False)
def test_suite_ta_square_runs(tmp_path):
    """In this process: the entry wrapped in a suite, on 10 bundled digits."""
    pytest.importorskip("torchattacks")
    import robench

    path = tmp_path / "ta-square.yaml"
    path.write_text("name: ta-square\nattacks:\n" + BLOCKS["suite-ta-square"].text)
    with IN_PROCESS:
        doc = robench.evaluate("example:digits", "example:digits", str(path), limit=10, device="cpu").doc
    [entry] = doc["attacks"]
    assert entry["attack"] == "ta.Square" and entry["params"]["eps_expr"] == "8/255"
    assert entry["params"]["n_queries"] == 1000
    assert_attacks_below_clean(doc)


# -- the table is complete ---------------------------------------------------------------------------------------

TESTED_HERE = {fn.readme_block for fn in list(globals().values()) if callable(fn) and hasattr(fn, "readme_block")}


def test_every_readme_block_is_run_or_checked():
    blocks = readme_blocks()
    unnamed = [b.where for b in blocks if b.name is None]
    assert not unnamed, (f"blocks without an <!-- example: NAME --> marker: {unnamed}: add one, and a test here "
                         "that runs the block (or an entry in CHECKED_DIFFERENTLY)")
    texts: dict[str, set[str]] = {}
    for block in blocks:
        texts.setdefault(block.name, set()).add(block.text)
    assert all(len(t) == 1 for t in texts.values()), \
        f"blocks that share a name but not their text: {sorted(n for n, t in texts.items() if len(t) > 1)}"
    names = list(texts)
    elsewhere = {name: re.match(r"run by (tests/\S+\.py) \((\w+)\)", why) for name, why in CHECKED_DIFFERENTLY.items()}
    covered = TESTED_HERE | {name for name, match in elsewhere.items() if match}
    assert set(names) <= covered, f"README blocks nothing runs or checks: {sorted(set(names) - covered)}"
    assert not covered - set(names), f"blocks the README no longer has: {sorted(covered - set(names))}"
    # Run here as written (with their plans), or listed with how they are checked instead; never both.
    run_here = {name for name in TESTED_HERE if name not in CHECKED_DIFFERENTLY}
    assert set(names) == run_here | set(CHECKED_DIFFERENTLY), sorted(set(names) ^ (run_here | set(CHECKED_DIFFERENTLY)))
    assert set(PLANS) <= run_here | {"github-actions"}
    for name, match in elsewhere.items():
        if match:  # that test exists and reads this block
            source = (TESTS.parent / match.group(1)).read_text()
            [test] = [node for node in ast.parse(source).body
                      if isinstance(node, ast.FunctionDef) and node.name == match.group(2)]
            assert f'readme_block("{name}")' in ast.get_source_segment(source, test), (name, match.group(0))


def test_plans_still_apply_to_their_blocks():
    for name in PLANS:
        block_text(name)
    assert bash_commands(BLOCKS["train-loop"].text)[0].startswith("for r in")
    markers = sum(path.read_text().count("<!-- example:") for path in documentation_files())
    assert markers == len([b for b in readme_blocks() if b.name])
