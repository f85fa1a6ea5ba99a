"""The naming and pruning rules of step checkpoints, and the run folder of a training run.

Old checkpoints are removed only after the new one is complete (writes: toolkit.state.atomic).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)


def step_file_name(name: str, step: int) -> str:
    """`<name>_<step:09d>.safetensors`, ai-toolkit's naming, so tools that sort by name sort by step."""
    return f"{name}_{step:09d}.safetensors"


def list_step_files(folder: Path, name: str) -> list[tuple[int, Path]]:
    """Complete step checkpoints of run `name` in `folder`, oldest first (temporary files are never matched)."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")
    found = []
    for p in Path(folder).glob(f"{name}_*.safetensors"):
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_step_files(folder: Path, name: str, keep: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (keep=0 keeps none); returns what was deleted."""
    protected = {Path(p).resolve() for p in protect}
    files = list_step_files(folder, name)
    doomed = [p for _, p in (files[:-keep] if keep > 0 else files) if p.resolve() not in protected]
    for p in doomed:
        p.unlink(missing_ok=True)
        log.debug("removed old checkpoint %s", p)
    return doomed


def latest_step_file(folder: Path, name: str) -> Optional[tuple[int, Path]]:
    files = list_step_files(folder, name)
    return files[-1] if files else None


def run_versions(training_folder: Path, name: str) -> list[tuple[int, Path]]:
    """Existing folders of run `name`, oldest first: `<name>` is version 1, then `<name>_v2`, `<name>_v3`..."""
    root = Path(training_folder)
    found = [(1, root / name)] if (root / name).is_dir() else []
    pattern = re.compile(rf"^{re.escape(name)}_v(\d+)$")
    if root.is_dir():
        for p in root.iterdir():
            m = pattern.match(p.name)
            if m and int(m.group(1)) >= 2 and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def run_has_outputs(folder: Path) -> bool:
    """True when a run folder holds anything a new run would overwrite (config copy, LoRA files, states)."""
    folder = Path(folder)
    return (folder / "config.yaml").exists() or any(folder.glob("*.safetensors")) or any(
        (folder / "state").glob("[0-9]*"))


def resolve_run_folder(training_folder: Path, name: str, fresh: bool) -> tuple[Path, str]:
    """The run folder and file prefix to use: the newest version of run `name`; with `fresh`, a new version
    (`<name>_v<N+1>`) when the newest one already holds outputs. Old versions are never touched."""
    versions = run_versions(training_folder, name)
    if not versions:
        return Path(training_folder) / name, name
    version, folder = versions[-1]
    if fresh and run_has_outputs(folder):
        new_name = f"{name}_v{version + 1}"
        return Path(training_folder) / new_name, new_name
    return folder, folder.name
