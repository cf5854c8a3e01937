"""The work queue beside static shards, on an uneven workload, in one torchrun job.

    torchrun --standalone --nproc-per-node 2 bench/bench_work_queue.py --device cpu
    torchrun --standalone --nproc-per-node 8 bench/bench_work_queue.py --device cuda --tile 40

The bundled digits model under PGD: a fooled sample leaves the attack's pool after a few steps, a
robust one takes every step. The same samples are attacked in two orders: sorted by the model's
clean margin, largest first (the robust half contiguous, as in data sets ordered by class), and
shuffled (balanced). "static" cuts the data into one unit per process (how robench split it before
the queue: each process an exact contiguous shard); "queue" is robench's cut (about 4 units per
process). The figure to read: each mode's time on the sorted order over its time on the shuffled one
(1.0x = the order does not matter). Per-sample outcomes are checked equal across all four runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.distributed as dist

import robench
from robench.data.sources import DataOptions, from_arrays, load_data
from robench.evaluation import distributed, work_queue
from robench.evaluation.config import EngineConfig
from robench.evaluation.engine import iterate_batches
from robench.evaluation.precision import device_name
from robench.evaluation.queued import run_queued
from robench.models.loading import load_model
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.suites.schema import Suite


def workload(args, model: RobustModel, device: torch.device):
    """The digits test images tiled ``--tile`` times, in margin order and shuffled."""
    base = load_data("example:digits", DataOptions())
    x = torch.cat([b[0] for b in iterate_batches(base, 1024, 0, False)])
    y = torch.cat([b[1] for b in iterate_batches(base, 1024, 0, False)])
    x, y = x.repeat(args.tile, 1, 1, 1), y.repeat(args.tile)
    keep = len(x) - len(x) % (args.batch_size * distributed.world()[1])  # whole batches per static shard
    x, y = x[:keep], y[:keep]
    with evaluation_mode(model), torch.no_grad():
        logits = torch.cat([model(part.to(device)).cpu() for part in x.split(512)])
    top2 = logits.topk(2, dim=1).values
    margin = torch.where(logits.argmax(1) == y, top2[:, 0] - top2[:, 1], -1.0)
    sorted_order = margin.argsort(descending=True)
    shuffled_order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    as_uint8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).squeeze(-1).numpy()
    return {name: from_arrays(as_uint8[order.numpy()], y[order].numpy(), name=f"digits-{name}")
            for name, order in (("sorted", sorted_order), ("shuffled", shuffled_order))}


QUEUE_PLAN = work_queue.plan_units


def static_shards(samples: int, batch_size: int, longest: int, processes: int) -> work_queue.Plan:
    """One unit per process: each process claims one contiguous shard (whole batches) and nothing else."""
    batches = -(-samples // batch_size)
    return work_queue.Plan(batch_size, -(-batches // processes), samples)


def timed(model, dataset, suite, options, device, static: bool):
    """One run's wall time on rank 0 (every process starts together) and its per-sample outcomes."""
    work_queue.plan_units = static_shards if static else QUEUE_PLAN
    dist.barrier()
    start = time.perf_counter()
    outcome = run_queued(model, dataset, suite, options, device=device)
    seconds = time.perf_counter() - start
    order = outcome.state.per_sample("index") if distributed.is_main_process() else None
    robust = outcome.state.entries[0].robust.compute().numpy() if distributed.is_main_process() else None
    return seconds, outcome, (order, robust)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile", type=int, default=2, help="copies of the 540 digits test images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--units-per-process", type=int, default=work_queue.UNITS_PER_PROCESS,
                        help="the queue's cut (robench's default unless given)")
    args = parser.parse_args()
    work_queue.UNITS_PER_PROCESS = args.units_per_process
    rank, size, local = distributed.world()
    device = distributed.local_device(torch.device(args.device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    loaded = load_model("example:digits")
    model = RobustModel(loaded.model, loaded.normalization).to(device)
    data = workload(args, model, device)
    suite = Suite.model_validate({"name": "bench", "attacks": [{"attack": "pgd", "eps": args.eps,
                                                                "steps": args.steps}]})
    options = EngineConfig(batch_size=args.batch_size, save_every=3600)
    best: dict[tuple[str, str], float] = {}
    outcomes = {}
    for _ in range(args.repeats):  # alternate the four runs; keep each one's best time
        for mode in ("static", "queue"):
            for order in ("sorted", "shuffled"):
                seconds, outcome, samples = timed(model, data[order], suite, options, device, mode == "static")
                best[mode, order] = min(best.get((mode, order), float("inf")), seconds)
                outcomes[mode, order] = (outcome, samples)
    if rank == 0:
        report(args, best, outcomes, size, device)
    dist.destroy_process_group()


def report(args, best, outcomes, size: int, device: torch.device) -> None:
    for order in ("sorted", "shuffled"):
        (_, (ia, ra)), (_, (ib, rb)) = outcomes["static", order], outcomes["queue", order]
        assert (ia == ib).all() and (ra == rb).all(), "the queue changed a per-sample outcome"
    outcome = outcomes["queue", "sorted"][0]

    def units(mode: str) -> int:
        return outcomes[mode, "sorted"][0].speed["work_units"]["units"]

    n = outcome.state.n
    robust = outcome.state.entries[0].robust.compute().numpy().astype(bool)
    half = n // 2
    print(f"device {device_name(device)} ({platform.machine()}) · {size} processes · torch {torch.__version__} · "
          f"robench {robench.__version__} · fp32 · batch {args.batch_size} · PGD-{args.steps} eps {args.eps} · "
          f"{n} samples · robust {robust.mean():.0%} (first half of the sorted order {robust[:half].mean():.0%}, "
          f"second {robust[half:].mean():.0%}) · units: queue {units('queue')}, static {units('static')}")
    print(f"{'mode':8} {'sorted s':>9} {'shuffled s':>11} {'sorted/shuffled':>16}")
    for mode in ("static", "queue"):
        a, b = best[mode, "sorted"], best[mode, "shuffled"]
        print(f"{mode:8} {a:9.2f} {b:11.2f} {a / b:15.2f}x")
    print(f"queue vs static on the sorted order: {best['static', 'sorted'] / best['queue', 'sorted']:.2f}x faster")


if __name__ == "__main__":
    main()
