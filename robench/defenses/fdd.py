"""Feature-Density Dropout (FDD): dropout whose rate falls where features crowd together.

Each sample's features are placed as points in a low-dimensional space (Algorithm 1): for FDD-1D
every FC neuron is a 1-D point (its value); for FDD-2D/3D the C feature maps of a conv layer are
vectorised to a C x (H*W) matrix and projected on its first 2 or 3 principal components, one point
per map. The space is cut into equal grid cells between the sample's per-dimension min and max,
and the density rho_i of cell i is the number of points in it. Every point of cell i is dropped
with probability (Eq. 1)

    p_i = kappa * rho_i / max_i(rho_i) + alpha,      kappa = -0.8, alpha = 0.9,

so the densest cell is dropped with probability 0.1 and near-empty cells with almost 0.9. A drop
removes a whole feature map (Eq. 2) or one neuron (Eq. 3).
"""

from __future__ import annotations

import torch
from torch import nn

# Grid cells per dimension used by the paper: 25 (1-D), 5^2 = 25 (2-D) and 3^3 = 27 (3-D).
DEFAULT_GRIDS = {1: 25, 2: 5, 3: 3}


def principal_projection(maps: torch.Tensor, dims: int) -> torch.Tensor:
    """(N, C, H, W) feature maps -> (N, C, dims): each map's coordinates on the first principal axes.

    Per sample, the C maps are the rows of a C x (H*W) matrix, centred over the channels; the
    coordinates are U[:, :dims] * S[:dims] of its thin SVD (batched over samples). Missing
    components (rank < dims) are zero, a constant dimension.
    """
    n, c = maps.shape[:2]
    rows = maps.reshape(n, c, -1).to(torch.float32)
    centred = rows - rows.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    kept = min(dims, s.shape[-1])
    points = torch.zeros(n, c, dims, dtype=rows.dtype, device=rows.device)
    points[..., :kept] = u[..., :kept] * s[..., None, :kept]
    return points


def grid_cells(points: torch.Tensor, grids: int) -> torch.Tensor:
    """(N, P, k) points -> (N, P) flat cell index in [0, grids**k).

    Per sample and dimension r the cells have width d_r = (max - min) / grids and a point's index
    is floor((f - min) / d_r), the maximum being put in the last cell; a constant dimension (d_r = 0)
    puts every point in cell 0.
    """
    low = points.amin(dim=1, keepdim=True)
    span = points.amax(dim=1, keepdim=True) - low
    scaled = (points - low) / torch.where(span > 0, span, torch.ones_like(span)) * grids
    index = scaled.floor().long().clamp(0, grids - 1)
    strides = grids ** torch.arange(points.shape[-1], device=points.device)
    return (index * strides).sum(dim=-1)


def density_drop_probabilities(cells: torch.Tensor, n_cells: int, kappa: float, alpha: float) -> torch.Tensor:
    """Eq. 1 per point: kappa * rho(cell) / max rho + alpha, clamped to [0, 1]; cells is (N, P)."""
    counts = torch.zeros(cells.shape[0], n_cells, dtype=torch.float32, device=cells.device)
    counts.scatter_add_(1, cells, torch.ones_like(cells, dtype=torch.float32))
    density = counts.gather(1, cells) / counts.amax(dim=1, keepdim=True)
    return (kappa * density + alpha).clamp(0.0, 1.0)


class FeatureDensityDropout(nn.Module):
    """Feature-Density Dropout (Algorithm 1 and Eqs. 1-3 of the FDD paper); the identity in eval mode.

    Args:
        dims: 1 for FDD-1D on FC features, input (N, F) or (N, F, 1, 1); 2 or 3 for FDD-2D/3D on
            conv feature maps, input (N, C, H, W), whose maps are projected by PCA (Algorithm 1).
        grids: equal cells per dimension; default 25, 5 and 3 for 1, 2 and 3 dims, as the paper.
        kappa, alpha: Eq. 1's slope and offset (paper: -0.8 and 0.9).
        generator: source of randomness (on the input's device); the global RNG when ``None``.

    Scaling: the paper writes X' = m * X without a scale and says nothing of evaluation. This
    layer uses inverted dropout: a kept point of cell i is multiplied by 1 / (1 - p_i), so that
    E[X'] = X and evaluation, where the layer is the identity, needs no rescaling (a point with
    p_i = 1 is always dropped and simply zeroed).

    The PCA is recomputed on every forward pass (the paper reports it cheap) and no gradient flows
    through it or through the drop probabilities; the gradient reaches the kept features only.
    The layer has no parameters and no buffers.
    """

    def __init__(
        self,
        dims: int = 1,
        grids: int | None = None,
        kappa: float = -0.8,
        alpha: float = 0.9,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if dims not in DEFAULT_GRIDS:
            raise ValueError(f"dims must be 1 (FC features), 2 or 3 (feature maps), got {dims!r}")
        grids = DEFAULT_GRIDS[dims] if grids is None else grids
        if int(grids) != grids or grids < 1:
            raise ValueError(f"grids must be an integer >= 1, got {grids!r}")
        self.dims = int(dims)
        self.grids = int(grids)
        self.kappa = float(kappa)
        self.alpha = float(alpha)
        self.generator = generator

    def extra_repr(self) -> str:
        return f"dims={self.dims}, grids={self.grids}, kappa={self.kappa}, alpha={self.alpha}"

    def _points(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, dims): one point per FC neuron (dims 1) or per feature map (dims 2/3)."""
        if self.dims == 1:
            if x.dim() < 2 or any(size != 1 for size in x.shape[2:]):
                raise ValueError(
                    "FDD-1D expects FC features (N, F) or pooled maps (N, F, 1, 1), got shape "
                    f"{tuple(x.shape)}: insert it after the pooling layer, or use dims=2/3 on feature maps"
                )
            return x.reshape(x.shape[0], -1, 1).to(torch.float32)
        if x.dim() != 4:
            raise ValueError(f"FDD-{self.dims}D expects feature maps (N, C, H, W), got shape {tuple(x.shape)}")
        return principal_projection(x, self.dims)

    @torch.no_grad()
    def drop_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Per-point drop probability p_i of Eq. 1: (N, F) for dims 1, (N, C) for dims 2/3."""
        cells = grid_cells(self._points(x.detach()), self.grids)
        return density_drop_probabilities(cells, self.grids**self.dims, self.kappa, self.alpha)

    def _keep_scale(self, drop: torch.Tensor) -> torch.Tensor:
        """Bernoulli(1 - p) keep mask times the inverted-dropout factor 1 / (1 - p); zero when dropped."""
        if self.generator is not None and self.generator.device.type != drop.device.type:
            raise ValueError(f"the generator is on {self.generator.device} but the input is on {drop.device}")
        dropped = torch.rand(drop.shape, generator=self.generator, device=drop.device) < drop
        # The 1/(1-p) branch is infinite where p == 1, but such points are always dropped (rand < 1).
        return torch.where(dropped, torch.zeros_like(drop), 1.0 / (1.0 - drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        scale = self._keep_scale(self.drop_probabilities(x)).to(x.dtype)
        if self.dims == 1:
            return x * scale.reshape(x.shape)
        return x * scale[..., None, None]
