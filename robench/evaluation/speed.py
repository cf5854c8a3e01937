"""Switchable speed-ups of the forward pass: compiled passes and channels_last.

Each is off unless asked for (``--compile on``, ``--channels-last``) except
``--compile auto`` (the default), which compiles when the run's estimated work
pays for it: on a GPU (``torch.compile``, about 20 s for a ResNet-50) at least
``AUTO_COMPILE_MIN_WORK`` image forward+backward passes; on a CPU, queries whose
eager time, at a measured forward, reaches :func:`auto_cpu_threshold`;
``env.speed.compile_decision`` says what auto decided and why. On a GPU the model
is compiled with dynamic shapes, so the shrinking batches of early stopping do not
trigger a compilation per size; the number of graphs compiled during the run is
recorded in the results (1 means nothing was recompiled). On a model held on the
CPU only the passes without an input gradient (queries, scoring) run compiled:
through TorchScript's frozen graph by default (:class:`FrozenQueries`), through
``torch.compile`` with another ``compile_backend`` (:class:`CompiledQueries`). The
eager passes of a model with max-pooling layers pool through PyTorch's
channels-last kernel, which gives the same numbers faster
(:mod:`robench.evaluation.pooling`); that one is always on.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from robench.errors import RunError, UsageError
from robench.evaluation.pooling import cpu_max_pooling
from robench.suites import Suite

Forward = Callable[[torch.Tensor], torch.Tensor]  # a model's forward pass, possibly compiled
COMPILE_MODES = ("off", "on", "auto")
AUTO_COMPILE_MIN_WORK = 200_000
# On a CPU, inductor's dynamic-shape forward of the digits CNN compiled (cold cache) in 14 s and ran a
# batch of 150 perturbed digits in 1.81 ms against the eager 2.38 ms (max-pooling routed, see pooling.py),
# a batch of 40 in the same time; a ResNet-20's compiled in 21 s and ran 2.7x faster at batch 40, yet the
# whole AutoAttack run on it took 87 s compiled against 59 s eager (bench/bench_autoattack.py). With
# savings that uncertain, auto compiles on a CPU only for runs whose queries would take half an hour.
AUTO_COMPILE_CPU_QUERY_SECONDS = 1800.0
# TorchScript's frozen graph (the CPU's default backend, FrozenQueries) is built in about a second and runs
# queries about 1.4x faster: auto uses it for runs whose queries would take a minute.
AUTO_FREEZE_CPU_QUERY_SECONDS = 60.0
FROZEN_BACKEND = "torchscript"
CPU_PROBE_IMAGES = 16  # images the CPU's auto decision times the eager forward on
COMPILED_MIN_BATCH = 16  # smaller query batches run eagerly on a CPU (see CompiledQueries)


def estimated_work(n_samples: int, suite: Suite) -> int:
    """Forward+backward image passes the suite needs at most (no early stopping), from the attacks' costs."""
    return sum(max(1, cost.gradient) * cells * n_samples for cost, cells in _costs(suite))


def estimated_queries(n_samples: int, suite: Suite) -> int:
    """Forward-only image passes (queries; no input gradient) the suite needs at most."""
    return sum(cost.forward * cells * n_samples for cost, cells in _costs(suite))


def _costs(suite: Suite) -> list[tuple[Any, int]]:
    """Each entry's cost per sample and eps, and its eps cells."""
    costs = []
    for spec in suite.attacks:
        cls = spec.attack_class
        cells = len(getattr(spec.settings, cls.sweep)) if cls.sweep else max(1, len(spec.eps))
        cells = 1 if cls.minimum_norm else cells  # one search, read at every eps
        costs.append((cls.cost(spec.settings), cells))
    return costs


def should_compile(mode: str, device: torch.device, work: int) -> bool:
    """``on``/``off``, or ``auto`` on a GPU; a CPU's ``auto`` is :func:`cpu_auto_decision`'s."""
    if mode not in COMPILE_MODES:
        raise UsageError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto":
        return device.type == "cuda" and work >= AUTO_COMPILE_MIN_WORK
    return mode == "on"


def resolved_backend(backend: str, cpu: bool) -> str:
    """``backend`` as it runs: ``auto`` is TorchScript's frozen graph on a CPU and inductor elsewhere."""
    if backend != "auto":
        return backend
    return FROZEN_BACKEND if cpu else "inductor"


def auto_cpu_threshold(backend: str) -> float:
    """Seconds of eager queries from which ``--compile auto`` compiles on a CPU with ``backend``."""
    frozen = resolved_backend(backend, cpu=True) == FROZEN_BACKEND
    return AUTO_FREEZE_CPU_QUERY_SECONDS if frozen else AUTO_COMPILE_CPU_QUERY_SECONDS


