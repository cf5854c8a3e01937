"""The run core: metrics that reset, merge by their declared reductions and round-trip; one RunState."""

from __future__ import annotations


import pytest
import torch

from robench.data.sources import ImageDataset, from_arrays
from robench.evaluation.config import EngineConfig
from robench.evaluation.engine import run
from robench.metrics import Accuracy, Collected, Scalar
from robench.models.wrapper import RobustModel
from robench.evaluation.state import PROGRESS_FORMAT, RunInterrupted, RunState, entry_metrics
from robench.suites import parse_suite
from cli_helpers import saved_and_loaded

SUITE = "name: core\nattacks:\n  - attack: fgsm\n    eps: [0.05, 0.1]\n  - attack: pgd\n    eps: 0.1\n    steps: 3\n"
BATCH = 64


@pytest.fixture(scope="module")
def batches(trained_model, test_tensors):
    """Per batch of 64 test images: (clean-correct flags, predictions, indices) from the trained model."""
    x, y = test_tensors
    with torch.no_grad():
        pred = trained_model(x).argmax(dim=1)
    idx = torch.arange(len(y))
    return [((pred == y)[s:s + BATCH], pred[s:s + BATCH], idx[s:s + BATCH]) for s in range(0, len(y), BATCH)]


def metrics_over(batches) -> dict:
    """One of each kind of metric, fed the batches: per-batch correct counts go to the scalars."""
    metrics = {"accuracy": Accuracy(), "collected": Collected(), "sum": Scalar("sum"),
               "max": Scalar("max", default=None), "min": Scalar("min", default=None)}
    for correct, pred, _ in batches:
        metrics["accuracy"].update(correct)
        metrics["collected"].update(pred)
        for name in ("sum", "max", "min"):
            metrics[name].update(int(correct.sum()))
    return metrics


def assert_same_states(a: dict, b: dict, skip: tuple = ()) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key in skip:
            continue
        if isinstance(a[key], dict):
            assert_same_states(a[key], b[key], skip)
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], dict):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                assert_same_states(x, y, skip)
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_reset_returns_every_metric_to_its_declared_defaults(batches):
    fresh = metrics_over([])
    used = metrics_over(batches)
    assert used["accuracy"].total == sum(len(c) for c, _, _ in batches) and used["max"].compute() is not None
    for name, metric in used.items():
        metric.reset()
        assert_same_states(metric.state_dict(), fresh[name].state_dict())
    # Fresh objects: filling a reset metric leaves a second reset one empty.
    again = Collected()
    used["collected"].update(batches[0][1])
    again.reset()
    assert again.parts == [] and len(used["collected"].parts) == 1
    collection = entry_metrics()
    collection.accuracy.update(batches[0][0])
    collection.peak_memory.update(123)
    collection.reset()
    assert_same_states(collection.state_dict(), entry_metrics().state_dict())


def test_merge_applies_each_declared_reduction(batches):
    whole = metrics_over(batches)
    first, second = metrics_over(batches[:3]), metrics_over(batches[3:])
    for name, metric in first.items():
        metric.merge(second[name])
    assert first["accuracy"].reductions() == {"correct": "sum", "total": "sum"}
    assert first["collected"].reductions() == {"parts": "cat"}
    # sum, cat (in order), max and min over two halves equal one metric fed everything.
    for name in whole:
        assert_same_states(first[name].state_dict(), whole[name].state_dict())
    per_batch = [int(c.sum()) for c, _, _ in batches]
    assert first["max"].compute() == max(per_batch) and first["min"].compute() == min(per_batch)
    assert first["accuracy"].compute() == pytest.approx(sum(per_batch) / sum(len(c) for c, _, _ in batches))
    # Nothing seen yet (None) never wins a max or min.
    empty = Scalar("max", default=None)
    empty.merge(whole["max"])
    assert empty.compute() == max(per_batch)


def test_seconds_add_within_a_process_and_take_the_slowest_shard():
    one, other = entry_metrics(), entry_metrics()
    for seconds in (1.5, 2.0):
        one.seconds.update(seconds)
    other.seconds.update(2.5)
    one.merge(other)
    assert one.seconds.compute() == 3.5
    with pytest.raises(TypeError):
        Scalar("sum").merge(Scalar("max"))


def test_state_dict_round_trip_through_torch_save_weights_only(batches):
    metrics = metrics_over(batches)
    for name, metric in metrics.items():
        restored = metrics_over([])[name]
        restored.load_state_dict(saved_and_loaded(metric.state_dict()))
        assert_same_states(restored.state_dict(), metric.state_dict())
        assert restored.compute() == metric.compute() if name != "collected" else \
            torch.equal(restored.compute(), metric.compute())
    # A loaded cat state keeps accumulating with the same dtype.
    loaded = Collected()
    loaded.load_state_dict(saved_and_loaded(metrics["collected"].state_dict()))
    loaded.update(batches[0][1])
    assert loaded.compute().dtype == batches[0][1].dtype
    with pytest.raises(ValueError, match="states are"):
        Accuracy().load_state_dict({"correct": 1})


