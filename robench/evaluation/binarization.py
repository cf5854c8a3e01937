"""The binarization test (Zimmermann et al., NeurIPS 2022): for each test point, a two-class problem
built on the model's own features in which an adversarial example within eps is known to exist.

For a clean point ``x`` the construction draws ``inner`` points uniformly in the ball of radius
``(1 - gap) * eps`` around ``x`` (``x`` itself is one of them) and one *boundary* point at distance
exactly ``eps``. It computes the model's features for all of them (the input of its readout layer,
the last ``nn.Linear`` unless one is named) and fits a linear readout that puts the boundary point
on one side and every inner point on the other. The model with this readout in place of its own is
a two-class classifier that calls ``x`` class 0 and the boundary point, which lies within eps of
``x``, class 1. So an adversarial example exists for every problem that could be built, and an
attack that is strong enough for these features finds one; one that fails on many problems is too
weak for this model, whatever robust accuracy it reports.

Choices where the paper leaves room: the decision threshold sits halfway between the highest
inner score and the boundary point's score (the largest margin along the fitted direction); the
readout's logits are scaled so that their difference spans 1 over the training points, as the
paper's "fixed" rescaling does; a problem that no linear readout separated is not built and is
counted apart, never as a failure of the attack.

Every problem is one sample's, yet attacks batch samples, drop finished ones and refill slots. The
readout therefore finds each input's problem by its nearest clean point (test points are chosen
more than two radii apart), so any attack runs on the binarized model unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from robench.errors import UsageError
from robench.models.wrapper import RobustModel

# The inner ball's radius is (1 - GAP) * eps: the paper's gap between inner and boundary points.
GAP = 0.05
# A problem is "trivial" when one of this many random points at distance eps already crosses the readout.
PROBES = 100


@dataclass(frozen=True)
class Construction:
    """How the problems are built: the same for every attack checked at one (norm, eps)."""

    norm: str
    eps: float  # pixel units
    inner: int = 999  # random inner points per problem, beside the clean point itself
    gap: float = GAP
    probes: int = PROBES
    seed: int = 0


@dataclass
class Problems:
    """One two-class problem per test point: its readout, whether it could be built, and whether random
    points at distance eps already solve it."""

    anchors: torch.Tensor  # the clean points, (N, C, H, W) in pixel units
    weight: torch.Tensor  # (N, 2, features)
    bias: torch.Tensor  # (N, 2)
    built: torch.Tensor  # bool (N,): the boundary point was separated from every inner point
    trivial: torch.Tensor  # bool (N,): a random point at distance eps is already class 1
    boundary: torch.Tensor  # (N, C, H, W): each problem's known solution, at distance eps from its clean point

    def subset(self, rows: torch.Tensor) -> "Problems":
        return Problems(self.anchors[rows], self.weight[rows], self.bias[rows], self.built[rows], self.trivial[rows],
                        self.boundary[rows])


def readout_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The layer whose input are the features: ``name``, or the model's last ``nn.Linear``."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            known = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise UsageError(f"--readout {name!r} is not a module of the model (its linear layers: "
                             f"{', '.join(known[-5:]) or 'none'})")
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"--readout {name!r} is a {type(layer).__name__}, not an nn.Linear")
        return name, layer
    linear = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linear:
        raise UsageError("the attack check needs the model's readout, an nn.Linear layer on its features; "
                         "this model has none")
    return linear[-1]


def build_problems(model: RobustModel, layer: nn.Linear, x: torch.Tensor, sample_ids: torch.Tensor,
                   construction: Construction, batch_size: int) -> Problems:
    """The problems of the points ``x`` (one each); ``sample_ids`` key each point's random draws."""
    weights, biases, built, trivial, solutions = [], [], [], [], []
    for point, sample in zip(x, sample_ids.tolist()):
        generator = torch.Generator().manual_seed(_problem_seed(construction, sample))
        w, b, ok, easy, solution = _one_problem(model, layer, point, construction, generator, batch_size)
        weights.append(w)
        biases.append(b)
        built.append(ok)
        trivial.append(easy)
        solutions.append(solution)
    return Problems(x.clone(), torch.stack(weights), torch.stack(biases), torch.tensor(built), torch.tensor(trivial),
                    torch.stack(solutions))


