"""Training recipes: what a YAML recipe may say, validated with pydantic, errors at file:line.

A recipe names the data, the architecture, the optimiser and its schedule, and the
defences of the papers robench mirrors (``defenses:``, ``adversarial:``, ``alignment:``),
with each paper's defaults. Built-in recipes live in ``recipes/`` beside the suites.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from robench.errors import UsageError
from robench.expressions import eval_expr
from robench.registry import did_you_mean

MAX_EPOCHS = 10_000
MAX_NAME = 100  # the name is the default output folder's: one path component, well under any file system's limit
NAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _number(raw: Any) -> float:
    try:
        return eval_expr(raw)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


class ModelSpec(_Strict):
    """The network: an architecture name (``robench:lenet``, ``torchvision:resnet18``) and its input."""

    arch: str
    num_classes: int = Field(ge=2, le=1_000_000)
    normalize: str | None = None  # a preset (cifar10, mnist, ...): the checkpoint records it for eval
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @field_validator("arch")
    @classmethod
    def _no_code(cls, arch: str) -> str:
        from robench.models.trained import importable_without_code

        if not importable_without_code(arch):
            from robench.models.architectures import known_architectures

            raise ValueError(f"unknown architecture {arch!r}; a recipe names a registered one or torchvision:NAME"
                             + did_you_mean(arch, known_architectures()))
        return arch

    @model_validator(mode="after")
    def _one_normalisation(self) -> "ModelSpec":
        from robench.models.preprocessing import PRESETS

        if self.normalize is not None and (self.mean or self.std):
            raise ValueError("normalize: give either a preset or mean/std")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean: mean and std go together")
        if self.mean is not None and len(self.mean) != len(self.std or ()):
            raise ValueError("std: as many values as mean")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std: values must be > 0")
        if self.normalize is not None and self.normalize not in PRESETS:
            raise ValueError(f"normalize: unknown preset {self.normalize!r}" + did_you_mean(self.normalize,
                                                                                           PRESETS.names()))
        return self

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | tuple[None, None]:
        from robench.models.preprocessing import PRESETS

        if self.normalize is not None and self.normalize != "none":
            preset = PRESETS.get(self.normalize)
            return tuple(preset.mean), tuple(preset.std)
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        return None, None


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    nesterov: bool = False


class ScheduleSpec(_Strict):
    """cosine (annealed to 0 over the epochs), step (x gamma at each milestone epoch) or constant."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(default=0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _milestones_for_step(self) -> "ScheduleSpec":
        if self.name == "step" and not self.milestones:
            raise ValueError("milestones: a step schedule needs the epochs at which the rate drops")
        if self.name != "step" and self.milestones:
            raise ValueError(f"milestones: only the step schedule takes milestones, not {self.name}")
        if sorted(set(self.milestones)) != self.milestones or any(m < 1 for m in self.milestones):
            raise ValueError("milestones: increasing epoch numbers >= 1")
        return self


# --- defences ------------------------------------------------------------------------------------------------


class LFMSpec(_Strict):
    """Local Feature Masking (LFM paper, Algorithm 1) after module ``after``."""

    kind: Literal["lfm"]
    after: str | None = None  # torchvision ResNets: the stem (see robench.defenses.insertion)
    p: float = Field(default=0.15, ge=0, le=1)
    channels: int = Field(default=32, ge=1, le=65_536)
    area: tuple[float, float] = (0.03, 0.4)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)

    # The layer's own checks, here too: a bad range is then a file:line error, not a crash at set-up.
    @field_validator("area")
    @classmethod
    def _area(cls, area: tuple[float, float]) -> tuple[float, float]:
        from robench.defenses.lfm import check_area

        return check_area(area)

    @field_validator("aspect")
    @classmethod
    def _aspect(cls, aspect: tuple[float, float]) -> tuple[float, float]:
        from robench.defenses.lfm import check_aspect

        return check_aspect(aspect)


