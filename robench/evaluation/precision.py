"""Devices and numeric precision for a run."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from robench.errors import UsageError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """fp32 means true fp32 (TF32 off); tf32 allows TF32 tensor cores. Restored after."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class PrecisionModel(nn.Module):
    """Runs the wrapped model under autocast for bf16/fp16 and returns fp32 logits."""

    def __init__(self, model: nn.Module, precision: str, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device_type = device.type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.model(x)
        return out.float()