def _problem_seed(construction: Construction, sample: int) -> int:
    # The draws of one problem depend on the run's seed, the sample and the threat model only.
    key = f"{construction.seed}:{sample}:{construction.norm}:{construction.eps!r}"
    return int.from_bytes(key.encode(), "little") % (2**63 - 1)


def _one_problem(model: RobustModel, layer: nn.Linear, x: torch.Tensor, construction: Construction,
                 generator: torch.Generator,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, bool, bool, torch.Tensor]:
    eps, norm = construction.eps, construction.norm
    inner = ball_points(x, eps * (1 - construction.gap), norm, construction.inner, generator)
    inner = torch.cat([x[None], inner])
    boundary = surface_points(x, eps, norm, 1 + construction.probes, generator)
    features = features_at(model, layer, torch.cat([inner, boundary]), batch_size).double()
    f_inner, f_boundary, f_probes = features[:len(inner)], features[len(inner)], features[len(inner) + 1:]
    direction = fit_direction(f_inner, f_boundary)
    inner_top, boundary_score = float((f_inner @ direction).max()), float(f_boundary @ direction)
    d = features.shape[1]
    if not boundary_score > inner_top:  # no readout of these features separates the two
        return torch.zeros(2, d), torch.zeros(2), False, False, boundary[0]
    threshold = (inner_top + boundary_score) / 2
    scores = torch.cat([f_inner, f_boundary[None]]) @ direction - threshold
    half = 1 / (2 * float(scores.max() - scores.min()))  # logit differences span 1 over the training points
    weight = torch.stack([-direction, direction]) * half
    bias = torch.tensor([threshold, -threshold], dtype=torch.float64) * half
    easy = bool(((f_probes @ direction) > threshold).any()) if len(f_probes) else False
    return weight.float(), bias.float(), True, easy, boundary[0]


def ball_points(x: torch.Tensor, radius: float, norm: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` points uniformly in the ``norm`` ball of ``radius`` around ``x``, clipped to [0,1]."""
    shape = (count, *x.shape)
    if norm == "linf":
        delta = (2 * torch.rand(shape, generator=generator) - 1) * radius
    else:
        direction = torch.randn(shape, generator=generator)
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, *[1] * x.dim())
        length = torch.rand(count, generator=generator) ** (1 / x.numel()) * radius
        delta = direction * length.view(-1, *[1] * x.dim())
    return (x.cpu() + delta).clamp(0, 1).to(x.device)


def surface_points(x: torch.Tensor, eps: float, norm: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` points at distance exactly ``eps`` from ``x`` (in [0,1]); where [0,1] leaves less room
    than eps in every direction, as far as it allows."""
    base = x.cpu()
    if norm == "linf":
        delta = (2 * torch.rand((count, *x.shape), generator=generator) - 1) * eps
        points = (base + delta).clamp(0, 1).flatten(1)
        # One coordinate moves the full eps (towards the side with room): the point lies on the sphere.
        flat = base.flatten()
        room_up, room_down = 1 - flat, flat
        movable = torch.nonzero(torch.maximum(room_up, room_down) >= eps).squeeze(1)
        if len(movable):
            pick = movable[torch.randint(len(movable), (count,), generator=generator)]
            up = room_up[pick] >= room_down[pick]
            points[torch.arange(count), pick] = torch.where(up, flat[pick] + eps, flat[pick] - eps)
        return points.view(count, *x.shape).to(x.device)
    direction = torch.randn((count, *x.shape), generator=generator)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, *[1] * x.dim())
    scale = torch.full((count,), eps)
    for _ in range(20):  # clipping shortens the step: lengthen it until the clipped step is eps long
        moved = ((base + direction * scale.view(-1, *[1] * x.dim())).clamp(0, 1) - base).flatten(1).norm(dim=1)
        scale = torch.where(moved > 0, scale * eps / moved.clamp_min(1e-12), scale)
    points = (base + direction * scale.view(-1, *[1] * x.dim())).clamp(0, 1)
    delta = points - base
    length = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    points = base + delta * torch.clamp(eps / length, max=1.0).view(-1, *[1] * x.dim())  # never beyond eps
    return points.clamp(0, 1).to(x.device)


@torch.no_grad()
def features_at(model: RobustModel, layer: nn.Linear, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The readout layer's input for each point of ``x``: what the model's own readout reads."""
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().float().flatten(1).cpu())

    handle = layer.register_forward_pre_hook(capture)
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    finally:
        handle.remove()
    if sum(len(c) for c in captured) != len(x):
        raise UsageError("the readout layer ran more than once per forward pass; name the layer whose input "
                         "are the features with --readout")
    return torch.cat(captured)


