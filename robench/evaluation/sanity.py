"""Checks that say when robench's own numbers should not be trusted (in the spirit of AutoAttack's).

Run on the first batch, cheaply: a few extra forward passes and one input
gradient. Each finding becomes a flag in ``results.json`` (``sanity.flags``),
a warning on stderr and a line under the table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from robench.errors import RobenchError, RunError, UsageError, describe

ZERO_GRADIENT_WARN = 0.5  # fraction of exactly-zero input-gradient entries
BATCH_TOLERANCE = 1e-2  # relative to the logit scale: absorbs float noise and bf16 autocast
SMALL_BATCH = 8  # second, small probe batch: cross-sample effects shrink as batches grow


def first_batch_checks(forward, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """Randomness, probability outputs, zero gradients and batch-size dependence on one batch."""
    report: dict[str, Any] = {}
    finite = torch.isfinite(logits).all(dim=1)
    with torch.no_grad():
        again = forward(x)
        # NaN rows that stay NaN are the non-finite flag's business, not randomness.
        report["nondeterministic_outputs"] = not torch.allclose(again.float(), logits.float(), rtol=1e-4,
                                                                atol=1e-5, equal_nan=True)
        report["batch_dependent_predictions"] = (not report["nondeterministic_outputs"]
                                                 and batch_dependent(forward, x, logits))
        usable = logits[finite].float()
        sums = usable.sum(dim=1)
        report["probability_outputs"] = bool(len(usable) and ((usable >= 0) & (usable <= 1)).all()
                                             and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
    report["zero_gradient_fraction"] = _zero_gradient_fraction(forward, x[finite], y[finite])
    return report


def batch_dependent(forward, x: torch.Tensor, logits: torch.Tensor) -> bool:
    """Do the same samples get other logits when the batch around them changes size?

    The first samples are run again as a smaller batch (half the batch, and a few
    images) and compared with their rows in the full batch. A single image is
    paired with its negative, so the batch size still changes.
    """
    if len(x) == 1:
        pair = forward(torch.cat([x, 1 - x]))[:1]
        return _logits_differ(pair, logits)
    sizes = sorted({(len(x) + 1) // 2, min(SMALL_BATCH, (len(x) + 1) // 2)})
    for m in sizes:
        try:
            part = forward(x[:m])
        except Exception:  # noqa: BLE001 - a model that cannot take a smaller batch depends on its size
            return True
        if _logits_differ(part, logits[:m]):
            return True
    return False


def _logits_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Finite rows only; the tolerance scales with the logits' magnitude."""
    a, b = a.float(), b.float()
    rows = torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1)
    if not rows.any():
        return False
    a, b = a[rows], b[rows]
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return float((a - b).abs().max()) > BATCH_TOLERANCE * (scale + 1.0)


