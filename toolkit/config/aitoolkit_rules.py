"""The kinds of disposition an ai-toolkit key can have here; toolkit/config/aitoolkit.py holds the table of keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

__all__ = ["DROP", "EMPTY", "Mapped", "NoEffect", "Refused", "Rule", "Unsupported", "is_empty", "same_value"]


def is_empty(value: Any) -> bool:
    """None, '', False, 0, or a list/dict holding only such values: the "nothing set" of ai-toolkit's optional keys."""
    if isinstance(value, dict):
        return all(is_empty(item) for item in value.values())
    if isinstance(value, list):
        return all(is_empty(item) for item in value)
    return value is None or value == "" or value is False or (type(value) in (int, float) and value == 0)


def same_value(value: Any, off: Any) -> bool:
    """YAML-value equality that keeps booleans apart from numbers (``1 == True`` in Python)."""
    if isinstance(value, bool) or isinstance(off, bool):
        return type(value) is type(off) and value == off
    return value == off


@dataclass(frozen=True)
class Mapped:
    """Written as our key ``target`` (a key path from the process; in ``datasets[]`` from the dataset), through
    ``convert`` when the value is spelled differently. ``unless_set``: ai-toolkit lets ``target`` win when both are
    given (``network.alpha`` vs ``linear_alpha``), so the key then has no effect instead of conflicting."""

    target: str
    why: str = ""
    convert: Optional[Callable[[Any], Any]] = None
    unless_set: bool = False


@dataclass(frozen=True)
class NoEffect:
    """Cannot change a Kontext LoRA run here, whatever its value."""

    why: str


@dataclass(frozen=True)
class Unsupported:
    """Changes training unless it is "off": one of the values in the tuple ``off``, or ``off(value, section)`` is
    true (``section``: the mapping holding the key, for offs that depend on a sibling key)."""

    off: Union[tuple, Callable[[Any, dict], bool]]
    why: str

    def is_off(self, value: Any, section: dict) -> bool:
        return self.off(value, section) if callable(self.off) else any(same_value(value, off) for off in self.off)


@dataclass(frozen=True)
class Refused:
    """A value of one of our keys that ai-toolkit accepts and this trainer does not implement."""

    why: str


Rule = Union[Mapped, NoEffect, Unsupported]
EMPTY = lambda value, section: is_empty(value)  # noqa: E731 - null, '', [] or {} (ai-toolkit's "not set")
DROP = object()  # a VALUES replacement: remove the key, our default means the same
