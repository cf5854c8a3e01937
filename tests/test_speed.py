"""Speed switches never change results: compiled (eager backend) and channels_last runs equal the plain run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robench
from robench.errors import UsageError
from robench.evaluation.speed import (AUTO_COMPILE_CPU_QUERY_SECONDS, AUTO_COMPILE_MIN_WORK, cpu_auto_decision,
                                     estimated_work, should_compile)
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


def test_auto_on_a_cpu_prices_the_queries_at_a_measured_forward(trained_model, test_tensors):
    """On a CPU, auto compiles when the queries' estimated eager time (their count times the forward's
    measured time per image) reaches the threshold; the decision is recorded in words."""
    calls = []

    def per_image(seconds):
        return lambda: calls.append(seconds) or seconds

    assert cpu_auto_decision(0, per_image(1.0)) == (False, "auto: eager (no query passes to compile)")
    assert calls == []  # nothing to compile: nothing measured
    over = AUTO_COMPILE_CPU_QUERY_SECONDS / 1e-3
    assert cpu_auto_decision(int(over), per_image(1e-3))[0]
    assert not cpu_auto_decision(int(over) - 1, per_image(1e-3))[0]
    suite = {"name": "q", "attacks": [{"attack": "square", "eps": 0.1, "queries": 20}, {"attack": "fgsm", "eps": 0.1}]}
    x, y = test_tensors[0][:40], test_tensors[1][:40]
    speed = robench.evaluate(trained_model, (x, y), suite, device="cpu", compile="auto").doc["env"]["speed"]
    # 40 images x (square: 20 queries and the scoring pass; fgsm: the scoring pass): far below the threshold.
    assert speed["compile"] is False
    assert speed["compile_decision"].startswith("auto: eager (880 query passes x ")
    per_image_ms = float(speed["compile_decision"].split(" x ")[1].split(" ms")[0])
    assert 0 < per_image_ms < 10
    off = robench.evaluate(trained_model, (x, y), suite, device="cpu", compile="off").doc["env"]["speed"]
    assert off["compile_decision"] is None


def test_auto_on_a_cpu_builds_the_frozen_graph_for_a_minute_of_queries(trained_model, test_tensors, monkeypatch):
    """The frozen graph costs about a second to build: auto takes it for runs whose queries would take a minute
    (inductor's 10-25 s of compilation, half an hour); a run over the threshold records the graph it built."""
    from robench.evaluation import speed as speed_module

    assert speed_module.auto_cpu_threshold("auto") == speed_module.auto_cpu_threshold("torchscript") == 60
    assert speed_module.auto_cpu_threshold("inductor") == AUTO_COMPILE_CPU_QUERY_SECONDS
    monkeypatch.setattr(speed_module, "AUTO_FREEZE_CPU_QUERY_SECONDS", 1e-6)
    suite = {"name": "q", "attacks": [{"attack": "square", "eps": 0.1, "queries": 20}]}
    data = (test_tensors[0][:40], test_tensors[1][:40])
    speed = robench.evaluate(trained_model, data, suite, device="cpu").doc["env"]["speed"]
    assert speed["compile"] is True and speed["compile_backend"] == "torchscript" and speed["compiled_graphs"] == 1
    assert speed["compile_decision"].startswith("auto: compiled (840 query passes x ")


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
    from robench.evaluation.speed import COMPILED_MIN_BATCH, CompiledQueries, speed_up

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
    x = torch.rand(COMPILED_MIN_BATCH, 1, 8, 8)
    assert not forward(x).requires_grad
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(forward(x).sum(), x)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        forward(x)
        forward(x[:COMPILED_MIN_BATCH - 1])  # small batches: no graph of their own
    assert routed == ["compiled", "eager", "compiled", "eager"]


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
    compiled = robench.evaluate(trained_model, data, suite, device="cpu", compile="on", compile_backend="inductor")
    assert compiled.doc["env"]["speed"]["compile_backend"] == "inductor"
    assert compiled.doc["env"]["speed"]["compiled_graphs"] >= 1
    assert [a["accuracy"] for a in compiled.doc["attacks"]] == [a["accuracy"] for a in plain.doc["attacks"]]
    assert compiled.doc["clean"] == plain.doc["clean"]


@pytest.mark.parametrize("suite", ["digits", {"name": "digits-autoattack",
                                               "attacks": [{"attack": "autoattack", "eps": 0.1}]}])
def test_a_compiled_cpu_run_gives_the_same_robust_accuracy(trained_model, test_tensors, suite):
    """--compile on, on a CPU: queries and scoring passes through TorchScript's frozen graph (their logits round
    differently in the last bits), gradient passes eager; on the built-in digits suite and AutoAttack (standard,
    at the digits' eps) the verdicts are the eager run's."""
    data = (test_tensors[0][:100], test_tensors[1][:100])
    plain = robench.evaluate(trained_model, data, suite, device="cpu", compile="off")
    compiled = robench.evaluate(trained_model, data, suite, device="cpu", compile="on")
    speed = compiled.doc["env"]["speed"]
    assert speed["compile_backend"] == "torchscript" and speed["compiled_graphs"] == 1
    assert compiled.doc["clean"] == plain.doc["clean"]
    assert [a["accuracy"] for a in compiled.doc["attacks"]] == [a["accuracy"] for a in plain.doc["attacks"]]


class BatchSizeAsANumber(torch.nn.Module):
    """Reads the batch size as a Python number: a trace keeps the first batch's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + torch.zeros(int(x.shape[0]), 1)


class BranchOnTheInput(torch.nn.Module):
    """Takes a branch on the input's values: a trace keeps the first batch's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) if x.mean() > 0.5 else -self.model(x)


