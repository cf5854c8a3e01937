"""The ``min_norm`` block of a results document: what a minimum-norm attack's suite entry found, read back.

A suite entry of a minimum-norm attack (``fmn``, ``fab``) runs once without an eps and keeps,
per attacked (clean-correct) sample, the smallest adversarial perturbation it found. The block
holds those norms in increasing order (``norms``; a sample without one is counted in
``attacked - found``), so the robust accuracy at any eps follows from it:

    robust(eps) = (attacked - found + #{norms > eps}) / n

The entry's eps are also ordinary ``attacks`` rows (accuracy at each eps): tables, ``compare``,
``gate`` and ``plot`` read those as they read any attack's. This module adds what only the block
has: the ``median_norm`` rows of the tidy table, the full step curve for ``plot`` and the
reader's checks that the block's numbers agree with each other. Plain data in and out (no torch).
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable

MEDIAN = "median_norm"


def blocks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The document's minimum-norm blocks (none for suites without minimum-norm attacks)."""
    return list(doc.get("min_norm") or [])


def robust_count(block: dict[str, Any], eps: float) -> int:
    """Attacked samples still robust at ``eps``: those without an adversarial example found, and those whose
    smallest one is larger than eps."""
    norms = block["norms"]
    return block["attacked"] - block["found"] + len(norms) - bisect.bisect_right(norms, eps)


def median_of(norms: list[float], attacked: int) -> float | None:
    """The median over ``attacked`` samples of which ``norms`` (sorted) were broken, the others counting as
    infinitely far (the mean of the middle two for an even count); None when nothing was attacked."""
    if attacked == 0:
        return None

    def at(k: int) -> float:
        return norms[k] if k < len(norms) else math.inf

    middle = attacked // 2
    return at(middle) if attacked % 2 else (at(middle - 1) + at(middle)) / 2


def step_curve(block: dict[str, Any], end: float) -> tuple[list[float], list[float]]:
    """The robust accuracy as a step function of eps from 0 to ``end``: the points where it drops (each
    holds until the next, as matplotlib's ``where="post"`` draws it)."""
    n = block["n"]
    xs, ys = [0.0], [(block["attacked"]) / n if n else 0.0]
    for eps in dict.fromkeys(v for v in block["norms"] if v <= end):  # once per distinct norm
        xs.append(eps)
        ys.append(robust_count(block, eps) / n)
    xs.append(end)
    ys.append(ys[-1])
    return xs, ys


def tidy_rows(doc: dict[str, Any], add: Callable[..., None], settings: Callable[[Any], str]) -> None:
    """One ``median_norm`` row per block, keyed like the entry's accuracy rows (same label and settings)."""
    for block in blocks(doc):
        add(block["label"], block["attack"], settings(block.get("params")), MEDIAN, block.get(MEDIAN),
            block.get("attacked"), norm=block.get("norm"))


def check_blocks(check: Any, doc: dict[str, Any]) -> None:
    """The reader's checks of every block (``check`` is the reader's field checker): counts within the clean
    counts, norms sorted, and the median and the curve what the norms say."""
    if "min_norm" not in doc:
        return
    for i, block in enumerate(check.array(doc["min_norm"], "min_norm")):
        path = f"min_norm[{i}]"
        check.object(block, path)
        _check_block(check, block, path)


def _check_block(check: Any, block: dict[str, Any], path: str) -> None:
    for key in ("attack", "label"):
        check.text(check.get(block, key, path), f"{path}.{key}")
    n, attacked, found = (check.get(block, key, path) for key in ("n", "attacked", "found"))
    check.count(n, f"{path}.n")
    check.count(attacked, f"{path}.attacked", at_most=("n", n))
    check.count(found, f"{path}.found", at_most=("attacked", attacked))
    norms = check.array(check.get(block, "norms", path), f"{path}.norms")
    for j, value in enumerate(norms):
        check.number(value, f"{path}.norms[{j}]")
    if len(norms) != found:
        check.fail(f"{path}.norms", f"must hold one norm per sample found ({found}), got {len(norms)}")
    if any(b < a for a, b in zip(norms, norms[1:])):
        check.fail(f"{path}.norms", "must be in increasing order")
    median = check.get(block, MEDIAN, path)
    check.number(median, f"{path}.{MEDIAN}", nullable=True)
    expected = median_of(norms, attacked)
    bounded = expected if expected is not None and math.isfinite(expected) else None
    if (median is None) != (bounded is None) or (median is not None and bounded is not None
                                                   and not _close(median, bounded)):
        shown = "null" if bounded is None else f"{bounded:.6g}"
        check.fail(f"{path}.{MEDIAN}", f"must be the median of the attacked samples' norms ({shown}), got "
                   f"{'null' if median is None else median}")
    for j, point in enumerate(check.array(check.get(block, "curve", path), f"{path}.curve")):
        _check_point(check, block, point, f"{path}.curve[{j}]")


def _check_point(check: Any, block: dict[str, Any], point: Any, path: str) -> None:
    check.object(point, path)
    eps, accuracy = check.get(point, "eps", path), check.get(point, "accuracy", path)
    check.number(eps, f"{path}.eps")
    check.fraction(accuracy, f"{path}.accuracy", nullable=True)
    n = block["n"]
    if accuracy is not None and n:
        robust = robust_count(block, eps)
        if not _close(accuracy, robust / n):
            check.fail(f"{path}.accuracy", f"must be the share of samples whose norm exceeds eps {eps:g} "
                       f"({robust}/{n}), got {accuracy}")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