def fit_direction(inner: torch.Tensor, boundary: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """A direction in feature space along which the boundary point scores above the inner points:
    logistic regression with both classes weighted equally (one boundary point against many inner ones)
    and a small ridge, by Newton's method, on features centred on the inner points and scaled to unit
    spread. Wider features than points are first expressed in the span of the points (the fitted
    direction lies there anyway), which keeps every solve at most points x points."""
    centre = inner.mean(dim=0)
    spread = (inner - centre).std(dim=0).clamp_min(1e-6)
    points = torch.cat([(inner - centre) / spread, ((boundary - centre) / spread)[None]])
    basis = None
    if points.shape[1] > points.shape[0]:
        basis, _ = torch.linalg.qr(points.T)  # features x points, orthonormal columns
        points = points @ basis
    coef = _newton_logistic(torch.cat([points, torch.ones(len(points), 1, dtype=points.dtype)], dim=1),
                            len(inner), steps)[:-1]
    if basis is not None:
        coef = basis @ coef
    return coef / spread  # scores on the raw features, up to a constant


def _newton_logistic(design: torch.Tensor, negatives: int, steps: int, ridge: float = 1e-6) -> torch.Tensor:
    """Coefficients (bias last) of the ridge logistic regression that scores the last row positive and
    the first ``negatives`` rows negative, each class weighing half."""
    target = torch.zeros(len(design), dtype=design.dtype)
    target[negatives:] = 1
    weight = torch.where(target > 0, 0.5 / (len(design) - negatives), 0.5 / negatives)
    coef = torch.zeros(design.shape[1], dtype=design.dtype)
    penalty = torch.full((design.shape[1],), ridge, dtype=design.dtype)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = torch.sigmoid(design @ coef)
        gradient = design.T @ (weight * (p - target)) + penalty * coef
        hessian = (design * (weight * p * (1 - p))[:, None]).T @ design + torch.diag(penalty)
        step = torch.linalg.solve(hessian, gradient)
        coef = coef - step
        if float(step.abs().max()) < 1e-8:
            break
    return coef


@contextlib.contextmanager
def binarized(model: RobustModel, layer: nn.Linear, problems: Problems) -> Iterator[None]:
    """The model answers each input with the two logits of its problem's readout while inside."""
    inner = model.model
    anchors = model.normalize(problems.anchors).flatten(1).float()  # once, not per forward pass
    weight, bias = problems.weight, problems.bias
    rows: list[torch.Tensor] = []

    def find_problem(module: nn.Module, args: tuple) -> None:
        seen = args[0].detach().flatten(1)
        rows[:] = [torch.cdist(seen.float(), anchors.to(seen.device), p=math.inf).argmin(dim=1)]

    def readout(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        features = args[0]
        if features.dim() != 2:
            raise UsageError(f"the readout layer's input has shape {tuple(features.shape)}; the attack check "
                             "needs a flat feature vector per sample (name another layer with --readout)")
        which = rows[0].to(features.device)
        w, b = weight.to(features)[which], bias.to(features)[which]
        return torch.einsum("nd,nkd->nk", features, w) + b

    handles = [inner.register_forward_pre_hook(find_problem), layer.register_forward_hook(readout)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
