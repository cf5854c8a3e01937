"""The command group: conventional help pages and options whose value may be left out."""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup

from robench.cli.help_style import restyle

# Options that may be given bare: --save-adversarial alone means every sample. Click has
# optional values (flag_value) but Typer does not pass them on, so the bare form is
# completed before parsing: the default is inserted when the option ends the command line
# or another option follows it. Any other next word is its value, checked as such (so
# `--save-adversarial abc` is an error about that option, not a stray argument).
OPTIONAL_VALUES: dict[str, tuple[str, Any]] = {
    "--save-adversarial": ("all", lambda word: not word.startswith("-") or word[1:].isdigit()),
}


class RobenchGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        restyle(self)
        for command in self.commands.values():
            _complete_bare_options(command)


def _complete_bare_options(command: Any) -> None:
    names = {opt for param in command.params for opt in getattr(param, "opts", ())} & set(OPTIONAL_VALUES)
    if not names:
        return
    parse = command.parse_args

    def parse_args(ctx: Any, args: list[str]) -> list[str]:
        return parse(ctx, with_bare_values(args, names))

    command.parse_args = parse_args


def with_bare_values(args: list[str], names: set[str]) -> list[str]:
    out: list[str] = []
    for i, word in enumerate(args):
        out.append(word)
        if word == "--":
            out += args[i + 1:]
            break
        if word in names:
            default, is_value = OPTIONAL_VALUES[word]
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or not is_value(following):
                out.append(default)
    return out
