"""``EngineConfig``: how the evaluation engine runs, validated once, the part of a run's config the engine takes."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from robench.errors import UsageError
from robench.evaluation.precision import PRECISIONS
from robench.evaluation.speed import COMPILE_MODES
from robench.validated import Options, check_range, choice_validator, parse_count

MAX_SAVE_EVERY = 7 * 24 * 3600.0  # seconds
MAX_WORKERS = 256
MAX_BATCH_SIZE = 1 << 20
CHOICES = {"compile": COMPILE_MODES, "precision": PRECISIONS}


class EngineConfig(Options):
    """Batching, precision, randomness, compilation, what is kept and how often progress is saved.

    Randomness is keyed by ``seed`` and each sample's index, so ``batch_size``, ``refill``,
    ``workers``, ``compile``, ``channels_last`` and ``save_every`` change the speed, not the results.
    """

    batch_size: int | str = 256  # or "auto"
    save_every: float = 2.0  # seconds between progress snapshots
    workers: int = 0
    compile: str = "auto"
    precision: str = "fp32"
    device: str = "auto"
    compile_backend: str = "auto"  # TorchScript's frozen graph on a CPU, inductor elsewhere (see speed.speed_up)
    channels_last: bool = False
    sweep_reuse: bool = False
    refill: bool = True  # continuous batching: fooled or finished samples' slots go to the next ones
    seed: int = 0
    save_adversarial: int | None = None  # keep the first N samples' examples as 8-bit images; 0 ("all"): every one

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> int | str:
        if value == "auto":
            return value
        text = str(value)
        # isdigit alone accepts "²" and other digits int() refuses.
        if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_BATCH_SIZE:
            # One message for the CLI and the Python API, with the words each of them has always used.
            raise UsageError(f"--batch-size must be an integer (a positive integer or auto, at most "
                             f"{MAX_BATCH_SIZE}), got {text!r}")
        return int(text)

    @field_validator("save_every")
    @classmethod
    def _save_every(cls, value: float) -> float:
        check_range("--save-every", value, 0, MAX_SAVE_EVERY)
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        check_range("--workers", value, 0, MAX_WORKERS)
        return value

    _one_of = choice_validator(CHOICES)

    @field_validator("save_adversarial", mode="before")
    @classmethod
    def _save_adversarial(cls, value: Any) -> int | None:
        return parse_count(value)
