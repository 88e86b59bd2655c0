"""A small name -> plugin registry whose unknown names fail with suggestions.

A plugin is either registered when its module is imported (`register`), or declared beforehand with
the module that registers it and a line describing it (`declare`): the names and descriptions are
then known without importing the plugin (the command line's choices and help are built from them
before torch is imported), and `get` imports the module the first time the plugin is asked for.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, NamedTuple, TypeVar

from depthcut.errors import DepthcutError

T = TypeVar("T")


class Declaration(NamedTuple):
    module: str
    description: str


class Registry(Generic[T]):
    """Maps names to plugins; `get` of an unknown name lists the closest valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._declared: dict[str, Declaration] = {}

    def declare(self, name: str, module: str, description: str) -> None:
        """`module`, once imported, registers the plugin `name`; `description` is its one-line summary."""
        if name in self._declared:
            raise ValueError(f"{self.kind} {name!r} is declared twice")
        self._declared[name] = Declaration(module, description)

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._declared:
            importlib.import_module(self._declared[name].module)
            if name not in self._entries:
                raise ValueError(f"{self._declared[name].module} did not register the {self.kind} {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DepthcutError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}."
            ) from None

    def check(self, name: str) -> None:
        """Raise `get`'s error for an unknown name, without importing a declared plugin."""
        if name not in self:
            self.get(name)

    def description(self, name: str) -> str:
        """The declared one-line summary, else the plugin's own `description` attribute."""
        if name in self._declared:
            return self._declared[name].description
        return getattr(self.get(name), "description", "")

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._declared))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._declared

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
