"""``robench train RECIPE``: train a model as a recipe says, into a checkpoint ``robench eval`` loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Optional

import typer

from robench.cli.common import handle_errors, interrupt_on_sigterm, stderr

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# Training modules (torch) are imported on use: --help stays fast.


@handle_errors
def train_command(
    recipe: Optional[str] = typer.Argument(None, help="A recipe YAML file or the name of a built-in recipe "
                                           "(see --list)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data instead of the recipe's (its train "
                                       "split): npz:PATH, imagefolder:PATH, example:digits or a dataset name."),
    test_data: Optional[str] = typer.Option(None, "--test-data", help="Data evaluated after every epoch instead "
                                            "of the recipe's (default: the test split of a named dataset or "
                                            "example; npz and image folders have none); 'none' skips."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: runs/train/RECIPE-NAME). "
                                       "An interrupted run there resumes."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Train this many epochs instead of the "
                                         "recipe's (the learning-rate schedule spans them)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on a fixed subset of this many images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(0, "--workers", min=0, help="Data-loading worker processes."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where named datasets are stored."),
    download: bool = typer.Option(False, "--download", help="Download a named dataset if it is missing."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON on stdout."),
    list_recipes: bool = typer.Option(False, "--list", help="List the built-in recipes and exit."),
) -> None:
    """Train a model with a defence from the papers (a YAML recipe), for `robench eval`."""
    from robench.errors import UsageError
    from robench.results.writers import default_train_dir
    from robench.training.recipe import builtin_recipes, load_recipe
    from robench.training.trainer import TrainOptions, train

    if list_recipes:
        _print_recipes(builtin_recipes())
        return
    if recipe is None:
        raise UsageError("give a RECIPE: a YAML file or a built-in recipe's name (robench train --list shows them)")
    loaded = load_recipe(recipe)
    folder = out or default_train_dir(loaded.recipe.name)
    options = TrainOptions(data=data, test_data=test_data, data_root=data_root, download=download, device=device,
                           workers=workers, limit=limit, epochs=epochs)
    with _progress() as progress, interrupt_on_sigterm():
        try:
            result = train(loaded, folder, options, progress=progress.update, log=progress.log)
        except KeyboardInterrupt:
            stderr.print(f"robench: the finished epochs are saved in {folder}; run the same command to resume",
                         highlight=False, markup=False)
            raise
    stderr.print(f"model written to {result.model_path} (evaluate it: robench eval {result.model_path} "
                 f"--suite SUITE)", highlight=False, markup=False)
    if as_json:
        from dataclasses import asdict

        sys.stdout.write(json.dumps({"model": str(result.model_path), "out": str(result.out),
                                     "resumed_from_epoch": result.resumed_from,
                                     "epochs": [asdict(e) for e in result.epochs]}, indent=2) + "\n")


def _print_recipes(recipes: dict[str, Path]) -> None:
    from rich.table import Table
    from rich.text import Text

    from robench.cli.common import stdout_console
    from robench.training.recipe import load_recipe

    table = Table(title="built-in recipes")
    table.add_column("name", no_wrap=True, min_width=max(map(len, recipes), default=4))
    table.add_column("data", overflow="fold")
    table.add_column("description", overflow="fold", ratio=1)
    for name, path in recipes.items():
        r = load_recipe(str(path)).recipe
        table.add_row(Text(name), Text(r.data), Text(r.description))
    console = stdout_console()
    table.expand = console.measure(table).maximum > console.width
    console.print(table)


class _progress:
    """A bar per epoch on a terminal; otherwise only the per-epoch lines (CI logs)."""

    def __enter__(self) -> "_progress":
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if stderr.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=stderr, transient=True)
            self._bar.__enter__()
        return self

    def update(self, epoch: int, epochs: int, done: int, batches: int) -> None:
        if self._bar is None:
            return
        description = f"epoch {epoch + 1}/{epochs}"
        if self._task is None or done == 1:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(description, total=batches)
        self._bar.update(self._task, completed=done)

    def log(self, message: str) -> None:
        (self._bar.console if self._bar is not None else stderr).print(message, highlight=False, markup=False)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, traceback)