def cpu_auto_decision(queries: int, seconds_per_image: Callable[[], float],
                      threshold: float = AUTO_COMPILE_CPU_QUERY_SECONDS) -> tuple[bool, str]:
    """Whether ``--compile auto`` compiles on a CPU, and why, in words the results keep.

    On a CPU only the query passes run compiled (:class:`CompiledQueries`), so what compiling can save is
    a share of the queries' time: the queries are priced at the eager forward's measured time per image
    (``seconds_per_image`` is called only when there are queries) and compiled when that estimate
    reaches ``threshold`` (:func:`auto_cpu_threshold`)."""
    if queries == 0:
        return False, "auto: eager (no query passes to compile)"
    estimate = queries * seconds_per_image()
    verdict = "compiled" if estimate >= threshold else "eager"
    relation = ">=" if verdict == "compiled" else "<"
    return verdict == "compiled", (f"auto: {verdict} ({queries} query passes x {1e3 * estimate / queries:.3f} ms "
                                   f"measured = {estimate:.0f} s {relation} {threshold:.0f} s)")


def measured_seconds_per_image(forward: Forward, x: torch.Tensor, repeats: int = 3) -> float:
    """The eager forward's fastest time per image on the batch ``x`` (gradients off)."""
    best = float("inf")
    with torch.no_grad():
        forward(x)  # warm-up: lazy initialisation, allocator
        for _ in range(repeats):
            start = time.perf_counter()
            forward(x)
            best = min(best, time.perf_counter() - start)
    return best / len(x)


class ChannelsLast(nn.Module):
    """Feeds the model NHWC-strided tensors (faster convolutions on tensor cores); values unchanged.

    Only the input is converted: a convolution runs NHWC when its input is, and converting the weights
    in place (``model.to(memory_format=...)``) would change the caller's model for every later use.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


@dataclass
class SpeedReport:
    compile: bool = False
    backend: str | None = None
    channels_last: bool = False
    first_call_seconds: float | None = None  # includes the compilation when compiled
    compiled_graphs: int | None = None
    decision: str | None = None  # how --compile auto decided, in words
    _graphs_before: int = field(default=0, repr=False)
    _frozen: FrozenQueries | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"compile": self.compile, "compile_backend": self.backend, "channels_last": self.channels_last,
                "first_call_seconds": self.first_call_seconds, "compiled_graphs": self.compiled_graphs,
                "compile_decision": self.decision}


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _input_gradient(x: torch.Tensor) -> bool:
    """Whether this pass is one of the attacks' gradient passes (those stay eager on a CPU)."""
    return torch.is_grad_enabled() and x.requires_grad


class CompiledQueries(nn.Module):
    """The compiled forward for passes that need no input gradient (queries, scoring); the eager one otherwise.

    On a CPU inductor's forward and input gradient of the bundled digits CNN at batch 150 (one thread) take
    13.4 ms against eager's 7.6 ms, while its forward alone takes 2.1 ms against 4.4 ms: gradient passes stay
    eager there. Queries run without autograd's bookkeeping (the parameters' gradients are never wanted).

    Batches under ``COMPILED_MIN_BATCH`` run eagerly too: inductor compiled a ResNet-20 (CIFAR-shaped) again
    for batches of 2 to 15 and again for 1 (dynamo specialises sizes 0 and 1), about 20 s each with a cold
    cache, inside an AutoAttack run whose Square ended on one point; at batch 1 the compiled forward saved
    a tenth of 3.7 ms.
    """

    def __init__(self, model: nn.Module, compiled: Forward) -> None:
        super().__init__()
        self.model = model
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _input_gradient(x) or len(x) < COMPILED_MIN_BATCH:
            return self.model(x)
        with torch.no_grad():
            return self.compiled(x)


