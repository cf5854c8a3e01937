"""How an attack call is batched: the call's context and the slot driver.

An attack never sees the batch size or the refill flag. The base's ``__call__`` builds a
:class:`RunContext` from them and hands it to ``run``, which reaches batching only
through the context:

* ``context.in_batches(fn, *tensors)`` runs a per-sample function a batch at a time
  (one-shot passes: a ranking of the clean logits, scoring, a generator);
* ``context.drive(search, x)`` runs an iterative search over a pool of slots
  (:class:`SlotDriver`): the driver admits queued samples into free slots (whenever a
  slot frees with refill, only into an empty pool without), counts steps and restarts,
  retires finished and fooled slots and, on Ctrl-C, raises :class:`PartialRun` for the
  samples that had left. The attack supplies only the per-slot logic
  (:class:`SlotSearch`);
* ``context.delegate(attack, ...)`` calls another attack (a composite's member) with
  this call's batching.

Where samples land in slots never changes a result: attacks key their random numbers
by the sample's index (``context.uniform``/``context.normal`` draw such numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from robench.attacks import randomness
from robench.attacks.pool import Pool

if TYPE_CHECKING:
    from robench.attacks.base import RunOutput


class PartialRun(KeyboardInterrupt):
    """Raised by ``run`` on Ctrl-C: ``done`` marks the samples it had finished, whose ``output`` rows are final.

    A KeyboardInterrupt still (whoever does not know it sees one); the base turns it into ``AttackInterrupted``.
    """

    def __init__(self, done: torch.Tensor, output: RunOutput) -> None:
        super().__init__("interrupted")
        self.done, self.output = done, output


class RunContext:
    """What ``run`` gets besides the data: the samples' ids, their random streams and the call's batching."""

    def __init__(self, sample_ids: torch.Tensor, *, batch_size: int, refill: bool = True, seed: int = 0,
                 stream: int = 0) -> None:
        self.sample_ids = sample_ids  # per input row, its index in the dataset: what keys its randomness
        self.seed, self.stream = seed, stream
        # Private: batching is the driver's business, reached through the methods below.
        self._batch_size = max(1, batch_size)
        self._refill = refill

    def in_batches(self, fn: Callable[..., Any], *tensors: torch.Tensor) -> Any:
        """``fn`` on the rows of ``tensors`` a batch at a time, its outputs (a tensor or a tuple) concatenated."""
        outputs = [fn(*parts) for parts in zip(*(t.split(self._batch_size) for t in tensors))]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(column) for column in zip(*outputs))
        return torch.cat(outputs)

    def drive(self, search: SlotSearch, x: torch.Tensor) -> RunOutput:
        """Run ``search`` on the samples of ``x`` (queue positions 0 .. len(x) - 1) over a pool of slots."""
        return SlotDriver(search, x, self._batch_size, self._refill).run()

    def delegate(self, attack: Callable[..., Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float | None, rows: torch.Tensor) -> Any:
        """Call ``attack`` on the rows ``rows`` of this call's inputs ``x``, ``y``, batched as this call is."""
        return attack(model, x[rows], y[rows], eps, self.sample_ids[rows], batch_size=self._batch_size,
                      refill=self._refill)

    def legacy_arguments(self) -> tuple[torch.Tensor, int, bool]:
        """``(sample_ids, batch_size, refill)``: what a ``run`` written before the context takes."""
        return self.sample_ids, self._batch_size, self._refill

    def unsplit(self) -> RunContext:
        """The same call with every sample in one batch: for losses that couple the samples of a batch."""
        return RunContext(self.sample_ids, batch_size=len(self.sample_ids), refill=self._refill, seed=self.seed,
                          stream=self.stream)

    def uniform(self, shape: tuple[int, ...], *parts: int) -> torch.Tensor:
        """Per sample, uniform [0,1) numbers of ``shape`` from the attack's stream ``parts`` (float32)."""
        key = randomness.stream_key(self.seed, self.stream, *parts)
        return randomness.uniform(self.sample_ids, shape, key, self.sample_ids.device)

    def normal(self, shape: tuple[int, ...], *parts: int) -> torch.Tensor:
        """Per sample, standard normal numbers of ``shape`` from the attack's stream ``parts`` (float32)."""
        key = randomness.stream_key(self.seed, self.stream, *parts)
        return randomness.normal(self.sample_ids, shape, key, self.sample_ids.device)


