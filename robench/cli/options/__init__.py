"""The options of ``robench eval`` and ``robench pixel-index`` as ``Annotated`` aliases, one module per
part: model, data, suite, engine (speed and precision), output, reid, gate and pixels (pixel-index's
experiments). A command declares ``arch: Arch = None``; the default stays in its signature.

An option that means the same in both commands is one ``typer.Option`` (an upper-case name in its
part's module): eval lists it under the part's help panel (``in_panel``), pixel-index, which has no
panels, uses it as it is. Where the two differ (help text, names, type), each has its own alias. An
alias of pixel-index's that has a namesake in eval is called ``Pixel...`` (``PixelArch``, ``PixelSeed``).

Nothing here imports torch: building the command line (--help) stays fast.
"""

from __future__ import annotations

import copy
from typing import Any, Collection, Mapping

from typer.models import OptionInfo


def in_panel(option: OptionInfo, panel: str) -> OptionInfo:
    """The same option, listed under ``panel`` in --help."""
    listed = copy.copy(option)
    listed.rich_help_panel = panel
    return listed


def config_options(values: Mapping[str, Any], cli_only: Collection[str]) -> dict[str, Any]:
    """A command's named values (its ``locals()``, taken before the body binds anything) as its config's
    flat options: all but ``cli_only``, the ones only the command line reads (--json, --quiet, ...)."""
    return {name: value for name, value in values.items() if name not in cli_only}
