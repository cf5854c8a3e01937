"""Speed switches never change results: compiled (eager backend) and channels_last runs equal the plain run."""

from __future__ import annotations

import pytest
import torch

import robench
from robench.errors import UsageError
from robench.evaluation.speed import AUTO_COMPILE_MIN_WORK, estimated_work, should_compile
from robench.suites.loader import parse_suite

SUITE = {"name": "sp", "attacks": [{"attack": "fgsm", "eps": 0.1}, {"attack": "pgd", "eps": [0.05, 0.1], "steps": 5}]}


@pytest.fixture(scope="module")
def plain(trained_model, test_tensors):
    return robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", compile="off")


def test_compiled_forward_gives_the_same_outcomes(trained_model, test_tensors, plain):
    # The "eager" backend exercises dynamo's capture and dynamic shapes without a C++ toolchain.
    compiled = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", compile="on",
                                compile_backend="eager")
    assert compiled.samples.equals(plain.samples)
    speed = compiled.doc["env"]["speed"]
    assert speed["compile"] is True and speed["compile_backend"] == "eager"
    assert speed["compiled_graphs"] >= 1 and speed["first_call_seconds"] > 0
    assert plain.doc["env"]["speed"]["compile"] is False


def test_channels_last_gives_the_same_outcomes(trained_model, test_tensors, plain):
    nhwc = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", compile="off", channels_last=True)
    assert nhwc.doc["env"]["speed"]["channels_last"] is True
    assert nhwc.samples.equals(plain.samples)


def test_auto_compiles_only_big_gpu_runs():
    suite = parse_suite("name: a\nattacks:\n  - attack: pgd\n    eps: [0.1, 0.2]\n    steps: 10\n").suite
    assert estimated_work(1000, suite) == 1000 * 10 * 2
    assert not should_compile("auto", torch.device("cpu"), 10**9)
    assert not should_compile("auto", torch.device("cuda"), AUTO_COMPILE_MIN_WORK - 1)
    assert should_compile("auto", torch.device("cuda"), AUTO_COMPILE_MIN_WORK)
    assert should_compile("on", torch.device("cpu"), 0) and not should_compile("off", torch.device("cuda"), 10**9)
    with pytest.raises(UsageError):
        should_compile("sometimes", torch.device("cpu"), 0)


def test_sweep_reuse_is_the_monotone_closure_of_the_plain_path(trained_model, test_tensors):
    sweep = {"name": "sw", "attacks": [{"attack": "pgd", "eps": [0.02, 0.05, 0.1, 0.15, 0.2], "steps": 5}]}
    plain = robench.evaluate(trained_model, test_tensors, sweep, device="cpu", compile="off")
    reused = robench.evaluate(trained_model, test_tensors, sweep, device="cpu", compile="off", sweep_reuse=True)
    cols = [c for c in plain.samples.columns if c.startswith("robust[")]
    closure = plain.samples[cols].cummin(axis=1)  # robust at eps_k only if robust at every smaller eps
    assert reused.samples[cols].equals(closure)
    # The plain path almost never disagrees with the closure (an attack that failed at a larger eps).
    assert (plain.samples[cols] != closure).to_numpy().sum() <= 3
    saved = sum(a["gradient_evals"] for a in plain.doc["attacks"]) - sum(a["gradient_evals"]
                                                                           for a in reused.doc["attacks"])
    assert saved > 0
    assert reused.doc["env"]["speed"]["sweep_reuse"] is True


def test_sweep_reuse_leaves_final_iterate_entries_alone(trained_model, test_tensors):
    sweep = {"name": "sw", "attacks": [{"attack": "pgd", "eps": [0.05, 0.1], "steps": 5, "final_iterate": True}]}
    plain = robench.evaluate(trained_model, test_tensors, sweep, device="cpu", compile="off")
    reused = robench.evaluate(trained_model, test_tensors, sweep, device="cpu", compile="off", sweep_reuse=True)
    assert reused.samples.equals(plain.samples)
    assert [a["gradient_evals"] for a in reused.doc["attacks"]] == [a["gradient_evals"] for a in plain.doc["attacks"]]


def test_auto_batch_size_probes_down_to_what_fits():
    from robench.evaluation.speed import CPU_BATCH, auto_batch_size

    tried = []

    def forward(x):
        tried.append(len(x))
        if len(x) > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x.flatten(1)[:, :3]

    sample = torch.rand(1, 1, 8, 8)
    assert auto_batch_size(forward, sample, torch.device("cuda")) == 64
    assert tried == [1024, 512, 256, 128, 64]
    assert auto_batch_size(forward, sample, torch.device("cpu")) == CPU_BATCH


def test_auto_batch_size_in_a_run(trained_model, test_tensors, plain):
    auto = robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", compile="off", batch_size="auto")
    assert auto.doc["env"]["batch_size"] == 256 and auto.doc["env"]["speed"]["batch_size_auto"] is True
    assert auto.samples.equals(plain.samples)
    with pytest.raises(UsageError, match="positive integer or auto"):
        robench.evaluate(trained_model, test_tensors, SUITE, device="cpu", batch_size="big")


def test_on_a_cpu_only_passes_without_an_input_gradient_are_compiled(trained_model):
    """Inductor's CPU backward of a small CNN is slower than eager: gradient passes stay eager there."""
    from robench.evaluation.speed import CompiledQueries, speed_up

    forward, report = speed_up(trained_model, compile=True, backend="eager")
    assert isinstance(forward, CompiledQueries) and report.compile
    routed = []

    class Recorded(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            routed.append(self.name)
            return trained_model(x)

    forward = CompiledQueries(Recorded("eager"), Recorded("compiled"))
    x = torch.rand(4, 1, 8, 8)
    assert not forward(x).requires_grad
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(forward(x).sum(), x)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        forward(x)
    assert routed == ["compiled", "eager", "compiled"]


def test_an_inductor_compiled_run_gives_the_same_robust_accuracy(trained_model, test_tensors, tmp_path,
                                                                   monkeypatch):
    """Inductor itself (C++ kernels on a CPU): its queries and scoring passes round differently in the last bits,
    which never moves a verdict on these points."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compiled here, not read from a cache
    data = (test_tensors[0][:120], test_tensors[1][:120])
    suite = {"name": "digits-compiled", "attacks": [
        {"attack": "fgsm", "eps": [0.05, 0.1]}, {"attack": "pgd", "eps": 0.1, "steps": 10},
        {"attack": "square", "eps": 0.1, "queries": 200}]}
    plain = robench.evaluate(trained_model, data, suite, device="cpu", compile="off")
    compiled = robench.evaluate(trained_model, data, suite, device="cpu", compile="on")
    assert compiled.doc["env"]["speed"]["compile_backend"] == "inductor"
    assert compiled.doc["env"]["speed"]["compiled_graphs"] >= 1
    assert [a["accuracy"] for a in compiled.doc["attacks"]] == [a["accuracy"] for a in plain.doc["attacks"]]
    assert compiled.doc["clean"] == plain.doc["clean"]