class SlotSearch:
    """An attack's per-slot logic; :class:`SlotDriver` runs it.

    A slot holds one sample (``slots.rows``: its queue position), its current example
    (``slots.xa``), its step ``slots.t`` within restart ``slots.restart`` and the per-slot
    tensors of ``slots.state``. A sample leaves its slot when its example fools the model,
    or when it ends its last restart; a search writes a sample's output before it leaves.
    """

    steps: int = 1  # steps per restart
    restarts: int = 1

    def slot_state(self) -> dict[str, torch.Tensor]:
        """The pool's per-slot state (a dict; a subclass may carry the call's constants on it)."""
        return {}

    def fresh(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Starting examples and per-slot state of the samples ``rows`` just admitted (restart 0)."""
        raise NotImplementedError

    def step(self, slots: Pool) -> torch.Tensor | None:
        """One step of every slot (the driver then counts it); per slot, whether its example fools the model,
        or None where it fools none of them.

        A step may retire slots itself before it moves the others (``slots.keep``, their outputs written
        first): the mask it returns is over the slots still there.
        """
        raise NotImplementedError

    def keep_fooled(self, slots: Pool, fooled: torch.Tensor) -> None:
        """Write the outputs of the slots ``fooled`` (they leave next)."""

    def end_restart(self, slots: Pool, ending: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The slots ``ending`` ran every step of their restart (``last``: their last one, they leave).

        Returns which of the others leave too (e.g. found fooled); the rest restart.
        """
        return torch.zeros_like(ending)

    def restart(self, slots: Pool, which: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Starting examples and fresh state of the slots ``which``, at their new ``slots.restart``."""
        raise NotImplementedError

    def output(self) -> RunOutput:
        """The run's output: complete after the driver's loop, final for the samples that left on Ctrl-C."""
        raise NotImplementedError


class SlotDriver:
    """Continuous batching: up to ``capacity`` slots step together; a slot that frees takes the next sample.

    Without ``refill`` the pool is filled only when empty (a batch at a time, as plain loops run).
    """

    def __init__(self, search: SlotSearch, x: torch.Tensor, capacity: int, refill: bool) -> None:
        self.search = search
        self.slots = Pool(x, search.slot_state())
        self.capacity, self.refill = capacity, refill
        # At least the largest step counter of the pool (slots join and restart at 0, and all count together):
        # below the step count no slot can end its restart, which spares three operations a step.
        self.oldest = 0

    def run(self) -> RunOutput:
        try:
            while True:
                self._admit()
                if self.slots.empty():
                    break
                self._advance()
        except KeyboardInterrupt as exc:
            # Samples that left the pool are finished: the search wrote their outputs before they left.
            raise PartialRun(self.slots.left, self.search.output()) from exc
        return self.search.output()

    def _admit(self) -> None:
        slots = self.slots
        if slots.free(self.capacity) and slots.queued() and (self.refill or slots.empty()):
            rows = slots.next_rows(self.capacity)
            xa, state = self.search.fresh(rows)
            slots.admit(rows, xa, state)

    def _advance(self) -> None:
        slots = self.slots
        fooled = self.search.step(slots)
        slots.t += 1
        slots.starting = False
        self.oldest += 1
        if self.oldest < self.search.steps:
            # Most steps fool nothing and end nothing: one sync skips the bookkeeping then.
            if fooled is not None and bool(fooled.any()):
                self.search.keep_fooled(slots, fooled)
                slots.keep(~fooled)
            return
        if fooled is None:
            fooled = torch.zeros(slots.size(), dtype=torch.bool, device=slots.rows.device)
        ending = (slots.t == self.search.steps) & ~fooled
        if not bool((fooled | ending).any()):
            return
        if bool(fooled.any()):
            self.search.keep_fooled(slots, fooled)
        leaving = fooled
        if bool(ending.any()):
            leaving = leaving | self._end_restarts(ending)
        slots.keep(~leaving)
        self.oldest = int(slots.t.max()) if not slots.empty() else 0

    def _end_restarts(self, ending: torch.Tensor) -> torch.Tensor:
        """Slots at the end of a restart: those at their last (or found fooled) leave, the others start again."""
        slots = self.slots
        last = ending & (slots.restart == self.search.restarts - 1)
        leaving = last | self.search.end_restart(slots, ending, last)
        again = ending & ~leaving
        if bool(again.any()):
            slots.restart[again] += 1
            slots.t[again] = 0
            xa, state = self.search.restart(slots, again)
            slots.xa[again] = xa
            slots.reset_state(again, state)
        return leaving
