"""FAB: the untargeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), a minimum-norm attack.

FAB-T (:mod:`robench.attacks.fab`) aims each run at one target class. The untargeted FAB
aims each step at the decision boundary nearest the iterate: it linearises the logit gaps
``z_k - z_y`` of every class k, takes the one whose linearised boundary is closest
(``|z_k - z_y| / ||grad(z_k - z_y)||_dual``, the dual norm being L1 for L-inf and L2 for L2),
and makes FAB's step towards it: the projections of the iterate and of the clean input onto
that hyperplane within the [0,1] box, mixed with weight ``alpha`` (at most ``alpha_max``) and
overshooting by ``eta`` (:class:`~robench.attacks.fab.FABSteps`, shared with FAB-T). An
adversarial iterate is kept when it is the smallest so far and pulled back towards the clean
input by ``beta``, so the search keeps shrinking the perturbation.

What follows the reference (fra31/auto-attack, ``FABAttack`` with ``targeted=False``; the
original FAB code keeps the best point over restarts the same way):

* 100 steps, ``alpha_max = 0.1``, ``eta = 1.05``, ``beta = 0.9``, 1 run;
* the closest boundary over all other classes at each step, from the full Jacobian of the
  logits (a gradient per class and step: the gradient passes reported count each of them);
* the smallest misclassified iterate over all steps and runs is the answer (the clean input
  where none was found); misclassified inputs are not attacked (norm 0);
* with ``restarts > 1``, each further run starts from a random point at half the smallest norm
  found so far (and at most half the call's eps, when it has one) from the clean input, in a
  random direction (L-inf: a uniform draw scaled to that max-norm; L2: a Gaussian draw scaled to
  that length), clipped to the box.

What deviates, and why:

* random starts come from robench's counter-based streams keyed by the sample and the run, not
  from torch's global generator: results do not depend on the batch size;
* called without an eps, a sample for which no run found an adversarial point has no radius for
  a random start, and a start at the clean input would repeat the run: it leaves after its run;
* L1 is left out: the base class defines the L-inf and L2 threat models only.

Called with an eps, FAB returns the smallest adversarial example it found when that lies
within eps and the clean input otherwise. The evaluation engine calls it once without an eps
and reads each eps of the suite entry from the measured norms.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from robench.attacks.base import (AttackParams, Cost, Eps, EpsBudget, RunOutput, check_minimum_norm_options,
                                  within_eps)
from robench.attacks.driver import RunContext, SlotSearch
from robench.attacks.fab import AlphaMax, Beta, Eta, FABSteps, Restarts, Steps, norm_of
from robench.attacks.pool import Pool

# cost() sees the parameters, not the model: the Jacobian's classes are taken as ten.
CLASSES_ASSUMED = 10
# Where a gap's gradient vanishes, its boundary counts as this far away per unit of gap (the reference's guard).
FLAT = 1e-12


class FABUntargetedParams(AttackParams):
    steps: Steps = 100  # per run
    restarts: Restarts = 1  # runs; all but the first start at random
    alpha_max: AlphaMax = 0.1
    eta: Eta = 1.05
    beta: Beta = 0.9


class FAB(FABSteps):
    name: ClassVar[str] = "fab"
    Params: ClassVar[type[AttackParams]] = FABUntargetedParams
    params: FABUntargetedParams
    # An eps only bounds the answer (and the random starts): the search itself minimises the norm.
    eps_budget: ClassVar[EpsBudget] = "optional"
    minimum_norm: ClassVar[bool] = True

    def __init__(self, params: AttackParams | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        check_minimum_norm_options(self)

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        p = cast(FABUntargetedParams, params)  # cost is asked of the class's own Params
        steps = p.steps * p.restarts
        # A gradient per class each step, a forward pass to check each new iterate, one to score the unbroken.
        return Cost(gradient=steps * CLASSES_ASSUMED, forward=steps + 1)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        radius = self.radius(eps, x)
        search = FABMinimalSearch(self, model, x, y, radius, context.sample_ids)
        context.drive(search, search.clean)
        out = search.output()
        if radius is None:
            return out
        return within_eps(out, x, self._within(out.x_adv.float() - x.float(), radius))

    def gaps_and_gradients(self, model: nn.Module, xa: torch.Tensor, y: torch.Tensor,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample and class k: ``z_k - z_y`` (fp32) and its gradient at ``xa``; and the logits."""
        xa = xa.detach().requires_grad_(True)
        rows = torch.arange(len(xa), device=xa.device)
        with torch.enable_grad():
            outputs = model(xa.to(dtype))
            classes = outputs.shape[1]
            # One backward pass per class through the same forward pass: the Jacobian, a class at a time, each
            # from its one-hot column (what the backward of logits[:, k].sum() hands the model).
            columns = torch.eye(classes, dtype=outputs.dtype, device=xa.device)
            grads = [torch.autograd.grad(outputs, xa, columns[k].expand_as(outputs).contiguous(),
                                         retain_graph=k < classes - 1)[0] for k in range(classes)]
        jacobian = torch.stack(grads, dim=1)
        logits = outputs.detach().float()
        gaps = logits - logits[rows, y].unsqueeze(1)
        return gaps, jacobian - jacobian[rows, y].unsqueeze(1), logits

    def closest_boundary(self, gaps: torch.Tensor, gradients: torch.Tensor,
                         y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the gap and gradient of the class whose linearised boundary lies nearest."""
        rows = torch.arange(len(gaps), device=gaps.device)
        flat = gradients.flatten(2)
        dual = flat.abs().sum(dim=2) if self.norm == "linf" else flat.norm(dim=2)
        distance = gaps.abs() / (dual + FLAT)
        distance[rows, y] = float("inf")  # the label's own "boundary" is no boundary
        nearest = distance.argmin(dim=1)
        return gaps[rows, nearest], gradients[rows, nearest]


class FABMinimalSearch(SlotSearch):
    """The untargeted FAB's per-slot logic; the queue is every row of the call.

    A slot's restart number is its run: each runs ``steps`` steps, the first from the clean
    input, the others from a random start. The outputs are per row: the smallest adversarial
    iterate so far and its norm (``best``, inf while none is known).
    """

    def __init__(self, attack: FAB, model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: Eps | None,
                 sample_ids: torch.Tensor) -> None:
        self.attack, self.model, self.y, self.radius, self.ids = attack, model, y, radius, sample_ids
        self.dtype = x.dtype
        self.clean = x.float()  # the search runs in fp32; the model sees its inputs' dtype
        self.steps, self.restarts = attack.params.steps, attack.params.restarts
        self.best = torch.full((len(x),), float("inf"), device=x.device)
        self.x_adv = x.clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.gradient_evals = self.forward_evals = 0

    def fresh(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.clean[rows].clone(), {}  # the first run starts at the clean input

    def step(self, slots: Pool) -> torch.Tensor:
        """One FAB step of every slot towards its nearest boundary. Returns the slots that cannot improve:
        inputs the model misclassifies already (norm 0)."""
        attack, rows = self.attack, slots.rows
        x0, y = self.clean[rows], self.y[rows]
        gaps, gradients, logits = attack.gaps_and_gradients(self.model, slots.xa, y, self.dtype)
        self.gradient_evals += slots.size() * gaps.shape[1]
        misclassified_clean = (slots.t == 0) & (slots.restart == 0) & (logits.argmax(dim=1) != y)
        self._keep_smaller(slots, rows, misclassified_clean)  # the clean input itself, at norm 0
        gap, gradient = attack.closest_boundary(gaps, gradients, y)
        slots.xa = attack._step(slots.xa, x0, gap, gradient)
        with torch.no_grad():
            adversarial = self.model(slots.xa.to(self.dtype)).argmax(dim=1) != y
        self.forward_evals += slots.size()
        attack.count_passes(slots.size() * gaps.shape[1], slots.size())
        self._keep_smaller(slots, rows, adversarial)
        # Adversarial: pull back towards the clean input and search on, for a smaller one.
        delta = slots.xa - x0
        pull = adversarial.view(-1, *[1] * (slots.xa.dim() - 1))
        slots.xa = torch.where(pull, x0 + delta * attack.params.beta, slots.xa)
        return misclassified_clean

    def _keep_smaller(self, slots: Pool, rows: torch.Tensor, adversarial: torch.Tensor) -> None:
        """An adversarial iterate strictly smaller than the best so far becomes the row's answer."""
        size = norm_of((slots.xa - self.clean[rows]).flatten(1), self.attack.norm)
        better = adversarial & (size < self.best[rows])
        if bool(better.any()):
            where = rows[better]
            self.best[where] = size[better]
            self.x_adv[where] = slots.xa[better].to(self.dtype)
            self.fooled[where] = True

    def end_restart(self, slots: Pool, ending: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Without an eps, a sample with nothing found has no radius to restart at: it leaves."""
        if self.radius is not None:
            return torch.zeros_like(ending)
        return ending & ~last & torch.isinf(self.best[slots.rows])

    def restart(self, slots: Pool, which: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next run from a random point at half the smallest norm found so far (and within the eps)."""
        run, rows = slots.restart[which], slots.rows[which]
        radius = self.best[rows]
        if self.radius is not None:
            radius = torch.clamp(radius, max=float(self.radius))
        start = self.clean[rows].clone()
        view = (-1, *[1] * (start.dim() - 1))
        for k in run.unique().tolist():
            mine = run == k
            start[mine] = self.attack._random_start(self.clean[rows[mine]], self.ids[rows[mine]], k,
                                                    radius[mine].view(view))
        return start, {}

    def output(self) -> RunOutput:
        # Every returned example went through the model as it is returned: the smallest adversarial iterate,
        # or the clean input (the first step's point) where none was found.
        return RunOutput(self.x_adv, self.gradient_evals, self.forward_evals, scored=torch.ones_like(self.fooled),
                         fooled=self.fooled.clone())
