"""Adversarial examples saved by ``--save-adversarial``: ``adversarial/<entry>.npz`` in a run directory.

Each file holds the examples twice:

* ``clean_float`` and ``adversarial_float``: float32, exactly the images the run put through the
  model. Classifying ``adversarial_float`` with the same model (same ``--precision``, device and
  normalisation) gives the run's verdicts ``run_fooled`` and so its reported accuracy. One limit,
  from the hardware rather than the file: the run scored each example inside a batch, and a CPU or
  GPU may round a sample's logits differently in another batch, so a near-tie can flip when the
  examples are classified in other batches. Models whose output for a row does not depend on the
  rest of the batch reproduce every verdict whatever the batching. float16 would not do: it moves
  a value by up to 2.4e-4 (a sixteenth of a 1/255 step), far more than those last bits, and an
  example the attack left at a near-tie can flip (none did on the bundled digits; exactness is the point).
* ``clean`` and ``adversarial``: uint8 images, what image files and viewers take, rounded as
  below. ``adv_pred`` is the model's prediction of the *saved 8-bit* image, ``fooled`` is
  ``adv_pred != label``. Rounding can undo a success (on the bundled digits, PGD-10 at eps 0.1
  keeps 115 of its 135): the 8-bit images alone do not reproduce the reported number, and
  ``robench eval`` says so (results.json ``saved_examples``, a warning line).

8-bit rounding, chosen so that a saved example stays inside the threat model it was made in:

* the clean image is rounded to the nearest k/255: ``clean_q = round(255 x)``;
* the perturbation is rounded toward zero to whole 1/255 steps, per pixel:
  ``adv_q = clip(clean_q + trunc(255 (x_adv - x)), 0, 255)``.

So ``|adv_q - clean_q| <= 255 |x_adv - x|`` per pixel, measured from the saved clean
image: the saved perturbation lies in every L-inf and L2 ball that held the float one,
and within the entry's eps. For data on the 8-bit grid (images read from 8-bit files,
the bundled digits) ``x = clean_q / 255`` and this is the rounding of ``x_adv`` itself;
for other data the clean image moves by at most half a step and the perturbation is
bounded against the saved clean image. One tolerance: a perturbation within
``STEP_TOLERANCE`` (in ``robench.evaluation.kept_examples``, with the rounding itself) of a
whole step counts as that step. An attack's projection works in
float32, where ``x + 8/255`` can land a hair under 8 steps from ``x``; truncating those
pixels to 7 steps would silently weaken the example (on the digits model it cost PGD
at 8/255 a third of its saved successes). The excess allowed is 1e-4/255 per pixel,
below float32's own resolution of the attack's check.

``run_fooled`` is the run's own verdict on the float example (as in samples.csv). Samples an
entry did not attack (misclassified before any attack) have ``adversarial == clean``.

Every image array is NHWC (rows, columns, channels: what image libraries expect), the float ones
too, in [0,1]. Cost: the run holds the kept examples as float32, 4 bytes a value (the 8-bit
images are rounded from them when written): ``--save-adversarial all`` on 10,000 CIFAR-10 images
holds about 125 MB per entry, on 5,000 ImageNet images at 224 px about 3 GB per entry, in memory
and in the progress file; give a number of samples on large runs. The compressed files grow too
(the digits' pgd file: 47 KB with the 8-bit arrays only, 139 KB with the float ones).
``robench pixel-index`` changes pixels on the 8-bit grid, so nothing is rounded and its files
have no float arrays.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from robench.evaluation.kept_examples import quantize_adversarial, quantize_clean
from robench.files import check_regular_file
from robench.results.atomic import write_file_atomically
from robench.results.file_names import entry_label, unique_stems

if TYPE_CHECKING:
    from robench.evaluation.state import RunOutcome

FOLDER = "adversarial"
CHUNK = 1024  # samples rounded at a time: the float64 intermediates of a whole large run would not fit


@dataclass
class SavedExamples:
    """One entry's saved samples; images NHWC, uint8 (``clean``, ``adversarial``) and float32 (``*_float``)."""

    entry: str
    clean: np.ndarray
    adversarial: np.ndarray
    index: np.ndarray  # dataset indices
    label: np.ndarray
    clean_pred: np.ndarray  # prediction of the saved clean image
    adv_pred: np.ndarray  # prediction of the saved adversarial image
    eps: float  # nan for entries without an eps (pixel counts)
    norm: str
    attacked: np.ndarray  # the entry attacked (or changed) the sample: it was classified correctly
    run_fooled: np.ndarray  # the run's verdict on the float example
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. pixel-index: pixels, setting, trial
    # The images the run scored (None where nothing was rounded: pixel-index changes 8-bit pixels).
    clean_float: np.ndarray | None = None
    adversarial_float: np.ndarray | None = None

    @property
    def fooled(self) -> np.ndarray:
        return self.adv_pred != self.label

    def counts(self) -> dict[str, int]:
        """results.json's ``saved_examples`` (without ``file``): what the run and the 8-bit images fooled."""
        attacked, run = self.attacked.astype(bool), self.run_fooled.astype(bool)
        fooled_8bit = self.fooled & attacked
        return {"n": len(self.index), "attacked": int(attacked.sum()), "fooled_run": int(run.sum()),
                "fooled_8bit": int(fooled_8bit.sum()), "undone_8bit": int((run & ~fooled_8bit).sum())}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"entry": np.array(self.entry), "clean": self.clean, "adversarial": self.adversarial,
                "index": self.index.astype(np.int64), "label": self.label.astype(np.int64),
                "clean_pred": self.clean_pred.astype(np.int64), "adv_pred": self.adv_pred.astype(np.int64),
                "fooled": self.fooled, "eps": np.array(self.eps, dtype=np.float64), "norm": np.array(self.norm),
                "attacked": self.attacked.astype(bool), "run_fooled": self.run_fooled.astype(bool),
                **self._float_arrays(), **{k: np.asarray(v) for k, v in self.extra.items()}}

    def _float_arrays(self) -> dict[str, np.ndarray]:
        if self.clean_float is None or self.adversarial_float is None:  # a run keeps both or neither
            return {}
        return {"clean_float": self.clean_float, "adversarial_float": self.adversarial_float}


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def write_examples(run_dir: Path, examples: list[SavedExamples]) -> list[Path]:
    """``adversarial/<entry>.npz`` per entry (atomic writes); returns the paths, in entry order."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ex, stem in zip(examples, unique_stems([e.entry for e in examples])):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **ex.arrays())  # type: ignore[arg-type]  # no array is named allow_pickle
        write_file_atomically(folder / f"{stem}.npz", buffer.getvalue())
        paths.append(folder / f"{stem}.npz")
    return paths


def read_examples(path: str | Path) -> SavedExamples:
    """An ``adversarial/*.npz`` file back as ``SavedExamples`` (no pickle)."""
    # numpy reads the path itself: a device or a pipe is refused before it does (the size is the data's).
    check_regular_file(path, "adversarial examples file")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    known = {"entry", "clean", "adversarial", "index", "label", "clean_pred", "adv_pred", "fooled", "eps", "norm",
             "attacked", "run_fooled", "clean_float", "adversarial_float"}
    return SavedExamples(
        entry=str(arrays["entry"]), clean=arrays["clean"], adversarial=arrays["adversarial"], index=arrays["index"],
        label=arrays["label"], clean_pred=arrays["clean_pred"], adv_pred=arrays["adv_pred"],
        eps=float(arrays["eps"]), norm=str(arrays["norm"]), attacked=arrays["attacked"],
        run_fooled=arrays["run_fooled"], extra={k: v for k, v in arrays.items() if k not in known},
        clean_float=arrays.get("clean_float"), adversarial_float=arrays.get("adversarial_float"))


def examples_of_run(outcome: "RunOutcome") -> list[SavedExamples]:
    """The examples a run kept (``RunState.examples``: float images, predictions of their 8-bit roundings),
    one per entry."""
    state = outcome.state
    kept = state.examples
    if kept is None:
        return []
    clean = kept.metrics["clean"].compute()
    n = len(clean)
    if not n:  # interrupted before the first segment finished
        return []
    index, labels = state.per_sample("index")[:n], state.per_sample("labels")[:n]
    clean_pred = kept.metrics["clean_pred"].compute().numpy()
    attacked = state.per_sample("pred")[:n] == labels  # the run attacks the samples it classified correctly
    # One copy of each clean array, shared by the entries.
    clean_q, clean_float = nhwc(_in_chunks(quantize_clean, clean)), nhwc(clean.float())
    out = []
    for entry, counts in outcome.with_entries():
        j = entry.index
        robust = counts.robust.compute().numpy().astype(bool)[:n]
        norm = entry.attack.norm or (entry.attack.norms[0] if len(entry.attack.norms) == 1 else "")
        adversarial = kept.metrics[f"adversarial{j}"].compute()
        out.append(SavedExamples(
            entry=entry_label(entry.spec.display_name(), entry.eps_text), clean=clean_q,
            adversarial=nhwc(_in_chunks(quantize_adversarial, clean, adversarial)), index=index, label=labels,
            clean_pred=clean_pred, adv_pred=kept.metrics[f"adv_pred{j}"].compute().numpy(),
            eps=math.nan if entry.eps is None else float(entry.eps), norm=norm, attacked=attacked,
            run_fooled=attacked & ~robust, clean_float=clean_float, adversarial_float=nhwc(adversarial.float())))
    return out


def _in_chunks(quantize, *images: torch.Tensor) -> torch.Tensor:
    return torch.cat([quantize(*parts) for parts in zip(*(x.split(CHUNK) for x in images))])


def saved_summaries(examples: list[SavedExamples]) -> list[dict[str, Any]]:
    """Per entry, results.json's ``saved_examples``: the npz file (relative to the run directory) and
    ``SavedExamples.counts``."""
    stems = unique_stems([e.entry for e in examples])
    return [{"file": f"{FOLDER}/{stem}.npz", **ex.counts()} for ex, stem in zip(examples, stems)]


def rounding_warning(where: str, saved: dict[str, Any]) -> str | None:
    """The line ``robench eval`` prints when 8-bit rounding undid some of an entry's successes (else None)."""
    if not saved.get("undone_8bit"):
        return None
    survived = saved["fooled_run"] - saved["undone_8bit"]
    grid = saved["file"].removesuffix(".npz") + ".png"
    return (f"{where}: {survived} of {saved['fooled_run']} successes survive 8-bit rounding in {grid}; the .npz "
            "keeps the float examples (adversarial_float) that reproduce the reported accuracy")
