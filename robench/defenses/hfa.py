"""Hierarchical feature alignment (HFA): optimal-transport alignment of clean and adversarial features.

Zhang et al., "Hierarchical feature alignment for adversarial defense" (paper 003 in the
papers folder), Sections 3.2-3.3 and 5.1. Training minimises Eq. 8,

    L_ALL = CE(F(x_clean), y) + CE(F(x_adv), y)
            + lam * sum_l W2(GCN(LC(f_clean^l)), GCN(LC(f_adv^l))),

where ``f^l`` are intermediate feature maps of the same network on the clean and the
adversarial batch, ``LC`` a learned linear combination that shrinks them (Eq. 6), ``GCN``
a two-layer graph convolution (Eq. 7) and ``W2`` the entropic 2-Wasserstein distance
(Eqs. 2-5). Paper defaults: eps = 0.1, 100 Sinkhorn iterations, lam = 1.0; L = 2 aligned
layers for LeNet, 4 for ResNet-110.

Pieces:

* :func:`sinkhorn_distance` -- ``<P*, C>`` between two uniform point clouds, with ``P*``
  the plan of the entropy-regularised problem (Eq. 5; the paper's ``W* = <P*, C>``), the
  transport cost of that plan and *not* the regularised objective. The paper's ``eps`` is
  absolute: the cost matrix is not normalised, so eps = 0.1 means "0.1 in squared feature
  units" and the plan is close to the exact one only when the costs are large next to eps.
  With features whose squared distances are small next to eps the plan is nearly uniform
  and ``W*`` of two identical clouds is not near zero (the entropic bias); that is the
  paper's quantity, kept as is.
* :class:`AlignmentHead` -- ``GCN(LC(f))`` for one layer, turning a (C, H, W) map into a
  cloud of L' points in R^C'.
* :class:`HierarchicalAlignment` -- one head per aligned layer, the Wasserstein term of Eq. 8.
* :func:`hierarchical_alignment_loss` -- all of Eq. 8, with its parts for logging.

Decisions:

* Sinkhorn is a short batched torch loop rather than POT or geomloss: it runs batched on
  the GPU inside the training graph with no extra dependency, while POT's ``sinkhorn2``
  takes one pair of clouds at a time. The tests check it against POT's exact ``ot.emd2``
  (eps -> 0) and its plan against ``ot.sinkhorn`` (same eps).
* The iteration runs in the log domain (logsumexp updates of the dual potentials), so
  large costs or small eps do not underflow the Gibbs kernel ``exp(-C / eps)``.
  Gradients come from autograd through the iterations; that keeps ``iters`` copies of a
  (B, n, m) matrix for the backward pass, small at the sizes used here (L' <= 64 nodes).
* The sizes C' and L' are not given in the paper; ours are ``C' = max(1, C // 2)`` and
  ``L' = max(1, min(H * W, 64))``.
* Eq. 7 is read as in the graph-reasoning unit the paper cites: a kernel-1 Conv1d across
  the nodes (node-wise diffusion), a ReLU, then a kernel-1 Conv1d across the channels
  (channel-wise update). The ReLU between them is ours, as such units usually have; the
  paper's equation shows none. The order (nodes first) follows the cited unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robench.defenses.features import FeatureTap
from robench.errors import UsageError

DEFAULT_EPS = 0.1  # Section 3.2
DEFAULT_ITERS = 100  # Section 3.2
DEFAULT_LAMBDA = 1.0  # Section 3.3, after Eq. 8
MAX_NODES = 64  # our cap on L' (the paper gives no value)


# ---------------------------------------------------------------------------------------
# Entropic optimal transport (Eqs. 2-5)
# ---------------------------------------------------------------------------------------


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``C_ij = ||x_i - y_j||^2`` for batched clouds (B, n, d), (B, m, d) -> (B, n, m) (Eq. 2-3).

    Expanded as |x|^2 + |y|^2 - 2 x.y so memory is B*n*m rather than B*n*m*d; rounding
    can make an entry slightly negative, hence the clamp.
    """
    x_norms = x.pow(2).sum(-1, keepdim=True)
    y_norms = y.pow(2).sum(-1).unsqueeze(-2)
    return (x_norms + y_norms - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0.0)


def entropic_plan(cost: torch.Tensor, eps: float = DEFAULT_EPS, iters: int = DEFAULT_ITERS) -> torch.Tensor:
    """The plan P* of Eq. 5 for uniform marginals, by log-domain Sinkhorn; cost (B, n, m) -> (B, n, m).

    Minimises ``<P, C> - eps H(P)`` with ``H(P) = -sum P (log P - 1)`` (Eq. 4, whose
    extraction reads ``log(P - 1)``) over plans with row sums 1/n and column sums 1/m.
    The dual potentials f, g are updated alternately,

        f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)
        g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps),

    and ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``; after the last (column) update
    the column sums are exact, the row sums converge with the iterations.
    """
    _check_eps_iters(eps, iters)
    _, n, m = cost.shape
    log_a = -math.log(n)
    log_b = -math.log(m)
    scaled = cost / eps
    f = cost.new_zeros(cost.shape[0], n, 1)  # potentials kept divided by eps
    g = cost.new_zeros(cost.shape[0], 1, m)
    for _ in range(iters):
        f = -torch.logsumexp(g - scaled + log_b, dim=2, keepdim=True)
        g = -torch.logsumexp(f - scaled + log_a, dim=1, keepdim=True)
    return torch.exp(f + g - scaled + (log_a + log_b))


