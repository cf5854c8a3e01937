"""A folder of image files, read defensively: bad files are skipped and listed, never fatal.

Used where users point robench at "their own folder of images" (the
Pixel-index command and ``--data imagefolder:``). Images become 8-bit (grayscale
or RGB) at the model's input resolution; whatever cannot be read (including
decompression bombs) lands in ``skipped`` with the reason, images whose channel
count differs from the dataset's are converted and listed in ``converted``, and a
warning is printed once per run. Only a folder that cannot be listed at all is an
error (exit 2): then the data is not there, rather than partly broken.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from robench.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
_WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.txt")


@dataclass
class ImageFolderScan:
    """What a folder holds: image files with their (optional) class names, and the rest."""

    root: Path
    files: list[Path]
    class_names: list[str | None]  # sub-folder name per file, None for a flat folder
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)  # {"file", "from": mode, "to": "L"/"RGB"}

    @property
    def class_structured(self) -> bool:
        return any(c is not None for c in self.class_names)


class UnreadableImage(ValueError):
    """A file that is skipped; the message is the reason listed in the results."""


def scan_folder(root: str | Path) -> ImageFolderScan:
    """Flat folder (files at the top) or class folders (one sub-folder per class).

    A folder or sub-folder that cannot be listed (permissions, I/O errors) is a usage
    error naming it: the user has to fix access, and dropping it would lose a class.
    """
    root = Path(root)
    try:
        return _scan(root)
    except OSError as exc:
        failed = Path(exc.filename) if exc.filename is not None else root
        reason = exc.strerror or str(exc)
        if failed == root:
            raise UsageError(f"cannot read data folder {root}: {reason}") from None
        raise UsageError(f"cannot read {failed} in data folder {root}: {reason}") from None


def _scan(root: Path) -> ImageFolderScan:
    if not root.is_dir():
        raise UsageError(f"image folder not found: {root}")
    files: list[Path] = []
    classes: list[str | None] = []
    skipped: list[dict[str, str]] = []
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    for path in (p for p in entries if p.is_file()):
        if subdirs:
            skipped.append({"file": str(path), "reason": "file beside class folders"})
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
            classes.append(None)
        else:
            skipped.append({"file": str(path), "reason": f"not an image file ({path.suffix or 'no suffix'})"})
    for sub in subdirs:
        for path in sorted(_files_below(sub)):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                classes.append(sub.name)
            else:
                skipped.append({"file": str(path), "reason": f"not an image file ({path.suffix or 'no suffix'})"})
    if not files:
        raise UsageError(f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFolderScan(root, files, classes, skipped)


def _files_below(folder: Path) -> Iterator[Path]:
    """Regular, non-hidden files at any depth.

    Unlike ``Path.rglob``, which silently drops sub-folders it may not list (a class
    would vanish from the results), a listing error is raised. Symbolic links to
    folders are not followed, so a link loop cannot make the scan endless.
    """
    def fail(exc: OSError) -> None:
        raise exc

    for parent, _, names in os.walk(folder, onerror=fail):
        for name in names:
            path = Path(parent, name)
            if not name.startswith(".") and path.is_file():
                yield path


def default_pixel_limit() -> int | None:
    """Pillow's limit as this program has it (its default unless the embedding program changed it)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def check_pixel_limit(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise UsageError(f"--max-image-pixels must be a positive integer, got {max_pixels!r}")


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's limit is a module global: set it for one read and put the program's value back.

    Pillow only warns between 1x and 2x its limit; within the read that warning is an
    error, so any image over the limit is skipped instead of decoded.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _refuse_bomb(size: tuple[int, int], limit: int | None) -> None:
    width, height = size
    if limit is not None and width * height > limit:
        raise UnreadableImage(f"decompression bomb: {width}x{height} = {width * height:,} pixels exceeds the "
                              f"limit of {limit:,}; pass --max-image-pixels to raise it")


