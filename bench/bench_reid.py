"""Wall time and peak memory of the ReID metrics and k-reciprocal re-ranking at a given size.

    python bench/bench_reid.py --device cpu --queries 3368 --gallery 15913 --dim 2048
    python bench/bench_reid.py --device cuda --skip-rerank

Stages: ``distance_matrix`` (squared Euclidean, Q x G), ``rank_metrics`` with
each AP convention (CMC@1/5/10 + mAP + mINP, valid denominator) and
``k_reciprocal_rerank`` (k1 20, k2 6, lambda 0.3) on Q + G images.

Each stage runs in a fresh process so that its peak memory is its own: on
CPU the peak resident set size during the stage (``ru_maxrss`` when the stage
sets the process's peak, else /proc/self/statm sampled every 2 ms) less the
resident size when it started, its inputs already built; on CUDA
``torch.cuda.max_memory_allocated`` during the stage (inputs included).

Features are random unit vectors (``--features random``, the default) or, so
that re-ranking sees neighbourhood structure like a trained model's,
unit vectors scattered around one centre per identity (``--features
clustered``: centre N(0, 1) and noise N(0, s^2) per dimension,
s = 3.5 (dim / 2048)^(1/4), which gives rank-1 about 0.95 and mAP about
0.57 at the default size). Identities: 751 (Market-1501's test split), 6 cameras; about 2%
of the gallery is junk (id -1) and 15% distractors (id 0).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import resource
import subprocess
import sys
import threading
import time

import torch

STAGES = ("distance_matrix", "rank_metrics_noninterp", "rank_metrics_trapezoid", "k_reciprocal_rerank")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _RssPeak:
    """Peak resident memory of a stage, in MiB above the resident memory when it started.

    ``ru_maxrss`` is the process's lifetime peak: it is exact when the stage sets a new
    peak, and says nothing otherwise (building the inputs may have peaked higher); a
    thread sampling /proc/self/statm every 2 ms covers that case.
    """

    def __enter__(self):
        try:  # give freed heap back to the system, so that the stage's allocations show
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start, self.lifetime_before, self.sampled = _rss_mib(), _peak_rss_mib(), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _rss_mib())
            self._stop.wait(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, _rss_mib())
        lifetime = _peak_rss_mib()
        peak = lifetime if lifetime > self.lifetime_before else self.sampled
        self.growth = max(0.0, peak - self.start)
        return False


def _inputs(n_query: int, n_gallery: int, dim: int, features: str, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    ids = 751
    q_pids = torch.randint(1, ids + 1, (n_query,), generator=gen)
    g_pids = torch.randint(1, ids + 1, (n_gallery,), generator=gen)
    kind = torch.rand(n_gallery, generator=gen)
    g_pids[kind < 0.15] = 0
    g_pids[kind < 0.02] = -1
    q_cams = torch.randint(1, 7, (n_query,), generator=gen)
    g_cams = torch.randint(1, 7, (n_gallery,), generator=gen)
    if features == "clustered":
        spread = 3.5 * (dim / 2048) ** 0.25  # same-person vs other-person separation alike at any dim
        centres = torch.randn(ids + 2, dim, generator=gen)
        qf = centres[q_pids + 1] + spread * torch.randn(n_query, dim, generator=gen)
        gf = centres[g_pids + 1] + spread * torch.randn(n_gallery, dim, generator=gen)
        # distractors and junk are not one person each
        other = g_pids <= 0
        gf[other] = spread * torch.randn(int(other.sum()), dim, generator=gen) + torch.randn(
            int(other.sum()), dim, generator=gen)
    else:
        qf, gf = torch.randn(n_query, dim, generator=gen), torch.randn(n_gallery, dim, generator=gen)
    qf = torch.nn.functional.normalize(qf, dim=1)
    gf = torch.nn.functional.normalize(gf, dim=1)
    return [t.to(device) for t in (qf, gf, q_pids, g_pids, q_cams, g_cams)]


def run_stage(stage: str, device: str, n_query: int, n_gallery: int, dim: int, features: str) -> dict:
    from robench.reid.metrics import distance_matrix, rank_metrics
    from robench.reid.rerank import k_reciprocal_rerank

    dev = torch.device(device)
    qf, gf, q_pids, g_pids, q_cams, g_cams = _inputs(n_query, n_gallery, dim, features, dev)
    dist = distance_matrix(qf, gf) if stage.startswith("rank_metrics") else None
    extra: dict = {}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with _RssPeak() as rss:
        t0 = time.perf_counter()
        if stage == "distance_matrix":
            out = distance_matrix(qf, gf)
        elif stage.startswith("rank_metrics"):
            out = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, ap=stage.rsplit("_", 1)[1], minp=True)
        elif stage == "k_reciprocal_rerank":
            out = k_reciprocal_rerank(qf, gf)
        else:
            raise SystemExit(f"unknown stage {stage}")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss.growth
    if isinstance(out, dict):
        extra = {"rank1": out["cmc"][1], "mAP": out["mAP"], "mINP": out["mINP"]}
    elif stage == "k_reciprocal_rerank":
        r = rank_metrics(out, q_pids, g_pids, q_cams, g_cams)
        extra = {"rank1": r["cmc"][1], "mAP": r["mAP"]}
    return {"stage": stage, "seconds": seconds, "peak_mib": peak, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--features", choices=("random", "clustered"), default="random")
    parser.add_argument("--skip-rerank", action="store_true", help="leave out k-reciprocal re-ranking")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.device, args.queries, args.gallery, args.dim, args.features)))
        return

    import robench

    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(args.device))} (CUDA {torch.version.cuda})"
        memory = "peak allocated MiB"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
        memory = "peak RSS growth MiB"
    versions = (f"robench {getattr(robench, '__version__', '?')}, torch {torch.__version__}, "
                f"Python {platform.python_version()}")
    print(f"{where} · {args.queries} queries x {args.gallery} gallery · dim {args.dim} · {args.features} "
          f"unit-norm features · fp32 · {versions}")
    print()
    print(f"| stage | device | queries x gallery | dim | seconds | {memory} | result |")
    print("|---|---|---|---|---|---|---|")
    stages = [s for s in STAGES if not (args.skip_rerank and s == "k_reciprocal_rerank")]
    for stage in stages:
        cmd = [sys.executable, __file__, "--stage", stage, "--device", args.device, "--queries", str(args.queries),
               "--gallery", str(args.gallery), "--dim", str(args.dim), "--features", args.features]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        size = f"{args.queries} x {args.gallery}"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"| {stage} | {args.device} | {size} | {args.dim} | failed: {last} | | |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        result = ", ".join(f"{k} {r[k]:.4f}" for k in ("rank1", "mAP", "mINP") if r.get(k) is not None)
        print(f"| {stage} | {args.device} | {size} | {args.dim} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
              f"{result} |", flush=True)


if __name__ == "__main__":
    main()
