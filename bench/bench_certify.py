"""Certification throughput beside a plain forward pass at the same batch size (the floor).

One process, one torch thread, the bundled digits CNN (or ``--model``) on the bundled test digits. Rounds
of equal work alternate, and each side keeps its fastest round (other work on the machine only ever slows
a round down, and alternating exposes both sides to it alike):

* floor: the model's forward pass and argmax on ``--samples`` x (n0 + n) noisy copies drawn beforehand (every
  batch its own), in batches of ``--batch-size``: images per second, what certification cannot beat;
* certify: ``run_certification`` (noise, forward passes, class counts, the bounds) on ``--samples`` samples
  with n0 + n copies each: noisy copies and samples per second, and the ratio to the floor; and, measured
  inside that same round, the share of its time the model's forward passes took (immune to the machine's
  other work, which slows both alike);
* noise: drawing the copies from the counter-based streams alone, copies per second;
* end to end: one ``robench.evaluate(..., task="certify")`` on ``--limit`` samples, loading included.

    python bench/bench_certify.py                         # batch sizes 250, 1000, 4000 (about 3 minutes)
    python bench/bench_certify.py --batch-size 1000 --n 100000 --samples 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from typing import Callable

import torch
from torch import nn

import robench
from robench.data.sources import DataOptions, ImageDataset
from robench.evaluation.certification import run_certification
from robench.evaluation.smoothing import Smoothing, noisy_copies
from robench.models.config import ModelConfig
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.tasks.classification import as_dataset

SIGMA = 0.25
ROUNDS = 7


class TimedForward(nn.Module):
    """The model, with the seconds its forward passes take added up."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - started
        return out


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def floor_round(model: RobustModel, sample: torch.Tensor, batch_size: int, copies: int) -> Callable[[], None]:
    """``copies`` images through the model and argmax, ``batch_size`` at a time: noisy copies drawn beforehand,
    each batch its own (the model's speed depends a little on what it sees, and on what is in the caches)."""
    smoothing = Smoothing(SIGMA)
    batches = [noisy_copies(sample, index, 0, batch_size, smoothing) for index in range(-(-copies // batch_size))]

    def passes() -> None:
        with evaluation_mode(model), torch.no_grad():
            for batch in batches:
                model(batch).argmax(dim=1)

    return passes


def certify_round(model: RobustModel, dataset: ImageDataset, smoothing: Smoothing, batch_size: int,
                  shares: list[float]) -> Callable[[], None]:
    """One certification of ``dataset``; appends to ``shares`` the part of its time its forward passes took."""
    counted = TimedForward(model.model)
    wrapped = RobustModel(counted, model.normalization)

    def certified() -> None:
        counted.seconds = 0.0
        started = time.perf_counter()
        run_certification(wrapped, dataset, smoothing, batch_size=batch_size, device=torch.device("cpu"))
        shares.append(counted.seconds / (time.perf_counter() - started))

    return certified


def noise_round(sample: torch.Tensor, batch_size: int, copies: int) -> Callable[[], None]:
    smoothing = Smoothing(SIGMA)

    def draws() -> None:
        for index in range(-(-copies // batch_size)):
            noisy_copies(sample, index, 0, batch_size, smoothing)

    return draws


def fastest(rounds: list[Callable[[], None]]) -> list[float]:
    """Each round's best time over ROUNDS alternations (after one warm-up of each)."""
    for work in rounds:
        work()
    best = [float("inf")] * len(rounds)
    for _ in range(ROUNDS):
        for i, work in enumerate(rounds):
            best[i] = min(best[i], timed(work))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="example:digits")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=10, help="samples per timed round")
    parser.add_argument("--limit", type=int, default=100, help="samples of the end-to-end run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = RobustModel(ModelConfig(source=args.model).load().model)
    dataset = as_dataset("example:digits", DataOptions(limit=args.samples))
    smoothing = Smoothing(SIGMA, args.n0, args.n)
    copies = args.samples * smoothing.copies
    sample = dataset[0][0]
    print(f"{dt.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
          f"1 thread · fp32 · sigma {SIGMA} · n0 {args.n0} · n {args.n:,} · rounds of {args.samples} samples "
          f"({copies:,} copies), best of {ROUNDS}")
    print("| batch | forward (images/s) | certify (copies/s) | certify (samples/s) | certify / forward "
          "| forward share of certify | noise alone (copies/s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.batch_size:
        shares: list[float] = []
        floor, certify, noise = fastest([floor_round(model, sample, size, copies),
                                         certify_round(model, dataset, smoothing, size, shares),
                                         noise_round(sample, size, copies)])
        share = sorted(shares)[len(shares) // 2]  # the median round's
        print(f"| {size:,} | {copies / floor:,.0f} | {copies / certify:,.0f} | {args.samples / certify:.2f} | "
              f"{floor / certify:.2f} | {share:.2f} | {copies / noise:,.0f} |")
    started = time.perf_counter()
    result = robench.evaluate(args.model, "example:digits", task="certify", sigma=SIGMA, n0=args.n0, n=args.n,
                              limit=args.limit, batch_size=max(args.batch_size), device="cpu")
    seconds = time.perf_counter() - started
    done = result.doc["progress"]["evaluated"]
    print(f"\nend to end, robench.evaluate on {done} samples at batch {max(args.batch_size):,}: {seconds:.1f} s, "
          f"{done / seconds:.2f} samples/s, {done * smoothing.copies / seconds:,.0f} copies/s")


if __name__ == "__main__":
    main()
