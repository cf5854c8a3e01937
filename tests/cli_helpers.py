"""Helpers shared by the test modules: the command line in-process, interruptions, a batch-free model."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from robench.cli import app


def invoke(*args, env=None):
    """Run ``robench ARGS`` in this process; stdout and stderr are kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_error_line(result, kind: str = "error") -> str:
    """A user error is exactly one line on stderr, ``robench: <kind>: ...``; returns it."""
    # A resume announces itself first; that notice is not part of the error.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("robench: resuming")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"robench: {kind}: "), lines[0]
    return lines[0]


def stop_after(batches: int):
    """An ``on_batch`` callback that interrupts the run (as Ctrl-C would) after ``batches`` batches."""
    seen = []

    def on_batch(n):
        seen.append(n)
        if len(seen) == batches:
            raise KeyboardInterrupt

    return on_batch


class RowByRow(nn.Module):
    """The model applied to one image at a time: outputs and gradients cannot depend on the batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x[i:i + 1]) for i in range(len(x))])


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def documentation_files() -> list[Path]:
    """README.md and every page of the docs site: the files whose fenced blocks the tests run."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def readme_block(marker_text: str) -> str:
    """The text of the block named ``marker_text`` (``<!-- example: NAME``) in README.md or a docs page."""
    found = {b.text for b in readme_blocks() if b.name == marker_text}
    assert found, f"no README.md or docs block is named {marker_text!r}"
    assert len(found) == 1, f"the blocks named {marker_text!r} differ between pages"
    return found.pop()


@contextlib.contextmanager
def lock_held_by_another_process(folder: Path):
    """Another process holds ``folder``'s run lock while the block runs; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from robench.results.locking import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def evaluate_with_state(model, data, suite, *, resume_state=None, save_state=None, on_batch=None, **options):
    """``robench.evaluate`` with the run's plumbing: progress snapshots, a resume, a per-batch hook."""
    from robench.api import config_for
    from robench.tasks import Hooks
    from robench.tasks.classification import evaluate_config

    return evaluate_config(config_for(model, data, suite, **options), hooks=Hooks(on_batch=on_batch),
                           resume_state=resume_state, save_state=save_state)


def saved_and_loaded(obj):
    """What a progress file gives back: ``obj`` saved and loaded as robench does (weights only)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def without(value, keys):
    """A results document (or any part of it) with the fields named in ``keys`` dropped at every depth."""
    if isinstance(value, dict):
        return {k: without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without(v, keys) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ReadmeBlock:
    """A fenced block of README.md or a docs page: its ``<!-- example: NAME -->`` marker (None without one),
    language, text, and where it is."""

    name: str | None
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    file: str = "README.md"  # relative to the repository

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def readme_blocks(text: str | None = None, file: str = "README.md") -> list[ReadmeBlock]:
    """Every fenced block of README.md and the docs pages (or of ``text``), in order. A block's name is that
    of an ``<!-- example: NAME ... -->`` marker on the line just above its opening fence. A block may appear
    on several pages under one name only with the same text (it is run once)."""
    if text is None:
        return [block for path in documentation_files()
                for block in readme_blocks(path.read_text(), path.relative_to(ROOT).as_posix())]
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence = opening.group(2)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{file}:{i + 1}: the fence {fence} is never closed"
        marker = re.match(r"\s*<!-- example: (\S+)", lines[i - 1]) if i else None
        indent = len(opening.group(1))
        body = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[i + 1:end]) + "\n"
        blocks.append(ReadmeBlock(marker.group(1) if marker else None, opening.group(3), body, i + 1, file))
        i = end + 1
    return blocks


@contextlib.contextmanager
def plugins_from(folder: Path, monkeypatch):
    """``folder`` on ``sys.path`` while the block runs; afterwards the attack registry and
    ``sys.modules`` are as before (the plugin modules imported from it are forgotten)."""
    from robench.attacks import ATTACKS

    items, loaded = dict(ATTACKS._items), ATTACKS._entry_points_loaded
    monkeypatch.syspath_prepend(str(folder))
    try:
        yield folder
    finally:
        ATTACKS._items.clear()
        ATTACKS._items.update(items)
        ATTACKS._entry_points_loaded = loaded
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(folder.resolve()):
                del sys.modules[name]

