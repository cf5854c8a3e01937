"""Square: a score-based random search on the margin loss (Andriushchenko et al. 2020).

AutoAttack's black-box member; it needs only the model's logits, so it is the part of
the ensemble that masked or obfuscated gradients cannot stop.

What follows the reference (fra31/auto-attack, ``autoattack/square.py``):

* the loss is the margin ``z_y - max_{i != y} z_i`` on fp32 logits; a proposal replaces
  the sample's current iterate when its margin is strictly lower, or when it fools the model;
* L-inf: the start is vertical stripes, ``x + eps * sign`` with one sign per channel and
  column; each proposal sets a random ``s x s`` square of every channel to ``+-eps`` around
  ``x`` (one sign per channel), projected on the eps-ball and [0,1];
* the side of the square is ``max(round(sqrt(p * n_features / c)), 1)``, clipped to the
  image side, with ``p`` from the reference's schedule: ``p_init``, halved after iterations
  10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-iteration run, the iteration
  number rescaled to the query budget (``int(i / queries * 10000)``);
* L2: the start is a grid of centred bumps (windows of side ``h // 5`` offset by
  ``(h - 5s) // 2``, each a bump of nested squares weighted ``1/(k+1)^2``, its lower half
  negated, randomly transposed, with a random sign per channel), scaled to norm eps; each
  proposal draws two windows of odd side at least 3: the first gets a fresh bump plus its
  old content, rescaled to take the mass of both windows and the budget left, the second
  is cleared, and the whole perturbation is rescaled to norm eps and clipped to [0,1];
* a window's offset is drawn among the first ``h - s`` positions, as the reference does
  (the offset ``h - s`` itself is never drawn);
* a restart starts again from a fresh random start, for the samples still not fooled.

Deliberate deviations from AutoAttack's port:

* Every sample draws its own window positions, signs and bump orientations, as the paper's
  own code (max-andr/square-attack) does image by image; AutoAttack's port draws one position
  (one orientation, one set of L-inf channel signs) per iteration for the whole batch. Each
  sample's proposals are distributed the same either way; only the correlation between the
  samples of a batch goes, and with it any dependence of a sample's result on its batch.
  Random numbers come from ``robench.attacks.randomness`` keyed by (seed, entry, restart,
  sample index, query).
* ``queries`` is the budget of model queries per sample and restart, the start's evaluation
  included, as the paper's code counts it: the start and ``queries - 1`` proposals, the
  schedule rescaled over ``queries``. AutoAttack's ``n_queries`` counts the proposals after
  the start, one query more.
* A sample leaves as soon as the model's top class is not its label (the verdict the base
  reports); the reference tests ``margin <= 0``, which differs only on exact ties.
* A sample never fooled returns its lowest-margin iterate over all restarts (the reference
  returns the clean input); either way it counts as robust.
* In the L2 start, a window side below 1 (images under 5 pixels, where the reference
  divides by zero) is raised to 1, and only windows that fit in the image are placed.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import ClassVar, cast

import torch
from pydantic import Field
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackParams, Cost, Eps, EpsBudget, Family, RunOutput
from robench.attacks.driver import RunContext, SlotSearch
from robench.attacks.pool import Pool
from robench.errors import UsageError

MAX_QUERIES = 1_000_000
# The reference's schedule of p: halved after each of these iterations of a 10,000-iteration run.
SCHEDULE_RUN = 10_000
SCHEDULE_MARKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareParams(AttackParams):
    """The query budget per restart, the initial share of the image a square covers, and restarts."""

    queries: int = Field(default=5000, ge=1, le=MAX_QUERIES)
    p_init: float = Field(default=0.8, gt=0, le=1)
    restarts: int = Field(default=1, ge=1, le=1000)


def p_at(i: int, queries: int, p_init: float) -> float:
    """The reference's p for proposal ``i`` (0-based), with the iteration rescaled to the budget."""
    it = int(i / queries * SCHEDULE_RUN)
    halvings = sum(it > mark for mark in SCHEDULE_MARKS)
    return p_init / 2 ** halvings


