"""The suite schema: what a YAML suite may say, validated with pydantic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from robench.expressions import check_expr, eval_expr
from robench.errors import UsageError

Number = float | int | str

# Which optional fields each native attack understands, and its default step size.
# Fields of gradient attacks on re-identification models (feature-space objectives).
REID_FIELDS = {"objective", "margin", "exclude_self", "dmr_compat", "ids_per_batch", "source"}
NATIVE_FIELDS: dict[str, set[str]] = {
    "fgsm": set() | REID_FIELDS,
    "bim": {"steps", "step_size"} | REID_FIELDS,
    "pgd": {"steps", "step_size", "random_start", "restarts"} | REID_FIELDS,
    "mifgsm": {"steps", "step_size", "decay"} | REID_FIELDS,
    "pixels": {"pixels", "delta", "area", "trials", "shared_positions", "channels"},
    "dmr": {"generator"},
}
DEFAULT_STEP_SIZE = {"bim": "eps/steps", "pgd": "2.5*eps/steps", "mifgsm": "eps/steps"}
OPTIONAL_FIELDS = {"steps", "step_size", "random_start", "restarts", "decay",
                   "pixels", "delta", "area", "trials", "shared_positions", "channels", "generator"} | REID_FIELDS
BUDGET_FREE = {"pixels"}  # attacks whose size is not an eps (one result per pixel count)
DEFAULT_PIXELS = [4, 8, 16, 32, 64]
MAX_TRIALS = 10_000  # random draws per pixel count (suites and `robench pixel-index --trials`)
LINF_MAX_EPS = 1.0  # pixel units: a larger L-inf radius allows any image at all


def _to_number(value: Any, names: dict[str, float] | None = None) -> float:
    try:
        return eval_expr(value, names)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


class AttackSpec(BaseModel):
    """One attack entry; each eps in ``eps`` gives one result."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    attack: str
    label: str | None = None
    norm: Literal["linf", "l2"] = "linf"
    eps: list[float] = Field(default_factory=list)
    eps_text: list[str] = Field(default_factory=list, exclude=True)
    steps: int | None = Field(default=None, ge=1, le=100_000)
    step_size: str | None = None
    random_start: bool | float | None = None
    restarts: int | None = Field(default=None, ge=1, le=1000)
    decay: float | None = Field(default=None, ge=0)
    final_iterate: bool = False
    params: dict[str, Any] = Field(default_factory=dict)
    # random few-pixel changes (attack: pixels)
    pixels: list[int] | None = None
    delta: int | None = Field(default=None, ge=0, le=255)
    area: list[int] | None = None
    trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS)
    shared_positions: bool | None = None
    channels: Literal["all", "first"] | None = None
    # re-identification: what the attack optimises and on which model
    objective: Literal["away", "odfa", "misrank"] | None = None
    margin: float | None = Field(default=None, ge=0)
    exclude_self: bool | None = None
    dmr_compat: bool | None = None
    ids_per_batch: int | None = Field(default=None, ge=2, le=10_000)
    source: Literal["target", "surrogate"] | None = None
    generator: str | None = None  # attack: dmr, a file written by `robench dmr train`

    @field_validator("pixels", mode="before")
    @classmethod
    def _pixel_counts(cls, raw: Any) -> Any:
        raw = raw if isinstance(raw, list) else [raw]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in raw):
            raise ValueError("pixel counts must be positive integers")
        return raw

    @field_validator("area", mode="before")
    @classmethod
    def _area(cls, raw: Any) -> Any:
        if raw is None:
            return raw
        raw = [raw, raw] if isinstance(raw, int) else raw
        if not isinstance(raw, list) or len(raw) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in raw
        ):
            raise ValueError("area is a side length or [rows, cols] of positive integers")
        return raw

    @model_validator(mode="before")
    @classmethod
    def _keep_eps_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and "eps" in data:
            raw = data["eps"]
            raw = raw if isinstance(raw, list) else [raw]
            data = {**data, "eps": raw, "eps_text": [str(r) for r in raw]}
        return data

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        from robench.attacks import ATTACKS
        from robench.registry import did_you_mean

        if name.startswith("ta."):
            return name
        if name.lower() not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}" + did_you_mean(name, ATTACKS.names() + ["ta.<Name>"]))
        return name.lower()

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_numbers(cls, raw: Any) -> list[float]:
        values = [_to_number(v) for v in raw]
        for v in values:
            if v < 0:
                raise ValueError(f"must be >= 0, got {v:g}")
        return values

    @field_validator("step_size", mode="before")
    @classmethod
    def _step_text(cls, raw: Any) -> str | None:
        if raw is None:
            return None
        try:
            # Syntax only: the value is checked at every real (eps, steps) once both are known.
            check_expr(raw, {"eps", "steps"})
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return str(raw)

    @field_validator("random_start", mode="before")
    @classmethod
    def _random_start(cls, raw: Any) -> Any:
        if raw is None or isinstance(raw, bool):
            return raw
        value = _to_number(raw)
        if value < 0:
            raise ValueError("must be true, false or a radius >= 0")
        return value

    @model_validator(mode="after")
    def _fields_fit_attack(self) -> "AttackSpec":
        if self.attack.startswith("ta."):
            extra = sorted(f for f in OPTIONAL_FIELDS if getattr(self, f) is not None)
            if extra:
                raise ValueError(f"{self.attack}: put {', '.join(extra)} under params:")
            return self
        if self.attack in BUDGET_FREE:
            if self.eps:
                raise ValueError(f"eps: {self.attack} has no eps budget (it changes whole pixels)")
        elif self.attack == "dmr":
            if not self.generator:
                raise ValueError("generator: dmr needs the file written by `robench dmr train`")
        elif not self.eps:
            raise ValueError("eps: at least one value is needed")
        allowed = NATIVE_FIELDS[self.attack]
        for name in sorted(OPTIONAL_FIELDS - allowed):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: {self.attack} does not take this field")
        if self.params:
            raise ValueError("params: only ta.* attacks take params")
        if self.norm == "linf":
            for v in self.eps:
                if v > LINF_MAX_EPS:
                    raise ValueError(f"eps {v:g} is absurd for linf in [0,1] pixel units (max {LINF_MAX_EPS:g})")
        self._check_step_sizes()
        return self

    def _check_step_sizes(self) -> None:
        """Evaluate the step size at every eps of the entry: a typo must not run as a negative step."""
        if self.attack not in DEFAULT_STEP_SIZE or self.step_size is None:
            return  # the defaults are positive multiples of eps
        steps = self.resolved_steps()
        for eps in self.eps:
            try:
                value = self.step_size_for(eps)
            except UsageError as exc:
                raise ValueError(f"step_size: {exc} at eps {eps:g}, steps {steps}") from None
            # At eps 0 nothing may move, so a zero step is right there; anywhere else it hides the attack.
            if value < 0 or (value == 0 and eps > 0):
                raise ValueError(f"step_size: {self.step_size!r} is {value:g} at eps {eps:g}, steps {steps}; "
                                 "it must be > 0")

    def pixel_counts(self) -> list[int]:
        return self.pixels or list(DEFAULT_PIXELS)

    def display_name(self) -> str:
        return self.label or self.attack

    def resolved_steps(self) -> int:
        return 1 if self.attack == "fgsm" else (self.steps or 10)

    def step_size_for(self, eps: float) -> float:
        text = self.step_size or DEFAULT_STEP_SIZE.get(self.attack, "eps")
        return eval_expr(text, {"eps": eps, "steps": float(self.resolved_steps())})


