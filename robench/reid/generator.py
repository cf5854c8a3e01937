"""The DMR generator (Wang et al., CVPR 2020): a ResNet that maps an image to its perturbation.

Trained against a surrogate with the mis-ranking loss on P x K batches of
training identities; the adversarial image is clamp(x + eps * tanh(G(x)), 0, 1),
so every output is inside the L-inf budget by construction. The checkpoint
with the lowest surrogate mAP on a validation split of *training* identities
(held out from the generator's training batches) is kept; the test set is
never looked at.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from robench.errors import RunError, UsageError
from robench.reid.objectives import misranking_loss
from robench.reid.perceptual import ms_ssim


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PerturbationGenerator(nn.Module):
    """Encoder (two stride-2 convolutions), residual blocks, decoder; output in (-1, 1)."""

    def __init__(self, width: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), nn.InstanceNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.InstanceNorm2d(2 * width), nn.ReLU(True),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.InstanceNorm2d(4 * width), nn.ReLU(True),
            *[_Residual(4 * width) for _ in range(blocks)],
            nn.ConvTranspose2d(4 * width, 2 * width, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(2 * width),
            nn.ReLU(True),
            nn.ConvTranspose2d(2 * width, width, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(width), nn.ReLU(True),
            nn.ReflectionPad2d(3), nn.Conv2d(width, 3, 7),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        # The encoder halves twice: pad to a multiple of 4 and crop back.
        ph, pw = (-h) % 4, (-w) % 4
        out = self.net(F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x)
        return torch.tanh(out[:, :, :h, :w])


def perturb(generator: PerturbationGenerator, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``eps`` is a radius, or a per-channel one shaped to broadcast over ``x`` (normalised inputs)."""
    return (x + eps * generator(x)).clamp(0.0, 1.0)


@dataclass
class GeneratorConfig:
    eps: float = 16 / 255
    width: int = 32
    blocks: int = 4
    margin: float = 0.3
    exclude_self: bool = True
    ce_weight: float = 1.0
    msssim_weight: float = 0.0
    ids_per_batch: int = 8
    images_per_id: int = 4
    steps: int = 2000
    lr: float = 2e-4
    val_fraction: float = 0.1
    val_every: int = 200
    seed: int = 0


def generator_bytes(generator: PerturbationGenerator, config: GeneratorConfig,
                    history: list[dict[str, Any]]) -> bytes:
    """The generator file's content (what ``load_generator`` reads), to be written in one piece."""
    buffer = io.BytesIO()
    torch.save({"format": "robench.dmr-generator/1", "state_dict": generator.state_dict(),
                "config": asdict(config), "history": history}, buffer)
    return buffer.getvalue()


def save_generator(path: Path, generator: PerturbationGenerator, config: GeneratorConfig,
                   history: list[dict[str, Any]]) -> None:
    Path(path).write_bytes(generator_bytes(generator, config, history))


def load_generator(path: str | Path) -> tuple[PerturbationGenerator, GeneratorConfig]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"generator file not found: {path} (train one with `robench dmr train`)")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"cannot read generator {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != "robench.dmr-generator/1":
        raise UsageError(f"{path} is not a generator written by `robench dmr train`")
    config = GeneratorConfig(**blob["config"])
    generator = PerturbationGenerator(config.width, config.blocks)
    generator.load_state_dict(blob["state_dict"])
    return generator.eval(), config


