"""``DataConfig``: which data a run reads and how, validated once."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from robench.data.images import check_pixel_limit
from robench.data.sources import DataOptions
from robench.validated import Options


class DataConfig(Options):
    """``source`` is a spec (``cifar10``, ``npz:FILE``, ``imagefolder:DIR``, ``market1501:ROOT``, ...), an
    ``(x, y)`` pair or an ``ImageDataset``; None takes the suite's dataset (or the bundled example's)."""

    source: Any = None
    max_image_pixels: int | None = None
    limit: int | None = None
    root: str | None = None
    download: bool = False
    split: str = "test"
    resize: int | None = None
    crop: int | None = None
    gray: bool | None = None

    @field_validator("max_image_pixels", mode="before")
    @classmethod
    def _max_image_pixels(cls, value: Any) -> Any:
        check_pixel_limit(value)
        return value

    def options(self) -> DataOptions:
        """A fresh DataOptions each call: nothing a run does to it can reach this config."""
        return DataOptions(root=self.root, download=self.download, limit=self.limit, resize=self.resize,
                           crop=self.crop, split=self.split, gray=self.gray, max_image_pixels=self.max_image_pixels)

    @classmethod
    def of(cls, source: Any, options: DataOptions) -> "DataConfig":
        """The config of ``source`` read with a DataOptions (read, never changed)."""
        return cls(source=source, root=options.root, download=options.download, limit=options.limit,
                   resize=options.resize, crop=options.crop, split=options.split, gray=options.gray,
                   max_image_pixels=options.max_image_pixels)
