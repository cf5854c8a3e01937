"""Throughput of the random few-pixel experiments beside a plain forward pass.

One process, same model, images and device. The pixel experiments cost one
forward pass per (setting, pixel count, trial) plus the perturbation itself;
the figure to read is robench's images/s per forward pass divided by the
plain forward pass's images/s (1.0x = the perturbation is free).

    python bench/bench_pixels.py --device cpu --models cifar-resnet18 --images 256
    python bench/bench_pixels.py --device cuda --models resnet50 --images 2048 --batch-size 256

Random weights and random 8-bit images: throughput only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time

import torch
import torchvision

import robench
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.pixels.experiment import build_settings, run_pixel_experiments
from robench.evaluation.precision import device_name

from bench_attacks import MODELS  # noqa: E402  (same models as the attack benchmark)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, device: torch.device, n_images: int, batch: int, pixels: list[int], trials: int,
          repeats: int) -> dict:
    factory, size = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RobustModel(factory()).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, size, size), generator=gen, dtype=torch.uint8)
    settings = build_settings([], [])

    def plain():
        with evaluation_mode(model), torch.no_grad():
            for start in range(0, n_images, batch):
                model(images[start:start + batch].to(device).float().div_(255.0)).argmax(1).cpu()

    def pixel_run():
        # labels None: the clean prediction is the reference, so every image takes part
        return run_pixel_experiments(model, images, None, pixels=pixels, settings=settings, trials=trials,
                                     batch_size=batch, device=device)

    run_pixel_experiments(model, images[:batch], None, pixels=pixels[:1], settings=settings, batch_size=batch,
                          device=device)  # warm-up
    plain_s = pixel_s = float("inf")
    for _ in range(repeats):  # alternate the two and keep each one's best time
        sync(device)
        t0 = time.perf_counter()
        plain()
        sync(device)
        plain_s = min(plain_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        counts = pixel_run()
        sync(device)
        pixel_s = min(pixel_s, time.perf_counter() - t0)
    forwards = counts.forward_images
    return {"model": name, "images": n_images, "passes": forwards / n_images,
            "forward_ips": n_images / plain_s, "pixel_ips": forwards / pixel_s,
            "ratio": (forwards / pixel_s) / (n_images / plain_s), "seconds": pixel_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="cifar-resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pixels", default="4,8,16,32,64")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    pixels = [int(p) for p in args.pixels.split(",")]
    print(f"{dt.date.today()} · {device_name(device)} · batch {args.batch_size} · fp32 · "
          f"robench {robench.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"Python {platform.python_version()}")
    print("| model | images | forward passes per image | plain forward img/s | pixel experiments img/s per pass "
          "| ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = bench(name, device, args.images, args.batch_size, pixels, args.trials, args.repeats)
        print(f"| {r['model']} | {r['images']} | {r['passes']:.0f} | {r['forward_ips']:.1f} | {r['pixel_ips']:.1f} "
              f"| {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
