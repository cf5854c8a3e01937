"""Checks that say when robench's own numbers should not be trusted (in the spirit of AutoAttack's).

Run on the first batch, cheaply: a few extra forward passes and one input
gradient. ``findings`` turns the report into flags in ``results.json`` (``sanity.flags``),
a warning on stderr and a line under the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from robench.errors import RobenchError, RunError, UsageError, describe

if TYPE_CHECKING:
    from robench.evaluation.bpda import BpdaHooks
    from robench.models.wrapper import RobustModel

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


def bpda_checks(model: RobustModel, forward, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                settings: Sequence[BpdaHooks], *, zero_fraction: bool) -> list[dict[str, Any]]:
    """The gradient checks under each BPDA setting's hooks: what the attacks that use it will see.

    Per setting: its modules as written, whether the output has an input gradient (two images; this
    also runs the setting's shape checks before any attack) and, with ``zero_fraction``, the share
    of exactly-zero input-gradient entries on the batch.
    """
    finite = torch.isfinite(logits).all(dim=1)
    probes = []
    for setting in settings:
        with setting.installed():
            probe: dict[str, Any] = {"modules": setting.written, "input_gradient": model.has_input_gradient(x[:2])}
            if zero_fraction:
                probe["zero_gradient_fraction"] = _zero_gradient_fraction(forward, x[finite], y[finite])
        probes.append(probe)
    return probes


def worst_gradient_checks(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's gradient findings when every gradient attack runs under BPDA: the worst of its settings'."""
    found: dict[str, Any] = {"input_gradient": all(p["input_gradient"] for p in probes)}
    fractions = [p["zero_gradient_fraction"] for p in probes if p.get("zero_gradient_fraction") is not None]
    if any("zero_gradient_fraction" in p for p in probes):
        found["zero_gradient_fraction"] = max(fractions) if fractions else None
    return found


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
