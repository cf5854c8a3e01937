"""The pixel change inside suites and the batched experiment runner (the perturbation and the
Pixel-index themselves are covered in test_pixels.py)."""

from __future__ import annotations

import pytest
import torch

import robench
from robench.errors import UsageError
from robench.pixels.experiment import build_settings, run_pixel_experiments


def test_pixels_attack_in_a_suite(trained_model, test_tensors):
    suite = {"name": "px", "attacks": [{"attack": "pixels", "pixels": [2, 16], "trials": 3}]}
    doc = robench.evaluate(trained_model, test_tensors, suite, device="cpu").doc
    two, sixteen = doc["attacks"]
    assert two["params"]["pixels"] == 2 and two["eps"] is None and two["norm"] == "l0"
    assert two["accuracy"] > sixteen["accuracy"]
    assert sixteen["accuracy"] <= doc["clean"]["accuracy"]


def test_pixel_suite_fields_are_validated():
    from robench.suites.loader import parse_suite

    with pytest.raises(UsageError, match="no eps budget"):
        parse_suite("name: a\nattacks:\n  - attack: pixels\n    eps: 0.1\n")
    with pytest.raises(UsageError, match="pixel counts"):
        parse_suite("name: a\nattacks:\n  - attack: pixels\n    pixels: [0]\n")
    with pytest.raises(UsageError, match="delta: pgd does not take"):
        parse_suite("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    delta: 3\n")
    spec = parse_suite("name: a\nattacks:\n  - attack: pixels\n    area: 4\n").suite.attacks[0]
    assert spec.settings.area == [4, 4] and spec.settings.pixels == [4, 8, 16, 32, 64]
    assert spec.model_dump()["area"] == [4, 4], "the suite's hash holds the validated value"


def test_experiment_counts_match_direct_trials(trained_model, digits_split):
    from robench.models.wrapper import RobustModel

    _, x_te, _, y_te = digits_split
    images = torch.from_numpy(x_te).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y_te)
    settings = build_settings([30], [(4, 4)])
    a = run_pixel_experiments(RobustModel(trained_model), images, labels, pixels=[2, 6], settings=settings,
                              trials=3, seed=1, batch_size=100)
    b = run_pixel_experiments(RobustModel(trained_model), images, labels, pixels=[2, 6], settings=settings,
                              trials=3, seed=1, batch_size=41)
    assert a.evaluated == b.evaluated and a.evaluated < len(labels)
    for key in a.counts:
        assert torch.equal(a.counts[key], b.counts[key]), "batching does not change the draws"
    # A setting's draws do not depend on which other settings run.
    c = run_pixel_experiments(RobustModel(trained_model), images, labels, pixels=[6],
                              settings=build_settings([], [(4, 4)]), trials=3, seed=1)
    assert torch.equal(c.counts[(1, 6)], a.counts[(2, 6)])


def test_a_resumed_run_counts_what_an_uninterrupted_one_does(trained_model, digits_split):
    import io

    from robench.models.wrapper import RobustModel
    from robench.pixels.experiment import PixelExperimentsInterrupted
    from cli_helpers import stop_after

    _, x_te, _, y_te = digits_split
    images = torch.from_numpy(x_te[:96]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y_te[:96])
    model = RobustModel(trained_model)
    options = {"pixels": [2, 6], "settings": build_settings([30], [(4, 4)]), "trials": 2, "seed": 1,
               "attack_eps": 0.1, "batch_size": 16}
    whole = run_pixel_experiments(model, images, labels, **options)
    snapshots = []

    def save(state):  # through bytes and back, as the progress file is read: plain tensors and numbers only
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        snapshots.append(torch.load(buffer, weights_only=True))

    with pytest.raises(PixelExperimentsInterrupted) as stopped:
        run_pixel_experiments(model, images, labels, **options, save_state=save, save_every=0, on_batch=stop_after(2))
    assert stopped.value.counts.batches == 2 and snapshots[-1]["batches"] == 2
    assert stopped.value.counts.clean_total == 32
    resumed = run_pixel_experiments(model, images, labels, **options, resume_state=snapshots[-1])
    for field in ("evaluated", "clean_total", "clean_correct", "adversarial", "forward_images", "fingerprint"):
        assert getattr(resumed, field) == getattr(whole, field), field
    for table in ("counts", "adversarial_counts"):
        mine, theirs = getattr(resumed, table), getattr(whole, table)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), table
    with pytest.raises(UsageError, match="the run used --batch-size 16, not 32"):
        run_pixel_experiments(model, images, labels, **{**options, "batch_size": 32}, resume_state=snapshots[-1])
    changed = images.clone()
    changed[20] = 255 - changed[20]  # in the second finished batch
    with pytest.raises(UsageError, match="the images changed since the interrupted run"):
        run_pixel_experiments(model, changed, labels, **options, resume_state=snapshots[-1])
    with pytest.raises(UsageError, match="the images changed since the interrupted run"):
        run_pixel_experiments(model, images[:16], labels[:16], **options, resume_state=snapshots[-1])


def test_a_unit_of_other_images_stops_a_queued_job_and_the_checked_units_are_kept(trained_model, digits_split,
                                                                                   monkeypatch):
    """The work queue in one process (as when it resumes a torchrun job), its worker reading other images
    from the second unit on, as a node with another copy of the folder would: rank 0's check stops the job
    at that unit, and the progress saved holds the units before it."""
    from robench.errors import RunError
    from robench.models.wrapper import RobustModel
    from robench.pixels import queued

    _, x_te, _, y_te = digits_split
    images = torch.from_numpy(x_te[:48]).permute(0, 3, 1, 2).contiguous()
    other = images ^ 1  # one bit of every pixel
    options = {"pixels": [2], "settings": build_settings([30], []), "trials": 1, "seed": 1, "shared_positions": False,
               "channels": "all", "attack_eps": None, "batch_size": 8, "device": torch.device("cpu")}
    work = queued.PixelWork(RobustModel(trained_model), images, torch.from_numpy(y_te[:48]), options)
    real_experiments = queued.run_pixel_experiments

    def other_copy_after_the_first_unit(model, unit_images, labels, *, first, **kwargs):
        if first > 0:  # what the worker reads; rank 0 checks against its own images
            unit_images = other[first:first + len(unit_images)]
        return real_experiments(model, unit_images, labels, first=first, **kwargs)

    monkeypatch.setattr(queued, "run_pixel_experiments", other_copy_after_the_first_unit)
    saved: list[dict] = []
    with pytest.raises(RunError, match=r"read other images than the first process \(images 8 to 15\)"):
        work.run(save_state=saved.append, save_every=0)
    assert [int(unit) for unit in saved[-1]["units"]] == [0]