def test_a_model_whose_trace_answers_otherwise_runs_eagerly(trained_model, test_tensors):
    """The tracer's warnings (a tensor read as a number or a truth value) or a graph answering otherwise:
    the run stays eager, with the same samples, and says why."""
    from robench.evaluation.speed import FrozenQueries

    model = BranchOnTheInput(trained_model).eval()
    branching = FrozenQueries(model, model)
    with torch.no_grad():
        branching(test_tensors[0][:8])
    assert branching.frozen is None and branching.failure.startswith("ValueError: the model does not trace (")

    model = BatchSizeAsANumber(trained_model).eval()
    suite = {"name": "q", "attacks": [{"attack": "square", "eps": 0.1, "queries": 30}]}
    data = (test_tensors[0][:40], test_tensors[1][:40])
    plain = robench.evaluate(model, data, suite, device="cpu", compile="off")
    compiled = robench.evaluate(model, data, suite, device="cpu", compile="on")
    speed = compiled.doc["env"]["speed"]
    assert speed["compiled_graphs"] == 0 and "torchscript: eager after all (" in speed["compile_decision"]
    assert compiled.samples.equals(plain.samples)
    forward = FrozenQueries(trained_model, trained_model)
    with torch.no_grad():
        logits = forward(data[0])
    assert forward.frozen is not None and forward.failure is None
    assert torch.equal(logits.argmax(1), trained_model(data[0]).argmax(1))
    x = data[0].clone().requires_grad_(True)
    assert torch.equal(forward(x), trained_model(x))  # a pass with an input gradient: the eager forward


class NestedPooling(torch.nn.Module):
    """A ResNet stem's pooling (3x3, stride 2, padding 1) inside a block, one with ceil_mode, and a layer
    that returns indices (left to PyTorch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.stem = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(3, stride=2, padding=1))
        self.ceil = torch.nn.MaxPool2d((3, 3), (2, 2), 0, 1, ceil_mode=True)
        self.indices = torch.nn.MaxPool2d(2, return_indices=True)
        self.head = torch.nn.Linear(8 * 4 * 4 + 8 * 4 * 4, 10)

    def forward(self, x):
        h = self.conv(x)
        a, c = self.stem(h), self.ceil(torch.relu(h))[..., :4, :4]
        b, _ = self.indices(torch.relu(h))
        return self.head(torch.cat([a.flatten(1) + c.flatten(1), b.flatten(1)], 1))


def test_cpu_max_pooling_is_bit_identical(trained_model, test_tensors, monkeypatch):
    """Max-pooling through the NHWC kernel: the same logits and input gradients, bit for bit, on digits
    moved to random corners of an eps-ball (ReLU zeros tie inside the windows), and the route is taken;
    the caller's model keeps its own layers."""
    from robench.evaluation import pooling

    routed = []
    original = pooling.nhwc_max_pool
    monkeypatch.setattr(pooling, "nhwc_max_pool", lambda *a: routed.append(1) or original(*a))
    x, y = test_tensors
    x = (x[:200] + torch.where(torch.rand_like(x[:200]) < 0.5, -0.1, 0.1)).clamp(0, 1)
    torch.manual_seed(0)
    for model in (trained_model, NestedPooling().eval()):
        layers = list(model.modules())
        routed.clear()
        fast = pooling.cpu_max_pooling(model)
        assert fast is not model and list(model.modules()) == layers
        assert {id(p) for p in fast.parameters()} == {id(p) for p in model.parameters()}
        with torch.no_grad():
            assert torch.equal(fast(x), model(x))
        grads = []
        for forward in (model, fast):
            xg = x.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(F.cross_entropy(forward(xg), y[:200]), xg)[0])
        assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
        assert len(routed) == 2 * (1 if model is trained_model else 2)  # the layer with indices is not routed


def test_a_pooling_layer_with_hooks_runs_as_itself(trained_model, test_tensors):
    """BPDA and the attack check hook named layers: a hooked pooling layer keeps firing its hooks."""
    from robench.evaluation import pooling

    fast = pooling.cpu_max_pooling(trained_model)
    seen = []
    pool = next(m for m in trained_model.modules() if isinstance(m, torch.nn.MaxPool2d))
    handle = pool.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            assert torch.equal(fast(test_tensors[0][:4]), trained_model(test_tensors[0][:4]))
    finally:
        handle.remove()
    assert len(seen) == 2


def test_speed_switches_leave_the_callers_model_as_it_was(trained_model, test_tensors):
    """The API never changes its arguments: --channels-last used to convert the model's weights in place."""
    before = {name: (p.stride(), p.clone()) for name, p in trained_model.state_dict().items()}
    robench.evaluate(trained_model, (test_tensors[0][:16], test_tensors[1][:16]), SUITE, device="cpu",
                     compile="off", channels_last=True)
    after = trained_model.state_dict()
    assert all(after[name].stride() == stride and torch.equal(after[name], value)
               for name, (stride, value) in before.items())
