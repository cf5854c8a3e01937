"""Putting a defence layer into an existing model without changing its checkpoint format.

A defence such as Local Feature Masking or Feature-Density Dropout sits *between* two layers of a
network that already exists (a torchvision ResNet, a checkpoint from elsewhere). Rewriting the
architecture would rename modules and break ``load_state_dict``; a forward hook on the module
whose output should be transformed keeps every parameter name as it was.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from robench.defenses.features import named_submodule
from robench.errors import UsageError
from robench.registry import did_you_mean

DEFENCES_ATTRIBUTE = "robench_defences"

# The attributes that identify a torchvision ResNet (resnet18 ... resnet152, wide/ResNeXt variants).
_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer4", "avgpool", "fc")

# Where each defence goes in a torchvision ResNet when a recipe does not name a module.
_RESNET_SITES = {
    # LFM paper, Fig. 1(b): after the conv1 block, at conv1's resolution, before max-pooling
    # (64 maps of 128x64 for a 256x128 person crop).
    "lfm": "relu",
    # FDD paper: FDD-2D/3D on the maps of the last convolution layer.
    "fdd-maps": "layer4",
    # FDD paper: FDD-1D on the 512 pooled features that feed the classifier.
    "fdd-fc": "avgpool",
}


class _ApplyAfter:
    """The forward hook; a class rather than a closure so that the hooked model still pickles."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: tuple, output):
        # The layer is not a submodule, so ``model.train()``/``model.eval()`` never reach it:
        # it takes the mode of the module it follows at every call instead.
        self.layer.train(module.training)
        return self.layer(output)


def insert_after(model: nn.Module, module_name: str, layer: nn.Module) -> RemovableHandle:
    """Apply ``layer`` to the output of ``model``'s submodule ``module_name`` (a ``named_modules`` name).

    The layer is attached by a forward hook, not as a child module, so the model's ``state_dict``
    keys are unchanged (a checkpoint of the defended model loads into the plain architecture) and
    an ``nn.Sequential`` parent does not run the layer a second time. The layer follows the
    hooked module's train/eval mode. It stays reachable as ``model.robench_defences``, a list of
    ``(module_name, layer, handle)`` tuples. ``handle.remove()`` takes the layer out again (the
    list keeps its record, which is bookkeeping only).

    Raises :class:`~robench.errors.UsageError` for a name the model does not have.
    """
    target = named_submodule(model, module_name)
    handle = target.register_forward_hook(_ApplyAfter(layer))
    defences = getattr(model, DEFENCES_ATTRIBUTE, None)
    if defences is None:
        defences = []
        # A plain list: nn.Module.__setattr__ only registers Modules, Parameters and buffers.
        setattr(model, DEFENCES_ATTRIBUTE, defences)
    defences.append((module_name, layer, handle))
    return handle


def _is_torchvision_resnet(model: nn.Module) -> bool:
    return all(isinstance(getattr(model, part, None), nn.Module) for part in _RESNET_PARTS)


def defence_site(model: nn.Module, kind: str) -> str:
    """The default module after which a defence of ``kind`` goes, for models whose shape is known.

    ``kind`` is ``"lfm"`` (Local Feature Masking), ``"fdd-maps"`` (FDD-2D/3D on conv feature maps)
    or ``"fdd-fc"`` (FDD-1D on pooled features). Only torchvision ResNets are recognised; any other
    model raises :class:`~robench.errors.UsageError` asking for the module name.
    """
    if kind not in _RESNET_SITES:
        raise UsageError(f"unknown defence kind {kind!r}{did_you_mean(kind, list(_RESNET_SITES))}")
    if not _is_torchvision_resnet(model):
        raise UsageError(
            f"no default place for a {kind!r} defence in a {type(model).__name__}: "
            "name the module to insert it after (one of the names in model.named_modules())"
        )
    return _RESNET_SITES[kind]
