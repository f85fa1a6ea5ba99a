"""The building blocks of config fields: value rules (``Check``), field metadata (``_meta``) and value normalisers.

Used by ``schema.py``; the loader reads the metadata they produce (see the schema module's docstring).
"""

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

@dataclass(frozen=True)
class Check:
    """A value rule: ``test(value)`` must hold; ``rule`` completes "must be ..." in errors and help."""

    test: Callable[[Any], bool]
    rule: str

    def problem(self, value: Any) -> Optional[str]:
        """Return the error text for ``value``, or None when it passes (None values always pass)."""
        if value is None or self.test(value):
            return None
        return f"must be {self.rule}, got {value!r}"


def _meta(help_text: str, *checks: Check, **extra: Any) -> dict[str, Any]:
    """Build a field's metadata: its help line, its value checks and any extra loader keys."""
    return {"help": help_text, "checks": checks, **extra}


def _expand_home(path: str) -> str:
    """Expand a leading ``~`` to the user's home folder; other paths are returned unchanged."""
    return os.path.expanduser(path) if path.startswith("~") else path


def _expand_folders(value: Union[str, list[str]]) -> Union[str, list[str]]:
    """``_expand_home`` on one folder or on each folder of a list."""
    return _expand_home(value) if isinstance(value, str) else [_expand_home(item) for item in value]


def folder_list(value: Union[str, list[str], None]) -> list[str]:
    """A ``control_path``-like value as a list of folders: None -> [], one folder -> [it]."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _one_size_to_list(value: Any) -> Any:
    """Accept a bare size (``resolution: 512``) as a one-element list."""
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


GT0 = Check(lambda v: v > 0, "> 0")
GE0 = Check(lambda v: v >= 0, ">= 0")
GE1 = Check(lambda v: v >= 1, ">= 1")
NON_EMPTY = Check(lambda v: len(v.strip() if isinstance(v, str) else v) > 0, "non-empty")
FOLDERS = Check(lambda v: len(folder_list(v)) > 0 and all(f.strip() for f in folder_list(v)),
                "a non-empty folder or list of non-empty folders")
UNIQUE = Check(lambda v: len(set(v)) == len(v), "free of duplicates")
SIZE16 = Check(lambda v: v >= 16 and v % 16 == 0, "a multiple of 16 and >= 16")
RESOLUTION = Check(lambda v: v >= 64 and v % 16 == 0, "a multiple of 16 and >= 64")
DEVICE = Check(lambda v: re.fullmatch(r"cpu|cuda|cuda:\d+|mps|auto", v) is not None,
               "one of cpu, cuda, cuda:N, mps, auto")
FILE_NAME = Check(lambda v: "/" not in v and "\\" not in v and v not in (".", ".."),
                  "a plain name without path separators")
PROBABILITY = Check(lambda v: 0 <= v <= 1, "in [0, 1]")
DROPOUT = Check(lambda v: 0 <= v < 1, "in [0, 1)")
OPEN_UNIT = Check(lambda v: 0 < v < 1, "in (0, 1)")
T5_LENGTH = Check(lambda v: 1 <= v <= 512, "in [1, 512]")
HUB_REPO_ID = Check(lambda v: re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", v) is not None and len(v) <= 96
                    and ".." not in v and "--" not in v and not v.endswith((".git", ".")),
                    "a Hub repository id 'namespace/name' (letters, digits, - _ .; no '--' or '..')")
