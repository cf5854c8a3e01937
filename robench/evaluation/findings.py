"""What a run's sanity report and its entries say about trusting the numbers: the named findings
(``sanity.flags`` and ``sanity.flag_names`` in results.json). Plain data in, plain data out, so that the
gate can name the flags of a document without importing torch; ``sanity`` probes the model.
"""

from __future__ import annotations

from typing import Any

ZERO_GRADIENT_WARN = 0.5  # fraction of exactly-zero input-gradient entries

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
    # Both gradient flags end with the way forward when a non-differentiable part causes them.
    bpda_hint = ("; if a non-differentiable part (JPEG, quantisation) causes it, differentiate through it with "
                 "`bpda: [module name]` in the suite entry or `--bpda NAME`")
    no_gradient = report.get("input_gradient") is False
    zero = report.get("zero_gradient_fraction")
    # Without any input gradient every entry is zero: the more specific flag below says why.
    if zero is not None and zero > ZERO_GRADIENT_WARN and not no_gradient:
        flags.append(("zero_gradients", f"{100 * zero:.0f}% of input-gradient entries are exactly zero: a sign "
                      "of gradient masking or obfuscation; add a black-box attack (e.g. ta.Square) to the suite"
                      + bpda_hint))
    if no_gradient:
        flags.append(("no_input_gradient", "the model's output does not depend on its input through autograd "
                      "(argmax, .detach() or torch.no_grad() in forward): gradient attacks see zero gradients, "
                      "so their accuracies are upper bounds; black-box attacks still run" + bpda_hint))
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
