"""Throughput of robench's attacks beside torchattacks and the forward+input-gradient bound.

Everything is measured in one process on the same model, data and device.
The bound for an attack of k gradient steps is (forward+input-gradient
throughput) / k; robench's ratio to it is its overhead. PGD runs with
final-iterate semantics here (fixed work: no early stopping), so the
comparison with torchattacks is like for like.

    python bench/bench_attacks.py --device cpu --models cifar-resnet18 --batch-size 64
    python bench/bench_attacks.py --device cuda --write BENCHMARKS.md

Random weights are fine for throughput; the images are random too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

import robench
from robench.attacks import FGSM, PGD
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.evaluation.precision import PrecisionModel, device_name, matmul_precision
from robench.evaluation.speed import speed_up


def cifar_resnet18() -> nn.Module:
    """ResNet-18 with the usual CIFAR stem: 3x3 stride-1 conv, no max-pool."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "cifar-resnet18": (cifar_resnet18, 32),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=1000), 224),
}


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def bench_model(name: str, device: torch.device, batch: int, precision: str, repeats: int,
                attacks: tuple[str, ...] = ("FGSM", "PGD-10", "PGD-50"), compile: bool = False,
                channels_last: bool = False) -> list[dict]:
    factory, size = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = factory()
    model = RobustModel(net).to(device)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    classes = 10 if name.startswith("cifar") else 1000
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    eps = 8 / 255
    rows = []
    with evaluation_mode(model), matmul_precision(precision):
        fwd = PrecisionModel(model, precision, device).eval()
        # The bound and both libraries use the same (possibly compiled) forward pass.
        fwd, _ = speed_up(fwd, compile=compile, channels_last=channels_last)

        def floor_step():
            xi = x.detach().requires_grad_(True)
            loss = nn.functional.cross_entropy(fwd(xi).float(), y, reduction="sum")
            torch.autograd.grad(loss, xi)

        floor = batch / timed(floor_step, device, repeats)
        cases = {
            "FGSM": (1, lambda: FGSM(eps, final_iterate=True)(fwd, x, y), "FGSM"),
            "PGD-10": (10, lambda: PGD(eps, steps=10, step_size=2 / 255, final_iterate=True)(fwd, x, y), "PGD10"),
            "PGD-50": (50, lambda: PGD(eps, steps=50, step_size=2 / 255, final_iterate=True)(fwd, x, y), "PGD50"),
        }
        cases = {k: v for k, v in cases.items() if k in attacks}
        ta = _torchattacks()
        for label, (steps, run_robench, ta_name) in cases.items():
            ours = batch / timed(run_robench, device, repeats)
            theirs = None
            if ta is not None:
                if ta_name == "FGSM":
                    attack = ta.FGSM(fwd, eps=eps)
                else:
                    attack = ta.PGD(fwd, eps=eps, alpha=2 / 255, steps=steps, random_start=True)
                with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                    theirs = batch / timed(lambda: attack(x, y), device, repeats)
            bound = floor / steps
            rows.append({"model": name, "attack": label, "robench": ours, "torchattacks": theirs,
                         "bound": bound, "vs_bound": ours / bound,
                         "vs_torchattacks": ours / theirs if theirs else None})
    return rows


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        return None
    return torchattacks


def render(rows: list[dict], device: torch.device, batch: int, precision: str, command: str) -> str:
    head = (f"### {dt.date.today().isoformat()} · {device_name(device)} · batch {batch} · {precision}\n\n"
            f"robench {robench.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()}. Command: `{command}`\n\n"
            "| model | attack | robench img/s | torchattacks img/s | bound img/s | robench / bound | "
            "robench / torchattacks |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ta = f"{r['torchattacks']:.1f}" if r["torchattacks"] else "-"
        vs_ta = f"{r['vs_torchattacks']:.2f}x" if r["vs_torchattacks"] else "-"
        lines.append(f"| {r['model']} | {r['attack']} | {r['robench']:.1f} | {ta} | {r['bound']:.1f} | "
                     f"{r['vs_bound']:.2f}x | {vs_ta} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="cifar-resnet18,resnet50")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attacks", default="FGSM,PGD-10,PGD-50")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward pass (all columns)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--write", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows = []
    for name in args.models.split(","):
        batch = args.batch_size or (1024 if name.startswith("cifar") else 256)
        rows += bench_model(name, device, batch, args.precision, args.repeats, tuple(args.attacks.split(",")),
                            args.compile, args.channels_last)
    import sys

    text = render(rows, device, args.batch_size or 0, args.precision, "python " + " ".join(sys.argv))
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
