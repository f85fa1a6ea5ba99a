"""Name -> object tables that extensions fill when imported (architectures, renderers, LoRA key layouts, model-card
facts): one shape for all of them, each with its own error for an unknown name."""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, unknown: Callable[[str, str], Exception]) -> None:
        """`unknown(name, known)` builds the error raised by get() for a name nobody registered; `known` lists the
        registered names ("none registered" when empty)."""
        self._items: dict[str, T] = {}
        self._unknown = unknown

    def add(self, name: str, item: T) -> T:
        """Register `item` under `name`; registering the same object again is a no-op, another one an error."""
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{name!r} registered twice")
        self._items[name] = item
        return item

    def find(self, name: str) -> Optional[T]:
        return self._items.get(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self._unknown(name, ", ".join(sorted(self._items)) or "none registered") from None

    def names(self) -> list[str]:
        return sorted(self._items)
