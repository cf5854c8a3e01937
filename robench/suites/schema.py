"""The suite schema: what a YAML suite may say, validated with pydantic."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, Literal, cast

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SerializerFunctionWrapHandler, ValidationError,
                      field_validator, model_serializer, model_validator)

from robench.expressions import eval_expr
from robench.errors import UsageError

if TYPE_CHECKING:  # the attacks are imported when a suite is validated, not with this module
    from robench.attacks import Attack, AttackParams

Number = float | int | str

# Fields of gradient attacks on re-identification models: what the loss is and which model it runs on.
REID_FIELDS = ("objective", "margin", "exclude_self", "dmr_compat", "ids_per_batch", "source")
LINF_MAX_EPS = 1.0  # pixel units: a larger L-inf radius allows any image at all


def _to_number(value: Any, names: dict[str, float] | None = None) -> float:
    try:
        return eval_expr(value, names)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


# Families whose attacks take the model's input gradient, the only thing BPDA changes.
BPDA_FAMILIES = ("gradient", "external")
MAX_BPDA_MODULES = 64


def approx_target(text: str) -> tuple[str, str]:
    """(module, function) of a BPDA approximation written ``file.py:function`` (a file in the working
    folder, imported as a plugin is) or ``package.module:function``."""
    source, _, name = text.partition(":")
    module = source.removesuffix(".py")
    if not name.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"{text!r} is not file.py:function (a file in the working folder) or "
                         "package.module:function")
    return module, name


def approx_function(text: str) -> Callable[..., Any]:
    """The approximation ``text`` names, from its module (imported, with the user's leave, by the suite
    loader or ``--plugin`` before the suite is validated)."""
    module, name = approx_target(text)
    if module not in sys.modules:
        raise ValueError(f"importing {module} runs its code; pass --plugin {module} (or --trust-suite) "
                         "to allow it")
    function = getattr(sys.modules[module], name, None)
    if not callable(function):
        raise ValueError(f"{module} has no function {name!r}")
    return function


class BpdaSpec(BaseModel):
    """One module of an entry's ``bpda:`` list: its name in the model (as ``named_modules()`` gives it) and
    the function whose gradient stands in for its own (``None``: the identity, the gradient passed through).

    Written as a plain name for the identity, or ``{module: NAME, approx: "file.py:function"}``.
    """

    model_config = ConfigDict(extra="forbid")

    module: str = Field(min_length=1)
    approx: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"module": data} if isinstance(data, str) else data

    @field_validator("approx")
    @classmethod
    def _approx_loaded(cls, text: str | None) -> str | None:
        if text is not None:
            approx_function(text)
        return text

    @model_serializer
    def _as_written(self) -> str | dict[str, str]:
        return self.module if self.approx is None else {"module": self.module, "approx": self.approx}

    def function(self) -> Callable[..., Any] | None:
        """The approximation; ``None`` for the identity."""
        if self.approx is None:
            return None
        try:
            return approx_function(self.approx)
        except ValueError as exc:  # its module was dropped since the suite was validated
            raise UsageError(f"bpda: {self.module}: approx: {exc}") from None


class AttackSpec(BaseModel):
    """One attack entry; each eps in ``eps`` (or each value of the attack's sweep) gives one result.

    Besides the fields below, an entry's fields are the attack's parameters, validated
    against the attack class's ``Params`` model (``settings`` holds the result).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    attack: str
    label: str | None = None
    norm: str = "linf"
    eps: list[float] = Field(default_factory=list)
    eps_text: list[str] = Field(default_factory=list, exclude=True)
    final_iterate: bool = False
    params: dict[str, Any] = Field(default_factory=dict)  # an external attack's own arguments (ta.*)
    # re-identification: what the attack optimises and on which model
    objective: Literal["away", "odfa", "misrank"] | None = None
    margin: float | None = Field(default=None, ge=0)
    exclude_self: bool | None = None
    dmr_compat: bool | None = None
    ids_per_batch: int | None = Field(default=None, ge=2, le=10_000)
    source: Literal["target", "surrogate"] | None = None
    # BPDA: modules whose gradient is replaced by an approximation's during this entry's attacks
    bpda: list[BpdaSpec] | None = None
    _settings: AttackParams | None = PrivateAttr(default=None)  # set by _fields_fit_attack

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
        if name not in ATTACKS:
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

    @field_validator("bpda")
    @classmethod
    def _bpda_modules(cls, specs: list[BpdaSpec] | None) -> list[BpdaSpec] | None:
        if specs is None:
            return None
        names = [spec.module for spec in specs]
        if not 1 <= len(names) <= MAX_BPDA_MODULES:
            raise ValueError(f"name 1 to {MAX_BPDA_MODULES} modules, got {len(names)}")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"module {twice[0]!r} is named twice")
        return specs

    @model_serializer(mode="wrap")
    def _without_unset_bpda(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Suites without BPDA dump (and hash) as they did before the field existed.
        data = handler(self)
        if self.bpda is None:
            data.pop("bpda", None)
        return data

    @model_validator(mode="after")
    def _fields_fit_attack(self) -> "AttackSpec":
        attack = self.attack_class
        settings = self._settings = self._validated_settings(attack)
        # The dump (and the suite's hash) holds the validated values, e.g. area: 4 as [4, 4].
        given = settings.model_dump(exclude_unset=True)
        given.pop("params", None)
        self.__pydantic_extra__ = given
        if attack.family != "gradient":
            for name in REID_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: {self.attack} does not take this field")
        if self.bpda is not None and attack.family not in BPDA_FAMILIES:
            raise ValueError(f"bpda: {self.attack} takes no gradients ({attack.family} attack); BPDA applies to "
                             "gradient attacks")
        self._check_budget(attack)
        return self

    def _validated_settings(self, attack: type[Attack]) -> AttackParams:
        from robench.registry import did_you_mean

        given = dict(self.model_extra or {})
        if "params" in attack.Params.model_fields:
            if given:
                raise ValueError(f"{self.attack}: put {', '.join(sorted(given))} under params:")
            given = {"params": self.params}
        elif self.params:
            raise ValueError(f"params: only ta.* attacks take params; {self.attack}'s parameters are fields of "
                             "the entry")
        try:
            return attack.Params.model_validate(given)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(entry)"
            if err["type"] == "extra_forbidden":
                hint = did_you_mean(field, list(attack.Params.model_fields)) if attack.Params.model_fields else ""
                raise ValueError(f"{field}: {self.attack} does not take this field{hint}") from None
            if err["type"] == "missing":
                raise ValueError(f"{field}: {self.attack} needs this field") from None
            raise ValueError(f"{field}: {err['msg'].removeprefix('Value error, ')}") from None

    def _check_budget(self, attack: type[Attack]) -> None:
        if attack.eps_budget == "none":
            if self.eps:
                raise ValueError(f"eps: {self.attack} has no eps budget (its budget is in {attack.norms[0]})")
            return
        if attack.eps_budget == "required" and not self.eps:
            raise ValueError("eps: at least one value is needed")
        if attack.minimum_norm and not self.eps:
            raise ValueError(f"eps: {self.attack} finds minimal perturbations; list the eps at which to read the "
                             "robust accuracy from them (at least one)")
        if self.norm not in attack.norms:
            raise ValueError(f"norm: {self.attack} supports {' or '.join(attack.norms)}, not {self.norm!r}")
        if self.norm == "linf":
            for v in self.eps:
                if v > LINF_MAX_EPS:
                    raise ValueError(f"eps {v:g} is absurd for linf in [0,1] pixel units (max {LINF_MAX_EPS:g})")
        for eps in self.eps:
            # e.g. a step size evaluated at every real (eps, steps): a typo must not run as a negative step
            attack.check_at(self.settings, eps)

    @property
    def attack_class(self) -> type[Attack]:
        from robench.attacks import ATTACKS

        try:
            return ATTACKS.get(self.attack)
        except UsageError as exc:
            raise ValueError(str(exc)) from None

    @property
    def settings(self) -> AttackParams:
        """The attack's parameters, validated by its ``Params`` model."""
        # Set by validation, which every entry passes (None only in an unvalidated model_construct copy).
        return cast("AttackParams", self._settings)

    def display_name(self) -> str:
        return self.label or self.attack


# Validation-context key set by the caller (``robench eval --trust-suite``): the suite may import code.
TRUST_CODE = "trust_code"


def _check_suite_arch(arch: str, trusted: bool) -> None:
    """Suites are shared files: by default they may only name architectures that import nothing."""
    from robench.models.architectures import ARCHITECTURES, check_torchvision_arch, known_architectures

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
    # Modules that register attacks, imported before the entries are validated (see the loader).
    plugins: list[str] = Field(default_factory=list, exclude=True)
    attacks: list[AttackSpec]

    @model_validator(mode="after")
    def _normalized_linf_only(self) -> "Suite":
        if self.eps_space == "normalized":
            for i, a in enumerate(self.attacks):
                if a.norm != "linf":
                    raise ValueError(f"attacks[{i}]: eps_space normalized is only defined for linf")
        return self
