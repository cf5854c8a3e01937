"""The attack check's results document (``robench.attack-check/1``): one row per checked suite entry
and eps, with the share of binarized problems its attack solved and a verdict.

* ``settings``: how the problems were built (samples asked for and chosen, inner points, gap,
  random probes, the readout layer and its feature width, the pass threshold)
* ``checks``: per (attack, eps): ``problems`` (built), ``not_built`` (no linear readout separated
  the boundary point), ``trivial`` (a random point at distance eps already crossed the readout),
  ``solved``, ``pass_rate`` (solved / problems), ``verdict`` (passed, failed or skipped, with
  ``reason`` for a skip), ``seconds``, ``gradient_evals``, ``sanity_flags`` (the engine's flags on
  the binarized model)
* ``verdict``: failed if any check failed, else passed (skipped checks aside)
"""

from __future__ import annotations

from typing import Any

import torch

from robench.models.checkpoints import LoadedModel
from robench.models.preprocessing import Normalization
from robench.results.document import data_block, env_block, header, model_block, suite_block
from robench.results.schema import CHECK_SCHEMA
from robench.suites import LoadedSuite


def attack_check_document(checks: list[dict[str, Any]], total: int, loaded: LoadedModel,
                          normalization: Normalization | None, suite: LoadedSuite, data: dict[str, Any],
                          settings: dict[str, Any], device: torch.device, *, seed: int, batch_size: int,
                          seconds: float, complete: bool) -> dict[str, Any]:
    """The document of a finished or interrupted check (``progress``: checks finished of ``total``)."""
    ran = [c for c in checks if c["verdict"] != "skipped"]
    verdict = "failed" if any(c["verdict"] == "failed" for c in ran) else "passed" if ran else "skipped"
    fingerprint = data["fingerprint"]
    return {
        **header(CHECK_SCHEMA, "attack-check", complete),
        "progress": {"evaluated": len(checks), "total": total, "unit": "checks"},
        "model": model_block(loaded, normalization=normalization),
        "suite": suite_block(suite.suite.name, suite.path, suite.sha256, eps_space=suite.suite.eps_space,
                             overrides=suite.overrides),
        "data": data_block({"name": data["name"], "n": data["n"]}, fingerprint),
        "settings": dict(settings),
        "checks": checks,
        "verdict": verdict,
        "env": env_block(device, seed=seed, batch_size=batch_size, checkpoint_sha256=loaded.sha256,
                         dataset_fingerprint=fingerprint, seconds=seconds, suite_sha256=suite.sha256),
    }


def verdict_line(doc: dict[str, Any]) -> str:
    """One line: what the check says about the suite's attacks, and what to try next."""
    failed = [c for c in doc["checks"] if c["verdict"] == "failed"]
    ran = [c for c in doc["checks"] if c["verdict"] != "skipped"]
    if not ran:
        return "no entry of the suite could be checked (see the reasons)"
    threshold = doc["settings"]["pass_threshold"]
    if not failed:
        return (f"every checked attack solved at least {100 * threshold:.0f}% of the test problems: strong enough "
                "for this model's features at these eps")
    names = ", ".join(f"{c['label']} eps {c['eps_text']}" for c in failed)
    return (f"too weak for this model: {names} solved fewer than {100 * threshold:.0f}% of problems that have a "
            "solution; try more steps or restarts, a black-box attack (square), or bpda: for a "
            "non-differentiable part")
