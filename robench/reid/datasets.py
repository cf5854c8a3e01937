"""Person re-identification folders: Market-1501, DukeMTMC-reID and the same layout generically.

A root holds ``query/`` and ``bounding_box_test/`` (the gallery), optionally
``bounding_box_train/``. Filenames carry the person id and the camera:
``0002_c1s1_000451_03.jpg`` (Market-1501) or ``0005_c2_f0046985.jpg``
(DukeMTMC). Person id -1 marks junk images, excluded from evaluation; id 0
marks distractors, kept as ordinary negatives. Files whose names do not
match the pattern are skipped and listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from robench.errors import UsageError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
# Group 1: person id (may be -1), group 2: camera (1-based).
PATTERNS = {
    "market1501": r"^(-?\d+)_c(\d+)s\d+_",
    "dukemtmc": r"^(-?\d+)_c(\d+)_",
    "reid": r"^(-?\d+)_c(\d+)",
}
CAMERAS = {"market1501": 6, "dukemtmc": 8}
SPLIT_DIRS = {"query": "query", "gallery": "bounding_box_test", "train": "bounding_box_train"}


@dataclass
class ReIDSplit:
    """One split's images with their person ids and cameras.

    ``files`` are read from disk unless ``images`` (uint8 NHWC, 1 or 3 channels)
    holds the pixels, as for the bundled example; ``files`` then only name the images.
    """

    files: list[Path]
    pids: np.ndarray
    camids: np.ndarray
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class ReIDData:
    kind: str
    root: Path
    query: ReIDSplit
    gallery: ReIDSplit
    train: ReIDSplit | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    junk: int = 0
    source: str | None = None  # the spec that named it when that is not KIND:ROOT (example:reid-digits)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.root.name}"

    @property
    def spec(self) -> str:
        return self.source or f"{self.kind}:{self.root}"


def parse_split(directory: Path, pattern: str, kind: str, skipped: list[dict[str, str]],
                keep_junk: bool = False) -> tuple[ReIDSplit, int]:
    regex = re.compile(pattern)
    files, pids, cams = [], [], []
    junk = 0
    max_cam = CAMERAS.get(kind)
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.name != "Thumbs.db":
                skipped.append({"file": str(path), "reason": "not an image file"})
            continue
        match = regex.match(path.name)
        if not match:
            skipped.append({"file": str(path), "reason": f"name does not match the pattern {pattern}"})
            continue
        pid, cam = int(match.group(1)), int(match.group(2))
        if max_cam is not None and not 1 <= cam <= max_cam:
            skipped.append({"file": str(path), "reason": f"camera {cam} outside 1..{max_cam}"})
            continue
        if pid == -1 and not keep_junk:
            junk += 1
            continue
        files.append(path)
        pids.append(pid)
        cams.append(cam)
    return ReIDSplit(files, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)), junk


def load_reid(kind: str, root: str | Path, pattern: str | None = None) -> ReIDData:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{kind} root not found: {root}")
    if pattern is None:
        pattern = PATTERNS[kind]
    else:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--reid-pattern is not a valid regular expression: {exc}") from None
        if compiled.groups < 2:
            raise UsageError("--reid-pattern needs two groups: person id and camera")
    skipped: list[dict[str, str]] = []
    splits: dict[str, ReIDSplit] = {}
    junk = 0
    for split, dirname in SPLIT_DIRS.items():
        directory = root / dirname
        if not directory.is_dir():
            if split == "train":
                continue
            raise UsageError(f"{root} has no {dirname}/ folder (expected query/ and bounding_box_test/)")
        splits[split], dropped = parse_split(directory, pattern, kind, skipped)
        junk += dropped
    query, gallery = splits["query"], splits["gallery"]
    if len(query) == 0:
        raise UsageError(f"{root / 'query'} holds no usable query images")
    if len(gallery) == 0:
        raise UsageError(f"{root / 'bounding_box_test'} holds no usable gallery images")
    return ReIDData(kind, root, query, gallery, splits.get("train"), skipped, junk)


class ReIDImages(Dataset):
    """Images of one split as [0,1] float CHW tensors at a fixed (height, width)."""

    def __init__(self, split: ReIDSplit, size: tuple[int, int] | None) -> None:
        self.split = split
        self.size = size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        images = self.split.images
        arr = self._read(i) if images is None else self._from_memory(images[i])
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        return x, int(self.split.pids[i]), i

    def _from_memory(self, arr: np.ndarray) -> np.ndarray:
        from PIL import Image

        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)  # RGB, as folder images are read
        if self.size is not None and tuple(arr.shape[:2]) != tuple(self.size):
            arr = np.asarray(_resized(Image.fromarray(np.ascontiguousarray(arr), "RGB"), self.size), dtype=np.uint8)
        return np.array(arr, dtype=np.uint8)  # a copy: torch.from_numpy must not alias the split

    def _read(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.split.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.size is not None:
                    img = _resized(img, self.size)
                return np.asarray(img, dtype=np.uint8).copy()
        except OSError as exc:
            raise UsageError(f"cannot read image {path}: {exc}") from None


def _resized(img: PILImage, size: tuple[int, int]) -> PILImage:
    """``img`` at (height, width) ``size``, bilinear."""
    from PIL import Image

    # Image.BILINEAR is set through globals(); Image.Resampling would need Pillow 9.1.
    return img.resize((size[1], size[0]), Image.BILINEAR)  # type: ignore[attr-defined]  # see above
