"""Import every package under extensions/ so each architecture registers itself."""

from __future__ import annotations

import importlib
import pkgutil

import extensions


def load_extensions() -> list[str]:
    """Import all extension packages (idempotent); returns their module names."""
    names = []
    for info in pkgutil.iter_modules(extensions.__path__):
        if info.ispkg:
            importlib.import_module(f"extensions.{info.name}")
            names.append(info.name)
    return names
