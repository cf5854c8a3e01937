"""Progress of ``robench eval`` on stderr: a bar on a terminal, plain periodic lines elsewhere (CI logs).

The unit people read is a sample-attack (one sample through one suite entry; the clean pass
is not counted): the total is samples x entries. The bar moves as each entry finishes a
segment, and within an entry with every pass its attack makes (``tick``). The ETA weighs each entry by its
attack's cost (a 100-step PGD sample takes ~100x an FGSM one), so it does not jump when the
run moves from cheap to expensive entries.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from robench.cli.progress_work import Work, clock

PLAIN_EVERY_SECONDS = 30.0  # CI logs: a line every half minute is enough and never floods
class _Units(ProgressColumn):
    """``1,234/5,400 sample-attacks`` from the task's ``work`` field."""

    def render(self, task: Task) -> Text:
        work: Work = task.fields["work"]
        return Text(f"{work.done_units:,}/{work.total_units:,} sample-attacks", style="progress.download")


class _Eta(ProgressColumn):
    def render(self, task: Task) -> Text:
        left = task.fields["work"].seconds_left()
        return Text("eta -:--:--" if left is None else f"eta {clock(left)}", style="progress.remaining")


class EvalProgress:
    """A context manager and the engine's ``ProgressSink``."""

    def __init__(self, console: Console, title: str, weights: Sequence[float], *, enabled: bool = True,
                 live: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.work = Work(weights, 0)
        self.console, self.title, self.enabled = console, title, enabled
        self.live = console.is_terminal if live is None else live
        self._clock = clock
        self._last_line = clock()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> "EvalProgress":
        if self.enabled and self.live:
            # One line at 80 columns: the title is cut with an ellipsis and the bar takes what is left.
            title = TextColumn("[bold]{task.description}",
                               table_column=Column(max_width=24, no_wrap=True, overflow="ellipsis"))
            self._bar = Progress(title, BarColumn(bar_width=None), _Units(table_column=Column(no_wrap=True)),
                                 TimeElapsedColumn(), _Eta(table_column=Column(no_wrap=True)),
                                 console=self.console, transient=True, expand=True)
            self._bar.__enter__()
        return self

    def start(self, samples: int, done: int) -> None:
        """The engine knows the size once the data is loaded (``done``: finished before a resume)."""
        self.work = Work(self.work.weights, samples)
        self.work.skip(done)
        if self._bar is not None:
            self._task = self._bar.add_task(
                self.title, total=self.work.total_weight, work=self.work,
                completed=self.work.done_weight)  # type: ignore[arg-type]  # rich types it int, keeps floats

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def entry_done(self, entry: int, samples: int) -> None:
        self.work.add(entry, samples)
        self._show()

    def tick(self, entry: int, weight: float) -> None:
        """Passes an entry's attack just made: the bar and ETA move step by step."""
        self.work.tick(weight)
        self._show()

    def _show(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.work.done_weight)
        elif self.enabled and not self.live and self._clock() - self._last_line >= PLAIN_EVERY_SECONDS:
            self._last_line = self._clock()
            self.console.print(self.plain_line(), highlight=False)

    def note(self, message: str) -> None:
        """A log line from inside an entry (AutoAttack after each member), above the bar."""
        if self.enabled:
            self.console.print(f"robench: {message}", highlight=False, markup=False)

    def plain_line(self) -> str:
        work = self.work
        share = work.done_weight / work.total_weight if work.total_weight else 1.0
        left = work.seconds_left()
        return (f"robench: {self.title}: {work.done_units:,}/{work.total_units:,} sample-attacks "
                f"({share:.0%} of the work), eta {'-:--:--' if left is None else clock(left)}")
