"""BPDA, Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner 2018, Section 4.1).

A defence with a non-differentiable part (JPEG compression, bit-depth reduction) gives gradient
attacks a zero or missing gradient, so their accuracies are only upper bounds. BPDA keeps the forward
pass exactly as it is and, on the way back, differentiates through an approximation of that part:
the identity (the part is close to it on its own input) or a function the user gives.

During an entry's attack calls a forward hook on each named module returns the module's own output,
value for value, attached to the approximation's graph: the gradient reaching the output goes to
``approx(input)`` instead of through the module. Nothing changes while gradients are off (clean
passes, scoring), and the hooks are removed when the call ends, however it ends.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from robench.errors import RobenchError, RunError, UsageError, describe
from robench.evaluation.entries import Entry
from robench.suites import Suite
from robench.suites.schema import BpdaSpec

SHOWN_MODULES = 8  # module names an unknown-name message lists


class _Substitute(torch.autograd.Function):
    """Forward: the module's output, untouched. Backward: the output's gradient, handed to the approximation."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
        ctx.dtype = approximation.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad.to(ctx.dtype)


def substitute_gradient(output: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """``output``'s values (bit for bit) with ``approximation``'s gradient: the two must have one shape."""
    return _Substitute.apply(output.detach(), approximation)


@dataclass(frozen=True)
class _Site:
    name: str
    module: nn.Module
    approx: Callable[..., Any] | None  # None: the identity


class BpdaHooks:
    """One entry's BPDA: the modules it names, resolved in the model, and their approximations."""

    def __init__(self, label: str, specs: list[BpdaSpec], model: nn.Module) -> None:
        self.label = label
        self.written = [spec.model_dump(mode="json") for spec in specs]
        modules = dict(model.named_modules())
        self._sites = [_Site(spec.module, _find_module(modules, spec.module, label), spec.function())
                       for spec in specs]

    @property
    def key(self) -> tuple:
        """Equal for entries with the same modules and approximations."""
        return tuple((site.name, None if site.approx is None else id(site.approx)) for site in self._sites)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The hooks on for the duration; removed after, also on an error or Ctrl-C."""
        with contextlib.ExitStack() as stack:
            for site in self._sites:
                stack.callback(site.module.register_forward_hook(self._hook(site)).remove)
            yield

    def _hook(self, site: _Site) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None  # no gradient will be asked for: the output as it is
            inputs = args[0] if args else None
            if not isinstance(output, torch.Tensor) or not isinstance(inputs, torch.Tensor):
                raise UsageError(f"{self.label}: bpda: module {site.name!r} must take and return one tensor, got "
                                 f"{type(inputs).__name__} -> {type(output).__name__}")
            approximation = inputs if site.approx is None else self._approximate(site, inputs)
            self._check_shape(site, inputs, output, approximation)
            return substitute_gradient(output, approximation)

        return hook

    def _approximate(self, site: _Site, inputs: torch.Tensor) -> Any:
        assert site.approx is not None  # called for user approximations only
        try:
            return site.approx(inputs)
        except RobenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's own error, reported as one line
            raise RunError(f"{self.label}: bpda: the approximation of {site.name!r} failed: {describe(exc)}") from exc

    def _check_shape(self, site: _Site, inputs: torch.Tensor, output: torch.Tensor, approximation: Any) -> None:
        if site.approx is None and inputs.shape != output.shape:
            raise UsageError(f"{self.label}: bpda: module {site.name!r} maps shape {tuple(inputs.shape)} to "
                             f"{tuple(output.shape)}, so the identity cannot stand in for it; give an approximation "
                             f"with its output's shape ({{module: {site.name}, approx: file.py:function}})")
        if not isinstance(approximation, torch.Tensor) or approximation.shape != output.shape:
            found = tuple(approximation.shape) if isinstance(approximation, torch.Tensor) else type(approximation)
            raise UsageError(f"{self.label}: bpda: the approximation of {site.name!r} returned {found}; the module "
                             f"returns shape {tuple(output.shape)}")


def _find_module(modules: dict[str, nn.Module], name: str, label: str) -> nn.Module:
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(n) for n in close) + "?"
    elif names:
        more = f" (and {len(names) - SHOWN_MODULES} more)" if len(names) > SHOWN_MODULES else ""
        hint = "its modules include " + ", ".join(names[:SHOWN_MODULES]) + more
    else:
        hint = "it has no submodules"
    raise UsageError(f"{label}: bpda: the model has no module {name!r}; {hint}")


def entry_hooks(suite: Suite, entries: list[Entry], model: nn.Module) -> dict[int, BpdaHooks]:
    """Each BPDA entry's hooks, by entry index, resolved in ``model`` (the user's module, inside the
    normalising wrapper): an unknown name is a ``UsageError`` before anything runs. The entries of one
    suite line (its eps values) share one ``BpdaHooks``."""
    by_line = {id(spec): BpdaHooks(f"suite {suite.name} attacks[{i}] ({spec.display_name()})", spec.bpda, model)
               for i, spec in enumerate(suite.attacks) if spec.bpda}
    return {entry.index: by_line[id(entry.spec)] for entry in entries if id(entry.spec) in by_line}


def distinct_settings(hooks: dict[int, BpdaHooks]) -> list[BpdaHooks]:
    """One of each BPDA setting, in entry order (suite lines that name the same modules and
    approximations count once)."""
    seen: dict[tuple, BpdaHooks] = {}
    for index in sorted(hooks):
        seen.setdefault(hooks[index].key, hooks[index])
    return list(seen.values())


def every_gradient_entry_uses_bpda(entries: list[Entry], hooks: dict[int, BpdaHooks]) -> bool:
    """Whether the run's gradient attacks all differentiate through BPDA (then its gradient checks should too)."""
    gradient = [e for e in entries if e.attack.family == "gradient" or e.index in hooks]
    return bool(gradient) and all(e.index in hooks for e in gradient)


def hooks_during(hooks: dict[int, BpdaHooks], entry: Entry) -> contextlib.AbstractContextManager[None]:
    """The entry's hooks installed, or nothing to do."""
    found = hooks.get(entry.index)
    return found.installed() if found is not None else contextlib.nullcontext()
