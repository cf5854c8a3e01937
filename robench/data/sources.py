"""Turn a ``--data SPEC`` into a dataset of ([0,1] float CHW image, int label, index)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from robench.data.images import check_pixel_limit
from robench.errors import UsageError
from robench.files import check_regular_file
from robench.models.preprocessing import INTERPOLATIONS
from robench.registry import Registry

LIMIT_SEED = 0  # --limit subsets are fixed across runs and machines, independent of --seed


@dataclass
class DataOptions:
    root: str | None = None
    download: bool = False
    limit: int | None = None
    resize: int | None = None
    crop: int | None = None
    split: str = "test"
    gray: bool | None = None  # image folders: force one (True) or three (False) channels; None: the majority
    max_image_pixels: int | None = None  # image folders: larger images are skipped; None: Pillow's limit
    interpolation: str | None = None  # image folders' --resize filter (a model's preprocessing); None: bilinear

    def __post_init__(self) -> None:
        check_pixel_limit(self.max_image_pixels)
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")


class ImageDataset(Dataset):
    """A dataset of images in [0,1], labels and the stable index of each sample."""

    def __init__(self, base: Any, name: str, indices: np.ndarray | None = None) -> None:
        self.base = base
        self.name = name
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices)
        self.skipped: list[dict[str, str]] = []  # files left out while reading, with the reason
        self.converted: list[dict[str, str]] = []  # files whose channels were changed to the dataset's

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        idx = int(self.indices[i])
        x, y = self.base[idx]
        return x, int(y), idx

    def subset(self, limit: int | None) -> "ImageDataset":
        if limit is None or limit >= len(self):
            return self
        if limit <= 0:
            raise UsageError(f"--limit must be positive, got {limit}")
        rng = np.random.default_rng(LIMIT_SEED)
        chosen = np.sort(rng.permutation(len(self))[:limit])
        subset = ImageDataset(self.base, self.name, self.indices[chosen])
        subset.skipped = self.skipped
        subset.converted = self.converted
        return subset


class TensorImages:
    """In-memory images (float NCHW in [0,1], or uint8 NCHW read from files) and labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return as_float(self.x[i]), int(self.y[i])


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


DATASETS: Registry[Callable[[str, DataOptions], ImageDataset]] = Registry("dataset kind")


def load_data(spec: str, options: DataOptions | None = None) -> ImageDataset:
    """``npz:PATH``, ``imagefolder:PATH``, ``example:digits`` or a torchvision name."""
    options = options or DataOptions()
    kind, _, arg = spec.partition(":")
    if not arg and kind.lower() in DATASETS and kind.lower() in TORCHVISION_SETS:
        arg = ""
    elif not arg:
        raise UsageError(
            f"--data {spec!r}: expected KIND:PATH (npz:, imagefolder:, example:) or a dataset name "
            f"({', '.join(sorted(TORCHVISION_SETS))})"
        )
    _check_folder_only_options(kind, options)
    dataset = DATASETS.get(kind)(arg, options)
    return dataset.subset(options.limit)


def _check_folder_only_options(kind: str, options: DataOptions) -> None:
    """Options that only image folders use are refused elsewhere rather than silently ignored."""
    if kind.lower() == "imagefolder":
        return
    given = [flag for flag, value in (("--gray/--rgb", options.gray), ("--max-image-pixels", options.max_image_pixels))
             if value is not None]
    if given:
        raise UsageError(f"{' and '.join(given)} apply to imagefolder: data only, not {kind}")


