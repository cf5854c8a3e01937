"""Help pages in the usual command-line style: ``MODEL``, ``--eps TEXT``, flags without a type.

Recent Typer versions print Python type tags (``{model}``, ``<str>``, ``<bool>``) that readers
of other tools' help do not expect. ``restyle`` rewrites every parameter's
display once, when the command tree is built (``robench.cli.group``); what the parameters
accept is unchanged.
Versions of Typer that do not print such tags are left as they are.
"""

from __future__ import annotations

from typing import Any


def restyle(command: Any) -> None:
    """Restyle the parameters a command shows, its --help included (made when help is asked for)."""
    listed = command.get_params

    def get_params(ctx: Any) -> list[Any]:
        params = listed(ctx)
        for param in params:
            _restyle_param(param)
        return params

    command.get_params = get_params
    for sub in getattr(command, "commands", {}).values():
        restyle(sub)


def _restyle_param(param: Any) -> None:
    # By click's own kind name: Typer may bring its own copy of click, so no isinstance.
    if param.param_type_name == "option":
        _restyle_option(param)
    elif param.param_type_name == "argument":
        _restyle_argument(param)


def _restyle_option(option: Any) -> None:
    if option.is_flag or option.count:
        option.metavar = ""  # a flag takes no value: no type to show
    elif option.metavar is None:
        option.metavar = _value_name(option)


_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "bool": "BOOLEAN"}


def _value_name(option: Any) -> str | None:
    """TEXT, INTEGER, FLOAT, PATH: click's conventional names for what follows the option."""
    kind = getattr(option, "type", None)
    if kind is not None:  # click proper
        return kind.name.upper()
    try:
        shown = option.display_type(None)  # Typer's own tag, e.g. <str> or <list[str]>
    except Exception:  # noqa: BLE001 - unknown Typer internals: keep its display
        return None
    bare = shown.strip("<>").removeprefix("list[").removesuffix("]")
    return _NAMES.get(bare, bare.upper())


def _restyle_argument(argument: Any) -> None:
    name = (argument.metavar or argument.name or "ARG").upper()
    argument.metavar = name
    if hasattr(argument, "display_type_rich"):
        argument.display_type_rich = lambda ctx: None  # the name says what it is
    if hasattr(argument, "_usage_display_name"):
        usage = name if argument.required else f"[{name}]"
        argument._usage_display_name = lambda: usage + ("..." if argument.nargs != 1 else "")
