"""The attack check beside the evaluation it qualifies, and its verdicts on masked and defended models.

One process, the bundled digits CNN (and three variants of it), the same device:

* cost: ``robench check-attack`` on the ``digits`` suite (50 problems, 999 inner points) against
  ``robench eval`` of the same suite on all 540 test images, with the check's own split into
  building the problems and running the attacks;
* verdicts: pass rates of FGSM, BIM, PGD (with and without BPDA), Square and AutoAttack (the members
  that apply to two classes) at L-inf eps 0.1, beside each model's accuracy under PGD on the test set,
  for the bundled model, the model behind ``x.detach()``, and the model behind 4-bit quantisation
  and JPEG (quality 75) of its input.

    python bench/bench_attack_check.py            # both parts (about 15 minutes on 2 CPU cores)
    python bench/bench_attack_check.py --part cost
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from typing import Any

import torch
from torch import nn

import robench
from robench.defenses.input_transforms import JPEG, Detach, InputDefended, Quantize
from robench.evaluation import binarization
from robench.models.config import ModelConfig

EPS = 0.1
PGD = {"attack": "pgd", "steps": 20, "step_size": "2.5*eps/steps", "random_start": True}
ENTRIES = [
    {"attack": "fgsm", "label": "FGSM"},
    {"attack": "bim", "label": "BIM-10", "steps": 10, "step_size": "eps/10"},
    {**PGD, "label": "PGD-20"},
    {**PGD, "label": "PGD-20 + BPDA", "bpda": ["transform"]},
    {"attack": "square", "label": "Square-1000", "queries": 1000},
    {"attack": "autoattack", "label": "AutoAttack"},
]


def models() -> dict[str, nn.Module]:
    def cnn() -> nn.Module:
        return ModelConfig(source="example:digits").load().model

    return {"bundled": cnn(), "x.detach()": InputDefended(Detach(), cnn()),
            "4-bit quantisation": InputDefended(Quantize(4), cnn()), "JPEG 75": InputDefended(JPEG(75), cnn())}


def timed(work) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def cost() -> None:
    evaluated, eval_seconds = timed(lambda: robench.evaluate("example:digits", "example:digits", "digits"))
    spent = {"build": 0.0}
    original = binarization.build_problems

    def counted(*args: Any, **kwargs: Any) -> Any:
        problems, seconds = timed(lambda: original(*args, **kwargs))
        spent["build"] += seconds
        return problems

    binarization.build_problems = counted
    import robench.tasks.attack_check as check_module

    check_module.build_problems = counted
    try:
        checked, check_seconds = timed(lambda: robench.evaluate("example:digits", "example:digits", "digits",
                                                                task="attack-check"))
    finally:
        binarization.build_problems = check_module.build_problems = original
    attacks = sum(c.get("seconds") or 0.0 for c in checked.doc["checks"])
    print(f"| digits suite (9 entries) | eval, {evaluated.doc['clean']['n']} images | {eval_seconds:.1f} s | 1.00x |")
    print(f"| | check-attack, {checked.doc['settings']['chosen']} problems | {check_seconds:.1f} s | "
          f"{check_seconds / eval_seconds:.2f}x |")
    print(f"| | of which building the problems (3 eps) | {spent['build']:.1f} s | "
          f"{spent['build'] / eval_seconds:.2f}x |")
    print(f"| | of which the attacks on them | {attacks:.1f} s | {attacks / eval_seconds:.2f}x |")


def verdicts() -> None:
    print("| model | PGD-20 robust accuracy (540 images) | " + " | ".join(e["label"] for e in ENTRIES) + " |")
    print("|---|---:|" + "---:|" * len(ENTRIES))
    for name, model in models().items():
        entries = [e for e in ENTRIES if "bpda" not in e or isinstance(model, InputDefended)]
        robust = robench.evaluate(model, "example:digits", {"name": "pgd", "attacks": [{**PGD, "eps": [EPS]}]})
        checked = robench.evaluate(model, "example:digits", {"name": "check", "attacks": [
            {**e, "eps": [EPS]} for e in entries]}, task="attack-check")
        rates = {c["label"]: c for c in checked.doc["checks"]}
        cells = []
        for entry in ENTRIES:
            check = rates.get(entry["label"])
            cells.append("-" if check is None else f"{100 * check['pass_rate']:.0f}% {check['verdict']}")
        print(f"| {name} | {100 * robust.doc['attacks'][0]['accuracy']:.2f} | " + " | ".join(cells) + " |")
    trivial = checked.doc["checks"][0]["trivial"]
    print(f"\n(last model: {trivial} of {checked.doc['checks'][0]['problems']} problems solved by a random point)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cost", "verdicts", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{dt.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
          "1 thread · fp32 · batch 256")
    if args.part in ("cost", "both"):
        cost()
    if args.part in ("verdicts", "both"):
        verdicts()


if __name__ == "__main__":
    main()
