"""Market-1501-scale ReID metrics and re-ranking: wall time and peak memory.

Each stage runs in its own process (so the peak resident memory is that
stage's own) on random unit-norm features of the Market-1501 test split's
size (3,368 queries x 15,913 gallery images, 751 identities, 6 cameras).

    python bench/bench_reid_metrics.py --device cpu
    python bench/bench_reid_metrics.py --device cuda --dim 2048

The figures are absolute (there is no reference implementation to run
beside them here); they show that Market-scale evaluation is practical.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

STAGES = ("distance", "cmc_map_noninterp", "cmc_map_trapezoid", "rerank")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_stage(stage: str, device: str, n_query: int, n_gallery: int, dim: int) -> dict:
    from robench.reid.metrics import distance_matrix, rank_metrics
    from robench.reid.rerank import k_reciprocal_rerank

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    qf = torch.nn.functional.normalize(torch.randn(n_query, dim, generator=gen), dim=1).to(dev)
    gf = torch.nn.functional.normalize(torch.randn(n_gallery, dim, generator=gen), dim=1).to(dev)
    q_pids = torch.randint(1, 752, (n_query,), generator=gen).to(dev)
    g_pids = torch.randint(0, 752, (n_gallery,), generator=gen).to(dev)
    q_cams = torch.randint(1, 7, (n_query,), generator=gen).to(dev)
    g_cams = torch.randint(1, 7, (n_gallery,), generator=gen).to(dev)
    base = peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    if stage == "distance":
        distance_matrix(qf, gf)
    elif stage.startswith("cmc_map"):
        dist = distance_matrix(qf, gf)
        t0 = time.perf_counter()
        rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, ap=stage.rsplit("_", 1)[1], minp=True)
    else:
        k_reciprocal_rerank(qf, gf)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else peak_rss_mb() - base
    return {"stage": stage, "seconds": seconds, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.device, args.queries, args.gallery, args.dim)))
        return
    import robench

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.machine()
    print(f"{device_name} · {args.queries} x {args.gallery} · dim {args.dim} · fp32 · robench {robench.__version__}, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print("| stage | seconds | peak memory MiB |")
    print("|---|---|---|")
    for stage in args.stages.split(","):
        out = subprocess.run([sys.executable, __file__, "--stage", stage, "--device", args.device, "--queries",
                              str(args.queries), "--gallery", str(args.gallery), "--dim", str(args.dim)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {stage} | failed: {out.stderr.strip().splitlines()[-1]} | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['stage']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
