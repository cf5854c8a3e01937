"""Several processes, one evaluation: ``torchrun [--nnodes M] --nproc-per-node N -m robench eval ...``.

Every task shares a work queue through the group's store (``robench.evaluation.work_queue``).
Per-sample randomness is keyed by the sample's index, so the numbers equal a single-process run's.
Only rank 0 writes. Works with NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return world()[0] == 0


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", world()[2])
    return device


@dataclass
class Group:
    """This process's place in the group and the group's key-value store (its keys are this launch
    attempt's: an elastic restart starts from clean keys; what a job keeps is on disk)."""

    store: dist.Store
    rank: int
    size: int


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Group]:
    """Join the group torchrun set up (or reuse one the caller created)."""
    if dist.is_initialized():
        # A caller's own group: its default store is the one every member shares.
        store = dist.distributed_c10d._get_default_store()
        yield Group(_fresh_keys(store), dist.get_rank(), dist.get_world_size())
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The rendezvous torchrun's environment describes, done here so that its store is ours to use too.
    # torchrun's agent keeps one store across elastic restarts: the keys of a failed attempt (the group's
    # addresses among them) would hang the next one, so each attempt works under a prefix of its own.
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=attempt, rank=rank, world_size=size)
    try:
        yield Group(_fresh_keys(attempt), rank, size)
    finally:
        dist.destroy_process_group()


_joins = itertools.count()


def _fresh_keys(store: dist.Store) -> dist.Store:
    # Each join of the group gets keys of its own: every process joins in the same order, so they agree.
    return dist.PrefixStore(f"robench/{next(_joins)}", store)


def from_first(value: T) -> T:
    """Rank 0's ``value`` on every process of a torchrun job; a single process's as it is."""
    if world()[1] == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