@lru_cache(maxsize=32)
def square_sides(norm: str, queries: int, p_init: float, c: int, h: int, w: int,
                 device: str = "cpu") -> torch.Tensor:
    """Side of the square of each proposal i = 0 .. queries - 2 (long, on ``device``)."""
    sides = []
    for i in range(max(queries - 1, 0)):
        side = int(round(math.sqrt(p_at(i, queries, p_init) * h * w)))  # p * n_features / c, n_features = c*h*w
        if norm == "linf":
            side = max(side, 1)
        else:
            side = max(side, 3)
            side += 1 - side % 2  # odd: the bump has a centre
        sides.append(min(side, h, w))
    return torch.tensor(sides, dtype=torch.long, device=device)


def _nested_squares(rows: int, cols: int) -> torch.Tensor:
    """Half a bump: squares nested around the centre, the k-th (Chebyshev radius k) weighted 1/(k+1)^2, unit norm."""
    if rows == 0:
        return torch.zeros(0, cols, dtype=torch.float64)
    ci, cj = rows // 2, cols // 2
    i = torch.arange(rows, dtype=torch.float64).view(-1, 1)
    j = torch.arange(cols, dtype=torch.float64).view(1, -1)
    radius = torch.maximum((i - ci).abs(), (j - cj).abs())
    outer = max(ci, cj) + 1  # squares k = 0 .. outer - 1 are drawn
    k = torch.arange(outer, dtype=torch.float64)
    weights = 1.0 / (k + 1) ** 2
    # A cell at radius d lies in every square k >= d.
    value = (weights.view(1, 1, -1) * (k.view(1, 1, -1) >= radius.unsqueeze(-1))).sum(-1)
    return value / value.norm()