def read_image8(path: Path, resize: int | None, crop: int | None, max_pixels: int | None = None,
                interpolation: str | None = None) -> np.ndarray:
    """An 8-bit array (H, W, 1) for grayscale files, (H, W, 3) otherwise.

    Raises ``ValueError`` (``UnreadableImage``) with a short reason for files that
    cannot be used. 16-bit and 32-bit integer images are scaled to 8 bits by their
    type's range (not clipped, as a plain conversion would); alpha is dropped;
    palettes expanded. Images with more than ``max_pixels`` pixels (default:
    Pillow's limit) are refused from their header, before anything is decoded.
    """
    return _read_image(path, resize, crop, max_pixels, interpolation)[0]


def _read_image(path: Path, resize: int | None, crop: int | None,
                max_pixels: int | None, interpolation: str | None = None) -> tuple[np.ndarray, str]:
    """The 8-bit array and the file's own mode (e.g. "RGBA", "P", "I;16")."""
    from PIL import Image, UnidentifiedImageError

    limit = default_pixel_limit() if max_pixels is None else max_pixels
    try:
        # Image.open reads only the header. Pillow's own check there would fire before the
        # size is known to us, so it is off for the open and ours runs on the header instead;
        # Pillow's checks stay on (at our limit) while decoding, e.g. for later GIF frames.
        with _pillow_pixel_limit(None):
            img = Image.open(path)
        with img, _pillow_pixel_limit(limit):
            _refuse_bomb(img.size, limit)
            img.load()
            mode = img.mode
            img = _to_8bit(img)
            if resize:
                img = _resize_shorter(img, resize, interpolation)
            if crop:
                img = _center_crop(img, crop)
            arr = np.asarray(img, dtype=np.uint8).copy()
            return (arr[..., None] if arr.ndim == 2 else arr), mode
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not a readable image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"decompression bomb: {exc}; pass --max-image-pixels to raise the limit") from None
    except Exception as exc:  # noqa: BLE001 - a hostile file may make a decoder raise anything; skip it
        raise UnreadableImage(f"unreadable image: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    """Truncated files raise OSError (reported as Pillow words it); others ValueError, struct.error, ..."""
    text = str(exc)
    if isinstance(exc, OSError) and text:
        return text
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {text}" if text else name


def _to_8bit(img):
    """Mode L for grayscale sources, RGB for everything else."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 16843009.0
        arr8 = np.clip(np.round(arr.astype(np.float64) / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8)
    if img.mode in ("L", "1", "LA"):
        return img.convert("L")
    return img.convert("RGB")


def _resize_shorter(img, size: int, interpolation: str | None = None):
    """Shorter side to ``size``; ``interpolation`` names a PIL filter (bilinear when None)."""
    from PIL import Image

    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    resample = getattr(Image, (interpolation or "bilinear").upper())
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _center_crop(img, size: int):
    w, h = img.size
    if w < size or h < size:
        raise UnreadableImage(f"image {w}x{h} is smaller than the crop {size}")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def input_geometry(input_size: int | None, resize: int | None, crop: int | None) -> tuple[int | None, int | None]:
    """``--input-size N`` means the usual evaluation transform: shorter side N/0.875, centre crop N."""
    if input_size is not None and (resize or crop):
        raise UsageError("give either --input-size or --resize/--crop, not both")
    if input_size is not None:
        if input_size < 1:
            raise UsageError(f"--input-size must be positive, got {input_size}")
        return round(input_size / 0.875), input_size
    return resize, crop


def load_folder(scan: ImageFolderScan, resize: int | None, crop: int | None,
                gray: bool | None = None, max_pixels: int | None = None,
                interpolation: str | None = None) -> tuple[torch.Tensor, list[int]]:
    """Read every file: uint8 NCHW tensor of the readable ones and their positions in ``scan.files``.

    Unreadable files (and decompression bombs over ``max_pixels``) are appended to
    ``scan.skipped``; images whose size differs from the first readable one are
    skipped too (pass --resize/--crop or --input-size). Channels: those of most
    readable images (ties: three), or one/three with ``gray=True/False``; images
    with the other count are converted (colour to gray with the ITU-R 601 luma
    weights, gray repeated) and listed in ``scan.converted``.
    """
    check_pixel_limit(max_pixels)
    arrays: list[np.ndarray] = []
    modes: list[str] = []
    kept: list[int] = []
    shape: tuple[int, ...] | None = None
    for i, path in enumerate(scan.files):
        try:
            arr, mode = _read_image(path, resize, crop, max_pixels, interpolation)
        except ValueError as exc:
            scan.skipped.append({"file": str(path), "reason": str(exc)})
            continue
        if shape is None:
            shape = arr.shape
        if arr.shape[:2] != shape[:2]:
            scan.skipped.append({"file": str(path), "reason": f"size {arr.shape[1]}x{arr.shape[0]} differs from "
                                 f"{shape[1]}x{shape[0]}; pass --input-size or --resize/--crop"})
            continue
        arrays.append(arr)
        modes.append(mode)
        kept.append(i)
    if not arrays:
        raise UsageError(f"{scan.root}: none of the {len(scan.files)} image files could be read")
    channels = _dataset_channels(arrays, gray)
    for arr, mode, i in zip(arrays, modes, kept):
        if arr.shape[2] != channels:
            scan.converted.append({"file": str(scan.files[i]), "from": mode, "to": "L" if channels == 1 else "RGB"})
    arrays = [_channels(a, channels == 1) for a in arrays]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, kept


def _dataset_channels(arrays: list[np.ndarray], gray: bool | None) -> int:
    """One odd file must not decide the model's input: the majority does.

    A tie keeps colour, since gray images lose nothing by being repeated to RGB.
    """
    if gray is not None:
        return 1 if gray else 3
    gray_count = sum(a.shape[2] == 1 for a in arrays)
    return 1 if gray_count > len(arrays) - gray_count else 3


def _channels(arr: np.ndarray, one: bool) -> np.ndarray:
    if one and arr.shape[2] == 3:
        luma = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    if not one and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return arr


def class_indices(names: list[str], num_classes: int, class_map: str | Path | None) -> list[int]:
    """Map sub-folder names to the model's class indices.

    In order: a ``--class-map`` file (JSON ``{"folder": index}``, or text with
    one ``folder index`` pair per line, or one class name per line in class
    order); integer folder names ("0", "1", ...); ImageNet synset ids
    (``n01440764``) for 1000-class models, whose index is the synset's rank
    among the 1000 ILSVRC-2012 synsets.
    """
    unique = sorted(set(names))
    if class_map is not None:
        mapping = _read_class_map(Path(class_map))
    elif all(n.isdigit() for n in unique):
        mapping = {n: int(n) for n in unique}
    elif all(n.startswith("n") and n[1:].isdigit() for n in unique):
        if num_classes != 1000:
            raise UsageError(f"folders are ImageNet synsets but the model has {num_classes} classes; "
                             "pass --class-map")
        wnids = _WNIDS_FILE.read_text().split()
        mapping = {w: i for i, w in enumerate(wnids)}
    else:
        raise UsageError("cannot map class folder names (e.g. "
                         f"{', '.join(unique[:3])}) to the model's classes: pass --class-map FILE")
    missing = [n for n in unique if n not in mapping]
    if missing:
        raise UsageError(f"no class index for folder(s) {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    bad = [n for n in unique if not 0 <= mapping[n] < num_classes]
    if bad:
        raise UsageError(f"folder {bad[0]} maps to class {mapping[bad[0]]}, outside the model's "
                         f"{num_classes} classes")
    return [mapping[n] for n in names]


def _read_class_map(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise UsageError(f"class map not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise UsageError(f"{path}: expected a JSON object mapping folder names to class indices")
        return {str(k): v for k, v in data.items()}
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if all(len(parts) == 2 and parts[1].lstrip("-").isdigit() for parts in lines):
        return {parts[0]: int(parts[1]) for parts in lines}
    return {" ".join(parts): i for i, parts in enumerate(lines)}
