"""The attack registry: names (case-insensitive) to attack classes.

Three sources, none needing a side-effect import of robench's own modules:

* the built-in attacks, listed below by import path and imported on first lookup;
* ``ta.<Name>``: any torchattacks attack, through the adapter (an optional extra);
* user attacks: ``robench.register_attack(cls)``, modules named by ``--plugin`` or a
  suite's ``plugins:`` (imported before validation; they call ``register_attack``), and
  installed packages declaring an entry point in the group ``robench.attacks``
  (``name = "package.module:AttackClass"``), discovered when a name is not found.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

from robench.errors import UsageError
from robench.registry import Registry

if TYPE_CHECKING:
    from robench.attacks.base import Attack

BUILTIN_ATTACKS = {
    "fgsm": "robench.attacks.fgsm:FGSM",
    "bim": "robench.attacks.bim:BIM",
    "pgd": "robench.attacks.pgd:PGD",
    "mifgsm": "robench.attacks.mifgsm:MIFGSM",
    "apgd": "robench.attacks.apgd:APGD",
    "apgd-ce": "robench.attacks.apgd:APGDCE",
    "apgd-dlr": "robench.attacks.apgd:APGDDLR",
    "apgd-t": "robench.attacks.apgd_targeted:APGDTargeted",
    "fab-t": "robench.attacks.fab:FABTargeted",
    "fab": "robench.attacks.fab_untargeted:FAB",
    "fmn": "robench.attacks.fmn:FMN",
    "square": "robench.attacks.square:Square",
    "autoattack": "robench.attacks.autoattack:AutoAttack",
    "pixels": "robench.attacks.pixels:PixelChange",
    "dmr": "robench.attacks.dmr:GeneratorAttack",
}
ENTRY_POINT_GROUP = "robench.attacks"
TA_PREFIX = "ta."


class AttackRegistry(Registry["type[Attack]"]):
    def __init__(self, builtins: dict[str, str]) -> None:
        super().__init__("attack")
        self._builtins = dict(builtins)
        self._entry_points_loaded = False

    def add(self, name: str, obj: type[Attack]) -> None:
        check_attack_class(obj)
        key = name.lower()
        if key in self._builtins or key.startswith(TA_PREFIX):
            raise UsageError(f"attack name {name!r} is taken by robench; register {obj.__name__} under another name")
        if key in self._items and self._items[key] is not obj:
            existing = self._items[key]
            raise UsageError(f"attack {name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
        self._items[key] = obj

    def get(self, name: str) -> type[Attack]:
        key = name.lower()
        if name.startswith(TA_PREFIX):
            from robench.attacks.torchattacks_adapter import torchattacks_attack

            return torchattacks_attack(name)
        if key in self._builtins:
            module, _, attr = self._builtins[key].partition(":")
            return getattr(importlib.import_module(module), attr)
        if key not in self._items:
            self.load_entry_points()
        return super().get(name)

    def __contains__(self, name: str) -> bool:
        key = name.lower()
        if key in self._builtins or super().__contains__(key):
            return True
        self.load_entry_points()
        return super().__contains__(key)

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(set(self._builtins) | set(super().names()))

    def load_entry_points(self) -> None:
        """Register the attacks installed packages declare (once; a broken one is named)."""
        if self._entry_points_loaded:
            return
        # Marked loaded only when all loaded: a broken plugin is named again at the next lookup.
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = point.load()
            except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported as one line
                raise UsageError(f"attack plugin {point.name} ({point.value}) failed to load: {exc}") from exc
            if cls not in self._items.values():
                self.add(point.name, cls)
        self._entry_points_loaded = True


def check_attack_class(cls: Any) -> None:
    """A registered attack must be an ``Attack`` subclass with a name and a parameter model."""
    from robench.attacks.base import Attack, AttackParams

    if not (inspect.isclass(cls) and issubclass(cls, Attack)):
        raise UsageError(f"{cls!r} is not an attack: subclass robench.attacks.Attack")
    if not (inspect.isclass(cls.Params) and issubclass(cls.Params, AttackParams)):
        raise UsageError(f"{cls.__name__}.Params must subclass robench.attacks.AttackParams")
    from robench.attacks.gradient import GradientAttack

    if cls.run is Attack.run or (issubclass(cls, GradientAttack) and cls.step is GradientAttack.step):
        raise UsageError(f"{cls.__name__} writes neither run nor step")


ATTACKS = AttackRegistry(BUILTIN_ATTACKS)


def register_attack(cls: type[Attack] | None = None, *, name: str | None = None) -> Any:
    """Register an attack class under ``name`` (default: its ``name`` attribute); usable as a decorator."""

    def add(attack: type[Attack]) -> type[Attack]:
        ATTACKS.add(name or attack.name, attack)
        return attack

    return add if cls is None else add(cls)


def _working_folder_importable() -> None:
    """The working folder on the import path, as ``python -m`` has it: ``my_attacks.py`` beside the
    suite imports through the installed ``robench`` script too. Appended, never first, so a file
    there cannot shadow an installed package; only modules the user named are imported from it."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def load_plugins(modules: list[str] | tuple[str, ...], where: str = "--plugin") -> None:
    """Import plugin modules (they register their attacks); a failure is one line naming the module."""
    if modules:
        _working_folder_importable()
    for module in modules:
        if not isinstance(module, str) or not module.replace(".", "").replace("_", "").isalnum():
            raise UsageError(f"{where}: {module!r} is not a module name (e.g. my_package.attacks)")
        try:
            importlib.import_module(module)
        except UsageError:
            raise
        except ModuleNotFoundError as exc:
            hint = (f" (run from the folder holding {module.replace('.', '/')}.py, or put its folder on "
                    "PYTHONPATH)") if exc.name == module.split(".")[0] else ""
            raise UsageError(f"{where}: cannot import {module}: ModuleNotFoundError: {exc}{hint}") from exc
        except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported as one line
            raise UsageError(f"{where}: cannot import {module}: {type(exc).__name__}: {exc}") from exc
