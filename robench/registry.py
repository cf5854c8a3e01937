"""One registry type for attacks, suites, datasets and layouts.

Lookups of unknown names raise a ``UsageError`` with a did-you-mean hint.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from robench.errors import UsageError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    by_lower = {c.lower(): c for c in choices}
    if close:
        return "; did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"
    return "; known: " + ", ".join(sorted(choices))


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        key = name.lower()
        if key in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[key] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name.lower()]
        except KeyError:
            raise UsageError(f"unknown {self.kind} {name!r}" + did_you_mean(name, self.names())) from None

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