# Validation-context key set by the caller (``robench eval --trust-suite``): the suite may import code.
TRUST_CODE = "trust_code"


def _check_suite_arch(arch: str, trusted: bool) -> None:
    """Suites are shared files: by default they may only name architectures that import nothing."""
    from robench.models.loading import ARCHITECTURES, check_torchvision_arch, known_architectures

    if arch in ARCHITECTURES:
        return
    if arch.startswith("torchvision:"):
        try:
            check_torchvision_arch(arch.split(":", 1)[1])
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return
    if ":" not in arch:
        raise ValueError(f"{arch!r} is not an architecture; name torchvision:NAME or a registered "
                         f"architecture (known: {', '.join(known_architectures())})")
    if not trusted:
        # Refused while validating, before anything could be imported: `os:abort` is a valid module:factory.
        raise ValueError(f"{arch!r} imports Python code; suites may name torchvision:NAME or a registered "
                         f"architecture (known: {', '.join(known_architectures())}); pass --trust-suite to "
                         "allow module:factory")


class SurrogateSpec(BaseModel):
    """The model a transfer attack is computed on (same loading options as the target).

    ``arch: module:factory`` is accepted only when validated with context ``{"trust_code": True}``.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    arch: str | None = None
    num_classes: int | None = None
    normalize: str | None = None
    feature_layer: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data

    @field_validator("arch")
    @classmethod
    def _arch_imports_nothing_unless_trusted(cls, arch: str | None, info: Any) -> str | None:
        if arch is not None:
            _check_suite_arch(arch, trusted=bool((info.context or {}).get(TRUST_CODE)))
        return arch


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    dataset: str | None = None
    normalize: str | None = None
    eps_space: Literal["pixel", "normalized"] = "pixel"
    reference: str | None = None
    notes: str | None = None
    task: Literal["classification", "reid"] | None = None
    surrogate: "SurrogateSpec | None" = None
    attacks: list[AttackSpec]

    @model_validator(mode="after")
    def _normalized_linf_only(self) -> "Suite":
        if self.eps_space == "normalized":
            for i, a in enumerate(self.attacks):
                if a.norm != "linf":
                    raise ValueError(f"attacks[{i}]: eps_space normalized is only defined for linf")
        return self
