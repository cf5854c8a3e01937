"""Launchers for the torchrun tests (gloo, loopback) and what they read back from a job's progress file."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch

from robench.results.progress import PROGRESS_FILE

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def standalone(processes: int, *extra: str) -> list[str]:
    """One node of ``processes`` workers."""
    return [*TORCHRUN, "--standalone", "--nproc-per-node", str(processes), *extra]


def nodes(count: int, processes: int, job_id: str) -> list[str]:
    """One of ``count`` launchers (run it ``count`` times) meeting through a c10d rendezvous on a free
    loopback port: nodes of one machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [*TORCHRUN, "--nnodes", str(count), "--nproc-per-node", str(processes), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job_id]


def saved_units(run: Path) -> int:
    """Work units in a queued job's progress file (0 before the first is saved, or while it is replaced)."""
    try:
        return len(torch.load(run / PROGRESS_FILE, weights_only=True)["units"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0
