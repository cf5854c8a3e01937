"""``robench dmr train SURROGATE --data market1501:ROOT --out generator.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from robench.cli.common import handle_errors, stderr

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
    # Imported here, not at the top: building the command line (--help) must not load torch.
    from robench.tasks.dmr import DMRTrainConfig, train_dmr_generator

    config = DMRTrainConfig(
        out=out, data=data, steps=steps, ids_per_batch=ids_per_batch, images_per_id=images_per_id,
        val_every=val_every, lr=lr, margin=margin, ce_weight=ce_weight, msssim_weight=msssim_weight, width=width,
        blocks=blocks, val_fraction=val_fraction, normalize=normalize, mean=mean, std=std,
        surrogate=surrogate, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
        feature_layer=feature_layer, classifier_layer=classifier_layer, dmr_compat=dmr_compat, seed=seed,
        device=device,
        # The command line's text, parsed by the config's validators (which name the option if it is bad).
        eps=eps,  # type: ignore[arg-type]  # an expression such as 16/255
        image_size=image_size,  # type: ignore[arg-type]  # HxW
    )
    written = train_dmr_generator(config, log=lambda line: stderr.print(f"robench: {line}", highlight=False))
    stderr.print(f"generator written to {written}", highlight=False)
