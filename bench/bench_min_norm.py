"""One minimum-norm run beside a five-eps PGD sweep: the time of each and how far their curves agree.

One process, one torch thread, the bundled digits CNN and all 540 of its test images, each run
through ``robench.evaluate`` as a suite (the engine's batching, early stop and scoring included):

* FMN (L-inf, the paper's 100 steps) once, its curve read at the five eps of the sweep;
* FAB (untargeted, 100 steps) once, read the same way;
* PGD-20 (random start, step 2.5 eps / steps, as the ``digits`` suite runs it) at each of the five eps.

It prints, per run, the seconds and gradient passes and, per eps, the accuracies with the largest
difference from the sweep's (a positive difference: the curve is above the sweep, i.e. weaker).

    python bench/bench_min_norm.py
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from typing import Any

import torch

import robench

EPS = [0.05, 0.1, 0.15, 0.2, 0.25]
RUNS: dict[str, dict[str, Any]] = {
    "FMN-100 (one run)": {"attack": "fmn", "norm": "linf", "eps": EPS},
    "FAB-100 (one run)": {"attack": "fab", "norm": "linf", "eps": EPS},
    "PGD-20 sweep (5 runs)": {"attack": "pgd", "norm": "linf", "eps": EPS, "steps": 20,
                              "step_size": "2.5*eps/steps", "random_start": True},
}


def evaluated(entry: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    result = robench.evaluate("example:digits", "example:digits", {"name": "bench", "attacks": [entry]},
                              device="cpu", compile="off")
    return result.doc, time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    print(f"{dt.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
          "1 thread · fp32 · batch 256")
    docs = {name: evaluated(entry) for name, entry in RUNS.items()}
    sweep = [a["accuracy"] for a in docs["PGD-20 sweep (5 runs)"][0]["attacks"]]
    print("| run | seconds | gradient passes | " + " | ".join(f"eps {e:g}" for e in EPS)
          + " | largest difference from the sweep | median norm |")
    print("|---|---:|---:|" + "---:|" * len(EPS) + "---:|---:|")
    for name, (doc, seconds) in docs.items():
        accuracies = [a["accuracy"] for a in doc["attacks"]]
        passes = sum(a["gradient_evals"] for a in doc["attacks"])
        worst = max((a - s for a, s in zip(accuracies, sweep)), key=abs)
        median = doc.get("min_norm", [{}])[0].get("median_norm")
        print(f"| {name} | {seconds:.1f} | {passes:,} | " + " | ".join(f"{100 * a:.2f}" for a in accuracies)
              + f" | {100 * worst:+.2f} pt | {'-' if median is None else f'{median:.4f}'} |")


if __name__ == "__main__":
    main()