@pytest.fixture(scope="module")
def engine_inputs(trained_model, test_tensors):
    x, y = test_tensors
    dataset = from_arrays(x[:200].numpy(), y[:200].numpy(), name="digits-test")
    return RobustModel(trained_model), dataset, parse_suite(SUITE).suite


def evaluate(engine_inputs, dataset=None, *, on_batch=None, resume_state=None, save_state=None, **options):
    model, whole, suite = engine_inputs
    return run(model, dataset or whole, suite, EngineConfig(batch_size=BATCH, **options), device=torch.device("cpu"),
               on_batch=on_batch, resume_state=resume_state, save_state=save_state)


TIMING = ("seconds", "sanity")  # wall time differs; the sanity report is the first batch's, checked apart


def test_two_halves_merged_equal_the_whole_run(engine_inputs):
    whole_dataset = engine_inputs[1]
    whole = evaluate(engine_inputs).state
    halves = [ImageDataset(whole_dataset.base, whole_dataset.name, whole_dataset.indices[a:b])
              for a, b in ((0, 64), (64, 200))]  # the second half is not a multiple of the batch size
    states = [evaluate(engine_inputs, half).state.state_dict() for half in halves]
    merged = RunState.merged(saved_and_loaded(states))
    assert merged.n == whole.n == 200 and 0 < merged.clean.correct < 200
    assert_same_states(merged.state_dict(), whole.state_dict(), skip=(*TIMING, "data_digest"))
    assert merged.data_digest == "" and whole.data_digest  # shard digests do not combine
    assert merged.sanity["input_gradient"] == whole.sanity["input_gradient"]
    assert (merged.per_sample("index") == whole_dataset.indices).all()
    for mine, theirs in zip(merged.entries, whole.entries):
        assert mine.fooled.total == theirs.fooled.total and mine.gradient_evals.compute() > 0
    assert (merged.robust_all() == whole.robust_all()).all()


def test_snapshot_restore_and_continue_equals_an_uninterrupted_run(engine_inputs):
    plain = evaluate(engine_inputs).state
    saved, seen = [], []

    def stop_after_two(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    # Progress is committed a segment (SEGMENT_BATCHES batches) at a time; without refill, a batch at a time.
    with pytest.raises(RunInterrupted) as info:
        evaluate(engine_inputs, on_batch=stop_after_two, save_state=saved.append, save_every=0, refill=False)
    assert info.value.outcome.state.n == 2 * BATCH and info.value.outcome.complete is False
    snapshot = saved_and_loaded(saved[-1])
    # The progress file's layout is that of robench.progress/3: each metric's states in declared order.
    assert snapshot["format"] == PROGRESS_FORMAT == "robench.progress/3" and snapshot["batches"] == 2
    assert snapshot["clean"] == [info.value.outcome.state.clean.correct, 2 * BATCH]
    assert set(snapshot["entries"][0]) == {"accuracy", "fooled", "robust", "seconds", "gradient_evals",
                                           "peak_memory", "chunk", "found_by"}
    # Resumed with refill on: the segments start at batch 2, the results are those of the plain run.
    resumed = evaluate(engine_inputs, resume_state=snapshot).state
    assert_same_states(resumed.state_dict(), plain.state_dict(), skip=TIMING)
    assert resumed.sanity == plain.sanity


def test_a_progress_file_with_8bit_examples_from_an_older_robench_is_refused():
    """Kept examples are float now; an older state of the same format kept uint8 images."""
    from robench.errors import UsageError

    state = RunState.for_entries(1, {}, keep_examples=True)
    images = torch.rand(2, 1, 4, 4)
    state.examples.metrics["clean"].update(images)
    state.examples.metrics["adversarial0"].update(images)
    for name in ("clean_pred", "adv_pred0"):
        state.examples.metrics[name].update(torch.zeros(2, dtype=torch.long))
    snapshot = state.snapshot(1, 2)
    RunState.for_entries(1, {}, keep_examples=True).restore(snapshot, 2)  # float: resumes
    clean = snapshot["examples"]["clean"]
    snapshot["examples"]["clean"] = ([(t * 255).to(torch.uint8) for t in clean] if isinstance(clean, list)
                                     else (clean * 255).to(torch.uint8))
    with pytest.raises(UsageError, match="older robench that kept 8-bit examples"):
        RunState.for_entries(1, {}, keep_examples=True).restore(snapshot, 2)
