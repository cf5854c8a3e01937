"""The attack registry (names are case-insensitive; ``ta.*`` routes to torchattacks)."""

from __future__ import annotations

from robench.registry import Registry

ATTACKS: Registry[type] = Registry("attack")