class FDDSpec(_Strict):
    """Feature-Density Dropout (FDD paper, Eqs. 1-3): dims 1 on FC features, 2/3 on feature maps."""

    kind: Literal["fdd"]
    after: str | None = None
    dims: Literal[1, 2, 3] = 1
    grids: int | None = Field(default=None, ge=1, le=1000)
    kappa: float = -0.8
    alpha: float = 0.9


class DropoutSpec(_Strict):
    """Plain dropout (the papers' "Original"), or spatial dropout of whole maps (``spatial: true``)."""

    kind: Literal["dropout"]
    after: str
    p: float = Field(default=0.5, ge=0, lt=1)
    spatial: bool = False


class CutoutSpec(_Strict):
    """Cutout (DeVries & Taylor; the LFM paper's input-level comparison): a zeroed square per image."""

    kind: Literal["cutout"]
    size: int = Field(ge=1, le=4096)  # also at most the images' side, checked against the data
    p: float = Field(default=1.0, ge=0, le=1)


class FewPixelSpec(_Strict):
    """Few-pixel augmentation (pixel paper, Algorithm 1): ``pixels`` random pixels per changed image."""

    kind: Literal["few-pixel"]
    pixels: int = Field(ge=1, le=1_000_000)  # also at most the images' pixels, checked against the data
    p: float = Field(default=0.5, ge=0, le=1)  # the share of each batch replaced by its changed copy
    delta: int | None = Field(default=None, ge=1, le=255)
    channels: Literal["all", "first"] = "all"


class GaussianNoiseSpec(_Strict):
    """Gaussian noise augmentation (randomized smoothing, Cohen et al. 2019): N(0, sigma^2) on every pixel of a
    share ``p`` of each batch, in [0, 1] pixel units, not clamped; train at the sigma you certify at."""

    kind: Literal["gaussian-noise"]
    sigma: float = Field(default=0.25, gt=0, le=10)
    p: float = Field(default=1.0, ge=0, le=1)


Defence = Annotated[Union[LFMSpec, FDDSpec, DropoutSpec, CutoutSpec, FewPixelSpec, GaussianNoiseSpec],
                    Field(discriminator="kind")]


class AdversarialSpec(_Strict):
    """FGSM (Goodfellow et al.) or PGD (Madry et al.) adversarial training with robench's own attacks.

    The loss is ``clean_weight * CE(clean) + adversarial_weight * CE(adversarial)``: Madry et al.
    train on adversarial examples only (0, 1); Goodfellow et al. mix both halves (0.5, 0.5);
    the feature-alignment paper's Eq. 8 adds both (1, 1). ``start_epoch`` is its T': epochs of
    clean training first. Step size and eps are in pixel units and may be expressions (``8/255``).
    """

    attack: Literal["fgsm", "pgd"]
    eps: float
    steps: int = Field(default=10, ge=1, le=1000)
    step_size: float | None = None
    random_start: bool | float = True
    clean_weight: float = Field(default=0.0, ge=0)
    adversarial_weight: float = Field(default=1.0, ge=0)
    start_epoch: int = Field(default=0, ge=0)

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _numbers(cls, raw: Any) -> Any:
        return None if raw is None else _number(raw)

    @field_validator("random_start", mode="before")
    @classmethod
    def _start(cls, raw: Any) -> Any:
        from robench.attacks.gradient import random_start_value

        return random_start_value(raw)  # the attacks' own rule: true, false or a radius >= 0

    @model_validator(mode="after")
    def _sensible(self) -> "AdversarialSpec":
        if not 0 < self.eps <= 1:
            raise ValueError("eps: in (0, 1] (pixel units)")
        if self.step_size is not None and not 0 < self.step_size <= 1:
            raise ValueError("step_size: in (0, 1] (pixel units)")
        if not isinstance(self.random_start, bool) and self.random_start > 1:
            raise ValueError("random_start: true, false or a radius in [0, 1] (pixel units)")
        if self.attack == "fgsm" and (self.steps != 10 or self.step_size is not None):
            raise ValueError("steps: FGSM is one step of size eps; steps and step_size are PGD's")
        if self.clean_weight + self.adversarial_weight == 0:
            raise ValueError("adversarial_weight: the two weights cannot both be 0")
        return self


