"""``robench dmr train SURROGATE --data market1501:ROOT --out generator.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from robench.cli.common import handle_errors, stderr
from robench.errors import UsageError

app = typer.Typer(help="The DMR generator attack (Deep Mis-Ranking, Wang et al. 2020).", no_args_is_help=True)


@app.command("train")
@handle_errors
def train(
    surrogate: str = typer.Argument(..., help="Surrogate ReID model the generator is trained against."),
    data: str = typer.Option(..., "--data", "-d", help="market1501:ROOT, dukemtmc:ROOT or reid:ROOT with "
                             "bounding_box_train/."),
    out: Path = typer.Option(..., "--out", "-o", help="Generator file to write (never overwritten)."),
    arch: Optional[str] = typer.Option(None, help="Architecture for state dicts: torchvision:NAME, a registered "
                                       "name or module:factory."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Passed to the architecture factory."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow unpickling full Python objects and TorchScript programs "
                                          "(runs code from the file)."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Preset of the surrogate's input "
                                            "normalisation: imagenet, cifar10, cifar100, mnist, fashion-mnist, none."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean, e.g. '0.485,0.456,0.406'."),
    std: Optional[str] = typer.Option(None, help="Per-channel std."),
    feature_layer: Optional[str] = typer.Option(None, "--feature-layer", help="Take the surrogate's features "
                                                "from this module (default: its output)."),
    classifier_layer: Optional[str] = typer.Option(None, "--classifier-layer",
                                                   help="Module whose output is identity logits: adds the "
                                                   "cross-entropy term."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="HxW, e.g. 256x128."),
    eps: str = typer.Option("16/255", help="L-inf budget in [0,1] pixel units."),
    steps: int = typer.Option(2000, help="Training steps (Adam)."),
    lr: float = typer.Option(2e-4, help="Adam learning rate."),
    ids_per_batch: int = typer.Option(8, "--ids-per-batch", help="Identities per batch (P of a PxK batch)."),
    images_per_id: int = typer.Option(4, "--images-per-id", help="Images per identity (K of a PxK batch)."),
    margin: float = typer.Option(0.3, help="Margin of the mis-ranking loss."),
    dmr_compat: bool = typer.Option(False, "--dmr-compat", help="Count an image as its own positive in the "
                                    "mis-ranking loss, as the released DMR code does."),
    ce_weight: float = typer.Option(1.0, "--ce-weight", help="With --classifier-layer: weight of the term that "
                                    "pushes the surrogate's identity prediction away."),
    msssim_weight: float = typer.Option(0.0, "--msssim-weight", help="Weight of the 1 - MS-SSIM perceptual term."),
    width: int = typer.Option(32, help="Channels of the generator's first layer."),
    blocks: int = typer.Option(4, help="Residual blocks of the generator."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Training identities held out for model "
                                       "selection."),
    val_every: int = typer.Option(200, "--val-every", help="Steps between validations on the held-out "
                                  "identities."),
    seed: int = typer.Option(0, help="Seed of the batch sampler and the generator's initialisation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Train the generator; the checkpoint with the lowest validation mAP under attack is kept."""
    import torch

    from robench.config import check_range, parse_image_size
    from robench.evaluation.precision import resolve_device
    from robench.expressions import eval_expr
    from robench.models import load_model, resolve_normalization
    from robench.reid.api import is_reid_spec, load_reid_spec
    from robench.reid.datasets import ReIDImages
    from robench.reid.features import ReIDFeatures
    from robench.reid.generator import GeneratorConfig, save_generator, train_generator

    if out.exists():
        raise UsageError(f"{out} exists; generators are never overwritten")
    if not is_reid_spec(data):
        raise UsageError("--data must be market1501:ROOT, dukemtmc:ROOT or reid:ROOT")
    budget = eval_expr(eps)
    if not 0 < budget <= 1:
        raise UsageError(f"--eps must be in (0, 1], got {budget:g}")
    for name, value in (("steps", steps), ("ids-per-batch", ids_per_batch - 1), ("images-per-id", images_per_id),
                        ("val-every", val_every)):
        if value < 1:
            raise UsageError(f"--{name} is too small")
    # Bounded and finite: a NaN weight or rate passes every comparison and trains garbage.
    for name, value, low, high in (("--lr", lr, 1e-12, 10.0), ("--margin", margin, 0.0, 100.0),
                                   ("--ce-weight", ce_weight, 0.0, 1e6), ("--msssim-weight", msssim_weight, 0.0, 1e6),
                                   ("--steps", steps, 1, 10_000_000), ("--width", width, 1, 4096),
                                   ("--blocks", blocks, 1, 64)):
        check_range(name, value, low, high)
    if not 0 <= val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1)")
    dataset = load_reid_spec(data)
    if dataset.train is None or len(dataset.train) == 0:
        raise UsageError(f"{dataset.root} has no bounding_box_train/ images to train on")
    loaded = load_model(surrogate, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    dev = resolve_device(device)
    model = ReIDFeatures(loaded.model, resolve_normalization(normalize, mean, std), layer=feature_layer).to(dev)
    logits_fn = None
    if classifier_layer is not None:
        head = ReIDFeatures(loaded.model, model.normalization, layer=classifier_layer).to(dev)
        logits_fn = head
    images = ReIDImages(dataset.train, parse_image_size(image_size))
    config = GeneratorConfig(eps=budget, width=width, blocks=blocks, margin=margin, exclude_self=not dmr_compat,
                             ce_weight=ce_weight if classifier_layer else 0.0, msssim_weight=msssim_weight,
                             ids_per_batch=ids_per_batch,
                             images_per_id=images_per_id, steps=steps, lr=lr, val_fraction=val_fraction,
                             val_every=val_every, seed=seed)
    generator, history = train_generator(
        model, lambda idx: torch.stack([images[i][0] for i in idx]), dataset.train.pids, dataset.train.camids,
        config, device=dev, logits_fn=logits_fn, log=lambda m: stderr.print(f"robench: {m}", highlight=False),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_generator(out, generator.cpu(), config, history)
    stderr.print(f"generator written to {out}", highlight=False)