def sinkhorn_distance(
    x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS, iters: int = DEFAULT_ITERS
) -> torch.Tensor:
    """``W* = <P*, C>`` between uniform clouds x (B, n, d) and y (B, m, d) -> (B,) (Eqs. 3-5).

    2-D inputs (n, d), (m, d) give a scalar. ``eps`` is absolute (the cost is not
    normalised, as in the paper; default 0.1) and ``iters`` Sinkhorn iterations are run
    (default 100). Differentiable in x and y. Half-precision inputs, or a bf16/fp16
    autocast region, are computed in float32 (the exponentials and logsumexps need the
    range); float64 stays float64.

    A fixed iteration count is what the paper prescribes; when the costs are far larger
    than eps (unnormalised deep features) 100 iterations do not converge: the plan's
    column sums are exact but its row sums are not, and W* can then fall below the exact
    transport cost. The result stays finite and differentiable either way.
    """
    batched = _check_clouds(x, y)
    if not batched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.to(dtype), y.to(dtype)
        cost = squared_distances(x, y)
        distance = (entropic_plan(cost, eps, iters) * cost).sum(dim=(1, 2))
    return distance if batched else distance.squeeze(0)


def _check_clouds(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Validate the two clouds' shapes; True when they are batched (3-D)."""
    if x.dim() != y.dim() or x.dim() not in (2, 3):
        raise UsageError(
            f"point clouds must both be (n, d) or both (B, n, d); got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[-1] != y.shape[-1] or (x.dim() == 3 and x.shape[0] != y.shape[0]):
        raise UsageError(
            f"point clouds need the same batch size and point dimension; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        raise UsageError("point clouds must have at least one point")
    return x.dim() == 3


def _check_eps_iters(eps: float, iters: int) -> None:
    if not eps > 0:
        raise UsageError(f"eps must be positive, got {eps}")
    if iters < 1:
        raise UsageError(f"iters must be at least 1, got {iters}")


# ---------------------------------------------------------------------------------------
# Linear combination + graph convolution (Eqs. 6-7)
# ---------------------------------------------------------------------------------------


def default_reduced_sizes(feature_shape: Sequence[int]) -> tuple[int, int]:
    """Our (C', L') for a (C, H, W) map: C' = max(1, C // 2), L' = max(1, min(H*W, 64))."""
    channels, height, width = feature_shape
    return max(1, channels // 2), max(1, min(height * width, MAX_NODES))


class AlignmentHead(nn.Module):
    """``GCN(LC(f))`` for one aligned layer: a (B, C, H, W) map -> a cloud (B, L', C').

    Eq. 6: the map is flattened to L = H*W positions of C channels; feature selection is a
    learned linear combination of the channels (C -> C', a kernel-1 Conv1d) and dimension
    reduction a learned linear combination of the positions (L -> L', a Linear over the L
    axis). Eq. 7: ``GCN(f~) = Conv1D(Conv1D(f~)^T)^T`` -- a kernel-1 Conv1d mixing the L'
    nodes (node-wise diffusion), a ReLU, and a kernel-1 Conv1d mixing the C' channels
    (channel-wise). The result is L' nodes, each a C'-dim feature, the points the
    Wasserstein distance compares. Sizes default to :func:`default_reduced_sizes`.
    """

    def __init__(
        self, feature_shape: Sequence[int], channels_out: int | None = None, nodes_out: int | None = None
    ) -> None:
        super().__init__()
        if len(feature_shape) != 3 or min(feature_shape) < 1:
            raise UsageError(f"feature_shape must be (C, H, W) with positive sizes, got {tuple(feature_shape)}")
        channels, height, width = (int(s) for s in feature_shape)
        default_channels, default_nodes = default_reduced_sizes((channels, height, width))
        self.feature_shape = (channels, height, width)
        self.channels_out = channels_out or default_channels
        self.nodes_out = nodes_out or default_nodes
        self.select_channels = nn.Conv1d(channels, self.channels_out, kernel_size=1)
        self.reduce_positions = nn.Linear(height * width, self.nodes_out)
        self.node_conv = nn.Conv1d(self.nodes_out, self.nodes_out, kernel_size=1)
        self.channel_conv = nn.Conv1d(self.channels_out, self.channels_out, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce_positions(self.select_channels(self._flatten(features)))  # (B, C', L')
        nodes_mixed = F.relu(self.node_conv(reduced.transpose(1, 2)))  # (B, L', C')
        return self.channel_conv(nodes_mixed.transpose(1, 2)).transpose(1, 2)  # (B, L', C')

    def _flatten(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, L); also takes (B, C) and (B, C, L) maps of matching size."""
        channels, height, width = self.feature_shape
        if features.dim() < 2 or features.shape[1] != channels or features.shape[2:].numel() != height * width:
            raise UsageError(
                f"alignment head built for features (B, {channels}, {height}, {width}), got {tuple(features.shape)}"
            )
        return features.reshape(features.shape[0], channels, height * width)


def feature_shape_of(features: object, name: str = "?") -> tuple[int, int, int]:
    """(C, H, W) of one recorded batch of features: (B, C, H, W) as is, (B, C, L) as (C, L, 1), (B, C) as (C, 1, 1)."""
    if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3, 4):
        described = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise UsageError(f"layer {name!r} must output a (B, C[, H[, W]]) tensor to be aligned, got {described}")
    channels, *spatial = features.shape[1:]
    spatial = spatial + [1] * (2 - len(spatial))
    return int(channels), int(spatial[0]), int(spatial[1])


# ---------------------------------------------------------------------------------------
# The hierarchical alignment term and the full loss (Eq. 8)
# ---------------------------------------------------------------------------------------


def _positions(shape: Sequence[int]) -> int:
    """H*W of a layer shape given as (C, H, W), (C, L) or (C,)."""
    dims = tuple(int(d) for d in shape[1:]) + (1, 1)
    return dims[0] * dims[1]


class HierarchicalAlignment(nn.Module):
    """``lam * sum_l mean_batch W2(GCN(LC(f_clean^l)), GCN(LC(f_adv^l)))``, the Wasserstein term of Eq. 8.

    One :class:`AlignmentHead` per aligned layer, shared by the clean and the adversarial
    features of that layer ("one graph convolution for features extracted from both clean
    and adversarial images", Section 3.3). Defaults: lam = 1.0, eps = 0.1, 100 iterations.
    The heads are trainable: give their parameters to the optimiser with the model's.
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        lam: float = DEFAULT_LAMBDA,
        eps: float = DEFAULT_EPS,
        iters: int = DEFAULT_ITERS,
        nodes: int | None = None,
    ) -> None:
        """``nodes`` caps L', the points per cloud (default: see :func:`default_reduced_sizes`);
        Sinkhorn's cost grows with its square."""
        super().__init__()
        if not shapes:
            raise UsageError("hierarchical alignment needs at least one layer shape")
        _check_eps_iters(eps, iters)
        self.heads = nn.ModuleList(
            AlignmentHead(shape, nodes_out=None if nodes is None else min(nodes, _positions(shape)))
            for shape in shapes)
        self.lam = float(lam)
        self.eps = float(eps)
        self.iters = int(iters)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        layer_names: Sequence[str],
        example_input: torch.Tensor,
        *,
        lam: float = DEFAULT_LAMBDA,
        eps: float = DEFAULT_EPS,
        iters: int = DEFAULT_ITERS,
        nodes: int | None = None,
    ) -> HierarchicalAlignment:
        """Heads sized from one eval-mode, no-grad forward of ``example_input`` through the named layers.

        The model's train/eval flags (every submodule's) are restored afterwards; the heads
        are put on the example's device. ``lam``, ``eps``, ``iters`` and ``nodes`` go to the constructor.
        """
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with FeatureTap(model, layer_names) as tap, torch.no_grad():
                model(example_input)
                shapes = [feature_shape_of(f, name) for f, name in zip(tap.features, layer_names)]
        finally:
            for module, training in modes.items():
                module.training = training
        return cls(shapes, lam=lam, eps=eps, iters=iters, nodes=nodes).to(example_input.device)

    def layer_distances(
        self, clean_feats: Sequence[torch.Tensor], adv_feats: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Batch-mean W2 of each aligned layer (scalars, before lam)."""
        if not len(clean_feats) == len(adv_feats) == len(self.heads):
            raise UsageError(
                f"expected {len(self.heads)} clean and {len(self.heads)} adversarial feature maps, "
                f"got {len(clean_feats)} and {len(adv_feats)}"
            )
        return [
            sinkhorn_distance(head(clean), head(adv), self.eps, self.iters).mean()
            for head, clean, adv in zip(self.heads, clean_feats, adv_feats)
        ]

    def forward(self, clean_feats: Sequence[torch.Tensor], adv_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.lam * torch.stack(self.layer_distances(clean_feats, adv_feats)).sum()


def hierarchical_alignment_loss(
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor,
    clean_feats: Sequence[torch.Tensor],
    adv_feats: Sequence[torch.Tensor],
    alignment: HierarchicalAlignment,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 8: CE(clean) + CE(adv) + the alignment term; returns the loss and its parts as floats.

    The parts dict has ``ce_clean``, ``ce_adv`` and ``alignment`` (lam included) for logging.
    """
    ce_clean = F.cross_entropy(logits_clean, y)
    ce_adv = F.cross_entropy(logits_adv, y)
    align = alignment(clean_feats, adv_feats)
    total = ce_clean + ce_adv + align
    parts = {"ce_clean": ce_clean.item(), "ce_adv": ce_adv.item(), "alignment": align.item()}
    return total, parts