class AlignmentSpec(_Strict):
    """Hierarchical feature alignment (feature-alignment paper, Eq. 8) on the named layers' outputs."""

    layers: list[str] = Field(min_length=1)
    lam: float = Field(default=1.0, ge=0)
    sinkhorn_eps: float = Field(default=0.1, gt=0)
    sinkhorn_iters: int = Field(default=100, ge=1, le=10_000)
    # points per cloud after reduction (L'); default min(H*W, 64)
    nodes: int | None = Field(default=None, ge=1, le=4096)


class AugmentSpec(_Strict):
    """The usual small-image augmentation: a random crop after zero padding, a horizontal flip."""

    crop_padding: int = Field(default=0, ge=0, le=64)
    flip: bool = False


class Recipe(_Strict):
    name: str
    description: str = ""
    reference: str = ""
    notes: str = ""
    data: str  # a --data spec; its train split is used
    test_data: str | None = None  # evaluated (clean accuracy) after every epoch; default: data's test split
    model: ModelSpec
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(ge=1, le=65_536)
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    precision: Literal["fp32", "bf16"] = "fp32"
    augment: AugmentSpec = AugmentSpec()
    defenses: list[Defence] = Field(default_factory=list)
    adversarial: AdversarialSpec | None = None
    alignment: AlignmentSpec | None = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        # The name is the default output folder (runs/train/NAME): it must stay one plain folder name.
        if len(name) > MAX_NAME or not set(name) <= NAME_CHARACTERS or not name.strip("."):
            raise ValueError(f"a name of at most {MAX_NAME} letters, digits, '-', '_' and '.' (not only dots): "
                             "it names the output folder")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.alignment is not None and self.adversarial is None:
            raise ValueError("alignment: feature alignment compares clean and adversarial features; add adversarial:")
        if self.adversarial is not None and self.adversarial.start_epoch >= self.epochs:
            raise ValueError(f"adversarial: start_epoch {self.adversarial.start_epoch} leaves no adversarial epoch "
                             f"of {self.epochs}")
        if any(m > self.epochs for m in self.schedule.milestones):
            raise ValueError(f"schedule: a milestone lies beyond the {self.epochs} epochs")
        return self

    def sha256(self) -> str:
        """Of the validated content: comments and layout do not matter."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: str
    text: str
    lines: dict[tuple, int] = field(default_factory=dict)  # each key's line in the file

    def where(self, *loc: str | int) -> str:
        """``file:line field`` of a recipe field, for checks that need the data (they cannot run in the schema)."""
        from robench.suites.loader import field_location

        return field_location(self.path, loc, self.lines)


def builtin_recipes() -> dict[str, Path]:
    """``recipes/`` beside the suites (inside the package in a wheel)."""
    from robench.suites.loader import builtin_files

    return builtin_files("recipes")


def find_recipe(name_or_path: str) -> Path:
    from robench.suites.loader import find_yaml

    return find_yaml(name_or_path, builtin_recipes(), "recipe")


def load_recipe(name_or_path: str) -> LoadedRecipe:
    """Read and validate a recipe file (or a built-in recipe by name)."""
    from robench.suites.loader import read_yaml_document, validation_message

    path = find_recipe(name_or_path)
    data, lines, text = read_yaml_document(path, "recipe")
    if not isinstance(data, dict):
        raise UsageError(f"{path}:1: a recipe is a mapping with name:, data:, model:, epochs: and batch_size:")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UsageError(validation_message(exc, lines, str(path))) from None
    return LoadedRecipe(recipe, str(path), text, lines)
