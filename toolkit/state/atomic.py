"""Atomic writes: a kill at any moment leaves either the old file (or folder) or the complete new one.

Files are written under a temporary name in the same folder, flushed to disk, then renamed into place (rename is
atomic on POSIX). Folders are built under a temporary name, flushed, then swapped in with the old one moved aside
first, so the two are never mixed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable


def _umask() -> int:
    """The process umask. Linux reports it in /proc without changing it; elsewhere set-and-restore (not thread-safe,
    but a brief window in which only this process's own new files could get a different mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one, with the mode any
    new file gets under the user's umask (0644 under 022): mkstemp's private 0600 must not survive the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_paths(paths: Iterable[Path]) -> None:
    """Flush files and folders to disk; a path that cannot be opened (some platforms' folders) is skipped, the
    rename that follows is atomic all the same."""
    for path in paths:
        try:
            fd = os.open(str(path), os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_in_folder(tmp: Path, final: Path) -> None:
    """Move a complete folder `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_paths([final.parent])
