"""The attack registry (names are case-insensitive; ``ta.*`` routes to torchattacks).

The built-in attacks are listed here by name and import path, so the registry
is complete as soon as this module is imported: no other module has to be
imported first for its decorators to run. Their modules are imported on the
first lookup of one of their names; the ``@ATTACKS.register`` decorators in
those modules then confirm the entry instead of adding a new one.
"""

from __future__ import annotations

import importlib

from robench.registry import Registry

BUILTIN_ATTACKS = {
    "fgsm": "robench.attacks.gradient:FGSM",
    "bim": "robench.attacks.gradient:BIM",
    "pgd": "robench.attacks.gradient:PGD",
    "mifgsm": "robench.attacks.gradient:MIFGSM",
    "pixels": "robench.pixels.attack:PixelChange",
    "dmr": "robench.reid.generator:GeneratorAttack",
}


class AttackRegistry(Registry[type]):
    """A registry whose built-in entries are import paths, resolved when first needed."""

    def __init__(self, builtins: dict[str, str]) -> None:
        super().__init__("attack")
        self._lazy = dict(builtins)

    def add(self, name: str, obj: type) -> None:
        key = name.lower()
        if key in self._lazy and self._lazy[key] == f"{obj.__module__}:{obj.__qualname__}":
            self._resolved(key, obj)
            return
        if key in self._lazy:
            raise ValueError(f"attack {name!r} is built in ({self._lazy[key]}); register under another name")
        super().add(name, obj)

    def get(self, name: str) -> type:
        key = name.lower()
        if key in self._lazy:
            module, _, attr = self._lazy[key].partition(":")
            found = getattr(importlib.import_module(module), attr)
            if key in self._lazy:  # the module's decorator normally resolved it already
                self._resolved(key, found)
        return super().get(name)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._lazy or super().__contains__(name)

    def names(self) -> list[str]:
        return sorted(set(self._lazy) | set(super().names()))

    def _resolved(self, key: str, obj: type) -> None:
        self._lazy.pop(key, None)
        self._items[key] = obj


ATTACKS = AttackRegistry(BUILTIN_ATTACKS)
