"""Identities for cache keys: a hash of everything that changes an encoder's output (toolkit.data.cache).

Modules are identified by their weights as loaded (`module_fingerprint`); model component folders by their files'
contents (`folder_fingerprint`), so a key can be computed without loading the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

CACHE_VERSION = 1  # bump when the meaning of a key or the file layout changes


def make_key(kind: str, parts: Mapping[str, Any]) -> str:
    """`<kind>-<hash>` of `parts` (JSON-able values; tuples count as lists)."""
    text = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:40]}"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: survives copies and touches, changes with any edit."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _word_sum(tensor: torch.Tensor) -> int:
    """Sum of the tensor's raw bytes read as 32-bit words: exact integer arithmetic, so the same on any device, any
    thread count and any reduction order; computed where the tensor lives, without a copy."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if raw.numel() % size == 0:
            return int(raw.view(dtype).sum(dtype=torch.int64))
    return int(raw.sum(dtype=torch.int64))


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _content_digest(path: Path) -> str:
    """SHA-256 of a file, once per process per (file, size, mtime). A Hub cache file that resolves to
    blobs/<64 hex> is named by its SHA-256 already (git-lfs): that name is used without reading 10 GB."""
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    stat = real.stat()
    memo = (str(real), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = file_digest(real)
    return _DIGESTS[memo]


def folder_fingerprint(folder: Path) -> str:
    """Identity of a model component folder's files (names and contents), without loading the model."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f"{path.name}|{_content_digest(path)};".encode("utf-8"))
    return h.hexdigest()[:40]


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module) -> str:
    """Identity of a module's weights: every state-dict entry's name, shape, dtype and word sum."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{_word_sum(tensor)};".encode("utf-8"))
    return h.hexdigest()[:40]


__all__ = ["CACHE_VERSION", "file_digest", "folder_fingerprint", "make_key", "module_fingerprint"]
