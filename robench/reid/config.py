"""``ReIDConfig``: the options only a re-identification run reads, validated once."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from robench.errors import UsageError
from robench.validated import Options, choice_validator

DISTANCES = ("euclidean", "cosine")
AP_RULES = ("noninterp", "trapezoid")
DENOMINATORS = ("valid", "all")
PERTURBED = ("query", "gallery")
CHOICES = {"distance": DISTANCES, "ap": AP_RULES, "denominator": DENOMINATORS, "perturb": PERTURBED}


class ReIDConfig(Options):
    """Ranking (distance, ranks, AP rule, re-ranking), features (layer, flip, L2), what the attacks
    perturb, the file-name pattern of the data and the transfer attacks' surrogate model."""

    distance: str = "euclidean"
    ranks: tuple[int, ...] = (1, 5, 10)
    ap: str = "noninterp"
    denominator: str = "valid"
    perturb: str = "query"
    image_size: tuple[int, int] | None = None
    feature_layer: str | None = None
    flip: bool = False
    l2: bool = False
    rerank: bool = False
    pattern: str | None = None
    surrogate: Any = None
    surrogate_arch: str | None = None
    surrogate_num_classes: int | None = None

    _one_of = choice_validator(CHOICES)

    @field_validator("ranks", mode="before")
    @classmethod
    def _ranks(cls, value: Any) -> tuple[int, ...]:
        values = value
        if isinstance(value, str):
            try:
                values = tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise UsageError(f"--ranks takes comma-separated integers, got {value!r}") from None
        values = tuple(values)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            shown = value if isinstance(value, str) else ",".join(str(v) for v in value)
            raise UsageError(f"--ranks values must be >= 1, got {shown!r}")
        return values

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> tuple[int, int] | None:
        return parse_image_size(value) if isinstance(value, str) else value


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``--image-size HxW``, e.g. 256x128."""
    if text is None:
        return None
    rows, _, cols = text.lower().partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise UsageError(f"--image-size takes HxW, e.g. 256x128, got {text!r}")
    return int(rows), int(cols)