def split_validation_ids(pids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation images, split by identity (no person in both)."""
    unique = np.unique(pids)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(fraction * len(unique)))) if len(unique) > 2 else 0
    val_ids = set(rng.permutation(unique)[:n_val].tolist())
    is_val = np.array([p in val_ids for p in pids])
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def pk_batches(pids: np.ndarray, p: int, k: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless P x K batches: P random identities with K images each (sampled with replacement if fewer)."""
    by_id: dict[int, list[int]] = {}
    for i, pid in enumerate(pids):
        by_id.setdefault(int(pid), []).append(i)
    ids = np.array(sorted(by_id))
    if len(ids) < 2:
        raise UsageError("training the generator needs images of at least two identities")
    while True:
        chosen = rng.choice(ids, size=min(p, len(ids)), replace=False)
        batch: list[int] = []
        for pid in chosen:
            pool = np.asarray(by_id[int(pid)])
            batch.extend(rng.choice(pool, size=k, replace=len(pool) < k).tolist())
        yield batch


def train_generator(
    surrogate: nn.Module,
    load_images: Callable[[list[int]], torch.Tensor],
    pids: np.ndarray,
    camids: np.ndarray,
    config: GeneratorConfig,
    *,
    device: torch.device,
    logits_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[PerturbationGenerator, list[dict[str, Any]]]:
    """Train against ``surrogate`` (images in [0,1] -> features); returns the best generator and its history."""
    gen_seed = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = PerturbationGenerator(config.width, config.blocks).to(device)
    train_idx, val_idx = split_validation_ids(pids, config.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise UsageError("no training images left after holding out validation identities")
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen_seed)))
    batches = pk_batches(pids[train_idx], config.ids_per_batch, config.images_per_id, rng)
    classes = {int(p): i for i, p in enumerate(np.unique(pids))}
    opt = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    surrogate.eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)

    def validate() -> float | None:
        return _validation_map(generator, surrogate, load_images, val_idx, pids, camids, config.eps, device)

    best: tuple[float, dict[str, torch.Tensor] | None] = (math.inf, None)
    history: list[dict[str, Any]] = []
    generator.train()
    for step in range(1, config.steps + 1):
        batch = next(batches)
        x = load_images(train_idx[batch].tolist()).to(device)
        y = torch.tensor(pids[train_idx][batch], device=device)
        loss = _generator_loss(generator, surrogate, x, y, config, classes, logits_fn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % config.val_every == 0 or step == config.steps:
            val_map = validate()
            history.append({"step": step, "loss": float(loss.detach()), "val_mAP": val_map})
            if log:
                log(f"step {step}: loss {float(loss.detach()):.4f}, validation mAP under attack "
                    f"{'-' if val_map is None else f'{100 * val_map:.2f}%'}")
            score = val_map if val_map is not None else -step  # no validation: keep the last
            if score <= best[0]:
                best = (score, {k: v.detach().clone() for k, v in generator.state_dict().items()})
    if best[1] is not None:
        generator.load_state_dict(best[1])
    return generator.eval(), history


def _generator_loss(generator: PerturbationGenerator, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    config: GeneratorConfig, classes: dict[int, int],
                    logits_fn: Callable[[torch.Tensor], torch.Tensor | None] | None) -> torch.Tensor:
    """The mis-ranking loss of one batch, with the optional identity and perceptual terms."""
    x_adv = perturb(generator, x, config.eps)
    feats = surrogate(x_adv)
    loss = misranking_loss(feats, y, config.margin, config.exclude_self)
    logits = logits_fn(x_adv) if logits_fn is not None else None
    if logits is not None and config.ce_weight > 0:
        target = torch.tensor([classes[int(p)] for p in y.tolist()], device=x.device)
        # Push the surrogate's classifier away from the true identity.
        loss = loss - config.ce_weight * F.cross_entropy(logits.float(), target, reduction="sum")
    if config.msssim_weight > 0:
        # Keep the adversarial image perceptually close to the original.
        loss = loss + config.msssim_weight * (1.0 - ms_ssim(x_adv, x)).sum()
    return loss


def _validation_map(generator: PerturbationGenerator, surrogate: nn.Module,
                    load_images: Callable[[list[int]], torch.Tensor], val_idx: np.ndarray, pids: np.ndarray,
                    camids: np.ndarray, eps: float, device: torch.device) -> float | None:
    """mAP of the held-out identities' adversarial images against their clean ones (None: too few to rank)."""
    from robench.reid.metrics import distance_matrix, rank_metrics

    if len(val_idx) < 2:
        return None
    generator.eval()
    with torch.no_grad():
        feats = []
        for s in range(0, len(val_idx), 64):
            x = load_images(val_idx[s:s + 64].tolist()).to(device)
            feats.append(surrogate(perturb(generator, x, eps)).float())
        f = torch.cat(feats)
    generator.train()
    clean = torch.tensor(pids[val_idx], device=device), torch.tensor(camids[val_idx], device=device)
    try:
        # Adversarial images against the clean validation images of the other cameras.
        with torch.no_grad():
            ref = torch.cat([surrogate(load_images(val_idx[s:s + 64].tolist()).to(device)).float()
                             for s in range(0, len(val_idx), 64)])
        result = rank_metrics(distance_matrix(f, ref), clean[0], clean[0], clean[1], clean[1])
    except UsageError:
        return None
    return result["mAP"]
