"""Rebuild the bundled ReID example: robench/examples/reid_digits.npz + reid_digits_net.safetensors
(+ reid_digits_surrogate.safetensors, the same network trained with another seed, for transfer attacks).

Identities are the source images of scikit-learn's digits (person id = index + 1),
upscaled to 16x16. A seeded permutation puts 300 of them in the evaluation set,
300 more in the gallery as distractors (id 0) and the other 1197 in training.
Each camera changes an image in its own fixed way, plus seeded jitter per view:

    cam 1: as it is            cam 2: shifted one pixel down-right, darker
    cam 3: rotated, blurred    cam 4: smaller, low contrast, noisy

Query: one view per evaluation identity, its camera cycling 1..4. Gallery: one
view of every evaluation identity by each of the four cameras (the one by the
query's own camera is junk for that query under the Market-1501 protocol) and
the distractors. Train (stored for ``robench dmr train``): four views of 200
training identities. The networks (unit-length 64-d embeddings) are trained
contrastively on all training identities, with views drawn afresh every epoch.

Run: python tools/make_reid_digits_example.py          (writes the files)
     python tools/make_reid_digits_example.py --check  (rebuilds in memory, compares with the shipped files)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from robench.examples import HERE
from robench.examples.reid_digits import IMAGE_SIZE, reid_digits_net

EVAL_IDS, DISTRACTORS, STORED_TRAIN_IDS = 300, 300, 200
CAMERAS = {  # camera -> its fixed change; jitter is added per view
    1: {},
    2: {"shift": (1.0, 1.0), "gain": 0.7},
    3: {"angle": 15.0, "blur": 0.8},
    4: {"scale": 0.8, "contrast": 0.6, "noise": 0.06},
}
JITTER = {"shift": 0.5, "angle": 5.0, "scale": 0.04, "gain": 0.08}
MODELS = {"reid_digits_net.safetensors": 0, "reid_digits_surrogate.safetensors": 1}  # file -> training seed
DATA_FILE = "reid_digits.npz"


def source_images() -> torch.Tensor:
    """scikit-learn's digits in [0,1], bilinearly upscaled to 16x16: [1797, 1, 16, 16]."""
    x = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    return F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)


