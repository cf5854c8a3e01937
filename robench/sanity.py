"""Checks that say when robench's own numbers should not be trusted (in the spirit of AutoAttack's).

Run on the first batch, cheaply: a few extra forward passes and one input
gradient. Each finding becomes a flag in ``results.json`` (``sanity.flags``),
a warning on stderr and a line under the table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

ZERO_GRADIENT_WARN = 0.5  # fraction of exactly-zero input-gradient entries
WHITE_BOX = {"fgsm", "bim", "pgd", "mifgsm"}
ITERATIVE = {"bim", "pgd", "mifgsm"}


def first_batch_checks(forward, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """Randomness, probability outputs, zero gradients and batch-size dependence on one batch."""
    report: dict[str, Any] = {}
    with torch.no_grad():
        again = forward(x)
        report["nondeterministic_outputs"] = not torch.allclose(again.float(), logits.float(), rtol=1e-4, atol=1e-5)
        half = max(1, len(x) // 2)
        split = torch.cat([forward(x[:half]), forward(x[half:])]) if len(x) > 1 else again
        report["batch_dependent_predictions"] = bool((split.argmax(1) != logits.argmax(1)).any()) and not \
            report["nondeterministic_outputs"]
        sums = logits.float().sum(dim=1)
        report["probability_outputs"] = bool(((logits >= 0) & (logits <= 1)).all()
                                             and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(forward(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    report["zero_gradient_fraction"] = float((grad == 0).float().mean())
    return report


def flags_from(report: dict[str, Any], attacks: list[dict[str, Any]]) -> list[str]:
    """Human-readable findings; empty when nothing looks wrong."""
    flags = []
    if report.get("model_was_training"):
        flags.append("the model was in train mode when handed over; robench evaluated it in eval mode "
                     "(check that this is how it is deployed)")
    if report.get("nondeterministic_outputs"):
        flags.append("the model gives different outputs for the same input (randomness): gradients are noisy "
                     "and single-sample attacks underestimate it; use Expectation over Transformation (EoT)")
    if report.get("batch_dependent_predictions"):
        flags.append("predictions change with the batch size (BatchNorm in train mode, or cross-sample layers)")
    if report.get("probability_outputs"):
        flags.append("the outputs look like probabilities (softmax applied): cross-entropy on them saturates and "
                     "gradient attacks weaken; return logits")
    zero = report.get("zero_gradient_fraction")
    if zero is not None and zero > ZERO_GRADIENT_WARN:
        flags.append(f"{100 * zero:.0f}% of input-gradient entries are exactly zero: a sign of gradient masking "
                     "or obfuscation; add a black-box attack (e.g. ta.Square) to the suite")
    if report.get("nonfinite_logits"):
        flags.append(f"{report['nonfinite_logits']} sample(s) gave NaN or infinite logits (counted as errors)")
    flags += masking_flags(attacks)
    return flags


def masking_flags(attacks: list[dict[str, Any]]) -> list[str]:
    """A weaker attack beating an iterative white-box one of the same norm and eps points at masked gradients."""
    flags = []
    strong = {}
    for a in attacks:
        if a["attack"] in ITERATIVE and a["eps"] is not None and a["accuracy"] is not None:
            key = (a["norm"], round(a["eps"], 10))
            strong[key] = min(strong.get(key, 1.0), a["accuracy"])
    for a in attacks:
        if a["attack"] in ITERATIVE or a["eps"] is None or a["accuracy"] is None:
            continue
        key = (a["norm"], round(a["eps"], 10))
        if key in strong and a["accuracy"] < strong[key] - 1e-12:
            kind = "single-step" if a["attack"] in WHITE_BOX else "black-box"
            flags.append(f"{a['label']} ({kind}) at eps {a['eps']:g} beats the iterative white-box attacks "
                         f"({100 * a['accuracy']:.2f}% vs {100 * strong[key]:.2f}%): a sign of gradient masking")
    return flags