def from_arrays(x: Any, y: Any, name: str = "arrays") -> ImageDataset:
    """Validate arrays (uint8 NHWC/NHW or float NCHW in [0,1]) into a dataset."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim not in (3, 4):
        raise UsageError(f"{name}: x must have 3 or 4 dimensions (N,H,W[,C] or N,C,H,W), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"{name}: y must be a vector with one label per image, got {y.shape} for {len(x)} images")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise UsageError(f"{name}: labels must be integers, got {y.dtype}")
    if len(x) == 0:
        raise UsageError(f"{name}: the dataset is empty (0 images)")
    if (y < 0).any():
        raise UsageError(f"{name}: labels must be >= 0 (found {int(y.min())})")
    _check_layout(x, name)
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        tensor = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        if x.ndim == 3:
            x = x[:, None]
        if not np.isfinite(x).all():
            raise UsageError(f"{name}: x contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise UsageError(f"{name}: float images must be in [0,1], found [{lo:.3g}, {hi:.3g}]")
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise UsageError(f"{name}: x must be uint8 (NHWC) or float (NCHW in [0,1]), got {x.dtype}")
    return ImageDataset(TensorImages(tensor, torch.from_numpy(y.astype(np.int64))), name)


def _check_layout(x: np.ndarray, name: str) -> None:
    """Catch the classic axis-order mix-up here, where it can be named, not as a convolution error later.

    Only shapes that cannot be read the documented way are refused: a uint8 array
    whose axis 1 looks like channels while its last axis cannot be channels, and the
    mirror case for floats. Anything ambiguous is left to the model's first batch.
    """
    if x.ndim != 4:
        return
    second, last = x.shape[1], x.shape[-1]
    if x.dtype == np.uint8 and second in (1, 3) and last not in (1, 3, 4):
        hint = "robench reads uint8 images as NHWC; transpose with x.transpose(0, 2, 3, 1)"
    elif np.issubdtype(x.dtype, np.floating) and last in (1, 3) and second not in (1, 3, 4):
        hint = "robench reads float images as NCHW; transpose with x.transpose(0, 3, 1, 2)"
    else:
        return
    raise UsageError(f"{name}: x is {x.dtype} with shape {tuple(x.shape)}: {hint}")


@DATASETS.register("npz")
def _npz(path: str, options: DataOptions) -> ImageDataset:
    file = Path(path)
    try:
        # A FIFO or a device would block or never end: refused before numpy opens it.
        check_regular_file(file, "data file")
        with open(file, "rb") as f:
            _check_zip_signature(f, path)
            _check_array_sizes(f, path)
            with np.load(f, allow_pickle=False) as arrays:
                missing = [k for k in ("x", "y") if k not in arrays.files]
                if missing:
                    raise UsageError(f"{path} lacks array(s) {', '.join(missing)} (has {', '.join(arrays.files)})")
                x, y = arrays["x"], arrays["y"]
    except UsageError:
        raise
    except OSError as exc:
        if exc.errno is None:  # numpy's own OSErrors are about the content, not access to the file
            raise UsageError(f"cannot read {path} as .npz: {exc}") from exc
        raise UsageError(f"cannot read data file {path}: {exc.strerror or exc}; check that it is "
                         "readable by this user") from exc
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy's words for an array of Python objects
            raise UsageError(f"{path} holds arrays of Python objects, which robench does not unpickle (that could "
                             "run code); save x and y as numeric arrays") from exc
        raise UsageError(f"cannot read {path} as .npz: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or non-npz file
        raise UsageError(f"cannot read {path} as .npz: {exc}") from exc
    return from_arrays(x, y, name=f"npz:{file.name}")


# A zip archive's first local header, or the end record of an empty archive.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")


def _check_zip_signature(f: Any, path: str) -> None:
    """numpy would read any other file as a .npy array or a pickle and report that instead."""
    head = f.read(4)
    if head not in _ZIP_SIGNATURES:
        raise UsageError(f"{path} is not an .npz archive of arrays; save one with numpy.savez(PATH, x=images, "
                         "y=labels)")
    f.seek(0)


def _check_array_sizes(f: Any, path: str) -> None:
    """An array's header says its shape; a forged one (or a zip bomb of zeros) would have numpy allocate
    and fill that much. Arrays larger than the memory available could only end in the out-of-memory
    killer: refused before numpy reads them."""
    import zipfile

    limit = _memory_bytes()
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                shape, dtype = _npy_header(member)
            claimed = max(info.file_size, int(np.prod(shape, dtype=object)) * dtype.itemsize)
            if limit is not None and claimed > limit:
                raise UsageError(f"{path}: {info.filename} holds {claimed / 1e9:.3g} GB (shape {tuple(shape)}), "
                                 f"more than the {limit / 1e9:.3g} GB of memory available")
    f.seek(0)


def _npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(member)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(member)  # numpy bounds the header's own size
    return shape, dtype


def _memory_bytes() -> int | None:
    """Memory available now (Linux's MemAvailable, page cache included), else all of it; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


@DATASETS.register("example")
def _example(name: str, options: DataOptions) -> ImageDataset:
    from robench.examples import example_data_path

    return _npz(str(example_data_path(name, options.split)), options)


def _image_transform(options: DataOptions) -> Callable:
    from torchvision import transforms as T

    steps: list[Any] = []
    if options.resize:
        steps.append(T.Resize(options.resize))
    if options.crop:
        steps.append(T.CenterCrop(options.crop))
    steps.append(T.ToTensor())
    return T.Compose(steps)


@DATASETS.register("imagefolder")
def _imagefolder(path: str, options: DataOptions) -> ImageDataset:
    """Class sub-folders (labels in sorted folder order, as torchvision's ImageFolder).

    Files are read up front (8-bit, at the --resize/--crop size) so that a bad
    file is skipped and listed in the results instead of stopping the run.
    """
    from robench.data.images import load_folder, scan_folder

    scan = scan_folder(path)
    if not scan.class_structured:
        raise UsageError(f"{path}: imagefolder needs one sub-folder per class")
    images, kept = load_folder(scan, options.resize, options.crop, options.gray, options.max_image_pixels,
                               interpolation=options.interpolation)
    classes = sorted({c for c in scan.class_names if c is not None})
    # Class-structured: every file has a class (files beside the class folders are skipped).
    labels = torch.tensor([classes.index(cast(str, scan.class_names[i])) for i in kept], dtype=torch.long)
    dataset = ImageDataset(TensorImages(images, labels), f"imagefolder:{Path(path).name}")
    dataset.skipped = scan.skipped
    dataset.converted = scan.converted
    return dataset


# name -> (torchvision class, how its split argument is spelled)
TORCHVISION_SETS: dict[str, tuple[str, str]] = {
    "mnist": ("MNIST", "train"),
    "fashion-mnist": ("FashionMNIST", "train"),
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"),
    "stl10": ("STL10", "split"),
}


def _torchvision(name: str) -> Callable[[str, DataOptions], ImageDataset]:
    cls_name, split_style = TORCHVISION_SETS[name]

    def build(split: str, options: DataOptions) -> ImageDataset:
        import torchvision.datasets as tvd

        split = split or options.split

        root = options.root or str(Path.home() / ".cache" / "robench" / "data")
        split_kwargs = (
            {"train": split == "train"} if split_style == "train" else {"split": split}
        )
        try:
            ds = getattr(tvd, cls_name)(
                root, download=options.download, transform=_image_transform(options), **split_kwargs
            )
        except RuntimeError as exc:
            hint = "" if options.download else " (pass --download to fetch it, or --data-root to point at it)"
            raise UsageError(f"{name} not found under {root}{hint}: {exc}") from exc
        return ImageDataset(ds, f"{name}:{split}")

    return build


for _name in TORCHVISION_SETS:
    DATASETS.add(_name, _torchvision(_name))