@lru_cache(maxsize=64)
def bump(side: int) -> torch.Tensor:
    """The reference's L2 window pattern of ``side x side``: upper half up, lower half down, unit norm (float32)."""
    top = _nested_squares(side // 2, side)
    bottom = -_nested_squares(side - side // 2, side)
    pattern = torch.cat([top, bottom])
    return (pattern / pattern.norm()).float()


@lru_cache(maxsize=16)
def bump_table(largest: int, device: str = "cpu") -> torch.Tensor:
    """``table[s]`` is ``bump(s)`` in the top-left corner of a ``largest x largest`` zero canvas."""
    table = torch.zeros(largest + 1, largest, largest)
    for side in range(1, largest + 1):
        table[side, :side, :side] = bump(side)
    return table.to(device)


def margin(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i in fp32 (the model may run in bf16)."""
    z = outputs.float()
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    others = z.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return true - others


@lru_cache(maxsize=16)
def bands(size: int, device: str = "cpu") -> torch.Tensor:
    """``bands[s, o]`` marks the ``s`` positions from ``o`` on, of ``size`` (bool, (size + 1, size, size))."""
    side = torch.arange(size + 1).view(-1, 1, 1)
    start = torch.arange(size).view(1, -1, 1)
    at = torch.arange(size).view(1, 1, -1)
    return ((at >= start) & (at < start + side)).to(device)


def windows(top: torch.Tensor, left: torch.Tensor, side: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per sample, the ``side x side`` window at (top, left) as a (n, 1, h, w) mask."""
    device = str(top.device)
    rows, cols = bands(h, device)[side, top], bands(w, device)[side, left]
    return (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1)


def offsets(u: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """The reference's random offset: floor(u * room), i.e. one of 0 .. room - 1 (0 when room is 0)."""
    return (u * room.to(u.dtype)).long()


def placed_bumps(top: torch.Tensor, left: torch.Tensor, side: torch.Tensor, flip: torch.Tensor,
                 h: int, w: int) -> torch.Tensor:
    """Per sample, ``bump(side)`` (transposed where ``flip``) in the window at (top, left), 0 elsewhere: (n,1,h,w)."""
    largest = min(h, w)
    table = bump_table(largest, str(top.device))
    i = torch.arange(h, device=top.device).view(1, -1, 1) - top.view(-1, 1, 1)
    j = torch.arange(w, device=top.device).view(1, 1, -1) - left.view(-1, 1, 1)
    inside = (i >= 0) & (i < side.view(-1, 1, 1)) & (j >= 0) & (j < side.view(-1, 1, 1))
    i, j = i.clamp(0, largest - 1), j.clamp(0, largest - 1)
    flip = flip.view(-1, 1, 1)
    i, j = torch.where(flip, j, i), torch.where(flip, i, j)
    return (table[side.view(-1, 1, 1), i, j] * inside).unsqueeze(1)


def signs(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0.5, -1.0, 1.0)


class Square(Attack):
    name: ClassVar[str] = "square"
    Params: ClassVar[type[AttackParams]] = SquareParams
    params: SquareParams
    family: ClassVar[Family] = "query"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    eps_budget: ClassVar[EpsBudget] = "required"
    # Queries a slot draws ahead at once (SquareSearch._ahead); 1 draws query by query.
    draw_block: int = 32

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        # Every query of every restart, and the base's scoring of an L2 example projected for rounding.
        p = cast(SquareParams, params)  # cost is asked of the class's own Params
        return Cost(forward=p.queries * p.restarts + 1)

    # -- randomness ------------------------------------------------------------------------------------------
    def draw(self, sample_ids: torch.Tensor, restart: torch.Tensor, t: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` uniform numbers per slot, from the stream of its (sample, restart, query).

        A restart's streams do not depend on the number of restarts, so a run with more restarts
        repeats a run with fewer and goes on. Streams are numbered sample * queries + query; past
        2^32 of them (about 850,000 samples at the default budget) numbers repeat, which only
        correlates draws of far-apart samples.
        """
        ids = sample_ids * self.params.queries + t
        # One restart (AutoAttack's setting) needs no grouping: spares a sync per query.
        restarts = [0] if self.params.restarts == 1 else restart.unique().tolist()
        if len(restarts) == 1:
            return randomness.uniform(ids, (count,), self._restart_key(restarts[0]), sample_ids.device)
        u = torch.empty(len(ids), count, device=sample_ids.device)
        for k in restarts:
            mine = restart == k
            u[mine] = randomness.uniform(ids[mine], (count,), self._restart_key(k), sample_ids.device)
        return u

    def _restart_key(self, restart: int) -> int:
        return randomness.stream_key(self.seed, self.stream, restart)

    # -- random starts ---------------------------------------------------------------------------------------
    def start(self, x: torch.Tensor, radius: Eps, sample_ids: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """A restart's starting point (query 0 of its stream)."""
        t = torch.zeros_like(sample_ids)
        if self.norm == "linf":
            return self._stripes(x, radius, sample_ids, restart, t)
        return self._bump_grid(x, radius, sample_ids, restart, t)

    def _stripes(self, x, radius, sample_ids, restart, t) -> torch.Tensor:
        n, c, _, w = x.shape
        u = self.draw(sample_ids, restart, t, c * w)
        stripes = signs(u).view(n, c, 1, w).to(x.dtype)
        return (x + radius * stripes).clamp(0.0, 1.0)

    def _bump_grid(self, x, radius, sample_ids, restart, t) -> torch.Tensor:
        n, c, h, w = x.shape
        side = max(h // 5, 1)
        first = max((h - 5 * side) // 2, 0)  # the reference centres five windows along the height
        tops = [first + k * side for k in range(h // side) if first + (k + 1) * side <= h]
        lefts = [first + k * side for k in range(w // side) if first + (k + 1) * side <= w]
        if not tops or not lefts:
            return x.clone()
        # Each pixel's window (or none) and its place in it, so all windows are filled at once.
        window_of = torch.full((h, w), -1, dtype=torch.long)
        row_in = torch.zeros(h, w, dtype=torch.long)
        col_in = torch.zeros(h, w, dtype=torch.long)
        for a, top in enumerate(tops):
            for b, left in enumerate(lefts):
                window_of[top:top + side, left:left + side] = a * len(lefts) + b
                row_in[top:top + side, left:left + side] = torch.arange(side).view(-1, 1)
                col_in[top:top + side, left:left + side] = torch.arange(side).view(1, -1)
        count = len(tops) * len(lefts)
        window_of, row_in, col_in = (m.to(x.device) for m in (window_of, row_in, col_in))
        u = self.draw(sample_ids, restart, t, count * (c + 1)).view(n, count, c + 1)
        placed = window_of >= 0
        k = window_of.clamp_min(0)
        flip = (u[:, :, 0] > 0.5)[:, k]  # (n, h, w): this window's bump transposed
        i, j = torch.where(flip, col_in, row_in), torch.where(flip, row_in, col_in)
        pattern = bump(side).to(x.device)[i, j] * placed  # (n, h, w)
        channel_signs = signs(u[:, :, 1:])[:, k].permute(0, 3, 1, 2)  # (n, c, h, w)
        delta = (pattern.unsqueeze(1) * channel_signs).to(x.dtype)
        return (x + self._to_radius(delta, radius)).clamp(0.0, 1.0)

    @staticmethod
    def _to_radius(delta: torch.Tensor, radius: Eps) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return delta / (norms + 1e-12) * radius

    # -- proposals -------------------------------------------------------------------------------------------
    def propose(self, xa: torch.Tensor, x: torch.Tensor, radius: Eps, t: torch.Tensor,
                u: torch.Tensor) -> torch.Tensor:
        """Query ``t`` >= 1 of each slot: its current iterate ``xa`` changed in random windows.

        ``u`` holds each slot's ``draw_count`` numbers of query ``t`` (:meth:`draw`)."""
        if self.norm == "linf":
            return self.project(xa + self.square_steps(x.shape, x.dtype, radius, t, u), x, radius)
        _, c, h, w = x.shape
        return self._two_windows(xa, x, radius, self._sides(c, h, w, x.device)[t - 1], u)

    def draw_count(self, channels: int) -> int:
        """Uniform numbers a proposal takes: window offsets (one window in L-inf, two in L2), a bump's
        orientation (L2), one sign per channel."""
        return 2 + channels if self.norm == "linf" else 5 + channels

    def _sides(self, c: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        return square_sides(self.norm, self.params.queries, self.params.p_init, c, h, w, str(device))

    def square_steps(self, shape: torch.Size, dtype: torch.dtype, radius: Eps, t: torch.Tensor,
                     u: torch.Tensor) -> torch.Tensor:
        """L-inf: what query ``t`` adds to the iterate before projection, +-2 eps on one random square
        (one sign per channel) and 0 elsewhere: projected, the square lands on x +- eps whatever it held."""
        n, c, h, w = shape
        side = self._sides(c, h, w, u.device)[t - 1]
        inside = windows(offsets(u[:, 0], h - side), offsets(u[:, 1], w - side), side, h, w)
        return 2 * radius * signs(u[:, 2:]).view(n, c, 1, 1).to(dtype) * inside

    def _two_windows(self, xa, x, radius, side, u) -> torch.Tensor:
        n, c, h, w = x.shape
        delta = xa - x
        top, left = offsets(u[:, 0], h - side), offsets(u[:, 1], w - side)
        first = windows(top, left, side, h, w)
        second = windows(offsets(u[:, 2], h - side), offsets(u[:, 3], w - side), side, h, w)

        def channel_norm(v: torch.Tensor) -> torch.Tensor:
            return v.square().sum(dim=(-2, -1), keepdim=True).sqrt()

        image_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        # The new window takes the mass both windows held, per channel, plus an equal share of the unused budget.
        mass = torch.clamp(radius ** 2 - image_norm ** 2, min=0) / c + channel_norm(delta * (first | second)) ** 2
        old = delta * first / (1e-12 + channel_norm(delta * first))
        fresh = placed_bumps(top, left, side, u[:, 4] > 0.5, h, w).to(x.dtype)
        new = old + fresh * signs(u[:, 5:]).view(n, c, 1, 1).to(x.dtype)
        new = new / (1e-12 + channel_norm(new)) * mass.sqrt()
        delta = torch.where(second, torch.zeros_like(delta), delta)
        delta = torch.where(first, new, delta)
        return (x + self._to_radius(delta, radius)).clamp(0.0, 1.0)

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        """Slots query the model together; a sample leaves when fooled or when its last restart is spent."""
        if x.dim() != 4:
            raise UsageError(f"square attacks images (N, C, H, W), got inputs of shape {tuple(x.shape)}")
        if not self.loss.scores:
            raise UsageError("square needs a classifier's logits and labels")
        radius = self.radius(self.required_eps(eps), x)
        return context.drive(SquareSearch(self, model, x, y, radius, context.sample_ids), x)


# What an L-inf slot draws ahead: up to ``draw_block`` queries, each an image's worth of floats, in this
# many bytes: 32 queries of a 32x32 RGB image, 8 of a 64x64 one, one at a time from about 181x181 RGB up.
AHEAD_BYTES_PER_SLOT = 32 * 3 * 32 * 32 * 4
FIRST_BLOCK_ROWS = 128  # queue positions whose first blocks are drawn together (at most 48 MB at that size)


class SquareSearch(SlotSearch):
    """Square's per-slot logic: each step queries every slot's next candidate (its start, then proposals).

    ``x_out`` holds each sample's answer: the query that fooled it, or else the lowest-margin
    iterate of its restarts so far; ``scored`` marks the answers that went through the model.
    """

    def __init__(self, attack: Square, model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: Eps,
                 sample_ids: torch.Tensor) -> None:
        self.attack, self.model, self.x, self.y, self.radius, self.sample_ids = attack, model, x, y, radius, sample_ids
        self.steps, self.restarts = attack.params.queries, attack.params.restarts
        self.x_out = x.clone()
        self.margin_out = torch.full((len(x),), float("inf"), device=x.device)
        self.scored = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.fooled = torch.zeros_like(self.scored)
        self.forwards = 0
        # L-inf proposals are drawn ahead whole (what each query adds); an image's worth per query and slot.
        self.linf = attack.norm == "linf"
        per_query = x[0].numel() * x.element_size() if self.linf else 1
        self.block = max(1, min(attack.draw_block, AHEAD_BYTES_PER_SLOT // per_query))
        # At least every slot's place in its block (query - drawn_from): slots join and restart at -1, a
        # refill puts every slot at 0 or -1, and all move on together. Spares a sync a query.
        self.block_place = -1
        self._starts = torch.zeros(0, dtype=torch.long, device=x.device)  # see _block_rows
        # Every sample's first start at once: one draw instead of one per admission.
        self.firsts = attack.start(x, radius, sample_ids, torch.zeros_like(sample_ids))
        # First blocks are drawn for the queue's next samples together, not at every admission (see _ahead).
        self.first_blocks: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (first row, blocks, drawn_from)

    def _unscored_margins(self, count: int) -> dict[str, torch.Tensor]:
        return {"margin": torch.full((count,), float("inf"), device=self.x.device)}

    def fresh(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # A slot keeps its sample's clean input, label, index and what it drew ahead: gathered once, not per query.
        x = self.x[rows]
        state = self._unscored_margins(len(rows)) | {"x": x, "y": self.y[rows], "ids": self.sample_ids[rows]}
        if self.linf:
            # Base.project's bounds, [x - eps, x + eps] within [0, 1], taken once (min and max are exact).
            state |= {"low": (x - self.radius).clamp_min(0.0), "high": (x + self.radius).clamp_max(1.0)}
        ahead, drawn_from = self._admitted_blocks(rows)
        return self.firsts[rows], state | {"ahead": ahead, "drawn_from": drawn_from}

    def _admitted_blocks(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First blocks of the queue positions ``rows`` (at least one, consecutive: the pool admits the queue's
        next samples), drawn for ``FIRST_BLOCK_ROWS`` positions at a time: one draw serves many admissions,
        in bounded memory."""
        first, last = int(rows[0]), int(rows[-1]) + 1
        cached = self.first_blocks
        if cached is None or first < cached[0] or last > cached[0] + len(cached[1]):
            ids = self.sample_ids[first:max(last, min(first + FIRST_BLOCK_ROWS, len(self.x)))]
            cached = self.first_blocks = (first, *self._first_block(ids, torch.zeros_like(ids)))
        start, ahead, drawn_from = cached
        return ahead[first - start:last - start], drawn_from[first - start:last - start]

    def restart(self, slots: Pool, which: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        state = slots.state
        ids, restart = state["ids"][which], slots.restart[which]
        xa = self.attack.start(state["x"][which], self.radius, ids, restart)
        ahead, drawn_from = self._first_block(ids, restart)
        return xa, self._unscored_margins(len(ids)) | {"ahead": ahead, "drawn_from": drawn_from}

    def _first_block(self, ids: torch.Tensor, restart: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A restart's first block (its proposals start at query 1; query 0 is the start) and where it begins.

        Query by query (a block of 1) nothing is drawn ahead: the numbers are drawn when the query is
        made, for the slots then in the pool, as a replay of another implementation's numbers needs."""
        first = torch.ones_like(ids)
        if self.block == 1 or self.steps == 1:
            return self._block(ids, restart, first, draw=False), first - 2  # stale: drawn at query 1
        return self._block(ids, restart, first), first

    def step(self, slots: Pool) -> torch.Tensor:
        """Query every slot's candidate; per slot, whether it fooled the model."""
        labels = slots.state["y"]
        candidate = self._candidates(slots)
        outputs = self.model(candidate)
        self.block_place += 1
        self.forwards += slots.size()
        self.attack.count_passes(0, slots.size())
        margins, hit = margin(outputs, labels), self.attack.loss.fooled(outputs, labels)
        # The start is always taken; later, a lower margin or a fooling proposal replaces the iterate.
        better = hit | (margins < slots.state["margin"])
        if slots.starting:
            better = better | (slots.t == 0)
        slots.xa = torch.where(better.view(-1, 1, 1, 1), candidate, slots.xa)
        slots.state["margin"] = torch.where(better, margins, slots.state["margin"])
        return hit

    def _block(self, ids: torch.Tensor, restart: torch.Tensor, start: torch.Tensor, draw: bool = True) -> torch.Tensor:
        """What queries ``start`` .. ``start + block - 1`` of each sample take: (n, block, ...), their random
        numbers, or in L-inf what they add to the iterate (``draw=False``: room for it, left empty)."""
        n, block, (_, c, h, w) = len(ids), self.block, self.x.shape
        if not draw:
            shape = (c, h, w) if self.linf else (self.attack.draw_count(c),)
            return torch.empty(n, block, *shape, dtype=self.x.dtype if self.linf else torch.float32,
                               device=ids.device)
        t = (start.view(-1, 1) + torch.arange(block, device=start.device)).flatten()
        count = self.attack.draw_count(c)
        u = self.attack.draw(ids.repeat_interleave(block), restart.repeat_interleave(block), t, count)
        if not self.linf:
            return u.view(n, block, -1)
        # Queries past the budget are drawn but never made: any valid square size will do for them.
        made = t.clamp(max=self.steps - 1)
        steps = self.attack.square_steps(torch.Size((n * block, c, h, w)), self.x.dtype, self.radius, made, u)
        return steps.view(n, block, c, h, w)

    def _ahead(self, slots: Pool) -> torch.Tensor:
        """Each slot's share of its query ``t``, from blocks of ``block`` queries drawn ahead.

        A block holds exactly what :meth:`Square.draw` and the proposal give query by query (the same
        streams, the same arithmetic); drawing them together spares the counter-based generator's and
        the square's few dozen small operations per query. When one slot's block runs out every slot
        draws its next, so the slots refill their blocks together, once in ``block`` queries, however
        they were admitted.
        """
        state = slots.state
        if self.block == 1 or self.block_place >= self.block:
            start = slots.t.clamp_min(1)
            state["ahead"] = self._block(state["ids"], slots.restart, start)
            state["drawn_from"] = start
            self.block_place = 0
        # Slot i's query sits at row i * block + offset of the flattened blocks: one index_select, about half
        # of what indexing by (slot, offset) pairs costs.
        ahead, offset = state["ahead"], slots.t - state["drawn_from"]
        if slots.starting:
            offset = offset.clamp_min(0)  # a slot at its start (offset -1) makes no proposal: any row will do
        at = self._block_rows(len(ahead), ahead.device) + offset
        return ahead.flatten(0, 1).index_select(0, at)

    def _block_rows(self, slots: int, device: torch.device) -> torch.Tensor:
        """Where each slot's block starts among the flattened blocks: 0, block, 2 * block, ... (cached)."""
        if len(self._starts) < slots or self._starts.device != device:
            self._starts = torch.arange(max(slots, 2 * len(self._starts)), device=device) * self.block
        return self._starts[:slots]

    def _candidates(self, slots: Pool) -> torch.Tensor:
        """The slots' next queries: a start where t is 0 (already in ``slots.xa``), a proposal elsewhere."""
        if not slots.starting:  # the usual case: no slot is at its start
            return self._proposals(slots, slots.xa, slice(None))
        moving = slots.t > 0
        if not bool(moving.any()):
            return slots.xa
        candidate = slots.xa.clone()
        candidate[moving] = self._proposals(slots, slots.xa[moving], moving)
        return candidate

    def _proposals(self, slots: Pool, xa: torch.Tensor, which: torch.Tensor | slice) -> torch.Tensor:
        ahead, state = self._ahead(slots), slots.state
        if self.linf:
            low, high = state["low"], state["high"]
            if not isinstance(which, slice):  # some slots only: most steps propose for all and index nothing
                ahead, low, high = ahead[which], low[which], high[which]
            return torch.clamp(xa + ahead, low, high)  # max then min, in one operation
        return self.attack.propose(xa, state["x"][which], self.radius, slots.t[which], ahead[which])

    def keep_fooled(self, slots: Pool, fooled: torch.Tensor) -> None:
        # A fooling query was taken as the iterate: it is the answer.
        rows = slots.rows[fooled]
        self.x_out[rows], self.scored[rows], self.fooled[rows] = slots.xa[fooled], True, True

    def end_restart(self, slots: Pool, ending: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A restart that ends unfooled: its iterate is the sample's answer if its margin is the lowest yet."""
        rows, margins = slots.rows[ending], slots.state["margin"][ending]
        lower = margins < self.margin_out[rows]
        self.x_out[rows[lower]] = slots.xa[ending][lower]
        self.margin_out[rows[lower]] = margins[lower]
        self.scored[rows[lower]] = True
        return torch.zeros_like(ending)

    def output(self) -> RunOutput:
        return RunOutput(self.x_out, forward_evals=self.forwards, scored=self.scored, fooled=self.fooled)