def identity_split(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return {"eval": np.sort(order[:EVAL_IDS]), "distractors": np.sort(order[EVAL_IDS:EVAL_IDS + DISTRACTORS]),
            "train": np.sort(order[EVAL_IDS + DISTRACTORS:])}


def _uniform(n: int, half_width: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * 2 - 1) * half_width


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(k, k)
    return (k2 / k2.sum()).view(1, 1, 5, 5)


def camera_view(x: torch.Tensor, camera: int, gen: torch.Generator) -> torch.Tensor:
    """What ``camera`` sees of the images ``x`` [N,1,H,W] in [0,1], jitter drawn from ``gen``."""
    spec, n = CAMERAS[camera], len(x)
    height, width = x.shape[-2:]
    dy, dx = spec.get("shift", (0.0, 0.0))
    shift_y = dy + _uniform(n, JITTER["shift"], gen)
    shift_x = dx + _uniform(n, JITTER["shift"], gen)
    angle = torch.deg2rad(spec.get("angle", 0.0) + _uniform(n, JITTER["angle"], gen))
    scale = spec.get("scale", 1.0) + _uniform(n, JITTER["scale"], gen)
    # affine_grid maps output to input coordinates: the inverse of rotate-scale-shift, in [-1, 1] units.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, sin, -shift_x * 2 / width], 1),
                         torch.stack([-sin, cos, -shift_y * 2 / height], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if "blur" in spec:
        out = F.conv2d(out, _gaussian_kernel(spec["blur"]), padding=2)
    if "contrast" in spec:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * spec["contrast"] + mean
    out = out * (spec.get("gain", 1.0) + _uniform(n, JITTER["gain"], gen)).view(-1, 1, 1, 1)
    if "noise" in spec:
        out = out + torch.randn(out.shape, generator=gen) * spec["noise"]
    return out.clamp(0, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N,1,H,W] in [0,1] -> uint8 NHWC, as stored."""
    return torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def views(images: torch.Tensor, sources: np.ndarray, cameras: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """One view per (source, camera) pair, in the given order."""
    out = np.empty((len(sources), *IMAGE_SIZE, 1), dtype=np.uint8)
    for camera in CAMERAS:
        rows = np.flatnonzero(cameras == camera)
        if len(rows):
            out[rows] = to_uint8(camera_view(images[sources[rows]], camera, gen))
    return out


def build_data(images: torch.Tensor, ids: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cams = np.array(sorted(CAMERAS))
    ev = ids["eval"]
    query_sources, query_cams = ev, cams[np.arange(len(ev)) % len(cams)]
    gallery_sources = np.concatenate([np.repeat(ev, len(cams)), ids["distractors"]])
    gallery_cams = np.concatenate([np.tile(cams, len(ev)), rng.choice(cams, len(ids["distractors"]))])
    gallery_pids = np.concatenate([np.repeat(ev + 1, len(cams)), np.zeros(len(ids["distractors"]), np.int64)])
    stored_train = np.sort(rng.choice(ids["train"], STORED_TRAIN_IDS, replace=False))
    train_sources, train_cams = np.repeat(stored_train, len(cams)), np.tile(cams, len(stored_train))
    data = {"train_identities": ids["train"] + 1}
    for split, sources, cameras, pids in (
        ("query", query_sources, query_cams, query_sources + 1),
        ("gallery", gallery_sources, gallery_cams, gallery_pids),
        ("train", train_sources, train_cams, train_sources + 1),
    ):
        data.update({f"{split}_images": views(images, sources, cameras, gen), f"{split}_pids": pids.astype(np.int64),
                     f"{split}_camids": cameras.astype(np.int64), f"{split}_sources": sources.astype(np.int64)})
    return data


def rgb(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div(255).repeat(1, 3, 1, 1)


def train_embedding(images: torch.Tensor, train_ids: np.ndarray, seed: int, epochs: int = 20,
                    batch_size: int = 256, lr: float = 3e-3, temperature: float = 0.1) -> nn.Module:
    """Contrastive training (NT-Xent): two views of each identity by two different cameras, drawn
    afresh every epoch, are pulled together and pushed away from the batch's other identities."""
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # layer initialisation
        net = reid_digits_net()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    cams = np.array(sorted(CAMERAS))
    n = len(train_ids)
    net.train()
    for _ in range(epochs):
        first = torch.randint(len(cams), (n,), generator=gen).numpy()
        second = (first + torch.randint(1, len(cams), (n,), generator=gen).numpy()) % len(cams)
        x1, x2 = (rgb(torch.from_numpy(views(images, train_ids, cams[c], gen)).permute(0, 3, 1, 2))
                  for c in (first, second))
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            _nt_xent(net(torch.cat([x1[batch], x2[batch]])), temperature).backward()
            opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return net.eval()


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows i and i + k of the unit-length ``z`` [2k, D] are the same identity; the rest are negatives."""
    k = len(z) // 2
    similarity = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(k, 2 * k), torch.arange(k)])
    return F.cross_entropy(similarity, partner)


def clean_metrics(weights: dict[str, torch.Tensor], data_path: Path) -> dict[str, float]:
    """Clean Rank-1/5/10 and mAP of an embedding on the stored data, through robench's own ReID path."""
    import robench
    from robench.examples.reid_digits import load_reid_digits

    net = reid_digits_net()
    net.load_state_dict(weights)
    doc = robench.evaluate(net.eval(), load_reid_digits(data_path, "example:reid-digits"), "reid-clean",
                           device="cpu").doc
    return {k: doc["clean"][k] for k in ("rank1", "rank5", "rank10", "mAP")}


def build(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    images = source_images()
    ids = identity_split(len(images))
    np.savez_compressed(out / DATA_FILE, **build_data(images, ids))
    nets = {}
    for name, seed in MODELS.items():
        net = train_embedding(images, ids["train"], seed)
        nets[name] = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    return nets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if not args.check:
        for name, weights in build(args.out).items():
            save_file(weights, str(args.out / name))
            (args.out / name).chmod(0o644)  # shipped in the wheel: readable by everyone, like the npz
            print(f"{name}: {clean_metrics(weights, args.out / DATA_FILE)}")
        print(f"wrote {args.out}")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build(Path(tmp))
        problems = _compare_data(Path(tmp) / DATA_FILE, args.out / DATA_FILE)
        for name, weights in rebuilt.items():
            shipped = clean_metrics(load_file(str(args.out / name)), args.out / DATA_FILE)
            again = clean_metrics(weights, args.out / DATA_FILE)
            print(f"{name}: shipped {shipped}, rebuilt {again}")
            # Training is seeded, but kernels may differ across torch versions: metrics, not bits.
            problems += [f"{name} {k}: shipped {shipped[k]:.4f}, rebuilt {again[k]:.4f}"
                         for k in shipped if not math.isclose(shipped[k], again[k], abs_tol=0.05)]
    print("\n".join(problems) if problems else "the shipped files match a rebuild")
    return 1 if problems else 0


def _compare_data(rebuilt: Path, shipped: Path) -> list[str]:
    with np.load(rebuilt) as a, np.load(shipped) as b:
        if set(a.files) != set(b.files):
            return [f"{DATA_FILE}: arrays {sorted(a.files)} vs {sorted(b.files)}"]
        # Resampling is float arithmetic: allow one grey level, nothing more.
        return [f"{DATA_FILE}: {k} differs" for k in a.files
                if a[k].shape != b[k].shape or np.abs(a[k].astype(np.int64) - b[k].astype(np.int64)).max() > 1]


if __name__ == "__main__":
    sys.exit(main())
