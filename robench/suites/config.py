"""``SuiteConfig``: which suite a run uses and the command line's overrides of it, validated once."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from robench.attacks.registry import load_plugins
from robench.errors import UsageError
from robench.expressions import eval_expr
from robench.suites.loader import LoadedSuite, load_suite, parse_suite, with_overrides
from robench.suites.schema import MAX_BPDA_MODULES, Suite
from robench.validated import Options

MAX_EPS_VALUES = 64
OVERRIDE_NORMS = ("linf", "l2")  # what --norm may replace a suite's norms with


class SuiteConfig(Options):
    """``source`` is a suite name or YAML path, a ``Suite``, a ``LoadedSuite`` or a dict in the YAML layout.

    ``eps`` replaces the eps of every entry that has one (expressions, as written), ``norm`` those
    entries' norm; ``bpda`` names the modules every gradient entry differentiates through (BPDA with
    the identity); ``plugins`` are modules that register attacks, imported before the suite is read.
    """

    source: Any = "pgd-linf"
    eps: tuple[str, ...] | None = None
    norm: str | None = None
    bpda: tuple[str, ...] | None = None
    trust_code: bool = False
    plugins: tuple[str, ...] = ()

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: Any) -> tuple[str, ...] | None:
        return None if value is None else parse_eps_override(value)

    @field_validator("norm")
    @classmethod
    def _norm(cls, value: str | None) -> str | None:
        if value is not None and value not in OVERRIDE_NORMS:
            raise UsageError(f"--norm must be one of {', '.join(OVERRIDE_NORMS)}, got {value!r}")
        return value

    @field_validator("bpda", mode="before")
    @classmethod
    def _bpda(cls, value: Any) -> tuple[str, ...] | None:
        return None if value is None else parse_bpda_override(value)

    def load(self) -> LoadedSuite:
        """The suite with the overrides applied; the plugins are imported first."""
        load_plugins(self.plugins)
        suite = as_suite(self.source, trust_code=self.trust_code, plugins=self.plugins)
        return with_overrides(suite, eps=self.eps, norm=self.norm, bpda=self.bpda)


def parse_bpda_override(value: Any) -> tuple[str, ...]:
    """``--bpda``: module names (as ``model.named_modules()`` gives them), a list or comma-separated."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise UsageError(f"--bpda takes module names, a list or comma-separated (transform,model.0), got {value!r}")
    names = tuple(item.strip() for item in items)
    if not names or not all(names):
        raise UsageError(f"--bpda needs module names, comma-separated without empty ones, got {value!r}")
    if len(names) > MAX_BPDA_MODULES:
        raise UsageError(f"--bpda takes at most {MAX_BPDA_MODULES} module names, got {len(names)}")
    return names


def parse_eps_override(value: Any) -> tuple[str, ...]:
    """``--eps``: a number, an expression (``8/255``) or several, as a list or comma-separated.

    The written text is kept (tables show ``4/255``); each value must be a finite number >= 0.
    """
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else value
    if not isinstance(items, (list, tuple)):
        raise UsageError(f"--eps takes a number, an expression such as 8/255, or a list of them, got {value!r}")
    if len(items) > MAX_EPS_VALUES:
        # Every value re-runs each attack of the suite: thousands of them is a typo, not a sweep.
        raise UsageError(f"--eps takes at most {MAX_EPS_VALUES} values, got {len(items)}; "
                         "split the sweep into several runs")
    texts = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
        try:
            number = eval_expr(item)
        except UsageError as exc:
            raise UsageError(f"--eps: {exc}") from None
        if number < 0:
            raise UsageError(f"--eps values must be >= 0, got {item}")
        texts.append(str(item))
    if not texts:
        raise UsageError("--eps needs at least one value")
    return tuple(texts)


def as_suite(suite: str | Suite | LoadedSuite | dict, *, trust_code: bool = False,
             plugins: tuple[str, ...] = ()) -> LoadedSuite:
    """A suite name or path, a Suite, a LoadedSuite or a dict in the YAML layout (never changed).

    ``plugins`` are the modules the caller allows a suite's ``plugins:`` to import.
    """
    import yaml

    if isinstance(suite, LoadedSuite):
        return suite
    if isinstance(suite, Suite):
        text, source = yaml.safe_dump(suite.model_dump(mode="json", exclude_none=True)), f"<{suite.name}>"
        return parse_suite(text, source, trust_code=trust_code, plugins=plugins)
    if isinstance(suite, dict):
        return parse_suite(yaml.safe_dump(suite), "<dict>", trust_code=trust_code, plugins=plugins)
    return load_suite(suite, trust_code=trust_code, plugins=plugins)
