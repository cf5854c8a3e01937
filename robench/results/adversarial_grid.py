"""A figure of saved adversarial examples: one row per sample, clean | adversarial | perturbation.

The perturbation column shows ``adversarial - clean`` around mid-gray, amplified so that the
largest change among the shown rows reaches black or white; the factor is in the column title.
Labels under each image give the true and the predicted class (class names when the data has
them). The images are the 8-bit ones of the npz: where rounding undid some of the run's successes,
a second title line says how many (the npz's ``adversarial_float`` keeps them). matplotlib draws
it with its Agg canvas, without pyplot: no global backend is touched.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from robench.results.adversarial import SavedExamples, write_examples
from robench.results.atomic import write_file_atomically

MAX_ROWS = 8
CELL_INCHES = (2.0, 2.1)  # width, height of one image with its caption
TITLE_INCHES = 0.9
DPI = 100
FOOLED_COLOR = "#c0392b"


def save_examples(run_dir: Path, examples: list[SavedExamples], class_names: list[str] | None = None) -> list[Path]:
    """``adversarial/<entry>.npz`` and ``adversarial/<entry>.png`` per entry; returns the npz paths."""
    paths = write_examples(run_dir, examples)
    for path, ex in zip(paths, examples):
        write_grid(path.with_suffix(".png"), ex, class_names)
    return paths


def grid_size(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of the figure for ``rows`` samples."""
    width, height = CELL_INCHES
    return round(3 * width * DPI), round((rows * height + TITLE_INCHES) * DPI)


def perturbation_view(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, float]:
    """The perturbation mapped around mid-gray (values in [0,1]) and the amplification factor used."""
    delta = adversarial.astype(np.float64) - clean.astype(np.float64)  # in 1/255 steps
    largest = float(np.abs(delta).max()) if delta.size else 0.0
    factor = 127.5 / largest if largest else 1.0
    return np.clip(0.5 + delta * factor / 255.0, 0.0, 1.0), factor


def shown_samples(examples: SavedExamples) -> np.ndarray:
    """Which saved samples the grid shows: those the attack fooled first (what a reader wants to see), then
    the others, each group in dataset order; at most ``MAX_ROWS``."""
    broken = np.asarray(examples.fooled, dtype=bool) & np.asarray(examples.attacked, dtype=bool)
    order = np.concatenate([np.flatnonzero(broken), np.flatnonzero(~broken)])
    return order[:MAX_ROWS]


def write_grid(path: Path, examples: SavedExamples, class_names: list[str] | None = None) -> None:
    """PNG of up to ``MAX_ROWS`` saved samples of one entry (nothing is written for an empty entry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = shown_samples(examples)
    rows = len(chosen)
    if not rows:
        return
    clean, adversarial = examples.clean[chosen], examples.adversarial[chosen]
    label_of, clean_pred, adv_pred = examples.label[chosen], examples.clean_pred[chosen], examples.adv_pred[chosen]
    perturbation, factor = perturbation_view(clean, adversarial)
    width, height = grid_size(rows)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.suptitle(_title(examples), fontsize=10, y=1 - 0.2 / (height / DPI))
    titles = ["clean", _changed_title(examples), f"perturbation ×{factor:.1f}"]
    # Space for the title (inches) at the top, each cell's caption under its image.
    top = 1 - TITLE_INCHES / (height / DPI)
    figure.subplots_adjust(left=0.03, right=0.97, bottom=0.3 / (height / DPI), top=top, wspace=0.15, hspace=0.3)
    axes = figure.subplots(rows, 3, squeeze=False)
    name = _namer(class_names)
    for r in range(rows):
        label = int(label_of[r])
        shown = [(clean[r], f"true {name(label)} · pred {name(int(clean_pred[r]))}", label),
                 (adversarial[r], f"true {name(label)} · pred {name(int(adv_pred[r]))}", label),
                 (perturbation[r], f"max |δ| {int(np.abs(adversarial[r].astype(int) - clean[r]).max())}/255", None)]
        for c, (image, caption, truth) in enumerate(shown):
            ax = axes[r][c]
            _show(ax, image, scaled=c == 2)
            pred = int(clean_pred[r] if c == 0 else adv_pred[r])
            wrong = truth is not None and pred != truth
            ax.set_xlabel(caption, fontsize=8, color=FOOLED_COLOR if wrong else "black")
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
    write_file_atomically(Path(path), _png_bytes(figure))


def _show(ax, image: np.ndarray, scaled: bool) -> None:
    """An NHWC row: gray images in gray, colour as they are; small images without smoothing."""
    data = image if scaled else image.astype(np.float64) / 255.0
    if data.shape[-1] == 1:
        ax.imshow(data[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(data, 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _namer(class_names: list[str] | None):
    def name(k: int) -> str:
        if k < 0:
            return "none"  # non-finite logits: no prediction
        if class_names and k < len(class_names):
            return class_names[k]
        return str(k)
    return name


def _title(examples: SavedExamples) -> str:
    budget = "" if np.isnan(examples.eps) else f" · {examples.norm} eps {examples.eps:.4g}"
    fooled = int(examples.fooled[examples.attacked].sum())
    done, outcome = ("changed", "misclassified") if examples.norm == "l0" else ("attacked", "fooled")
    title = (f"{examples.entry}{budget} · {fooled} of {int(examples.attacked.sum())} {done} samples {outcome} "
             f"(of {len(examples.index)} saved)")
    counts = examples.counts()
    if counts["undone_8bit"]:  # the figure must not pass for the run's result
        title += (f"\n8-bit rounding undid {counts['undone_8bit']} of the run's {counts['fooled_run']} successes; "
                  "the .npz keeps them")
    return title


def _changed_title(examples: SavedExamples) -> str:
    # Pixel changes (an l0 budget) are not crafted against the model: "changed", as the paper says.
    return "changed" if examples.norm == "l0" else "adversarial"


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
