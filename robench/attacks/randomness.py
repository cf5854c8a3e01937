"""Counter-based random numbers keyed by (seed, stream, sample index).

A sample's random start depends only on the run's seed, the attack entry
and the sample's index in the dataset, never on its batch position, the
batch size or the device: runs are batch-size invariant, resumable and
identical on CPU and GPU. No global RNG is touched.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x):
    # A 32-bit integer finaliser (xorshift-multiply) on int64 tensors or Python ints alike:
    # products of a 32-bit value and a 27-bit constant never overflow a signed 64-bit integer.
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def stream_key(seed: int, *parts: int) -> int:
    key = seed & _MASK32
    for part in parts:
        key = _mix32(key ^ _mix32((part & _MASK32) + 0x9E3779B9))
    return int(key)


def uniform(sample_ids: torch.Tensor, shape: tuple[int, ...], key: int, device: torch.device) -> torch.Tensor:
    """Uniform [0,1) numbers of ``(len(sample_ids), *shape)``, one stream per sample."""
    n_per = 1
    for s in shape:
        n_per *= s
    ids = sample_ids.to(device=device, dtype=torch.int64).view(-1, 1)
    base = _mix32(_mix32(ids + key) + 0x68E31DA4)
    counter = torch.arange(n_per, device=device, dtype=torch.int64).view(1, -1)
    bits = _mix32(base ^ _mix32(counter * 0x2545F491 + 0x1B873593))
    # 24 high-quality bits -> float32 without rounding up to 1.0
    return (bits >> 8).to(torch.float32).mul_(1.0 / (1 << 24)).view(len(sample_ids), *shape)


def normal(sample_ids: torch.Tensor, shape: tuple[int, ...], key: int, device: torch.device) -> torch.Tensor:
    """Standard normal numbers via Box-Muller from two independent uniform streams."""
    u1 = uniform(sample_ids, shape, key, device).clamp_min_(1e-7)
    u2 = uniform(sample_ids, shape, _mix32(key + 0x3C6EF372), device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
