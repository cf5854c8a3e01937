"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), AutoAttack's member.

FAB looks for the smallest perturbation that changes the decision. Against a target class
t it linearises the logit gap ``z_t - z_y`` at the current iterate, projects both the
iterate and the clean input onto that hyperplane intersected with the [0,1] box (the
smallest step in the attack's norm), and moves to a mix of the two projections biased
towards the clean input (weight ``alpha = min(|d_iter| / (|d_iter| + |d_clean|), alpha_max)``),
overshooting by ``eta``. When an iterate is misclassified, it is pulled back towards the
clean input by ``beta``, so the search keeps shrinking the perturbation.

What follows the reference implementation (fra31/auto-attack, ``fab_base.py``,
``fab_projections.py``; torchattacks' ``FAB`` is the same code):

* the targets are the classes ranked by the clean logits, the runner-up first
  (``n_target_classes``), each attacked in turn by the samples not yet broken; with
  ``restarts > 1`` each target gets that many runs, the first from the clean input and
  the others from a random point at distance eps/2 (L-inf: a uniform draw scaled to that
  max-norm; L2: a Gaussian draw scaled to that length), clipped to the box;
* the step, the projections onto the hyperplane within the box for L-inf and L2 (solved
  exactly by sorting the coordinates' breakpoints: written afresh, equal to the
  reference's up to float rounding, which the tests check), ``alpha_max = 0.1``,
  ``eta = 1.05``, ``beta = 0.9``, 100 steps, 9 targets and 1 restart (AutoAttack's
  standard version);
* a sample counts as broken when an iterate is misclassified within eps of its clean
  input, as AutoAttack counts FAB-T; misclassified inputs are not attacked.

What deviates, and why:

* a sample leaves as soon as it has a misclassified iterate within eps (the reference
  keeps shrinking the perturbation to the end of the run): the verdict within eps
  cannot change any more, and the iterates of every other sample are unaffected, so the
  verdicts are the reference's. The returned example is that first iterate inside the
  eps-ball, not the smallest one the full run would find;
* a sample that is not broken gets its clean input back, even where FAB found an
  adversarial point outside eps (the reference likewise reports it robust);
* random starts come from robench's counter-based streams keyed by the sample, not from
  torch's global generator: results do not depend on the batch size;
* with per-channel radii (eps in normalised units) the search still minimises the plain
  pixel norm; only the in-budget test uses the per-channel box;
* L1 is left out: the base class defines the L-inf and L2 threat models only.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, cast

import torch
from pydantic import Field
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackParams, Cost, Eps, EpsBudget, Family, RunOutput
from robench.attacks.driver import PartialRun, RunContext, SlotSearch
from robench.attacks.gradient import MAX_STEPS
from robench.attacks.objectives import CrossEntropy
from robench.attacks.pool import Pool
from robench.errors import UsageError

# Gradient entries at most this small leave their coordinate in place in the L2 projection
# (the reference's threshold); the L-inf projection moves every coordinate with w != 0.
L2_FLAT = 1e-8
# Projections shorter than this count as this long when weighing the two of a step.
MIN_STEP = 1e-8


# The parameters every FAB variant shares (this one and the untargeted ``fab``), with their bounds.
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Restarts = Annotated[int, Field(ge=1, le=1000)]  # all but the first start at random
AlphaMax = Annotated[float, Field(ge=0, le=1)]  # largest weight of the clean input's projection
Eta = Annotated[float, Field(ge=1, le=10)]  # overshoot past the linearised boundary
Beta = Annotated[float, Field(gt=0, le=1)]  # pull-back towards the clean input after a success


class FABParams(AttackParams):
    steps: Steps = 100  # per target and restart
    targets: int = Field(default=9, ge=1, le=1000)  # runner-up first; capped at the classes - 1
    restarts: Restarts = 1  # per target
    alpha_max: AlphaMax = 0.1
    eta: Eta = 1.05
    beta: Beta = 0.9


def boundary_step(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per row, the step ``d`` of smallest norm with ``<w, points + d> = b`` and ``points + d`` in [0,1].

    Rows (flattened) are independent. Lowering ``<w, .>`` by ``need`` at cost ``lam`` moves a
    coordinate by ``min(lam, room)`` (L-inf) or ``min(lam |w_i|, room)`` (L2) against the sign of
    ``w_i``, where ``room`` is its distance to the box face it moves towards. The gain is
    piecewise linear in ``lam`` with a knee where each coordinate saturates: sorting the knees
    gives the gain at each, the segment where the gain reaches ``need`` and ``lam`` on it. A row
    whose hyperplane lies beyond the box gets the step to the box corner nearest to it.
    """
    gap = (w * points).sum(1) - b
    w = w * torch.where(gap >= 0, 1.0, -1.0).unsqueeze(1)  # orient w so that <w, .> must go down
    need = gap.abs().unsqueeze(1)
    size = w.abs()
    moving = size > L2_FLAT if norm == "l2" else w != 0
    room = torch.where(w > 0, points, 1.0 - points) * moving
    # Move per unit of lam before saturation: |w_i| in L2, 1 in L-inf, where the knees (the lam at which
    # each coordinate saturates) are the rooms themselves and the slopes |w_i| (dividing or multiplying by
    # 1 changes no float, so L-inf skips those operations).
    rate = size if norm == "l2" else None
    knee = room if rate is None else torch.where(moving, room / torch.where(moving, rate, 1.0), 0.0)
    # Gain per unit of lam while unsaturated. In L-inf it is |w_i| itself: where w_i is 0 so is |w_i|, and a
    # product with the mask (bool operands take this CPU's slow kernels) would change no bit.
    slope = size if rate is None else size * rate * moving
    order = stable_order(knee)
    knee, slope, saturated = (v.gather(1, order) for v in (knee, slope, size * room))
    slope_from = slope.flip(1).cumsum(1).flip(1)  # the slope of the coordinates not saturated before knee k
    gain = saturated.cumsum(1) - saturated + knee * slope_from  # the gain at knee k
    k = (gain < need).sum(1, keepdim=True)  # need is reached on the segment ending at knee k
    reachable = k < w.shape[1]
    k = k.clamp_max(w.shape[1] - 1)
    at, excess, s = knee.gather(1, k), gain.gather(1, k) - need, slope_from.gather(1, k)
    lam = torch.where(s > 0, at - excess / torch.where(s > 0, s, 1.0), at).clamp_min(0.0)
    lam = torch.where(reachable, lam, torch.inf)  # beyond the box: every coordinate moves its full room
    # where, not a product: an unbounded lam times a zero rate is nan on coordinates that stay.
    return torch.where(moving, -torch.sign(w) * torch.minimum(lam if rate is None else lam * rate, room), 0.0)


def stable_order(knee: torch.Tensor) -> torch.Tensor:
    """Per row, the stable ascending order of the non-negative ``knee``.

    A non-negative float32's bits, read as an integer, order as the float does, so with each column's index
    appended the keys are distinct and a plain sort gives the stable order: a quarter faster than a stable
    float sort on this CPU, where that sort was a third of FAB's work outside the model (300 rows of 64).
    Adding +0.0 turns -0.0 (an iterate clamped at 0 from below) into +0.0, which the float sort ties
    with it; NaN, or another dtype, takes the float sort."""
    # The smallest knee >= 0 is every knee >= 0, and NaN fails it as it fails the comparison: a min reduction
    # costs a sixth of a comparison into a bool tensor and its all().
    if knee.dtype != torch.float32 or (knee.numel() > 0 and not float(knee.amin()) >= 0):
        return torch.sort(knee, dim=1, stable=True).indices
    columns = knee.shape[1]
    keys = (knee + 0.0).view(torch.int32).long() * columns + torch.arange(columns, device=knee.device)
    return torch.sort(keys, dim=1).indices


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm of flattened rows."""
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)


class FABSteps(Attack):
    """What the FAB variants share: the threat models, the step onto the linearised boundary, the random
    starts of restarts and the in-budget test. A variant says which boundary each step aims at."""

    family: ClassVar[Family] = "gradient"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    params: Any  # a variant's Params, holding alpha_max and eta

    def __init__(self, params: AttackParams | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if not isinstance(self.loss, CrossEntropy):
            raise UsageError(f"{self.name} attacks classifiers; this run gives its own objective")
        if self.final_iterate:
            raise UsageError(f"{self.name} counts any adversarial iterate within eps, as AutoAttack does; "
                             "final_iterate does not apply")
        self._signs: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _random_start(self, x0: torch.Tensor, ids: torch.Tensor, phase: int, radius: Eps) -> torch.Tensor:
        """A point at distance eps/2 from the clean input in a random direction, clipped to the box.

        ``radius`` is a number, per-channel radii or one radius per sample (shape (n, 1, ...))."""
        key = randomness.stream_key(self.seed, self.stream, phase)
        shape = tuple(x0.shape[1:])
        view = (-1, *[1] * len(shape))
        if self.norm == "linf":
            direction = 2.0 * randomness.uniform(ids, shape, key, x0.device) - 1.0
        else:
            direction = randomness.normal(ids, shape, key, x0.device)
        length = norm_of(direction.flatten(1), self.norm).view(view)
        half = radius * 0.5 if not isinstance(radius, torch.Tensor) else radius.float() * 0.5
        return (x0 + half * direction / length).clamp(0.0, 1.0)

    def _within(self, delta: torch.Tensor, radius: Eps) -> torch.Tensor:
        """Per sample: the perturbation lies in the eps-ball (per-channel radii in L-inf)."""
        if self.norm == "linf":
            if not isinstance(radius, torch.Tensor):  # one radius: the largest |delta_i| decides (NaN fails both)
                return delta.abs().flatten(1).amax(dim=1) <= radius
            return (delta.abs() <= radius).flatten(1).all(dim=1)
        return delta.flatten(1).norm(dim=1) <= radius

    def _step(self, xa: torch.Tensor, x0: torch.Tensor, gap: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One FAB step: project the iterate and the clean input onto the linearised boundary, mix, overshoot.

        ``gap`` is the logit difference the boundary zeroes (per sample) and ``grad`` its gradient at ``xa``."""
        n, shape = len(xa), xa.shape
        w = grad.flatten(1)
        b = (w * xa.flatten(1)).sum(1) - gap  # <w, z> = b where the linearised gap is zero
        d = boundary_step(torch.cat([xa.flatten(1), x0.flatten(1)]), torch.cat([w, w]), torch.cat([b, b]),
                          self.norm)
        d_iter, d_clean = d[:n], d[n:]
        size = norm_of(d, self.norm).clamp_min(MIN_STEP)
        a_iter, a_clean = size[:n], size[n:]
        alpha = (a_iter / (a_iter + a_clean)).clamp(0.0, self.params.alpha_max).unsqueeze(1)
        eta = self.params.eta
        mixed = (xa.flatten(1) + eta * d_iter) * (1 - alpha) + (x0.flatten(1) + eta * d_clean) * alpha
        return mixed.clamp(0.0, 1.0).view(shape)


class FABTargeted(FABSteps):
    name: ClassVar[str] = "fab-t"
    Params: ClassVar[type[AttackParams]] = FABParams
    params: FABParams
    eps_budget: ClassVar[EpsBudget] = "required"

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        p = cast(FABParams, params)  # cost is asked of the class's own Params
        runs = p.targets * p.restarts * p.steps
        # A gradient of the logit gap per step, a forward pass to check the new iterate, one clean pass.
        return Cost(gradient=runs, forward=1 + runs)

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        radius = self.radius(self.required_eps(eps), x)
        # Classes by decreasing clean logit; the top one says whether the model gets a sample right.
        logits = context.in_batches(lambda part: model(part).float(), x)
        ranking = torch.sort(logits, dim=1, descending=True, stable=True).indices
        correct = ranking[:, 0] == y
        targets = min(self.params.targets, ranking.shape[1] - 1)
        search = FABSearch(self, model, x, y, correct, ranking[:, 1:targets + 1], radius, context.sample_ids)
        try:
            # At eps 0 no correctly classified point can be broken.
            if targets > 0 and len(search.todo) and float(torch.as_tensor(radius).max()) > 0:
                context.drive(search, search.clean)
        except PartialRun as partial:  # the rows the search finished, and every row it did not need to attack
            done = ~correct
            done[search.todo[partial.done]] = True
            raise PartialRun(done, partial.output) from partial.__cause__
        return search.output()

    def _logit_gap_and_grad(self, model, xa, pair, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_target - z_y`` per sample, in fp32, and its gradient at ``xa``; ``pair`` holds the rows
        (target, y)."""
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            outputs = model(xa.to(dtype))
            picked = outputs.detach().float().gather(1, pair)
            # d gap / d logits is +1 at the target and -1 at the label: what autograd's backward of the
            # indexing and the difference would hand the model, without recording them.
            d_logits = torch.zeros_like(outputs).scatter_(1, pair, self._gap_signs(outputs).expand(len(pair), 2))
            (grad,) = torch.autograd.grad(outputs, xa, d_logits)
        return picked[:, 0] - picked[:, 1], grad.detach()

    def _gap_signs(self, outputs: torch.Tensor) -> torch.Tensor:
        """The row (+1, -1) in the logits' dtype and device, made once."""
        key = (outputs.dtype, outputs.device)
        if key not in self._signs:
            self._signs[key] = torch.tensor([[1.0, -1.0]], dtype=outputs.dtype, device=outputs.device)
        return self._signs[key]


class FABSearch(SlotSearch):
    """FAB-T's per-slot logic on the ``correct`` (correctly classified) samples only: its queue is
    ``todo``, the rows of those samples (queue position i is row ``todo[i]`` of the call).

    A slot's restart number is its phase, ``target * restarts + restart``: each phase runs
    ``steps`` steps, from the clean input (a target's first run) or a random start.
    """

    def __init__(self, attack: FABTargeted, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 correct: torch.Tensor, target_ranks: torch.Tensor, radius: Eps, sample_ids: torch.Tensor) -> None:
        self.attack, self.model, self.y, self.correct, self.radius = attack, model, y, correct, radius
        self.todo = torch.nonzero(correct).squeeze(1)
        self.target_ranks, self.ids, self.dtype = target_ranks, sample_ids[self.todo], x.dtype
        self.clean = x[self.todo].float()  # the search runs in fp32; the model sees its inputs' dtype
        self.steps, self.restarts = attack.params.steps, target_ranks.shape[1] * attack.params.restarts
        self.x_adv = x.clone()
        self.broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.gradient_evals = self.forward_evals = 0

    def fresh(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # A slot keeps its clean input, label and target class: gathered when it joins or changes target,
        # not at every step.
        x0, where = self.clean[rows], self.todo[rows]
        y = self.y[where]
        state = {"x0": x0, "y": y, "pair": torch.stack([self.target_ranks[where, 0], y], dim=1)}
        return x0, state  # phase 0 starts at the clean input

    def restart(self, slots: Pool, which: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next restart from a random start, or the next target from the clean input."""
        phase, rows = slots.restart[which], slots.rows[which]
        start = self.clean[rows].clone()
        for k in phase.unique().tolist():
            if k % self.attack.params.restarts:
                mine = phase == k
                start[mine] = self.attack._random_start(self.clean[rows[mine]], self.ids[rows[mine]], k, self.radius)
        target = self.target_ranks[self.todo[rows], phase // self.attack.params.restarts]
        return start, {"pair": torch.stack([target, slots.state["y"][which]], dim=1)}

    def step(self, slots: Pool) -> torch.Tensor:
        """One FAB step of every slot; per slot, whether its new iterate is adversarial within eps."""
        attack, state = self.attack, slots.state
        x0, y = state["x0"], state["y"]
        gap, grad = attack._logit_gap_and_grad(self.model, slots.xa, state["pair"], self.dtype)
        slots.xa = attack._step(slots.xa, x0, gap, grad)
        self.gradient_evals += slots.size()
        with torch.no_grad():
            misclassified = self.model(slots.xa.to(self.dtype)).argmax(dim=1) != y
        self.forward_evals += slots.size()
        attack.count_passes(slots.size(), slots.size())
        delta = slots.xa - x0
        inside = attack._within(delta, self.radius)
        # Adversarial but too far: pull back towards the clean input and search on.
        shrink = (misclassified & ~inside).view(-1, *[1] * (slots.xa.dim() - 1))
        slots.xa = torch.where(shrink, x0 + delta * attack.params.beta, slots.xa)
        return misclassified & inside

    def keep_fooled(self, slots: Pool, fooled: torch.Tensor) -> None:
        where = self.todo[slots.rows[fooled]]
        self.x_adv[where] = slots.xa[fooled].to(self.dtype)
        self.broken[where] = True

    def output(self) -> RunOutput:
        """Every row of the call: misclassified samples count as fooled at their clean input."""
        fooled = ~self.correct | self.broken
        # Verdicts were taken on exactly the returned points, unless the cast to x's dtype changed them.
        scored = ~self.broken if self.x_adv.dtype != torch.float32 else torch.ones_like(self.broken)
        # The clean pass that ranked the targets was one forward pass per sample.
        return RunOutput(self.x_adv, self.gradient_evals, len(self.correct) + self.forward_evals, scored=scored,
                         fooled=fooled)