class FrozenQueries(nn.Module):
    """On a CPU, the passes without an input gradient through TorchScript's frozen graph of the model.

    The graph is traced at the first such pass, frozen (weights as constants, batch norms folded into
    their convolutions) and handed to oneDNN's fused kernels (``torch.jit.optimize_for_inference``):
    0.1 s for the digits CNN and 0.9 s for a ResNet-20, where inductor compiles for 10-25 s. Then a
    query of the digits CNN at batch 142 takes 1.57 ms against the eager 2.21 ms (one thread, pooling
    routed), a ResNet-20's at batch 40 43.8 ms against 61.4 ms. Logits round differently in the last
    bits (9.5e-6 at most on perturbed digits). Passes with an input gradient stay eager, as do inputs
    other than float32.

    A model whose trace draws the tracer's warnings (its Python code read a tensor as a number or a truth
    value, so the graph holds one branch or one size), that does not trace, whose graph answers otherwise
    than the eager forward on the first batch or on half of it, or fails later, runs eagerly; ``failure``
    says why. So does every model where TorchScript is gone (recent PyTorch deprecates it).
    """

    def __init__(self, model: nn.Module, source: nn.Module) -> None:
        super().__init__()
        self.model = model  # the eager forward
        self.source = source  # what is traced: the model without the eager passes' pooling route
        self.frozen: Any = None
        self.failure: str | None = None
        self.build_seconds: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _input_gradient(x) or self.failure is not None or x.dtype != torch.float32:
            return self.model(x)
        with torch.no_grad():
            if self.frozen is None:
                self._freeze(x)
                if self.frozen is None:
                    return self.model(x)
            try:
                return self.frozen(x)
            except Exception as exc:  # noqa: BLE001 - the eager forward answers instead, for good
                self.frozen, self.failure = None, _reason(exc)
                return self.model(x)

    def _freeze(self, x: torch.Tensor) -> None:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(self.source, x)))
            # The tracer warns where the model's Python code read a tensor as a number or a truth value: the
            # graph then holds one branch or one size, right for the traced batch only.
            tracer = [w for w in said if issubclass(w.category, torch.jit.TracerWarning)]
            if tracer:
                raise ValueError(f"the model does not trace ({str(tracer[0].message).splitlines()[0]})")
            for batch in (x, x[:max(1, len(x) // 2)]):
                _check_same(self.model(batch), frozen(batch))
        except Exception as exc:  # noqa: BLE001 - any model may refuse to trace: it runs eagerly
            self.failure = _reason(exc)
        else:
            self.frozen = frozen
        self.build_seconds = time.perf_counter() - start


def _check_same(expected: Any, got: Any) -> None:
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape == expected.shape):
        raise ValueError("the traced graph's outputs are not the model's")
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not bool(((got - expected).abs() <= 1e-3 * scale + 1e-5).all()):
        raise ValueError("the traced graph's logits differ from the model's")


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def speed_up(forward: nn.Module, *, compile: bool, backend: str = "auto",
             channels_last: bool = False) -> tuple[Forward, SpeedReport]:
    """The forward pass the run uses. ``backend`` ``auto`` is TorchScript's frozen graph on a CPU
    (:class:`FrozenQueries`) and inductor elsewhere; any other is ``torch.compile``'s."""
    cpu = _cpu_only(forward)
    backend = resolved_backend(backend, cpu)
    report = SpeedReport(compile=compile, backend=backend if compile else None, channels_last=channels_last)
    if channels_last:
        forward = ChannelsLast(forward)
    eager = cpu_max_pooling(forward) if cpu else forward
    if not compile:
        return eager, report
    if backend == FROZEN_BACKEND:
        if not cpu:
            raise UsageError(f"the {FROZEN_BACKEND} backend runs models held on a CPU")
        report._frozen = FrozenQueries(eager, forward)
        return report._frozen, report
    report._graphs_before = _graph_count()
    compiled = torch.compile(forward, dynamic=True, backend=backend)
    return (CompiledQueries(eager, compiled) if cpu else compiled), report


def _cpu_only(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def timed_first_call(forward: Forward, x: torch.Tensor, report: SpeedReport) -> torch.Tensor:
    start = time.perf_counter()
    out = forward(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    report.first_call_seconds = round(time.perf_counter() - start, 4)
    return out


def finish(report: SpeedReport) -> None:
    frozen = report._frozen
    if frozen is not None:
        report.compiled_graphs = int(frozen.frozen is not None)
        if frozen.failure is not None:
            said = f"{report.decision}; " if report.decision else ""
            report.decision = f"{said}{FROZEN_BACKEND}: eager after all ({frozen.failure})"
    elif report.compile:
        report.compiled_graphs = _graph_count() - report._graphs_before


AUTO_BATCH_START = 1024
CPU_BATCH = 256


def auto_batch_size(forward: Forward, sample: torch.Tensor, device: torch.device, start: int = AUTO_BATCH_START) -> int:
    """The largest power-of-two batch (from ``start`` down) whose forward+input-gradient pass fits.

    On a CPU memory is the machine's and a fixed 256 is used. Attacks keep a few
    more tensors per image than this probe; if they run out of memory anyway, the
    engine halves their chunk and retries.
    """
    if device.type != "cuda":
        return CPU_BATCH
    size = start
    while size >= 1:
        try:
            x = sample.expand(size, *sample.shape[1:]).clone().requires_grad_(True)
            with torch.enable_grad():
                loss = forward(x).float().sum()
                torch.autograd.grad(loss, x)
            return size
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size //= 2
    raise RunError("out of memory even for a batch of one image")