def _zero_gradient_fraction(forward, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of exactly-zero input-gradient entries over the samples with finite logits (None: none had)."""
    if not len(x):
        return None
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(forward(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    return float((grad == 0).float().mean())


FLAG_NAMES = ("train_mode", "randomness", "batch_dependence", "probability_outputs", "zero_gradients",
              "no_input_gradient", "nonfinite_logits", "gradient_masking")


def named_flags(report: dict[str, Any], attacks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, message) per finding; names are stable (a gate can match them), messages are for people."""
    flags = []
    if report.get("model_was_training"):
        flags.append(("train_mode", "the model was in train mode when handed over; robench evaluated it in eval "
                      "mode (check that this is how it is deployed)"))
    if report.get("nondeterministic_outputs"):
        flags.append(("randomness", "the model gives different outputs for the same input (randomness): "
                      "gradients are noisy and single-sample attacks underestimate it; use Expectation over "
                      "Transformation (EoT)"))
    if report.get("batch_dependent_predictions"):
        flags.append(("batch_dependence", "predictions change with the batch size (BatchNorm in train mode, or "
                      "cross-sample layers)"))
    if report.get("probability_outputs"):
        flags.append(("probability_outputs", "the outputs look like probabilities (softmax applied): "
                      "cross-entropy on them saturates and gradient attacks weaken; return logits"))
    no_gradient = report.get("input_gradient") is False
    zero = report.get("zero_gradient_fraction")
    # Without any input gradient every entry is zero: the more specific flag below says why.
    if zero is not None and zero > ZERO_GRADIENT_WARN and not no_gradient:
        flags.append(("zero_gradients", f"{100 * zero:.0f}% of input-gradient entries are exactly zero: a sign "
                      "of gradient masking or obfuscation; add a black-box attack (e.g. ta.Square) to the suite"))
    if no_gradient:
        flags.append(("no_input_gradient", "the model's output does not depend on its input through autograd "
                      "(argmax, .detach() or torch.no_grad() in forward): gradient attacks see zero gradients, "
                      "so their accuracies are upper bounds; black-box attacks still run"))
    if report.get("nonfinite_logits"):
        flags.append(("nonfinite_logits", f"{report['nonfinite_logits']} sample(s) gave NaN or infinite logits "
                      "(counted as errors)"))
    flags += [("gradient_masking", message) for message in masking_flags(attacks)]
    return flags


def flags_from(report: dict[str, Any], attacks: list[dict[str, Any]]) -> list[str]:
    """Human-readable findings; empty when nothing looks wrong."""
    return [message for _, message in named_flags(report, attacks)]


def attack_kind(name: str) -> str:
    """"iterative", "single-step" (white-box) or "black-box", read from the attack class's traits."""
    from robench.attacks import ATTACKS

    try:
        cls = ATTACKS.get(name)
    except Exception:  # noqa: BLE001 - an attack this install cannot load (a plugin, ta.* without the extra)
        return "black-box"
    if cls.family != "gradient":
        return "black-box"
    return "iterative" if cls.iterative() else "single-step"


# A black-box part of a composite attack (AutoAttack's Square) that lowers its robust accuracy by more
# than this after the white-box parts points at masked gradients (the reference's check uses 0.2 points).
BLACK_BOX_GAIN_WARN = 0.002


def masking_flags(attacks: list[dict[str, Any]]) -> list[str]:
    """A weaker attack beating an iterative white-box one of the same norm and eps points at masked gradients."""
    flags = [flag for a in attacks for flag in _composite_masking(a)]
    strong: dict[tuple[str, float], float] = {}  # (norm, eps) -> the iterative attacks' lowest accuracy
    kinds = {a["attack"]: attack_kind(a["attack"]) for a in attacks}
    for a in attacks:
        if kinds[a["attack"]] == "iterative" and a["eps"] is not None and a["accuracy"] is not None:
            key = (a["norm"], round(a["eps"], 10))
            strong[key] = min(strong.get(key, 1.0), a["accuracy"])
    for a in attacks:
        if kinds[a["attack"]] == "iterative" or a["eps"] is None or a["accuracy"] is None:
            continue
        key = (a["norm"], round(a["eps"], 10))
        if key in strong and a["accuracy"] < strong[key] - 1e-12:
            flags.append(f"{a['label']} ({kinds[a['attack']]}) at eps {a['eps']:g} beats the iterative white-box "
                         f"attacks ({100 * a['accuracy']:.2f}% vs {100 * strong[key]:.2f}%): a sign of gradient "
                         "masking")
    return flags


def _composite_masking(entry: dict[str, Any]) -> list[str]:
    """A composite entry's black-box part breaking points that its white-box parts before it did not."""
    flags, white_box_before = [], False
    for part in entry.get("parts") or []:
        kind = attack_kind(part["attack"])
        if kind != "black-box":
            white_box_before = True
            continue
        n = entry.get("n") or 0
        if white_box_before and n and part["broken"] / n > BLACK_BOX_GAIN_WARN:
            eps = f" at eps {entry['eps']:g}" if entry.get("eps") is not None else ""
            flags.append(f"{entry['label']}{eps}: {part['attack']} (black-box) broke {part['broken']} point(s) the "
                         f"white-box attacks before it did not (robust accuracy {100 * part['broken'] / n:.2f} "
                         "points lower): a sign of gradient masking")
    return flags


# -- the first-batch probe: failures that have a cause the user can fix ----------------------------------------

_CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")


def check_output_shape(logits: torch.Tensor, batch: int) -> None:
    """One row per image and at least two classes, or nothing downstream means anything."""
    if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < 2:
        raise UsageError(f"the model returned shape {tuple(logits.shape)}; robench needs one logit per class, "
                         "shape (batch, classes)")


def explain_failure(model: nn.Module, x: torch.Tensor, exc: BaseException) -> RobenchError:
    """The error to report when the model raised on the first batch.

    A first layer that expects other channels or features than the data has is a
    usage error with its fix; anything else is the model's own message, one line.
    """
    shape = "x".join(str(d) for d in x.shape)
    mismatch = _first_layer_mismatch(model, x)
    if mismatch is not None:
        what, fix = mismatch
        return UsageError(f"{what} (batch shape {shape}): {fix}")
    return RunError(f"the model failed on the first batch (shape {shape}): {describe(exc)}")


def _first_layer_mismatch(model: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """(what differs, how to fix it), comparing the first convolution (or, without one, the first
    linear layer) with the batch; best effort, as registration order is usually call order."""
    layers = [(name, m, _kind(m)) for name, m in _named_modules(model)]
    conv = next(((n, m) for n, m, kind in layers if kind in _CONV_TYPES), None)
    if conv is not None:
        expected = _conv_in_channels(conv[1])
        if expected is None or x.dim() < 2 or x.shape[1] == expected:
            return None
        found = int(x.shape[1])
        return (f"the model's first layer ({conv[0] or 'the model'}) takes {expected} input channel(s) but the "
                f"data has {found}", _channel_fix(expected, found))
    linear = next(((n, m) for n, m, kind in layers if kind == "Linear"), None)
    if linear is not None and len(x):
        expected, found = _linear_in_features(linear[1]), x[0].numel()
        if expected is not None and found != expected:
            return (f"the model's first layer ({linear[0] or 'the model'}) takes {expected} input feature(s) but "
                    f"each image has {found} values", _LAYOUT_FIX)
    return None


_LAYOUT_FIX = ("check the data's layout (uint8 arrays are read as NHWC, float arrays as NCHW) and image size, "
               "or use a matching model")


def _channel_fix(expected: int, found: int) -> str:
    if expected == 1 and found == 3:
        return "convert the images to grayscale (--gray for image folders) or use a matching model"
    if expected == 3 and found == 1:
        return "convert the images to RGB (--rgb for image folders) or use a matching model"
    return _LAYOUT_FIX


def _named_modules(model: nn.Module):
    try:
        return list(model.named_modules())
    except Exception:  # noqa: BLE001 - exotic (scripted) modules: no diagnosis rather than a second error
        return []


def _kind(module: nn.Module) -> str:
    """The layer type, also for TorchScript submodules (which keep the original class name)."""
    return getattr(module, "original_name", None) or type(module).__name__


def _conv_in_channels(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    groups = getattr(module, "groups", 1)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 3 and isinstance(groups, int):
        return int(weight.shape[1]) * groups
    return None


def _linear_in_features(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
