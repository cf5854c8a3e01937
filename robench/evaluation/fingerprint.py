"""The data fingerprint every run records and resumes against: SHA-256 of the samples read so far.

Indices, labels and pixels go into three streams joined at the end, so the fingerprint of a set does
not depend on how it was cut into batches; a resumed run compares the digest of the samples the
interrupted run finished with the one it saved.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def batch_bytes(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[bytes, bytes, bytes]:
    """A batch as the digest reads it (kept by callers that hash the same batch more than once)."""
    return (index.numpy().astype(np.int64).tobytes(), y.numpy().astype(np.int64).tobytes(),
            x.numpy().astype(np.float32).tobytes())


class DataDigest:
    def __init__(self) -> None:
        self.streams = [hashlib.sha256() for _ in range(3)]

    def add(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        self.add_bytes(batch_bytes(x, y, index))

    def add_bytes(self, parts: tuple[bytes, bytes, bytes]) -> None:
        for stream, part in zip(self.streams, parts):
            stream.update(part)

    def hexdigest(self) -> str:
        """Of the samples added so far (the streams stay open for more)."""
        return hashlib.sha256(b"".join(stream.digest() for stream in self.streams)).hexdigest()
