"""Slots of samples under attack: the continuous-batching pool the slot driver fills (:mod:`robench.attacks.driver`).

Each slot holds one sample of the call's queue (``rows``: its position in the inputs),
its current iterate, its own step counter and restart number, and the attack's
per-sample state. Slots leave with ``keep`` (an attack writes a sample's output before
its slot leaves, so ``left`` marks finished samples); ``admit`` appends the next samples of
the queue. Nothing here depends on which samples share a batch.
"""

from __future__ import annotations

import torch


class Pool:
    def __init__(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.total = len(x)
        self.next = 0  # queue position of the next sample to admit
        device = x.device
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.t = torch.zeros(0, dtype=torch.long, device=device)
        self.restart = torch.zeros(0, dtype=torch.long, device=device)
        self.xa = x[:0].clone()
        self.state = state  # per-sample tensors, aligned with the slots
        # Queue positions whose slots have left: their outputs are final (an interrupted run keeps them).
        self.left = torch.zeros(len(x), dtype=torch.bool, device=device)
        # Some slot is at step 0 of a restart: set when slots join or restart, cleared by the driver after
        # a step. Most steps have none, and a search may then skip its per-slot start tests.
        self.starting = False

    def size(self) -> int:
        return len(self.rows)

    def empty(self) -> bool:
        return len(self.rows) == 0

    def queued(self) -> int:
        return self.total - self.next

    def free(self, capacity: int) -> int:
        return max(0, capacity - len(self.rows))

    def next_rows(self, capacity: int) -> torch.Tensor:
        count = min(self.free(capacity), self.queued())
        rows = torch.arange(self.next, self.next + count, device=self.rows.device)
        self.next += count
        return rows

    def admit(self, rows: torch.Tensor, xa: torch.Tensor, fresh: dict[str, torch.Tensor]) -> None:
        """New slots at step 0 of restart 0, with the attack's fresh state for them."""
        for name, value in fresh.items():
            self.state[name] = torch.cat([self.state[name], value]) if name in self.state else value
        self.rows = torch.cat([self.rows, rows])
        self.t = torch.cat([self.t, torch.zeros_like(rows)])
        self.restart = torch.cat([self.restart, torch.zeros_like(rows)])
        self.xa = torch.cat([self.xa, xa])
        self.starting = True

    def reset_state(self, which: torch.Tensor, fresh: dict[str, torch.Tensor]) -> None:
        """Fresh state for the slots ``which`` (a restart begins)."""
        for name, value in fresh.items():
            self.state[name][which] = value
        self.starting = True

    def keep(self, keep: torch.Tensor) -> None:
        """Only the slots where ``keep`` is true stay; the others have left for good."""
        self.left[self.rows[~keep]] = True
        self.rows, self.t, self.restart, self.xa = self.rows[keep], self.t[keep], self.restart[keep], self.xa[keep]
        for name in list(self.state):
            self.state[name] = self.state[name][keep]

