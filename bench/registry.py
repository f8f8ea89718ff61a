"""Name -> object registries with lazy imports.

An entry is registered as a dotted path "package.module:attribute" and only
imported when it is first looked up, so a missing optional dependency breaks
only the entry that needs it, and listing names costs no imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from bench.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._targets: dict[str, str | T] = {}
        self._loaded: dict[str, T] = {}

    def register(self, name: str, target: str | T | None = None):
        """Register `target` (an object or "module:attr") under `name`.

        Used bare as a decorator: ``@REG.register("name")``.
        """
        if target is None:
            def deco(obj: T) -> T:
                self.register(name, obj)
                return obj

            return deco
        if name in self._targets:
            raise RegistryError(f"duplicate {self.kind} name {name!r}: it is already registered")
        self._targets[name] = target
        return target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str) -> None:
        if name not in self._targets:
            import difflib

            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}.{hint}"
            )

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._loaded:
            target = self._targets[name]
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                obj: Any = importlib.import_module(module)
                for part in filter(None, attr.split(".")):
                    obj = getattr(obj, part)
                target = obj
            self._loaded[name] = target  # type: ignore[assignment]
        return self._loaded[name]

    def target(self, name: str) -> str | T:
        self.check(name)
        return self._targets[name]
