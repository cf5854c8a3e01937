"""Several processes, one evaluation: ``torchrun --nproc-per-node N -m robench eval ...``.

Each process takes a contiguous shard of the dataset (exact: no padding, no
duplicates), attacks it on its own device, and the per-sample outcomes are
gathered so that every process holds the same merged result; only rank 0
writes it. Per-sample randomness is keyed by the sample's index, so the
numbers equal a single-process run's. Works with NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, TypeVar, cast

import torch
import torch.distributed as dist

from robench.errors import UsageError

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


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the group torchrun set up (or reuse one the caller created)."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous, exact split of n items: the first n % size shards get one more."""
    if n < size:
        raise UsageError(f"{n} samples cannot be split over {size} processes")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather(obj: T) -> list[T]:
    """Every process's object (each sends the same kind), in rank order, on every process."""
    out: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return cast("list[T]", out)  # every slot now holds a process's object
